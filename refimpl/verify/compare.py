"""Compare a result with the oracle under an elementwise error bound.

    stats = error_stats(got, want, bound)     # numbers for a report
    assert_within(got, want, bound, what)     # raises AssertionError with the worst element

Non-finite values must match exactly: where the reference is NaN the result
must be NaN, where it is +-inf the result must be the same infinity.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from refimpl.oracle.layers import host_array


@dataclass
class ErrorStats:
    max_abs: float          # max |got - want| over finite reference entries
    max_rel: float          # max |got - want| / |want| over nonzero finite entries
    max_ulp: float          # max distance in units of the result dtype's spacing at |want|
    bound_ratio: float      # max |got - want| / bound: <= 1 passes ("% of the error budget")
    nmse: float             # sum (got - want)^2 / sum want^2 (llama.cpp test-backend-ops)
    worst_index: tuple      # where the bound ratio is largest (the first non-finite mismatch if any)
    worst_got: float
    worst_want: float
    worst_bound: float
    nonfinite_mismatches: int

    def as_dict(self):
        return asdict(self)


def _check_bound(bound, want64) -> np.ndarray:
    """`bound` as float64 broadcast to want's shape; ValueError unless it broadcasts and is >= 0 and
    not NaN where want is finite (+inf: the element is unchecked; where want is NaN/inf the bound is
    unused, as the result must match exactly, and contract bounds are NaN there)."""
    shape = want64.shape
    try:
        b = np.asarray(host_array(bound), dtype=np.float64)
    except (TypeError, ValueError):
        raise TypeError(f"bound must be a number or an array of numbers, got {type(bound).__name__}") from None
    try:
        b = np.broadcast_to(b, shape)
    except ValueError:
        raise ValueError(f"bound of shape {b.shape} does not broadcast to want's shape {shape}") from None
    with np.errstate(invalid="ignore"):
        bad = np.isfinite(want64) & (np.isnan(b) | (b < 0))
    if bad.any():
        i = np.unravel_index(int(np.argmax(bad)), b.shape)
        raise ValueError(f"bound must be >= 0 and not NaN (+inf: unchecked), got {float(b[i])!r}"
                         + (f" at element {tuple(int(j) for j in i)}" if b.ndim else ""))
    return b


def error_stats(got, want, bound) -> ErrorStats:
    got = host_array(got)                                # torch tensors too, grad or not
    want64 = np.asarray(host_array(want), dtype=np.float64)
    got64 = got.astype(np.float64)
    bound = _check_bound(bound, want64)
    if got64.shape != want64.shape:
        raise AssertionError(f"shape mismatch: got {got64.shape}, expected {want64.shape}")
    fin = np.isfinite(want64)
    nan_bad = np.isnan(want64) & ~np.isnan(got64)
    inf_bad = np.isinf(want64) & (got64 != want64)
    fin_bad = fin & ~np.isfinite(got64)
    nf_bad = nan_bad | inf_bad | fin_bad
    nonfinite = int(nf_bad.sum())
    with np.errstate(invalid="ignore", over="ignore"):      # inf - inf where both are non-finite: masked out
        err = np.where(fin & np.isfinite(got64), np.abs(got64 - want64), 0.0)
    err = np.where(fin_bad, np.inf, err)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(fin, err / np.where(bound > 0, bound, np.finfo(np.float64).tiny), 0.0)
        rel = np.where(fin & (want64 != 0), err / np.abs(want64), 0.0)
        dt = got.dtype if got.dtype.kind == "f" else np.float64
        ulp = np.where(fin, err / np.spacing(np.abs(want64).astype(dt)).astype(np.float64), 0.0)
        num = float((err[fin] ** 2).sum())
        den = float((want64[fin] ** 2).sum())
    nmse = num / den if den > 0 else (0.0 if num == 0 else np.inf)
    if nonfinite:    # an infinite error: the first one is the element to show
        ratio = np.where(nf_bad, np.inf, ratio)
        wi = np.unravel_index(int(np.argmax(nf_bad)), ratio.shape)
    elif ratio.size:
        wi = np.unravel_index(int(np.argmax(ratio)), ratio.shape)
    else:
        wi = ()
    pick = lambda a: float(a[wi]) if ratio.size else 0.0  # noqa: E731
    return ErrorStats(
        max_abs=float(err.max()) if err.size else 0.0,
        max_rel=float(rel.max()) if rel.size else 0.0,
        max_ulp=float(ulp.max()) if ulp.size else 0.0,
        bound_ratio=float(ratio.max()) if ratio.size else 0.0,
        nmse=nmse,
        worst_index=tuple(int(i) for i in wi),
        worst_got=pick(got64), worst_want=pick(want64), worst_bound=pick(bound),
        nonfinite_mismatches=nonfinite,
    )


def assert_within(got, want, bound, what: str = "result") -> ErrorStats:
    """Raise AssertionError naming the worst element, its bound and the ratio
    (or the first non-finite mismatch: NaN/inf must match the oracle exactly)."""
    s = error_stats(got, want, bound)
    if s.nonfinite_mismatches:
        raise AssertionError(
            f"{what}: {s.nonfinite_mismatches} non-finite mismatch(es) (NaN/inf must match the oracle "
            f"exactly); first at element {s.worst_index}: got {s.worst_got!r}, oracle {s.worst_want!r}")
    if not s.bound_ratio <= 1.0:
        raise AssertionError(
            f"{what}: error exceeds its bound: worst element {s.worst_index}: got {s.worst_got!r}, "
            f"oracle {s.worst_want!r}, |error| {abs(s.worst_got - s.worst_want):.3e} > bound "
            f"{s.worst_bound:.3e} (ratio {s.bound_ratio:.3g}); max ulp {s.max_ulp:.3g}; nmse {s.nmse:.3e}")
    return s
