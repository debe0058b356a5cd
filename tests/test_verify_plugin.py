"""The pytest plugin: `refimpl_check` fixture, exercised with pytester."""
pytest_plugins = ["pytester"]


def test_refimpl_check_fixture_passes_and_fails(pytester):
    pytester.makepyfile(test_user="""
        import numpy as np

        def good_softmax(x):
            e = np.exp(x - x.max(axis=-1, keepdims=True))
            return e / e.sum(axis=-1, keepdims=True)

        def bad_softmax(x):                       # no max shift: overflows near 88
            e = np.exp(x)
            return e / e.sum(axis=-1, keepdims=True)

        def test_good(refimpl_check):
            report = refimpl_check(good_softmax, op="softmax", examples=10)
            assert report.passed

        def test_bad(refimpl_check):
            refimpl_check(bad_softmax, op="softmax", examples=10)
    """)
    result = pytester.runpytest_subprocess("-q", "-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.fnmatch_lines(["*FAIL refimpl verify*bad_softmax*softmax*", "*logits near exp overflow*"])
    # pytest.fail(pytrace=False): the report, not a traceback into refimpl
    assert "refimpl/verify/check.py" not in result.stdout.str()


def test_fixture_is_registered_by_the_entry_point(pytester):
    pytester.makepyfile(test_fx="""
        def test_fixture_exists(refimpl_check):
            assert callable(refimpl_check)
    """)
    result = pytester.runpytest_subprocess("-q")
    result.assert_outcomes(passed=1)
