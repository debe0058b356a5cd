"""Check anyone's implementation of a contract op against the oracle.

    from refimpl.verify import check
    report = check(my_softmax, "softmax")          # NumPy in, NumPy out
    report = check(lambda x: torch.softmax(x, -1), "softmax")   # torch: converted in and out
    report = check(load_c("./libmine.so", "my_sgemm",
                          "void(float*, const float*, const float*, int, int, int)", "matmul"), "matmul")
    print(report.text()); report.passed

What is checked
---------------
Every edge case of `refimpl.verify.cases.edge_cases(op)`, then `examples`
hypothesis examples (`cases.strategy(op)`, steered by `hypothesis.target`
toward the largest error/bound ratio).  For each: the float64 oracle on the
same inputs, the contract's error bound (`refimpl.kernels.contracts`), and
max abs / max relative error, max ulp distance, the error/bound ratio
("% of the error budget used"; > 100% fails), NMSE, and non-finite
mismatches (NaN/inf must match the oracle exactly).  A failure found by
hypothesis is shrunk and printed as Python source small enough to paste.  Every
case is called twice, on fresh copies of its input: results whose bits differ
fail as "nondeterministic", and so does a failing input that passes when
hypothesis calls it again.

Calling convention
------------------
Array arguments are passed positionally in the op's order, keyword
parameters by name, as in refimpl/kernels/numpy_kernels.py (see
`cases.SPECS[op].signature`).  A keyword parameter is passed only if the
implementation's signature takes it (or takes **kwargs, or cannot be
inspected); a parameter it does not take is fixed at the value given to
`check` (default: the op's default), e.g. `check(f, "rope", interleaved=True)`
for an implementation that only does the interleaved convention, and
attention cases that need `causal=True` are skipped for an implementation
without a `causal` parameter (the report says so).

`convert`: "numpy" (arrays in, array out), "torch" (torch tensors in, a
tensor out), or "auto": torch for functions from the torch package;
otherwise numpy, retried once with torch tensors if the numpy call raises
and torch is installed.
"""
from __future__ import annotations

import inspect
import io
import math
from dataclasses import dataclass, field

import numpy as np

from refimpl.verify import cases as CS
from refimpl.verify.compare import ErrorStats, error_stats


@dataclass
class CaseResult:
    name: str
    shapes: str
    passed: bool
    stats: ErrorStats | None = None
    error: str | None = None          # exception raised by the implementation, or a contract violation
    example: str | None = None        # Python source reproducing a failing case

    def as_dict(self):
        return {"name": self.name, "shapes": self.shapes, "passed": self.passed,
                "stats": self.stats.as_dict() if self.stats else None, "error": self.error,
                "example": self.example}


@dataclass
class CheckReport:
    op: str
    impl: str
    dtype: str
    params: dict
    passed: bool
    cases: list = field(default_factory=list)
    notes: list = field(default_factory=list)

    def __bool__(self):
        return self.passed

    @property
    def failures(self):
        return [c for c in self.cases if not c.passed]

    @property
    def worst_ratio(self) -> float:
        rs = [c.stats.bound_ratio for c in self.cases if c.stats]
        return max(rs) if rs else math.nan

    def as_dict(self):
        return {"op": self.op, "impl": self.impl, "dtype": self.dtype, "params": self.params,
                "passed": self.passed, "worst_bound_ratio": self.worst_ratio,
                "cases": [c.as_dict() for c in self.cases], "notes": self.notes}

    # ------------------------------------------------------------------ output
    def render(self, console=None):
        """Print the report with rich (a table of cases, then each failure in detail)."""
        from rich.console import Console
        from rich.table import Table
        console = console or Console()
        verdict = "[bold green]PASS[/]" if self.passed else "[bold red]FAIL[/]"
        console.print(f"{verdict} refimpl verify: {self.impl} as {self.op} ({self.dtype}"
                      + "".join(f", {k}={v!r}" for k, v in self.params.items()) + ")")
        t = Table(show_lines=False)
        for col in ("case", "shapes", "max abs", "max rel", "max ulp", "budget used", "NMSE", "result"):
            t.add_column(col, justify="left" if col in ("case", "shapes", "result") else "right",
                         overflow="fold")
        for c in self.cases:
            s = c.stats
            if s is None:
                t.add_row(c.name, c.shapes, "-", "-", "-", "-", "-", "[green]ok[/]" if c.passed else "[red]error[/]")
                continue
            res = "[green]ok[/]" if c.passed else "[red]FAIL[/]"
            t.add_row(c.name, c.shapes, f"{s.max_abs:.3g}", f"{s.max_rel:.3g}", f"{s.max_ulp:.3g}",
                      _pct(s.bound_ratio), f"{s.nmse:.3g}", res)
        console.print(t)
        for c in self.failures:
            console.print(f"[bold red]failed:[/] {c.name} ({c.shapes})")
            if c.error:
                console.print(f"  {c.error}", markup=False)
            if c.stats:
                s = c.stats
                console.print(f"  worst element {s.worst_index}: got {s.worst_got!r}, oracle {s.worst_want!r}, "
                              f"|error| {abs(s.worst_got - s.worst_want):.3e}, bound {s.worst_bound:.3e} "
                              f"({_pct(s.bound_ratio)} of the budget); non-finite mismatches: "
                              f"{s.nonfinite_mismatches}", markup=False)
            if c.example:
                console.print("  reproduce:", markup=False)
                console.print("\n".join("    " + ln for ln in c.example.splitlines()), markup=False)
        for n in self.notes:
            console.print(f"note: {n}", markup=False)

    def text(self, width: int = 120) -> str:
        """The report as plain text."""
        from rich.console import Console
        con = Console(record=True, width=width, force_terminal=False, color_system=None, file=io.StringIO())
        self.render(con)
        return con.export_text()

    def __str__(self):
        return self.text()


