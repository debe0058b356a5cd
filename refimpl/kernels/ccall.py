"""A prepared C kernel call, for timing loops that run entirely in C.

Every C op wrapper offers `prepare(*args, **kw) -> CCall`: the arguments are
checked and packed once into a C struct, and the kernel is reachable as a
`void fn(void *ctx)` thunk.  The clock's C loop calls `fn(ctx)` `reps` times
between two fenced counter reads, so no Python runs inside the timed region.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class CCall:
    fn_addr: int                 # address of `void thunk(void *ctx)` in refimpl._kernels
    ctx_addr: int                # address of the packed argument struct
    run: Callable[[], Any]       # one call from Python (same thunk, same ctx)
    out: Any = None              # the output array the kernel writes
    keep: list = field(default_factory=list)   # keeps the struct and arrays alive


def check_c_identifier(symbol, who: str = "") -> str:
    """`symbol` if it is a C identifier, else ValueError (it is pasted into a cffi declaration)."""
    if not (isinstance(symbol, str) and re.fullmatch(r"[A-Za-z_]\w*", symbol)):
        raise ValueError(f"{who}symbol {symbol!r} is not a C identifier")
    return symbol


def dlopen_symbol(ffi, lib, symbol: str, who: str = "") -> tuple:
    """(library handle, function) of `symbol`, already declared in `ffi`, in the user's shared
    library `lib` (a path; a bare name is looked for in the current directory, not the loader's
    search path).  FileNotFoundError, OSError or AttributeError naming the library and symbol;
    `who` prefixes the messages."""
    lib = os.fspath(lib)
    path = lib if os.sep in lib else os.path.join(".", lib)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{who}shared library {lib!r} not found")
    try:
        handle = ffi.dlopen(os.path.abspath(path))
    except OSError as e:
        raise OSError(f"{who}cannot open shared library {lib!r}: {e}") from None
    try:
        return handle, getattr(handle, symbol)
    except AttributeError:
        raise AttributeError(f"{who}symbol {symbol!r} not found in {lib!r}") from None
