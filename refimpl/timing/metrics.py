"""Work per op (FLOPs, bytes moved) by documented formula, and the roofline.

Dimension letters: M, K, N (matmul a[M,K] @ b[K,N]); R rows, N entries
(softmax); H query heads, Hkv key/value heads, Lq queries, Lk keys, D head
width (attention); T rows, D features (norms, activations); s = bytes per
element of the dtype.

FLOP counts (a transcendental exp / tanh / cos / sin counts as 1 FLOP, so the
elementwise ops' "% of peak" understates how busy the FPU is):

| op | FLOPs | bytes (compulsory: each input read once, output written once) |
|---|---|---|
| matmul | 2 M N K | (M K + K N + M N) s |
| softmax | 5 R N: max-compare, subtract, exp, sum, scale | 2 R N s |
| attention | H P (4 D + 5): 2 D for the q.k dot, 2 D for P V, 5 for the softmax of each score | (2 H Lq D + 2 Hkv Lk D) s |
| layer_norm | 7 T D: mean, centre, square, sum, normalise, * w, + b | (2 T D + 2 D) s |
| rms_norm | 4 T D: square, sum, * rsqrt, * w | (2 T D + D) s |
| gelu_tanh | 9 per element: x^3 (2), * 0.044715, + x, * sqrt(2/pi), tanh, + 1, * x, * 0.5 | 2 T D s |
| silu | 4 per element: negate, exp, + 1, divide | 2 T D s |
| rope | 3 H T D (2 mul + 1 add per output) + 3 T D / 2 (angle, cos, sin per pair) | 2 H T D s + 8 T |

P, the number of (query, key) pairs attention scores:
  not causal: P = Lq Lk;
  causal with Lq <= Lk (query i sees keys 0 .. Lk - Lq + i):
      P = sum_{i=0}^{Lq-1} (Lk - Lq + i + 1) = Lq (Lk - Lq) + Lq (Lq + 1) / 2
  (exactly half of Lq Lk plus Lq/2 when Lq = Lk; Lk for decode, Lq = 1).
  A kernel that skips masked tiles does about this much work; one that
  computes the full Lq x Lk and masks does 2x more than counted.

Roofline (all in TSC ticks; core cycles = ticks x core/TSC):
  peak FLOP/tick  = peak FLOP per core cycle (machine table) x core/TSC
  bandwidth B/tick of the smallest cache level that holds the op's bytes
  (DRAM in cold-cache mode): the larger of its streaming-read and copy
  (reads + writes) bandwidths, so the roof is an optimistic bound;
  roofline minimum ticks = max(FLOPs / peak, bytes / bandwidth);
  measured / bound = median ticks / roofline minimum (>= 1; 1 = at the roof).
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np

# shape tuples per op (the names used on the command line and in JSON)
SHAPE_DIMS = {
    "matmul": ("M", "K", "N"),
    "softmax": ("R", "N"),
    "attention": ("H", "Hkv", "Lq", "Lk", "D"),      # + causal flag
    "layer_norm": ("T", "D"),
    "rms_norm": ("T", "D"),
    "gelu_tanh": ("T", "D"),
    "silu": ("T", "D"),
    "rope": ("H", "T", "D"),
}


def causal_pairs(Lq: int, Lk: int) -> int:
    """Number of (query, key) pairs a causal mask keeps: Lq (Lk - Lq) + Lq (Lq + 1) / 2."""
    if Lq > Lk:
        raise ValueError(f"causal attention needs Lq <= Lk, got Lq={Lq}, Lk={Lk}")
    return Lq * (Lk - Lq) + Lq * (Lq + 1) // 2


@dataclass(frozen=True)
class Work:
    flops: int
    bytes: int

    @property
    def intensity(self) -> float:
        """Arithmetic intensity, FLOP per byte."""
        return self.flops / self.bytes if self.bytes else math.inf


def work(op: str, shape: tuple, dtype="float32", causal: bool = False) -> Work:
    """FLOPs and compulsory bytes of `op` on `shape` (see the module table)."""
    s = np.dtype(dtype).itemsize
    dims = SHAPE_DIMS.get(op)
    if dims is None:
        raise ValueError(f"unknown op {op!r}; ops are {list(SHAPE_DIMS)}")
    if len(shape) != len(dims):
        raise ValueError(f"{op}: shape {shape} must give {'x'.join(dims)}")
    if any((not isinstance(x, (int, np.integer))) or x < 0 for x in shape):
        raise ValueError(f"{op}: shape {shape} must be non-negative ints")
    if causal and op != "attention":
        raise ValueError(f"{op}: causal applies to attention only")
    if op == "attention" and (shape[1] == 0 or shape[0] % shape[1]):
        raise ValueError(f"attention: shape {shape}: query heads H={shape[0]} must be a multiple of "
                         f"key/value heads Hkv={shape[1]}")
    if op == "matmul":
        M, K, N = shape
        return Work(2 * M * N * K, (M * K + K * N + M * N) * s)
    if op == "softmax":
        R, N = shape
        return Work(5 * R * N, 2 * R * N * s)
    if op == "attention":
        H, Hkv, Lq, Lk, D = shape
        P = causal_pairs(Lq, Lk) if causal else Lq * Lk
        return Work(H * P * (4 * D + 5), (2 * H * Lq * D + 2 * Hkv * Lk * D) * s)
    if op == "layer_norm":
        T, D = shape
        return Work(7 * T * D, (2 * T * D + 2 * D) * s)
    if op == "rms_norm":
        T, D = shape
        return Work(4 * T * D, (2 * T * D + D) * s)
    if op == "gelu_tanh":
        T, D = shape
        return Work(9 * T * D, 2 * T * D * s)
    if op == "silu":
        T, D = shape
        return Work(4 * T * D, 2 * T * D * s)
    if op == "rope":
        H, T, D = shape
        return Work(3 * H * T * D + 3 * T * D // 2, 2 * H * T * D * s + 8 * T)
    raise AssertionError(op)


@dataclass
class Roofline:
    ticks: float                 # measured median ticks per call
    core_cycles: float           # estimated: ticks x core/TSC
    flops: int
    bytes: int
    flop_per_tick: float
    flop_per_core_cycle: float
    pct_peak: float              # flop_per_core_cycle / peak per core cycle, in %
    bytes_per_tick: float
    intensity: float             # FLOP / byte
    peak_flop_per_tick: float
    bandwidth_level: str
    bandwidth_bytes_per_tick: float
    roofline_ticks: float        # max(flops / peak, bytes / bandwidth)
    bound: str                   # "compute" or "memory"; "unknown" without measured bandwidths
                                 # (roofline_ticks is then the compute roof alone)
    measured_over_bound: float   # ticks / roofline_ticks

    def as_dict(self) -> dict:
        return asdict(self)


def roofline(w: Work, ticks: float, machine, dtype="float32", cold: bool = False,
             core_cycles: float | None = None) -> Roofline:
    """Place a measurement of `w` (median `ticks`) against the machine's roofs.  FLOP per core
    cycle and % of peak use `core_cycles` when given (counted by the PMU), else the estimate
    ticks x machine.core_per_tsc."""
    cpt = machine.core_per_tsc
    ticks = float(ticks)
    if not (math.isfinite(ticks) and ticks >= 0):
        raise ValueError(f"roofline: ticks={ticks!r} must be a finite number >= 0")
    if core_cycles is not None and ticks > 0 and core_cycles > 0:
        cpt = core_cycles / ticks                     # this measurement's own core/TSC
    dt = str(np.dtype(dtype))
    if dt not in machine.peak_flop_per_cycle:
        raise ValueError(f"roofline: no peak FLOP/cycle for dtype {dt} (the machine model has "
                         f"{', '.join(machine.peak_flop_per_cycle)})")
    peak_cycle = machine.peak_flop_per_cycle[dt]
    peak_tick = peak_cycle * cpt
    if cold and machine.bandwidth:
        level = "DRAM" if "DRAM" in machine.bandwidth else list(machine.bandwidth)[-1]
        bw = max(machine.bandwidth[level]["read"], machine.bandwidth[level]["copy"])
    else:
        level, bw = machine.bandwidth_for(w.bytes)
    t_flop = w.flops / peak_tick
    measured_bw = math.isfinite(bw) and bw > 0
    t_mem = w.bytes / bw if measured_bw else 0.0
    roof = max(t_flop, t_mem)
    cyc = ticks * cpt
    safe = ticks if ticks > 0 else math.nan
    return Roofline(ticks=ticks, core_cycles=cyc, flops=w.flops, bytes=w.bytes,
                    flop_per_tick=w.flops / safe, flop_per_core_cycle=w.flops / (safe * cpt),
                    pct_peak=100.0 * w.flops / (safe * cpt) / peak_cycle,
                    bytes_per_tick=w.bytes / safe, intensity=w.intensity, peak_flop_per_tick=peak_tick,
                    bandwidth_level=level, bandwidth_bytes_per_tick=bw, roofline_ticks=roof,
                    bound=("compute" if t_flop >= t_mem else "memory") if measured_bw else "unknown",
                    measured_over_bound=(ticks / roof) if roof > 0 and ticks > 0 else math.nan)