def _pct(r: float) -> str:
    if not math.isfinite(r):
        return "inf"
    return f"{100 * r:.3g}%"


# --------------------------------------------------------------------------
# calling the implementation
# --------------------------------------------------------------------------


def _accepted(fn, names) -> set:
    """The keyword params among `names` that `fn` takes."""
    acc = getattr(fn, "refimpl_accepts", None)
    if acc is not None:
        return set(acc) & set(names)
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return set(names)
    ps = sig.parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in ps.values()):
        return set(names)
    return {n for n in names if n in ps and ps[n].kind in (inspect.Parameter.POSITIONAL_OR_KEYWORD,
                                                          inspect.Parameter.KEYWORD_ONLY)}


def _is_torch_fn(fn) -> bool:
    mod = getattr(fn, "__module__", None) or type(fn).__module__ or ""
    return mod == "torch" or mod.startswith("torch.")


def _from_result(x):
    if hasattr(x, "detach") and hasattr(x, "numpy"):     # torch.Tensor
        return x.detach().cpu().numpy()
    return np.asarray(x)


class _Caller:
    """Calls the implementation with numpy arrays or torch tensors."""

    def __init__(self, impl, convert: str):
        if convert not in ("auto", "numpy", "torch"):
            raise ValueError(f"convert must be 'auto', 'numpy' or 'torch', got {convert!r}")
        self.impl = impl
        self.mode = "torch" if (convert == "torch" or (convert == "auto" and _is_torch_fn(impl))) else "numpy"
        self.may_switch = convert == "auto" and self.mode == "numpy"

    def _torch_args(self, arrays):
        import torch
        return [torch.from_numpy(np.ascontiguousarray(a)) for a in arrays]

    def __call__(self, arrays, kwargs):
        with np.errstate(all="ignore"):
            if self.mode == "torch":
                return _from_result(self.impl(*self._torch_args(arrays), **kwargs))
            try:
                return _from_result(self.impl(*arrays, **kwargs))
            except Exception as first:
                if not self.may_switch:
                    raise
                self.may_switch = False
                try:
                    import torch  # noqa: F401
                except ImportError:
                    raise first from None
                try:
                    out = _from_result(self.impl(*self._torch_args(arrays), **kwargs))
                except Exception:
                    raise first from None
                self.mode = "torch"
                return out


def _impl_name(impl) -> str:
    n = getattr(impl, "refimpl_name", None)
    if n:
        return n
    mod = getattr(impl, "__module__", None)
    q = getattr(impl, "__qualname__", None) or getattr(impl, "__name__", None) or type(impl).__name__
    return f"{mod}:{q}" if mod else q


# --------------------------------------------------------------------------
# the check
# --------------------------------------------------------------------------


class _CaseFailed(Exception):
    pass


