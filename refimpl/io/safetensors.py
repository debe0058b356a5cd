"""A hand-written, defensive reader and writer for the safetensors format.

No pickle, ever, and no memory mapping: the file is read once into memory and
checked before a single tensor is built.

File layout (https://huggingface.co/docs/safetensors):

    [8 bytes]  N, unsigned little-endian 64-bit: size of the JSON header
    [N bytes]  UTF-8 JSON object (may be right-padded with spaces):
               {"name": {"dtype": "F32", "shape": [2, 3], "data_offsets": [begin, end]},
                ...,
                "__metadata__": {"str": "str", ...}}          (optional)
    [rest]     the data buffer; offsets are relative to its start

Checks made on reading (each failure raises `SafetensorsError` naming the file
and the tensor or field):

* the file holds at least the 8-byte size; 0 < N <= MAX_HEADER_BYTES and the
  header lies inside the file;
* the header is valid UTF-8 and a JSON object, with no duplicate keys at any
  level;
* `__metadata__`, when present, maps str to str;
* every tensor entry has exactly the fields dtype, shape, data_offsets; the
  dtype is on the allow-list `DTYPES`; shape and offsets are lists of
  non-negative ints (JSON booleans are not ints); begin <= end; at most
  MAX_DIMS dimensions, and the product of the nonzero dimensions times the
  item size at most MAX_SHAPE_BYTES (so a zero-element tensor with absurd
  dimensions is refused here, not by NumPy later);
* prod(shape) * itemsize == end - begin, computed with Python ints (no overflow);
* the tensors' byte ranges tile the data buffer exactly: sorted by offset they
  start at 0, each begins where the previous ended (no gap, no overlap), and
  the last ends at the end of the file.

Conversions on reading: BF16 becomes float32 exactly (the 16 bits are the top
half of a float32: `uint16 << 16`); every other dtype keeps its NumPy
equivalent (F16 stays float16).  Arrays are returned as fresh, writable,
C-contiguous, native-endian copies.
"""
from __future__ import annotations

import json
import math
import os
import struct
from pathlib import Path

import numpy as np

from refimpl.io.pickles import torch_checkpoint_kind, torch_checkpoint_message

MAX_HEADER_BYTES = 100 * 1024 * 1024          # 100 MB, as the reference implementation
MAX_DIMS = 32                                 # NumPy 1.x allows 32 dimensions (2.x: 64)
MAX_SHAPE_BYTES = 2 ** 62                     # prod(nonzero dims) * itemsize: NumPy's limit is 2^63 - 1

# safetensors dtype name -> (numpy dtype as stored, little-endian) ; BF16 is decoded by hand
DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype("<f8"),
    "F32": np.dtype("<f4"),
    "F16": np.dtype("<f2"),
    "BF16": np.dtype("<u2"),
    "I64": np.dtype("<i8"),
    "I32": np.dtype("<i4"),
    "I16": np.dtype("<i2"),
    "I8": np.dtype("i1"),
    "U64": np.dtype("<u8"),
    "U32": np.dtype("<u4"),
    "U16": np.dtype("<u2"),
    "U8": np.dtype("u1"),
    "BOOL": np.dtype("?"),
}

# numpy dtype -> safetensors dtype name, for writing
_NAME_OF = {np.dtype(np.float64): "F64", np.dtype(np.float32): "F32", np.dtype(np.float16): "F16",
            np.dtype(np.int64): "I64", np.dtype(np.int32): "I32", np.dtype(np.int16): "I16",
            np.dtype(np.int8): "I8", np.dtype(np.uint64): "U64", np.dtype(np.uint32): "U32",
            np.dtype(np.uint16): "U16", np.dtype(np.uint8): "U8", np.dtype(np.bool_): "BOOL"}

_TENSOR_FIELDS = {"dtype", "shape", "data_offsets"}


class SafetensorsError(ValueError):
    """A safetensors file (or the tensors given to the writer) breaks the format."""


# --------------------------------------------------------------------------
# reading
# --------------------------------------------------------------------------


