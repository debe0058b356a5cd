"""A prepared C kernel call, for timing loops that run entirely in C.

Every C op wrapper offers `prepare(*args, **kw) -> CCall`: the arguments are
checked and packed once into a C struct, and the kernel is reachable as a
`void fn(void *ctx)` thunk.  The clock's C loop calls `fn(ctx)` `reps` times
between two fenced counter reads, so no Python runs inside the timed region.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable


@dataclass
class CCall:
    fn_addr: int                 # address of `void thunk(void *ctx)` in refimpl._kernels
    ctx_addr: int                # address of the packed argument struct
    run: Callable[[], Any]       # one call from Python (same thunk, same ctx)
    out: Any = None              # the output array the kernel writes
    keep: list = field(default_factory=list)   # keeps the struct and arrays alive