def _first_difference(a: np.ndarray, b: np.ndarray):
    """(index, a value, b value) of the first element whose bits differ, or None if a and b are
    the same bits (same dtype and shape; a NaN equals the same NaN, 0.0 differs from -0.0)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return ((), f"{a.dtype} {a.shape}", f"{b.dtype} {b.shape}")
    x, y = a.reshape(-1), b.reshape(-1)
    u = {1: np.uint8, 2: np.uint16, 4: np.uint32, 8: np.uint64}.get(a.dtype.itemsize)
    if u is not None and a.dtype.kind in "fiub":
        bad = np.ascontiguousarray(x).view(u) != np.ascontiguousarray(y).view(u)
    else:
        bad = ~((x == y) | ((x != x) & (y != y)))
    if not bad.any():
        return None
    i = tuple(int(j) for j in np.unravel_index(int(np.argmax(bad)), a.shape))
    return i, a[i], b[i]


def run_case(call, op: str, case: CS.Case, fixed: dict, accepts: set, dtype, varied=(),
             seed: int = 0, all_masked_rows: bool = False) -> CaseResult:
    """One case: oracle, bound, the implementation's result, statistics."""
    sp = CS.SPECS[op]
    params = {**fixed, **case.params}
    with np.errstate(all="ignore"):
        ref = CS.reference(op, case, params)
        bnd = CS.bound(op, case, params, ref, dtype)
    kwargs = {k: v for k, v in params.items() if k in accepts}

    def failed(msg, stats=None):
        return CaseResult(case.name, case.describe(), False, stats, msg,
                          CS.format_case(op, case, kwargs, dtype=dtype, accepts=varied, seed=seed,
                                          all_masked_rows=all_masked_rows))
    try:
        got = call([case.arrays[n].copy() for n in sp.arrays], kwargs)
    except Exception as e:   # the implementation's failure is the finding, not ours
        return failed(f"{type(e).__name__}: {e}")
    except SystemExit as e:  # sys.exit(0) in the implementation must not end the check as a pass
        return failed(f"the implementation tried to exit the process (SystemExit: {e.code!r})")
    got = np.asarray(got)
    if got.shape != ref.shape:
        return failed(f"returned shape {got.shape}, expected {ref.shape}")
    try:                     # the same input again, on fresh copies: the same bits, or nondeterministic
        again = np.asarray(call([case.arrays[n].copy() for n in sp.arrays], kwargs))
    except Exception as e:
        return failed(f"the second call on the same input raised {type(e).__name__}: {e}")
    except SystemExit as e:
        return failed(f"the implementation tried to exit the process (SystemExit: {e.code!r})")
    differ = _first_difference(got, again)
    if differ is not None:
        i, a, b = differ
        return failed(f"nondeterministic: same input, different output: two calls differ first at {i}: {a!r}, "
                      f"then {b!r} (a race, uninitialised memory or hidden state?)")
    if got.dtype.kind not in "fiu":
        return failed(f"returned dtype {got.dtype}, expected a float array")
    if got.dtype.kind != "f":
        got = got.astype(np.float64)
    with np.errstate(all="ignore"):
        st = error_stats(got, ref, bnd)
    if st.nonfinite_mismatches == 0 and st.bound_ratio <= 1.0:
        return CaseResult(case.name, case.describe(), True, st)
    return failed(None, st)


def check_param(name: str, value, dtype=np.float32):
    """An op parameter as the contract takes it, or TypeError / ValueError naming it: eps finite
    and >= 0, theta finite and > 0, scale finite or None (each within `dtype`), causal and
    interleaved bool.  A NaN eps made every case's bound NaN, and an all-NaN result passed."""
    from refimpl.kernels.contracts import check_finite, check_flag
    if name in ("causal", "interleaved"):
        return check_flag(name, value)
    if name == "scale" and value is None:
        return None
    return check_finite(name, value, dtype, positive=name == "theta", nonneg=name == "eps")


