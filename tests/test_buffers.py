"""Cache-line-aligned buffers (refimpl.kernels.buffers) and the C wrappers' outputs."""
import numpy as np
import pytest

from refimpl.kernels import get
from refimpl.kernels.buffers import aligned_copy, aligned_empty


@pytest.mark.parametrize("shape, dtype", [((3, 5), np.float32), (7, np.float64), ((0, 4), np.float32),
                                          ((2, 3, 4), np.int64)])
def test_aligned_empty_and_copy(shape, dtype):
    for _ in range(20):                     # many allocations: NumPy's own offsets vary between them
                                            # (an empty array has no data to align)
        a = aligned_empty(shape, dtype)
        assert (a.size == 0 or a.ctypes.data % 64 == 0) and a.flags.c_contiguous and a.dtype == dtype
        assert a.shape == ((shape,) if isinstance(shape, int) else shape)
    src = np.arange(int(np.prod(shape)), dtype=dtype).reshape(shape)
    c = aligned_copy(src)
    assert (c.size == 0 or c.ctypes.data % 64 == 0) and np.array_equal(c, src) and c.dtype == src.dtype


def test_c_outputs_start_on_a_cache_line():
    x = np.ones((3, 17), np.float32)
    for _ in range(10):
        assert get("softmax", "c")(x).ctypes.data % 64 == 0
        assert get("matmul", "c")(x, x.T.copy()).ctypes.data % 64 == 0
        assert get("silu", "c")(x).ctypes.data % 64 == 0
