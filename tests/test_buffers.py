"""Cache-line-aligned buffers (refimpl.kernels.buffers) and the C wrappers' outputs."""
import numpy as np
import pytest

from refimpl.kernels import get
from refimpl.kernels.buffers import PAGE, aligned_copy, aligned_empty, apart_empty, apart_zeros, spread_copies


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


@pytest.mark.parametrize("backend", ["c", "numba"])
@pytest.mark.parametrize("op", ["softmax", "gelu_tanh", "silu", "rms_norm", "layer_norm"])
def test_outputs_start_half_a_page_after_their_input(op, backend):
    """A C or Numba kernel's output starts 2 KiB (mod 4 KiB) after its input x, whatever the
    allocator hands out: at 64 bytes C gelu_tanh ran 29 % slower (4K aliasing)."""
    x = aligned_copy(np.linspace(-2, 2, 64 * 96, dtype=np.float32).reshape(64, 96))
    args = {"rms_norm": (np.ones(96, np.float32),), "layer_norm": (np.ones(96, np.float32),
                                                                    np.zeros(96, np.float32))}.get(op, ())
    for _ in range(5):
        out = get(op, backend)(x, *args)
        assert (out.ctypes.data - x.ctypes.data) % PAGE == PAGE // 2


@pytest.mark.parametrize("like_offset", [0, 16, 64, 1000, 4032])
def test_apart_empty_and_zeros_sit_half_a_page_from_their_input(like_offset):
    raw = aligned_empty(3 * PAGE, np.uint8)
    like = raw[like_offset:like_offset + PAGE].view(np.float32)
    for _ in range(20):                     # whatever NumPy's allocator hands out
        out = apart_zeros((2, 300), np.float32, like=like)
        assert out.shape == (2, 300) and out.dtype == np.float32 and out.flags.c_contiguous
        assert not out.any() and out.ctypes.data % 64 == 0
        # half a page from `like`, rounded up to the next cache line when `like` is off one
        d = (out.ctypes.data - like.ctypes.data) % PAGE
        assert PAGE // 2 <= d < PAGE // 2 + 64
        e = apart_empty(7, np.float64, like=like, apart=1024)
        assert e.shape == (7,) and e.dtype == np.float64 and 1024 <= (e.ctypes.data - like.ctypes.data) % PAGE < 1088
    with pytest.raises(ValueError, match="multiple of 64"):
        apart_zeros(4, np.float32, like=like, apart=100)


def test_numba_gemv_output_is_apart_from_the_matrix():
    a = aligned_copy(np.ones((1, 64), np.float32))
    b = aligned_copy(np.ones((64, 96), np.float32))
    for _ in range(5):
        out = get("matmul", "numba")(a, b)
        assert (out.ctypes.data - b.ctypes.data) % PAGE == PAGE // 2
        assert np.array_equal(out, np.full((1, 96), 64, np.float32))


def test_spread_copies_places_every_array_the_same_way():
    """Of n arrays the i-th starts i*(PAGE/2)/n bytes past a page (on a line), whatever the
    allocator hands out, and holds the same values in the same dtype and shape."""
    src = [np.arange(12, dtype=np.float32).reshape(3, 4), np.arange(5, dtype=np.int64),
           np.ones((2, 2, 2), np.float64)]
    for _ in range(20):
        got = spread_copies(src)
        assert [a.ctypes.data % PAGE for a in got] == [0, 640, 1344]     # 0, 2048/3, 4096/3 on lines
        for a, b in zip(got, src):
            assert a.dtype == b.dtype and a.flags.c_contiguous and np.array_equal(a, b)
        assert [a.ctypes.data % PAGE for a in spread_copies(src[:2], span=PAGE)] == [0, 2048]
    with pytest.raises(ValueError, match="span=100"):
        spread_copies(src, span=100)


@pytest.mark.parametrize("shape, exc", [((-1, 3), ValueError), ((-2, -3), ValueError), (-4, ValueError),
                                        ((2.5,), TypeError), ((3, "a"), TypeError)])
def test_bad_shapes_are_refused_by_name(shape, exc):
    """A negative or non-integer dimension is an error naming the shape (a float is not
    truncated), from every constructor."""
    like = aligned_empty(16, np.float32)
    for make in (lambda: aligned_empty(shape, np.float32), lambda: apart_empty(shape, np.float32, like=like),
                 lambda: apart_zeros(shape, np.float32, like=like)):
        with pytest.raises(exc, match=r"array shape .* dimensions must be non-negative integers"):
            make()
