"""The verifier: compare anyone's implementation with the oracle under error bounds."""
from refimpl.verify.compare import ErrorStats, assert_within, error_stats

__all__ = ["ErrorStats", "assert_within", "error_stats"]
