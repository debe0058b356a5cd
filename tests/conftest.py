"""Shared test set-up: hypothesis profiles and the optional-dependency rule.

Profiles: `ci` (loaded when CI is set: derandomized, no deadline, no example
database), `dev` (default: fewer examples), `nightly` (thousands).  Select one
with HYPOTHESIS_PROFILE=name.
"""
import importlib
import os

import pytest
from hypothesis import HealthCheck, settings

settings.register_profile("ci", derandomize=True, deadline=None, database=None, max_examples=60,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("dev", deadline=None, max_examples=30,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.register_profile("nightly", deadline=None, max_examples=2000,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE") or ("ci" if os.environ.get("CI") else "dev"))


def require(module: str):
    """Import an optional dependency; skip without it, but fail when CI is set."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        if os.environ.get("CI"):
            pytest.fail(f"CI is set and optional dependency {module!r} is missing: {e}")
        pytest.skip(f"optional dependency {module!r} not installed")