def check(impl, op: str, *, examples: int = 100, seed: int = 0, dtype=None, edge: bool = True,
          convert: str = "auto", all_masked_rows: bool = False, name: str | None = None,
          **params) -> CheckReport:
    """Check `impl` as an implementation of contract op `op`; return a CheckReport.

    examples: hypothesis examples after the edge cases (0: edge cases only).
    seed: hypothesis seed (the run is reproducible).  dtype: float32 or float64 inputs
        (default: the C function's pointer type, else float32).
    all_masked_rows: softmax rows of only -inf must give zeros (the oracle's
        definition); off by default since most libraries return NaN there.
    **params: fixed values of the op's keyword parameters (eps, theta, interleaved,
        causal, scale).
    """
    if not callable(impl):
        raise TypeError(f"check: impl must be callable, got {type(impl).__name__}")
    sp = CS.spec(op)
    unknown = set(params) - set(sp.params)
    if unknown:
        have = ", ".join(sp.params) or "none"
        raise ValueError(f"op {op!r} has no parameter {', '.join(sorted(unknown))}; its parameters: {have}")
    own = getattr(impl, "refimpl_dtype", None)        # a C function's pointer type (load_c)
    if dtype is not None and own is not None and np.dtype(dtype) != np.dtype(own):
        raise ValueError(f"dtype {np.dtype(dtype)} conflicts with the function's own {np.dtype(own)} arrays "
                         "(its C signature): leave dtype out, or wrap a function of that type")
    dt = np.dtype(dtype or own or np.float32)
    if dt not in (np.float32, np.float64):
        raise ValueError(f"dtype must be float32 or float64, got {dt}")
    params = {k: check_param(k, v, dt) for k, v in params.items()}
    fixed = {**sp.params, **params}
    accepts = _accepted(impl, sp.params)
    varied = {v for v in sp.varied if v in accepts and v not in params}
    call = _Caller(impl, convert)
    rep = CheckReport(op=op, impl=name or _impl_name(impl), dtype=dt.name,
                      params={k: v for k, v in fixed.items() if k not in varied}, passed=True)
    skipped = [v for v in sp.varied if v not in accepts and v not in params]
    if skipped:
        rep.notes.append(f"the implementation takes no {', '.join(skipped)} parameter: cases with a "
                         f"non-default value are skipped ({sp.signature})")
    if edge:
        for case in CS.edge_cases(op, dt, varied, seed, all_masked_rows):
            rep.cases.append(run_case(call, op, case, fixed, accepts, dt, varied, seed, all_masked_rows))
    if examples > 0:
        rep.cases.append(_hypothesis_phase(call, op, fixed, accepts, varied, dt, examples, seed, all_masked_rows))
    rep.passed = all(c.passed for c in rep.cases)
    if call.mode == "torch":
        rep.notes.append("called with torch tensors (converted from and back to numpy)")
    return rep


def _hypothesis_phase(call, op, fixed, accepts, varied, dt, examples, seed, all_masked_rows) -> CaseResult:
    from hypothesis import HealthCheck, Verbosity, given, settings, target
    from hypothesis import seed as hseed
    from hypothesis.errors import Flaky

    failures: list[CaseResult] = []
    worst: list[CaseResult] = []
    count = [0]

    @hseed(seed)
    @settings(max_examples=examples, database=None, deadline=None, derandomize=False,
              suppress_health_check=list(HealthCheck), report_multiple_bugs=False,
              verbosity=Verbosity.quiet, print_blob=False)
    @given(CS.strategy(op, dt, varied, all_masked_rows))
    def prop(case):
        count[0] += 1
        res = run_case(call, op, case, fixed, accepts, dt, varied, seed)
        r = res.stats.bound_ratio if res.stats else math.inf
        target(float(min(r, 1e9)) if math.isfinite(r) else 1e9, label="error/bound ratio")
        if res.passed:
            if not worst or res.stats.bound_ratio > worst[0].stats.bound_ratio:
                worst[:] = [res]
            return
        failures.append(res)
        raise _CaseFailed(res.error or "out of bound")

    label = f"hypothesis ({examples} examples, seed {seed})"
    try:
        prop()
    except _CaseFailed:
        pass
    except Flaky:      # a failing input passed when hypothesis replayed it
        f = failures[-1] if failures else CaseResult(label, "-", False)
        return CaseResult(f"{label}, nondeterministic", f.shapes, False, f.stats,
                          "nondeterministic: same input, different output (this input failed once and "
                          "passed when called again: a race, uninitialised memory or hidden state?)"
                          + (f"; the failing call: {f.error}" if f.error else ""), f.example)
    if failures:
        f = failures[-1]          # hypothesis replays the shrunk (minimal) example last
        return CaseResult(f"{label}, shrunk", f.shapes, False, f.stats, f.error, f.example)
    if worst:
        w = worst[0]
        return CaseResult(label, f"worst: {w.shapes}", True, w.stats)
    return CaseResult(label, "-", True, None)
