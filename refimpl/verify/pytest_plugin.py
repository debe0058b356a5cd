"""pytest plugin (entry point `pytest11: refimpl`): the `refimpl_check` fixture.

    def test_my_softmax(refimpl_check):
        refimpl_check(my_softmax, op="softmax")            # fails the test with the report
        report = refimpl_check(my_gemm, op="matmul", examples=200)

`refimpl_check(impl, op, **options)` runs `refimpl.verify.check` (same
arguments) and calls `pytest.fail` with the printed report when the
implementation is out of its error bound; on success it returns the report.

This module is imported by every pytest run in an environment where refimpl
is installed, so it imports nothing heavy until the fixture is used.
"""
from __future__ import annotations

import pytest


@pytest.fixture
def refimpl_check():
    """Check an implementation against the refimpl oracle; fail the test on a bound violation."""
    def run(impl, op: str, **options):
        from refimpl.verify.check import check
        report = check(impl, op, **options)
        if not report.passed:
            pytest.fail(report.text(), pytrace=False)
        return report
    return run
