"""Argument checks of the verify API: assert_within / error_stats `bound`, check's `impl`,
write_trace's `dtype`."""
import numpy as np
import pytest

from refimpl.verify import assert_within, check, error_stats
from refimpl.verify.trace import read_trace, write_trace


@pytest.mark.parametrize("fn", [assert_within, error_stats])
def test_bound_of_the_wrong_shape_is_a_value_error_naming_bound(fn):
    with pytest.raises(ValueError, match=r"bound of shape \(3,\) does not broadcast to want's shape \(2, 2\)"):
        fn(np.zeros((2, 2)), np.zeros((2, 2)), np.ones(3))


@pytest.mark.parametrize("fn", [assert_within, error_stats])
@pytest.mark.parametrize("bad", [np.nan, -1e-3, [1e-3, np.nan]])
def test_nan_or_negative_bound_is_a_value_error_naming_bound(fn, bad):
    with pytest.raises(ValueError, match=r"bound must be >= 0 and not NaN"):
        fn(np.array([1.0, 2.0]), np.array([1.0, 2.5]), bad)


def test_infinite_bound_is_unchecked_and_nan_bound_where_the_oracle_is_nonfinite_is_unused():
    s = assert_within(np.array([1.5, 1e3]), np.array([1.0, 2.0]), np.inf)
    assert s.bound_ratio == 0.0
    want = np.array([np.nan, np.inf, 1.0])       # contract bounds are NaN at non-finite oracle entries
    assert_within(want.copy(), want, np.array([np.nan, np.nan, 1e-6]))


def test_check_refuses_a_non_callable_impl():
    with pytest.raises(TypeError, match=r"^check: impl must be callable, got str$"):
        check("np.exp", "softmax")


@pytest.mark.parametrize("dtype", [np.float32, np.dtype("float32"), "float32"])
def test_write_trace_normalises_the_dtype_name(tmp_path, dtype):
    write_trace(tmp_path / "t.safetensors", {"embed": np.zeros((2, 4), np.float32)}, [1, 2], dtype)
    assert read_trace(tmp_path / "t.safetensors")[1]["dtype"] == "float32"


@pytest.mark.parametrize("dtype", ["fp32", np.int32, None])
def test_write_trace_refuses_an_unknown_dtype(tmp_path, dtype):
    with pytest.raises(ValueError, match=r"dtype must be one of float32, float64, float16, bfloat16"):
        write_trace(tmp_path / "t.safetensors", {"embed": np.zeros((2, 4))}, [1, 2], dtype)


def test_error_stats_take_torch_tensors_that_require_grad():
    """A port's activations are often graph tensors: before, np.asarray raised torch's
    "Can't call numpy() on Tensor that requires grad"."""
    from conftest import require
    torch = require("torch")
    want = np.array([1.0, 2.0, 3.0])
    got = torch.tensor([1.0, 2.0, 3.5], requires_grad=True) * 1
    s = error_stats(got, want, np.full(3, 0.25))
    assert s.max_abs == 0.5 and s.bound_ratio == 2.0 and s.worst_index == (2,)
    with pytest.raises(AssertionError):
        assert_within(got, torch.from_numpy(want), torch.full((3,), 0.25))
    assert_within(got, want, np.full(3, 0.5))