def _no_duplicates(pairs):
    """json `object_pairs_hook`: refuse an object that repeats a key."""
    d = {}
    for k, v in pairs:
        if k in d:
            raise _DuplicateKey(k)
        d[k] = v
    return d


class _DuplicateKey(Exception):
    pass


def _is_uint(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


def parse_header(data: bytes | bytearray | memoryview, source: str = "<bytes>", size: int | None = None):
    """Check the header of a whole safetensors file held in `data`.

    Returns (entries, metadata, data_start): entries maps tensor name to
    (dtype name, shape tuple, begin, end) with offsets relative to data_start.
    With `size` (the file's size), `data` may be the file's first 8 + header bytes only:
    the header is checked against that size before the body is read.
    """
    where = f"safetensors file {source}"
    size = len(data) if size is None else size
    if size < 8:
        raise SafetensorsError(f"{where}: truncated: {size} bytes, fewer than the 8-byte header size field")
    (n,) = struct.unpack("<Q", bytes(data[:8]))
    if n == 0:
        raise SafetensorsError(f"{where}: header size is 0")
    if n > MAX_HEADER_BYTES or 8 + n > size:
        kind = torch_checkpoint_kind(data[:4])
        if kind:
            raise SafetensorsError(torch_checkpoint_message(kind, where))
    if n > MAX_HEADER_BYTES:
        raise SafetensorsError(f"{where}: header size {n} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes "
                               "(not a safetensors file?)")
    if 8 + n > size:
        raise SafetensorsError(f"{where}: header size {n} bytes runs beyond the end of the file "
                               f"(8 + {n} > file size {size} bytes; truncated file?)")
    raw = bytes(data[8:8 + n])
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise SafetensorsError(f"{where}: header is not valid UTF-8 ({e})") from None
    try:
        header = json.loads(text, object_pairs_hook=_no_duplicates)
    except _DuplicateKey as e:
        raise SafetensorsError(f"{where}: header repeats the key {e.args[0]!r}") from None
    except ValueError as e:         # JSONDecodeError, or an integer with too many digits
        raise SafetensorsError(f"{where}: header is not valid JSON ({e})") from None
    except RecursionError:
        raise SafetensorsError(f"{where}: header JSON is nested too deeply") from None
    if not isinstance(header, dict):
        raise SafetensorsError(f"{where}: header must be a JSON object, got {type(header).__name__}")

    metadata = header.pop("__metadata__", None)
    if metadata is not None:
        if not isinstance(metadata, dict):
            raise SafetensorsError(f"{where}: __metadata__ must be an object of str -> str")
        for k, v in metadata.items():
            if not isinstance(v, str):
                raise SafetensorsError(f"{where}: __metadata__[{k!r}] must be a string, got {type(v).__name__}")

    data_start = 8 + n
    data_len = size - data_start
    entries: dict[str, tuple[str, tuple[int, ...], int, int]] = {}
    for name, info in header.items():
        what = f"{where}: tensor {name!r}"
        if not isinstance(info, dict):
            raise SafetensorsError(f"{what}: entry must be an object, got {type(info).__name__}")
        keys = set(info)
        if keys != _TENSOR_FIELDS:
            missing, extra = _TENSOR_FIELDS - keys, keys - _TENSOR_FIELDS
            raise SafetensorsError(f"{what}: fields must be exactly {sorted(_TENSOR_FIELDS)}"
                                   + (f"; missing {sorted(missing)}" if missing else "")
                                   + (f"; unknown {sorted(extra)}" if extra else ""))
        dt = info["dtype"]
        if not isinstance(dt, str) or dt not in DTYPES:
            raise SafetensorsError(f"{what}: dtype {dt!r} is not supported (allowed: {', '.join(DTYPES)})")
        shape = info["shape"]
        if not isinstance(shape, list) or not all(_is_uint(s) for s in shape):
            raise SafetensorsError(f"{what}: shape must be a list of non-negative ints, got {shape!r}")
        if len(shape) > MAX_DIMS:
            raise SafetensorsError(f"{what}: shape has {len(shape)} dimensions, more than the limit of {MAX_DIMS}")
        if math.prod(d for d in shape if d) * DTYPES[dt].itemsize > MAX_SHAPE_BYTES:
            raise SafetensorsError(f"{what}: shape {shape} is too large: its nonzero dimensions times the "
                                   f"{dt} item size exceed 2^{MAX_SHAPE_BYTES.bit_length() - 1} bytes")
        offs = info["data_offsets"]
        if not (isinstance(offs, list) and len(offs) == 2 and all(_is_uint(o) for o in offs)):
            raise SafetensorsError(f"{what}: data_offsets must be [begin, end] non-negative ints, got {offs!r}")
        begin, end = offs
        if begin > end:
            raise SafetensorsError(f"{what}: data_offsets begin {begin} > end {end}")
        nbytes = math.prod(shape) * DTYPES[dt].itemsize           # Python ints: no overflow
        if nbytes != end - begin:
            raise SafetensorsError(f"{what}: shape {shape} of {dt} needs {nbytes} bytes but data_offsets "
                                   f"[{begin}, {end}] span {end - begin} bytes")
        entries[name] = (dt, tuple(shape), begin, end)

    # the byte ranges must tile [0, data_len) exactly
    pos, prev = 0, None
    for name, (_, _, begin, end) in sorted(entries.items(), key=lambda kv: (kv[1][2], kv[1][3])):
        if begin < pos:
            raise SafetensorsError(f"{where}: tensor {name!r} data_offsets [{begin}, {end}] overlap tensor "
                                   f"{prev!r} which ends at {pos}")
        if begin > pos:
            after = f"after tensor {prev!r} " if prev is not None else ""
            raise SafetensorsError(f"{where}: gap of {begin - pos} bytes in the data buffer {after}"
                                   f"before tensor {name!r} (data_offsets [{begin}, {end}], expected begin {pos})")
        pos, prev = end, name
    if pos != data_len:
        if pos > data_len:
            raise SafetensorsError(f"{where}: tensor {prev!r} ends at data offset {pos} but the data buffer has "
                                   f"only {data_len} bytes (truncated file?)")
        raise SafetensorsError(f"{where}: {data_len - pos} trailing bytes after the last tensor "
                               f"(data buffer {data_len} bytes, tensors end at {pos})")
    return entries, (metadata or {}), data_start


def _decode(data, dt: str, shape, begin: int, end: int) -> np.ndarray:
    raw = np.frombuffer(data, dtype=DTYPES[dt], count=(end - begin) // DTYPES[dt].itemsize, offset=begin)
    if dt == "BF16":
        out = (raw.astype(np.uint32) << 16).view(np.float32)          # bf16 = top half of float32
    else:
        out = raw.astype(DTYPES[dt].newbyteorder("="), copy=True)
    return out.reshape(shape)


def load_bytes(data: bytes | bytearray, source: str = "<bytes>") -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Parse a whole safetensors file held in memory: (tensors, metadata)."""
    tensors, metadata, _ = _load_entries(data, source)
    return tensors, metadata


def _load_entries(data, source: str, header=None):
    """(tensors, metadata, stored dtypes); `header`: parse_header's result when already had."""
    entries, metadata, start = header or parse_header(data, source)
    mv = memoryview(data)[start:]
    tensors = {name: _decode(mv, dt, shape, b, e) for name, (dt, shape, b, e) in entries.items()}
    return tensors, metadata, {name: e[0] for name, e in entries.items()}


def read_rest(f, head: bytes, size: int) -> bytearray:
    """The whole `size`-byte file: `head` (its first bytes, already read from `f`) and the rest
    read into one buffer (head + f.read() held the body twice)."""
    buf = bytearray(size)
    buf[:len(head)] = head
    got = len(head) + f.readinto(memoryview(buf)[len(head):])
    return buf if got == size else buf[:got]          # shorter when the file shrank meanwhile


def _read(path, body: bool = True):
    """(the file's bytes, its parsed header), read only after the header checked out against
    the file's size (a sparse 8 GB file behind a small header was read whole before any check).
    body=False: (the header's bytes, the parsed header), the tensors' bytes left unread."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"safetensors file {p} does not exist or is not a file")
    size = p.stat().st_size
    with open(p, "rb") as f:
        head = f.read(8)
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if n <= MAX_HEADER_BYTES and 8 + n <= size:
                head += f.read(n)
        header = parse_header(head, str(p), size=size)   # raises for a bad header, or offsets != the size
        if not body:
            return head, header
        data = read_rest(f, head, size)
    return data, (header if len(data) == size else None)   # None: parse again, which names the shortfall


def load(path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """Read a safetensors file: (tensors by name, `__metadata__` as str -> str)."""
    data, header = _read(path)
    tensors, metadata, _ = _load_entries(data, str(path), header)
    return tensors, metadata


def load_with_dtypes(path) -> tuple[dict[str, np.ndarray], dict[str, str], dict[str, str]]:
    """(tensors, metadata, {name: stored safetensors dtype}): BF16 arrays come back as
    float32, so the stored dtype is what says how precise the values are."""
    data, header = _read(path)
    return _load_entries(data, str(path), header)


def load_file(path) -> dict[str, np.ndarray]:
    """Read a safetensors file into a dict of NumPy arrays (BF16 -> float32)."""
    return load(path)[0]


def load_metadata(path) -> dict[str, str]:
    """The `__metadata__` of a safetensors file (empty dict when absent)."""
    return load(path)[1]


def read_header(path) -> dict[str, tuple[str, tuple[int, ...]]]:
    """Tensor name -> (safetensors dtype, shape), checking the whole header."""
    entries, _, _ = _read(path, body=False)[1]
    return {k: (dt, shape) for k, (dt, shape, _, _) in entries.items()}


# --------------------------------------------------------------------------
# writing
# --------------------------------------------------------------------------


def save_bytes(tensors: dict[str, np.ndarray], metadata: dict[str, str] | None = None) -> bytes:
    """Serialise `tensors` (name -> ndarray) to safetensors bytes, tensors in name order."""
    if not isinstance(tensors, dict):
        raise TypeError(f"tensors must be a dict of name -> numpy.ndarray, got {type(tensors).__name__}")
    header: dict[str, object] = {}
    if metadata:
        if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                     for k, v in metadata.items()):
            raise SafetensorsError("metadata must be a dict of str -> str")
        header["__metadata__"] = dict(metadata)
    blobs, pos = [], 0
    for name in sorted(tensors):
        a = tensors[name]
        if not isinstance(name, str) or not name or name == "__metadata__":
            raise SafetensorsError(f"tensor name {name!r} is not allowed")
        if not isinstance(a, np.ndarray):
            raise TypeError(f"tensor {name!r} must be a numpy.ndarray, got {type(a).__name__}")
        dt = _NAME_OF.get(a.dtype.newbyteorder("=") if a.dtype.byteorder not in "|=" else a.dtype)
        if dt is None:
            raise SafetensorsError(f"tensor {name!r}: dtype {a.dtype} cannot be stored "
                                   f"(allowed: {', '.join(str(d) for d in _NAME_OF)})")
        raw = np.ascontiguousarray(a, dtype=DTYPES[dt]).tobytes()
        header[name] = {"dtype": dt, "shape": [int(s) for s in a.shape], "data_offsets": [pos, pos + len(raw)]}
        blobs.append(raw)
        pos += len(raw)
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)                                   # align the data buffer to 8 bytes
    return struct.pack("<Q", len(text)) + text + b"".join(blobs)


def save_file(tensors: dict[str, np.ndarray], path, metadata: dict[str, str] | None = None) -> None:
    """Write `tensors` to `path` as safetensors (written to a temporary name, then renamed)."""
    data = save_bytes(tensors, metadata)
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)
