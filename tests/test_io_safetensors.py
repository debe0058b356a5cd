"""The hand-written safetensors reader/writer: round trips, agreement with the
reference `safetensors` package, and one test per malformed file."""
import json
import struct

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st_h

from refimpl.io import safetensors as st
from refimpl.io.safetensors import SafetensorsError


def raw_file(header: dict | str | bytes, data: bytes = b"", size_field: int | None = None) -> bytes:
    """A safetensors file built byte by byte (independent of the writer under test)."""
    if isinstance(header, dict):
        header = json.dumps(header)
    if isinstance(header, str):
        header = header.encode("utf-8")
    n = len(header) if size_field is None else size_field
    return struct.pack("<Q", n) + header + data


def f32(offsets, shape=(2,)):
    return {"dtype": "F32", "shape": list(shape), "data_offsets": list(offsets)}


def sample_tensors():
    rng = np.random.default_rng(0)
    return {
        "w": rng.standard_normal((3, 4)).astype(np.float32),
        "d": rng.standard_normal(5),
        "h": rng.standard_normal((2, 2)).astype(np.float16),
        "i": np.arange(-3, 3, dtype=np.int64),
        "b": np.array([True, False, True]),
        "u": np.arange(7, dtype=np.uint8),
        "s": np.array(2.5, dtype=np.float32),          # 0-d
        "e": np.zeros((0, 4), dtype=np.float32),       # empty
    }


def test_round_trip_own_writer(tmp_path):
    t = sample_tensors()
    st.save_file(t, tmp_path / "a.safetensors", metadata={"format": "np", "note": "ü"})
    got, meta = st.load(tmp_path / "a.safetensors")
    assert meta == {"format": "np", "note": "ü"}
    assert set(got) == set(t)
    for k, v in t.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
        assert got[k].flags.writeable and got[k].flags.c_contiguous


def test_agrees_with_reference_package(tmp_path):
    from conftest import require
    ref = require("safetensors.numpy")
    t = sample_tensors()
    ref.save_file(t, str(tmp_path / "ref.safetensors"), metadata={"k": "v"})
    got = st.load_file(tmp_path / "ref.safetensors")
    assert st.load_metadata(tmp_path / "ref.safetensors") == {"k": "v"}
    for k, v in t.items():
        np.testing.assert_array_equal(got[k], v)
    st.save_file(t, tmp_path / "own.safetensors")
    back = ref.load_file(str(tmp_path / "own.safetensors"))
    for k, v in t.items():
        assert back[k].dtype == v.dtype
        np.testing.assert_array_equal(back[k], v)


def test_bf16_is_top_half_of_float32():
    # bf16 bit patterns written by hand: 1.0 = 0x3F80, -2.5 = 0xC020, inf = 0x7F80,
    # 2^-131 = 0x0004 (float32 0x00040000, a subnormal: 2^18 * 2^-149)
    bits = np.array([0x3F80, 0xC020, 0x0004, 0x7F80], dtype="<u2")
    data = raw_file({"x": {"dtype": "BF16", "shape": [4], "data_offsets": [0, 8]}}, bits.tobytes())
    got, _ = st.load_bytes(data)
    assert got["x"].dtype == np.float32
    np.testing.assert_array_equal(got["x"], np.array([1.0, -2.5, 2.0 ** -131, np.inf], dtype=np.float32))


def test_offsets_in_any_order():
    a, b = np.float32([1, 2]).tobytes(), np.float32([3, 4, 5]).tobytes()
    data = raw_file({"second": f32([8, 20], (3,)), "first": f32([0, 8])}, a + b)
    got, _ = st.load_bytes(data)
    np.testing.assert_array_equal(got["first"], [1, 2])
    np.testing.assert_array_equal(got["second"], [3, 4, 5])


# ---------------------------------------------------------------- bad input


def _raises(data: bytes, *words):
    with pytest.raises(SafetensorsError) as e:
        st.load_bytes(data, "bad.safetensors")
    msg = str(e.value)
    assert "bad.safetensors" in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_truncated_file():
    good = st.save_bytes({"w": np.ones((4, 4), np.float32)})
    _raises(good[:-5], "'w'", "truncated")
    _raises(good[:5], "truncated")


def test_header_size_beyond_file():
    _raises(raw_file({"w": f32([0, 8])}, b"\0" * 8, size_field=10_000), "10000", "beyond the end of the file")


def test_header_size_over_limit():
    _raises(raw_file(b"{}", size_field=st.MAX_HEADER_BYTES + 1), "exceeds the limit", "(not a safetensors file?)")
    _raises(b"import os\nx = 1\n", "exceeds the limit", "(not a safetensors file?)")   # a .py file, say


def test_overlapping_offsets():
    _raises(raw_file({"a": f32([0, 8]), "b": f32([4, 12])}, b"\0" * 12), "overlap", "'a'", "'b'")


def test_gapped_offsets():
    _raises(raw_file({"a": f32([0, 8]), "b": f32([12, 20])}, b"\0" * 20), "gap", "'b'")


def test_gap_at_start_and_trailing_bytes():
    _raises(raw_file({"a": f32([4, 12])}, b"\0" * 12), "gap", "'a'")
    _raises(raw_file({"a": f32([0, 8])}, b"\0" * 12), "trailing")


