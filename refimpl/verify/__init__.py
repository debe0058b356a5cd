"""The verifier: compare anyone's implementation with the oracle under error bounds.

    error_stats / assert_within      compare one result with the oracle (compare.py)
    check(impl, op, ...)             edge cases + hypothesis for a user's implementation (check.py)
    load_c(lib, symbol, signature, op)   a C function from a shared library, callable by check (cabi.py)
"""
from refimpl.verify.compare import ErrorStats, assert_within, error_stats
# imported here, not on first call: importing the submodule `check` later would rebind this
# package's attribute `check` from the function to the module (hypothesis, a test dependency,
# is imported inside check() when it runs hypothesis examples)
from refimpl.verify.check import check


def load_c(lib, symbol, signature, op):
    """See refimpl.verify.cabi.load_c."""
    from refimpl.verify.cabi import load_c as _load
    return _load(lib, symbol, signature, op)


__all__ = ["ErrorStats", "assert_within", "error_stats", "check", "load_c"]
