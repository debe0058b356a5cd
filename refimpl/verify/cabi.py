"""A C function in the user's shared library as a `check`-able Python callable.

    f = load_c("./libmine.so", "my_sgemm", "void(float*, const float*, const float*, int, int, int)", "matmul")
    check(f, "matmul")

The library is opened with cffi in ABI mode (`ffi.dlopen`); the signature
string is declared with `ffi.cdef`, so cffi converts every argument.

Accepted conventions (row-major, C-contiguous arrays; float = float32, double = float64)
------------------------------------------------------------------------------------
The signature's pointers are classified: floating pointers (arrays), integer
pointers (RoPE positions), integer scalars (sizes; `bool`/`_Bool` is the
causal flag), floating scalars (eps, scale, theta).  The output is the one
non-const floating pointer when the others are const, else the first floating
pointer (the project's "output first" rule).  With as many floating pointers
as the op has float arrays, the function works in place (output = first array).

    matmul      out[M,N], a[M,K], b[K,N], int M, int K, int N
                (sizes in that order; names m/n/k in the signature reorder them)
                out[d], x[n], w[d,n], int n, int d  (llama2.c matvec: out = w @ x,
                called once per column of b with w = a)
    softmax     out[R,N], x[R,N], int R, int N   |  out[N], x[N], int N (called per row)
                in place: x, int R, int N  |  x, int N (llama2.c)
    gelu_tanh, silu   out[n], x[n], int n  |  in place: x, int n
    layer_norm  out[R,D], x[R,D], w[D], b[D], int R, int D [, float eps]  |  ..., int D (per row)
    rms_norm    out[R,D], x[R,D], w[D], int R, int D [, float eps]  |  ..., int D (per row, llama2.c)
    attention   out[H,Lq,D], q[H,Lq,D], k[Hkv,Lk,D], v[Hkv,Lk,D], sizes:
                  5 ints: H, Hkv, Lq, Lk, D   4 ints: H, Lq, Lk, D (Hkv = H: k/v heads are repeated)
                  3 ints: Lq, Lk, D (called once per head)   6 ints: H, Hkv, Lq, Lk, D, causal
                [bool causal] [float scale]  (names h/hkv/lq/lk/d/causal reorder them)
    rope        out[H,T,D], x[H,T,D], const int* positions[T], int H, int T, int D [, float theta]
                | in place x | 2 ints: T, D (called once per head)

A parameter the signature lacks is fixed (check's `interleaved=`, `eps=`,
`causal=` options say which value the function implements).

Memory safety: every array is copied into a buffer with guard zones of
GUARD elements on both sides, filled with a NaN carrying a payload.  After
the call the guards of the output (and of every input, which must also be
unchanged) are compared bit for bit: a write past the end raises
`GuardViolation`; a read past the end reads NaN, which shows up as a
non-finite mismatch in the report.  A function that crashes the process
cannot be contained in-process.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import numpy as np

GUARD = 64
_SENTINEL = {np.dtype(np.float32): (np.uint32, 0x7FC0DEAD), np.dtype(np.float64): (np.uint64, 0x7FF8DEADBEEFDEAD),
             np.dtype(np.int32): (np.uint32, 0x7FFFFFF0), np.dtype(np.int64): (np.uint64, 0x7FFFFFFFFFFFFFF0)}
_FLOAT = {"float": np.float32, "double": np.float64}
_INT = {"int": np.int32, "int32_t": np.int32, "unsigned": np.int32, "unsigned int": np.int32,
        "long": np.int64, "long long": np.int64, "int64_t": np.int64, "size_t": np.int64,
        "ptrdiff_t": np.int64, "long int": np.int64, "uint32_t": np.int32, "uint64_t": np.int64}
_BOOL = ("bool", "_Bool")


class SignatureError(ValueError):
    """The signature cannot be parsed or fits no convention of the op."""


class GuardViolation(AssertionError):
    """The C function wrote outside its output array (or into an input)."""


@dataclass
class Param:
    text: str         # as written, e.g. "const float* a"
    base: str         # "float", "int", ...
    pointer: bool
    const: bool
    name: str | None

    @property
    def kind(self) -> str:
        if self.pointer:
            if self.base in _FLOAT:
                return "fptr"
            if self.base in _INT:
                return "iptr"
        elif self.base in _FLOAT:
            return "fscalar"
        elif self.base in _INT:
            return "int"
        elif self.base in _BOOL:
            return "bool"
        raise SignatureError(f"parameter {self.text!r}: unsupported type (use float/double pointers, "
                             f"int/int32_t/int64_t/size_t/long sizes, bool, float/double scalars)")


_TYPE_WORDS = {"float", "double", "int", "long", "unsigned", "signed", "short", "char", "size_t", "ptrdiff_t",
               "int32_t", "int64_t", "uint32_t", "uint64_t", "bool", "_Bool", "void"}
_QUALIFIERS = {"const", "restrict", "__restrict", "__restrict__", "volatile"}


def _split_decl(text: str):
    """'const float * restrict a' -> (base 'float', pointer, const, name)."""
    toks = text.replace("*", " * ").split()
    pointer = toks.count("*")
    if pointer > 1:
        raise SignatureError(f"parameter {text!r}: pointers to pointers are not supported")
    star = toks.index("*") if pointer else len(toks)
    const = "const" in toks[:star]
    words = [t for t in toks if t != "*" and t not in _QUALIFIERS]
    name = None
    if words and words[-1] not in _TYPE_WORDS:
        name = words.pop()
    if not words or any(w not in _TYPE_WORDS for w in words) or name and not re.fullmatch(r"[A-Za-z_]\w*", name):
        raise SignatureError(f"cannot parse {text!r}")
    base = " ".join(w for w in words if w != "signed") or "int"
    return base, bool(pointer), const, name


def parse_signature(sig: str):
    """'void(float* out, const float*, int n)' -> ('void', [Param, ...]); a function name may be included."""
    m = re.fullmatch(r"\s*([^()]*)\((.*)\)\s*;?\s*", sig, re.S)
    if not m:
        raise SignatureError(f"cannot parse signature {sig!r}; expected e.g. 'void(float*, const float*, int)'")
    head, body = m.group(1).split(), m.group(2).strip()
    if head and head[-1] not in _TYPE_WORDS:
        head = head[:-1]                       # the function's name
    ret = " ".join(head)
    if ret not in ("void", "int"):
        raise SignatureError(f"return type {ret!r} not supported: use void (or int, nonzero = error)")
    params = []
    if body and body != "void":
        for raw in body.split(","):
            t = raw.strip()
            try:
                base, pointer, const, name = _split_decl(t)
            except SignatureError as e:
                raise SignatureError(f"{e} in signature {sig!r}") from None
            params.append(Param(t, base, pointer, const, name))
            params[-1].kind  # noqa: B018  (validates the type)
    return ret, params


# size names per op and number of integer parameters, with aliases used to reorder by name
_SIZES = {
    "matmul": {3: ("M", "K", "N"), 2: ("n", "d")},
    "softmax": {1: ("N",), 2: ("R", "N")},
    "gelu_tanh": {1: ("N",)},
    "silu": {1: ("N",)},
    "layer_norm": {1: ("D",), 2: ("R", "D")},
    "rms_norm": {1: ("D",), 2: ("R", "D")},
    "attention": {3: ("Lq", "Lk", "D"), 4: ("H", "Lq", "Lk", "D"), 5: ("H", "Hkv", "Lq", "Lk", "D"),
                  6: ("H", "Hkv", "Lq", "Lk", "D", "causal")},
    "rope": {2: ("T", "D"), 3: ("H", "T", "D")},
}
_ALIASES = {
    "matmul": {"m": "M", "k": "K", "n": "N"},
    "attention": {"h": "H", "n_heads": "H", "hkv": "Hkv", "h_kv": "Hkv", "n_kv_heads": "Hkv", "kv_heads": "Hkv",
                  "lq": "Lq", "t": "Lq", "n_q": "Lq", "lk": "Lk", "s": "Lk", "n_k": "Lk", "d": "D", "dh": "D",
                  "head_dim": "D", "causal": "causal", "is_causal": "causal"},
}
_FLOAT_ARRAYS = {"matmul": 2, "softmax": 1, "gelu_tanh": 1, "silu": 1, "layer_norm": 3, "rms_norm": 2,
                 "attention": 3, "rope": 1}
_SCALAR = {"layer_norm": "eps", "rms_norm": "eps", "attention": "scale", "rope": "theta"}


class CFunction:
    """A C function from a shared library, called with the op's Python convention."""

    def __init__(self, lib: str, symbol: str, signature: str, op: str):
        import cffi

        from refimpl.kernels.ccall import check_c_identifier, dlopen_symbol
        from refimpl.verify.cases import OPS
        if op not in OPS:
            raise ValueError(f"unknown op {op!r}; ops are {', '.join(OPS)}")
        check_c_identifier(symbol)
        lib = os.fspath(lib)                             # a pathlib.Path too
        self.op, self.symbol, self.signature = op, symbol, signature
        self.ret, self.params = parse_signature(signature)
        self._classify()
        self.ffi = cffi.FFI()
        decl = f"{self.ret} {symbol}({', '.join(p.text for p in self.params) or 'void'});"
        try:
            self.ffi.cdef(decl)
        except Exception as e:
            raise SignatureError(f"cffi cannot declare {decl!r}: {e}") from None
        self.lib, self.fn = dlopen_symbol(self.ffi, lib, symbol)
        self.refimpl_name = f"{lib}:{symbol}"

    # ------------------------------------------------------------------ convention
    def _classify(self):
        op, ps = self.op, self.params
        kinds = [p.kind for p in ps]
        fptr = [i for i, k in enumerate(kinds) if k == "fptr"]
        iptr = [i for i, k in enumerate(kinds) if k == "iptr"]
        ints = [i for i, k in enumerate(kinds) if k == "int"]
        bools = [i for i, k in enumerate(kinds) if k == "bool"]
        fsc = [i for i, k in enumerate(kinds) if k == "fscalar"]
        where = f"signature {self.signature!r} for op {op!r}"
        if not fptr:
            raise SignatureError(f"{where}: no float/double pointer")
        dts = {_FLOAT[ps[i].base] for i in fptr}
        if len(dts) != 1:
            raise SignatureError(f"{where}: mixes float and double pointers")
        self.refimpl_dtype = np.dtype(dts.pop())
        n_arr = _FLOAT_ARRAYS[op]
        if op == "matmul" and len(ints) == 2:
            n_arr = 2
        if len(fptr) == n_arr and op in ("softmax", "gelu_tanh", "silu", "rope"):
            self.inplace, self.out_idx, self.in_idx = True, fptr[0], fptr
        elif len(fptr) == n_arr + 1:
            nonconst = [i for i in fptr if not ps[i].const]
            out = nonconst[0] if len(nonconst) >= 1 and len(nonconst) < len(fptr) else fptr[0]
            self.inplace, self.out_idx, self.in_idx = False, out, [i for i in fptr if i != out]
        else:
            raise SignatureError(f"{where}: {len(fptr)} float pointers; expected {n_arr + 1} (output + inputs)"
                                 + (f" or {n_arr} (in place)" if op in ("softmax", "gelu_tanh", "silu", "rope")
                                    else ""))
        if op == "rope":
            if len(iptr) != 1:
                raise SignatureError(f"{where}: rope needs one integer pointer (positions[T])")
            self.pos_idx, self.pos_dtype = iptr[0], np.dtype(_INT[ps[iptr[0]].base])
        elif iptr:
            raise SignatureError(f"{where}: unexpected integer pointer {ps[iptr[0]].text!r}")
        table = _SIZES[op]
        if len(ints) not in table:
            raise SignatureError(f"{where}: {len(ints)} integer sizes; accepted: "
                                 + "; ".join(f"{n}: ({', '.join(v)})" for n, v in sorted(table.items())))
        names = list(table[len(ints)])
        given = [ps[i].name for i in ints]
        alias = _ALIASES.get(op, {})
        if all(given) and alias:
            mapped = [alias.get(g) or alias.get(g.lower()) for g in given]
            if None not in mapped:          # every size is named: the names decide, and must fit a convention
                sizes_only = sorted(m for m in mapped if m != "causal")
                fits = any(sorted(n for n in v if n != "causal") == sizes_only for v in table.values())
                if not fits or len(set(mapped)) != len(mapped):
                    raise SignatureError(f"{where}: size names {given} fit no convention; accepted: "
                                         + "; ".join(f"({', '.join(v)})" for v in table.values()))
                names = mapped
        self.sizes = dict(zip(ints, names))
        if len(bools) > 1 or (bools and "causal" in names):
            raise SignatureError(f"{where}: more than one causal flag")
        self.causal_idx = bools[0] if bools else next((i for i, n in self.sizes.items() if n == "causal"), None)
        if self.causal_idx is not None and op != "attention":
            raise SignatureError(f"{where}: a bool parameter only makes sense for attention (causal)")
        if len(fsc) > 1 or (fsc and op not in _SCALAR):
            raise SignatureError(f"{where}: unexpected float scalar parameters")
        self.scalar_idx = fsc[0] if fsc else None
        acc = set()
        if self.causal_idx is not None:
            acc.add("causal")
        if self.scalar_idx is not None:
            acc.add(_SCALAR[op])
        self.refimpl_accepts = acc
        self.mode = {("matmul", 2): "matvec"}.get((op, len(ints)), "direct")

    def describe(self) -> str:
        """The convention chosen, in words."""
        ps = self.params
        roles = {self.out_idx: "output" + (" (in place)" if self.inplace else "")}
        from refimpl.verify.cases import SPECS
        arrays = [a for a in SPECS[self.op].arrays if a != "positions"]
        if self.mode == "matvec":
            arrays = ["x = column of b", "w = a"]
        for name, i in zip(arrays, self.in_idx):
            roles[i] = (roles.get(i, "") + " input " + name).strip()
        for i, n in self.sizes.items():
            roles[i] = f"size {n}"
        if self.causal_idx is not None:
            roles[self.causal_idx] = "causal flag"
        if self.scalar_idx is not None:
            roles[self.scalar_idx] = _SCALAR[self.op]
        if self.op == "rope":
            roles[self.pos_idx] = "positions"
        return ", ".join(f"{p.text} -> {roles.get(i, '?')}" for i, p in enumerate(ps))

    # ------------------------------------------------------------------ memory
    def _guarded(self, a: np.ndarray, dtype) -> np.ndarray:
        dtype = np.dtype(dtype)
        ut, bits = _SENTINEL[dtype]
        buf = np.empty(a.size + 2 * GUARD, dtype)
        buf.view(ut)[:] = bits
        buf[GUARD:GUARD + a.size] = a.ravel()
        return buf

    def _check_guards(self, buf: np.ndarray, what: str, n: int):
        ut, bits = _SENTINEL[buf.dtype]
        u = buf.view(ut)
        before = np.flatnonzero(u[:GUARD] != bits)
        after = np.flatnonzero(u[GUARD + n:] != bits)
        if before.size:
            raise GuardViolation(f"{self.symbol} wrote {GUARD - before[0]} element(s) before the start of {what}")
        if after.size:
            raise GuardViolation(f"{self.symbol} wrote past the end of {what} ({n} elements): "
                                 f"element {n + after[-1]} was written")

    def _ptr(self, buf, i):
        ctype = self.ffi.typeof(self.fn).args[i]
        return self.ffi.cast(ctype, self.ffi.from_buffer(buf)) + GUARD

    def _call(self, bufs: dict, sizes: dict, causal, scalar):
        """bufs: param index -> guarded buffer."""
        args = []
        for i, p in enumerate(self.params):
            if i in bufs:
                args.append(self._ptr(bufs[i], i))
            elif i in self.sizes:
                n = self.sizes[i]
                args.append(int(bool(causal)) if n == "causal" else int(sizes[n]))
            elif i == self.causal_idx:
                args.append(bool(causal))
            elif i == self.scalar_idx:
                args.append(float(scalar))
            else:
                raise AssertionError(f"unassigned parameter {p.text}")
        for v, i in zip(args, range(len(args))):
            if i in self.sizes and not (-2 ** 31 <= v < 2 ** 31) and _INT[self.params[i].base] == np.int32:
                raise ValueError(f"size {self.sizes[i]}={v} does not fit the C int of {self.params[i].text!r}")
        r = self.fn(*args)
        if self.ret == "int" and r != 0:
            raise RuntimeError(f"{self.symbol} returned error code {r}")

    def _run(self, out_shape, inputs: list, sizes: dict, causal=False, scalar=None, positions=None):
        """Call once: inputs are arrays in self.in_idx order; returns the output array."""
        dt = self.refimpl_dtype
        ins = [np.ascontiguousarray(a, dtype=dt) for a in inputs]
        bufs = {i: self._guarded(a, dt) for i, a in zip(self.in_idx, ins)}
        n_out = int(np.prod(out_shape))
        if self.inplace:
            out = bufs[self.out_idx]
        else:
            out = np.empty(n_out + 2 * GUARD, dt)
            out.view(_SENTINEL[dt][0])[:] = _SENTINEL[dt][1]      # guards, and NaN where never written
            bufs[self.out_idx] = out
        if positions is not None:
            bufs[self.pos_idx] = self._guarded(np.asarray(positions, dtype=self.pos_dtype), self.pos_dtype)
        self._call(bufs, sizes, causal, scalar)
        self._check_guards(out, "its output", n_out)
        for i, a in zip(self.in_idx, ins):
            if i == self.out_idx and self.inplace:
                continue
            self._check_guards(bufs[i], f"input {self.params[i].text!r}", a.size)
            if not np.array_equal(bufs[i][GUARD:GUARD + a.size].view(_SENTINEL[dt][0]),
                                  a.ravel().view(_SENTINEL[dt][0])):
                raise GuardViolation(f"{self.symbol} modified its input {self.params[i].text!r}")
        if positions is not None:
            self._check_guards(bufs[self.pos_idx], "positions", len(positions))
        return out[GUARD:GUARD + n_out].reshape(out_shape).copy()

    # ------------------------------------------------------------------ the op's Python convention
    def _checked(self, arrays, causal) -> list:
        """The op's arrays checked as every backend checks them (refimpl.kernels.contracts), in
        the function's dtype and the ranks of the convention above: the C function indexes them
        by the sizes taken from their shapes (a 4-wide a with a 5-row b read past b's end)."""
        from refimpl.kernels import contracts as C
        from refimpl.verify.cases import SPECS
        names, op, dts = SPECS[self.op].arrays, self.op, (self.refimpl_dtype,)
        if len(arrays) != len(names):
            raise TypeError(f"{self.symbol} ({op}) takes {len(names)} array(s) ({', '.join(names)}), "
                            f"got {len(arrays)}")
        if op == "matmul":
            return list(C.check_matmul_args(*arrays, dtypes=dts))
        if op == "attention":
            return list(C.check_attention_args(*arrays, causal=causal, dtypes=dts))
        if op in ("gelu_tanh", "silu"):
            return [C.check_array("x", arrays[0], dts)]
        x = C.check_array("x", arrays[0], dts, ndim=3 if op == "rope" else 2)    # [R,N] / [H,T,D] here
        if op == "rope":
            x, p = C.check_rope_args(x, arrays[1], dts)
            if self.pos_dtype == np.int32 and p.size and (p.min() < -2**31 or p.max() >= 2**31):
                raise ValueError(f"argument 'positions' has values beyond the int32 range {self.symbol} takes")
            return [x, p]
        if op == "softmax":
            return [x]
        return list(C.check_norm_args(op, x, *arrays[1:], dtypes=dts))

    def __call__(self, *arrays, **kw):
        op = self.op
        scalar = kw.get(_SCALAR.get(op, ""), None)
        arrays = self._checked(arrays, bool(kw.get("causal", False)))
        if op == "matmul":
            a, b = arrays
            M, K = a.shape
            N = b.shape[1]
            if self.mode == "matvec":       # out[d] = w[d,n] @ x[n], once per column of b
                cols = [self._run((M,), [np.ascontiguousarray(b[:, j]), a], {"n": K, "d": M}) for j in range(N)]
                return np.stack(cols, axis=1) if cols else np.zeros((M, 0), self.refimpl_dtype)
            return self._run((M, N), [a, b], {"M": M, "K": K, "N": N})
        if op in ("softmax", "layer_norm", "rms_norm"):
            x, rest = arrays[0], list(arrays[1:])
            R, N = x.shape
            names = list(self.sizes.values())
            eps = scalar if self.scalar_idx is not None else None
            if "R" in names:
                return self._run(x.shape, [x] + rest, {"R": R, "N": N, "D": N}, scalar=eps)
            return np.stack([self._run((N,), [x[r]] + rest, {"N": N, "D": N}, scalar=eps) for r in range(R)])
        if op in ("gelu_tanh", "silu"):
            (x,) = arrays
            return self._run(x.shape, [x], {"N": x.size})
        if op == "attention":
            q, k, v = arrays
            H, Lq, D = q.shape
            Hkv, Lk, _ = k.shape
            causal = kw.get("causal", False)
            scale = kw.get("scale")
            if self.scalar_idx is not None and scale is None:
                scale = 1.0 / np.sqrt(D)
            names = set(self.sizes.values())
            if "Hkv" in names:
                return self._run(q.shape, [q, k, v], {"H": H, "Hkv": Hkv, "Lq": Lq, "Lk": Lk, "D": D}, causal, scale)
            g = H // Hkv
            if "H" in names:     # no Hkv parameter: repeat each kv head for its query heads
                k2, v2 = np.repeat(k, g, axis=0), np.repeat(v, g, axis=0)
                return self._run(q.shape, [q, k2, v2], {"H": H, "Lq": Lq, "Lk": Lk, "D": D}, causal, scale)
            return np.stack([self._run((Lq, D), [q[h], k[h // g], v[h // g]], {"Lq": Lq, "Lk": Lk, "D": D},
                                       causal, scale) for h in range(H)])
        if op == "rope":
            x, positions = arrays
            H, T, D = x.shape
            theta = kw.get("theta", 10000.0)
            if "H" in set(self.sizes.values()):
                return self._run(x.shape, [x], {"H": H, "T": T, "D": D}, scalar=theta, positions=positions)
            return np.stack([self._run((T, D), [x[h]], {"T": T, "D": D}, scalar=theta, positions=positions)
                             for h in range(H)])
        raise AssertionError(op)


def load_c(lib: str, symbol: str, signature: str, op: str) -> CFunction:
    """Open `lib`, find `symbol`, and wrap it with `op`'s convention (see the module docstring)."""
    return CFunction(lib, symbol, signature, op)