def test_duplicate_keys():
    header = '{"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}, ' \
             '"a": {"dtype": "F32", "shape": [2], "data_offsets": [8, 16]}}'
    _raises(raw_file(header, b"\0" * 16), "repeats the key 'a'")
    nested = '{"a": {"dtype": "F32", "dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}'
    _raises(raw_file(nested, b"\0" * 8), "repeats the key 'dtype'")


def test_unknown_dtype():
    _raises(raw_file({"a": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}}, b"\0" * 2),
            "'a'", "F8_E4M3", "not supported")


def test_size_does_not_match_shape():
    _raises(raw_file({"a": f32([0, 12], (2,))}, b"\0" * 12), "'a'", "needs 8 bytes", "span 12")


def test_huge_shape_does_not_overflow():
    _raises(raw_file({"a": f32([0, 8], (2 ** 40, 2 ** 40))}, b"\0" * 8), "'a'", "too large")


@pytest.mark.parametrize("shape", [(2 ** 64, 0), (0, 2 ** 62, 2 ** 62), (2 ** 40, 2 ** 40, 0)])
def test_zero_element_tensor_with_absurd_dims_is_refused_by_name(shape):
    # 0 bytes of data match the offsets, but NumPy cannot make such an array: refused in the header
    _raises(raw_file({"a": f32([0, 0], shape)}, b""), "'a'", "too large", "2^62")


def test_too_many_dimensions_is_refused_by_name():
    _raises(raw_file({"a": f32([0, 0], (1,) * 40 + (0,))}, b""), "'a'", "41 dimensions", "limit of 32")
    got, _ = st.load_bytes(raw_file({"a": f32([0, 0], (3,) * 31 + (0,))}, b""))      # 32 dims: fine
    assert got["a"].shape == (3,) * 31 + (0,)


def test_torch_checkpoint_bytes_are_named(tmp_path):
    # torch.save's ZIP archive read as safetensors (e.g. a shard named in an index)
    _raises(b"PK\x03\x04" + b"\0" * 60, "PyTorch zip checkpoint", "never unpickles", "safetensors")
    _raises(b"\x80\x04\x95" + b"\0" * 60, "PyTorch pickle checkpoint")


def test_header_with_a_huge_integer_names_the_file():
    big = "9" * 5000
    text = ('{"a": {"dtype": "F32", "shape": [' + big + '], "data_offsets": [0, 0]}}').encode()
    _raises(struct.pack("<Q", len(text)) + text, "not valid JSON")


@pytest.mark.parametrize("shape", [[-1, 2], [2.0], [True, 2], "2"])
def test_bad_shape(shape):
    _raises(raw_file({"a": {"dtype": "F32", "shape": shape, "data_offsets": [0, 8]}}, b"\0" * 8),
            "'a'", "shape")


def test_bad_offsets():
    _raises(raw_file({"a": f32([8, 0])}, b"\0" * 8), "'a'", "begin 8 > end 0")
    _raises(raw_file({"a": f32([0, 8, 9])}, b"\0" * 8), "'a'", "data_offsets")


def test_bad_header_json():
    _raises(raw_file(b"\xff\xfe{}"), "UTF-8")
    _raises(raw_file(b"{not json"), "not valid JSON")
    _raises(raw_file(b"[1, 2]"), "JSON object")
    _raises(raw_file(b"[" * 100_000 + b"]" * 100_000), "nested too deeply")
    _raises(raw_file({"a": 3}), "'a'", "object")
    _raises(raw_file({"a": {**f32([0, 8]), "extra": 1}}, b"\0" * 8), "'a'", "unknown ['extra']")


def test_bad_metadata():
    _raises(raw_file({"__metadata__": {"k": 1}}), "__metadata__", "'k'")
    _raises(raw_file({"__metadata__": ["x"]}), "__metadata__")


def test_writer_refuses_bad_input(tmp_path):
    with pytest.raises(SafetensorsError, match="complex128"):
        st.save_file({"z": np.zeros(2, np.complex128)}, tmp_path / "x.safetensors")
    with pytest.raises(TypeError, match="'l'"):
        st.save_file({"l": [1, 2]}, tmp_path / "x.safetensors")
    with pytest.raises(SafetensorsError, match="metadata"):
        st.save_file({"a": np.zeros(1)}, tmp_path / "x.safetensors", metadata={"k": 1})
    with pytest.raises(FileNotFoundError, match="nothere"):
        st.load_file(tmp_path / "nothere.safetensors")


@settings(max_examples=200)
@given(data=st_h.data())
def test_corrupted_files_raise_clean_errors(data):
    """Any byte-level corruption of a valid file either still parses or raises SafetensorsError."""
    good = bytearray(st.save_bytes({"a": np.arange(6, dtype=np.float32).reshape(2, 3),
                                    "b": np.arange(3, dtype=np.int64)}, metadata={"k": "v"}))
    for _ in range(data.draw(st_h.integers(1, 4), label="n_edits")):
        kind = data.draw(st_h.sampled_from(["flip", "cut", "insert"]), label="kind")
        i = data.draw(st_h.integers(0, len(good) - 1), label="at")
        if kind == "flip":
            good[i] = data.draw(st_h.integers(0, 255), label="byte")
        elif kind == "cut":
            del good[i:i + data.draw(st_h.integers(1, 16), label="len")]
        else:
            good[i:i] = data.draw(st_h.binary(min_size=1, max_size=8), label="bytes")
        if not good:
            break
    try:
        tensors, _ = st.load_bytes(bytes(good))
    except SafetensorsError:
        return
    for v in tensors.values():
        assert isinstance(v, np.ndarray)
