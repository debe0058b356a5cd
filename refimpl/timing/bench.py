"""`refimpl bench`: verify every kernel against the oracle, then time them.

    run(ops=None, backends=None, shapes=None, dtype="float32", cold=False, ...) -> report dict
    print_report(report), write_json(report, path), plot_roofline(report, path)
    compare(old_report, new_report) -> rows; run_shift(rows); print_compare(rows)

Order of work (llm.c style, "check before timing"): every (op, backend, shape)
the run will time is first computed on the same inputs as the float64 oracle
and checked elementwise against the op's error bound from
`refimpl.kernels.contracts` (`refimpl.verify.compare.error_stats`; a C kernel's
prepared call `prepare(...).run()` is checked too).  Each (op, backend) then runs the
verifier's edge cases (`verify_edges`, both C entry points too): the timed shapes are
multiples of 64, which never run a SIMD kernel's remainder loop, nor shapes 1, primes
or special values, on whichever SIMD path this machine dispatches to.  If any of our backends fails,
nothing is timed.  torch, when installed, is a reference: it is checked
the same way and a torch failure only drops torch from the ratios (with a warning).

Timing is single-threaded: threadpoolctl limits BLAS/OpenMP to 1 thread,
torch.set_num_threads(1).  C kernels with `prepare` are timed from a C loop;
others (numpy, numba, torch) from Python, so their numbers include one Python
call per repetition (~90 ticks here).

JSON schema "refimpl.bench/1" (`--json PATH`)
----------------------------------------------
{
  "schema": "refimpl.bench/1",
  "created": ISO-8601 UTC time, "argv": [...],
  "settings": {"dtype", "cold", "budget_s" (seconds of samples per row), "rounds" (slices
      each row's budget is split into; see "Round-robin timing"), "max_samples" (per row),
      "threads": 1, "quick", "gate" (the quiet gate ran: asked for, and rounds >= 2 x
      harness.GATE_MIN_ROUNDS), "gate_asked" (not --no-gate), "gate_min_rounds" (that 2 x)},
  "machine": Machine.as_dict() (refimpl.timing.machine): cpu_model, vendor,
      family, model, stepping, uarch, flags, simd_bits, n_cpus,
      peak_flop_per_cycle {dtype: FLOP per core cycle}, peak_source, caches,
      counter, tsc_hz, core_per_tsc, overhead_ticks, granularity_ticks,
      perf_available, perf_reason, cpu_ids (the counter's stops read the cpu id: false on
      aarch64 and on x86 without RDTSCP, where migrations are not detected), blas
      (threadpoolctl's libraries and num_threads as in force during verification and timing:
      read inside the run's 1-thread limit; an OpenMP runtime first loaded by numba's
      threading layer keeps its default there, numba's own count being set to 1), bandwidth
      {level: {bytes (test size), capacity (the cache's size; null for DRAM), read, copy}}
      (B/tick); core_per_tsc is the one every estimated
      core-cycle figure of the run uses: after timing, the core_add_chain probe's (see
      "noise"), with core_per_tsc_source saying which and core_per_tsc_calibrated the
      one-shot calibration's (`core_clock`),
  "verification": [{op, backend, shape, dtype, passed, bound_ratio, max_ulp, nmse, error,
                    (one row per timed case, then one per kernel with shape "edge cases (N)":
                    the verifier's N edge cases, `verify_edges`; its nmse and max_ulp are the
                    worst case's, its error names the first failing case),
                    unsupported (present when the kernel call itself refuses float64 inputs
                    with a TypeError naming float64, as a fast backend's contract allows: not
                    timed, not a failure; an output of the wrong dtype is a failure)}],
  "warnings": [str], "passed": bool (false: something failed verification, nothing timed),
  "noise": {timing_wall_s, cpu (the CPU every row was pinned to), other_cpus_busy (fraction
      of the timing phase the machine's other CPUs were busy, /proc/stat; null if unknown),
      steal_s (hypervisor steal on the pinned CPU), preempted (samples dropped), migrations,
      probes: two machine probes timed in the same rounds as the rows (not rows themselves),
        each with median_ticks, min_ticks, cv, cv_raw, cv_within, n, round_medians and
        round_kept as a row's:
        core_add_chain {..., core_per_tsc} (65536
          dependent adds: the core clock), l3_read {..., bytes, bytes_per_tick} (one read
          of an L3-sized buffer: shared-cache contention; with --cold it is flushed
          first like every row, so it reads DRAM).  Between two runs, a shift of the
          probes shows how much of a shift of every row is the machine's},
      gate (present when the quiet gate ran, settings.gate): {probe, tol, level_pct,
          level_ticks (the quiet level: the level_pct-th percentile of the readings),
          readings, quiet_readings (<= (1 + tol) x level), extra_visits (slices added for
          rows short of quiet ones, at most GATE_EXTRA_S seconds), busy_over_quiet (median
          of the other readings / level, or null)}
      (absent when nothing was timed),
  "results": [ one row per timed kernel:
      op, backend, shape (label, e.g. "256x256x256" or "8x2x128x128x64c"),
      dims [ints], causal (bool), dtype, cold, kind ("c-loop"|"python"),
      median_ticks, min_ticks, mad_ticks, p90_ticks, mean_ticks, cv (robust,
      1.4826 MAD/median; the `unstable` flag and `compare` use it), cv_raw (std/mean, the
      classical CV, reported beside it), cv_within (median over the row's rounds of each
      round's robust CV: the kernel's short-term jitter without the drift between rounds
      that `cv` includes; null when no round had 5 samples), round_medians (the median
      ticks of each round, in time order: the drift of the machine over the run as this
      kernel saw it), round_kept (per round: pooled in the statistics), quiet_rounds (rounds
      the gate found quiet; when fewer than harness.GATE_MIN_ROUNDS, that many least busy
      rounds are pooled and the row is flagged; null without the gate), median_all_ticks
      and cv_all (over every round, quiet or not; null without the gate), n, reps, rounds
      (the rows' own: the gate may add rounds), unstable, reasons,
      preempted (samples dropped: the thread was switched out during them),
      faults_per_call (page faults, minor + major, per call inside the timed samples: an
      output buffer the allocator gave back to the kernel and maps again on every call
      costs ~1-4k ticks per 4 KiB page on this VM; null where getrusage has no per-thread
      figures),
      median_core_cycles (counted by the PMU when perf_event_open works, else estimated =
      median_ticks x machine.core_per_tsc), core_cycles_source ("pmu"|"estimate"),
      pmu_instructions (instructions per call, median; null without a PMU), ipc (their
      ratio, or null),
      flops, bytes, intensity, flop_per_tick, flop_per_core_cycle, pct_peak,
      bytes_per_tick, roofline_ticks, roofline_bound ("compute"|"memory"),
      roofline_level, measured_over_bound,
      vs_numpy (numpy median / this median: > 1 = faster than numpy, or null),
      vs_torch (same against torch, or null) ]
}
Every ticks figure is TSC (reference) ticks per call; the rows' `cv`/`mad_ticks`
give the noise `compare` uses.

Round-robin timing
------------------
The rows are not timed one after the other in one block each.  Every row is warmed
up, then its budget is split into `rounds` slices and the rows are visited round-robin
(row 1 slice 1, row 2 slice 1, ..., row 1 slice 2, ...; `harness.interleave_order`);
each visit first runs the kernel untimed (>= 3 calls and >= 2 ms: the previous row
evicted its data; without this the first samples after a switch ran up to 2x slow).
Every row gets its whole budget (up to `max_samples` samples), fast rows included, so
each median pools samples from every part of the run.  A
row's statistics pool the samples of all its slices, so they describe the whole run:
a slow drift or a burst of the host (other tenants' cache and memory traffic, the
core clock) lands on every row alike instead of on whichever row ran during it, and
the ratios between backends compare kernels timed in the same moments.  The price:
a row's CV now includes the run-long variation of the machine, not only that of one
block of its budget.  `--rounds 1` times each row in one block, as before.

Quiet gate (on by default with >= 2 x harness.GATE_MIN_ROUNDS rounds, `--no-gate` turns it off): a shared host
alternates between a quiet and a busy state for seconds at a time, and a median pooled
over both jumps between runs.  A short probe is read between every two slices, and each
row's statistics pool only its slices with quiet readings on both sides
(`refimpl.timing.harness`, "Quiet gate"); the noise section says how many readings
were quiet and how much slower the others were.
"""
from __future__ import annotations

import dataclasses
import datetime as _dt
import functools
import json
import math
import os
import sys
import time

import numpy as np

from refimpl.kernels import contracts as C
from refimpl.kernels.buffers import spread_copies
from refimpl.timing.metrics import SHAPE_DIMS, roofline, work

SCHEMA = "refimpl.bench/1"
OUR_BACKENDS = ("numpy", "numba", "c")
ALL_BACKENDS = OUR_BACKENDS + ("torch",)

DEFAULT_ROUNDS = 40     # slices each row's budget is split into (round-robin over all rows): 10 ms each,
                        # so the quiet gate finds enough quiet ones when the host is busy half the time
DEFAULT_BUDGET_S = 0.4  # seconds of samples per row (before the gate leaves the busy slices out)
QUICK_ROUNDS = 2
FAULTS_NOTE = 0.5       # rows with at least this many page faults per call are listed under the table
MAX_SAMPLES = 20000     # per row: high enough that the time budget, not a count, ends a fast row's sampling
GATE_EXTRA_S = 15.0     # extra rounds for rows the quiet gate left short of quiet ones: at most this
                        # long, and at most the planned sample time (budget x targets)

# (dims, causal) per op: prefill-sized and decode-sized cases of a small LLM
DEFAULT_SHAPES = {
    "matmul": [((256, 256, 256), False), ((128, 768, 768), False), ((1, 768, 3072), False)],
    "softmax": [((64, 1024), False)],
    "attention": [((8, 2, 128, 128, 64), True), ((8, 2, 1, 512, 64), True)],
    "layer_norm": [((64, 768), False)],
    "rms_norm": [((64, 768), False)],
    "gelu_tanh": [((64, 3072), False)],
    "silu": [((64, 3072), False)],
    "rope": [((8, 128, 64), False)],
}
QUICK_SHAPES = {
    "matmul": [((64, 64, 64), False)],
    "softmax": [((16, 256), False)],
    "attention": [((4, 2, 32, 32, 32), True)],
    "layer_norm": [((16, 256), False)],
    "rms_norm": [((16, 256), False)],
    "gelu_tanh": [((16, 256), False)],
    "silu": [((16, 256), False)],
    "rope": [((4, 32, 32), False)],
}


# ------------------------------------------------------------------ shapes


def shape_label(dims, causal=False) -> str:
    return "x".join(str(d) for d in dims) + ("c" if causal else "")


def parse_shapes(text: str) -> dict:
    """"op:AxBxC[,op:...]" -> {op: [(dims, causal)]}; attention takes HxHkvxLqxLkxD[c]."""
    out: dict = {}
    for item in filter(None, (t.strip() for t in text.split(","))):
        op, sep, dims = item.partition(":")
        op = op.strip()
        if not sep or op not in SHAPE_DIMS:
            raise ValueError(f"--shapes: {item!r} must be op:AxB..., op one of {list(SHAPE_DIMS)}")
        dims = dims.strip().lower()
        causal = False
        for suffix in (":causal", "c"):
            if dims.endswith(suffix):
                dims, causal = dims[: -len(suffix)], True
        if causal and op != "attention":
            raise ValueError(f"--shapes: {item!r}: only attention takes a causal flag")
        try:
            d = tuple(int(x) for x in dims.split("x"))
        except ValueError:
            raise ValueError(f"--shapes: {item!r}: dims must be integers joined by 'x'") from None
        want = SHAPE_DIMS[op]
        if len(d) != len(want) or any(x <= 0 for x in d):
            raise ValueError(f"--shapes: {item!r}: {op} needs {len(want)} positive sizes {'x'.join(want)}")
        if op == "attention" and d[0] % d[1]:
            raise ValueError(f"--shapes: {item!r}: query heads H={d[0]} must be a multiple of key/value heads Hkv={d[1]}")
        if (d, causal) in out.get(op, []):             # it would be verified and timed twice, shown once
            raise ValueError(f"--shapes: {item!r} is named twice")
        out.setdefault(op, []).append((d, causal))
    if not out:
        raise ValueError(f"--shapes: {text!r} names no shape")
    return out


def case_bytes(op, dims, dtype="float32", causal=False) -> int:
    """Memory a Case holds while it is built and verified, in bytes (an estimate on the high
    side): its inputs in `dtype` and in float64 (the oracle's copies), the float64 answer and
    its bound, four outputs in `dtype`; attention's oracle also holds its float64 H x Lq x Lk
    scores, their exponentials and probabilities."""
    s = np.dtype(dtype).itemsize
    d = dict(zip(SHAPE_DIMS[op], dims))
    n_out = {"matmul": lambda: d["M"] * d["N"], "attention": lambda: d["H"] * d["Lq"] * d["D"],
             "rope": lambda: d["H"] * d["T"] * d["D"]}.get(op, lambda: math.prod(dims))()
    n_in = work(op, tuple(dims), dtype, causal).bytes // s - n_out
    total = n_in * (s + 8) + n_out * (16 + 4 * s)
    if op == "attention":
        total += 3 * 8 * d["H"] * d["Lq"] * d["Lk"] + d["Lq"] * d["Lk"]
    return total


def available_memory() -> int | None:
    """Bytes of memory available to a new allocation now (MemAvailable), or None if unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    except (ValueError, OSError, AttributeError):
        return None


def check_memory(jobs, dtype) -> None:
    """ValueError, before anything is allocated, when the run's cases (all kept until the
    end) would not fit in the memory available."""
    avail = available_memory()
    if avail is None or not jobs:
        return
    need = [(case_bytes(op, dims, dtype, causal), op, shape_label(dims, causal)) for op, dims, causal, _ in jobs]
    total = sum(n for n, *_ in need)
    if total > avail:
        big, op, label = max(need)
        raise ValueError(f"--shapes: the cases need about {total / 2**30:.1f} GiB of memory ({op} {label} "
                         f"alone {big / 2**30:.1f} GiB, {dtype}), but {avail / 2**30:.1f} GiB is available")


# ------------------------------------------------------------------- cases


class Case:
    """One op on one shape: inputs, the float64 oracle's answer and its error bound."""

    def __init__(self, op, dims, causal, dtype, seed=0):
        from refimpl.oracle import layers as L
        self.op, self.dims, self.causal, self.dtype = op, tuple(dims), bool(causal), np.dtype(dtype)
        self.label = shape_label(dims, causal)
        rng = np.random.default_rng(seed)
        dt = self.dtype

        def r(*shape, scale=1.0):
            return (rng.standard_normal(shape) * scale).astype(dt)
        f64 = lambda a: np.asarray(a, np.float64)  # noqa: E731
        kw = {}
        if op == "matmul":
            M, K, N = dims
            a, b = r(M, K), r(K, N)
            args = (a, b)
            self.want = f64(a) @ f64(b)
            self.bound = C.matmul_bound(a, b, dt)
        elif op == "softmax":
            x = r(*dims, scale=4.0)
            args = (x,)
            self.want = L.softmax(f64(x), axis=-1)
            self.bound = C.softmax_bound(x, self.want, dt)
        elif op == "attention":
            H, Hkv, Lq, Lk, D = dims
            q, k, v = r(H, Lq, D), r(Hkv, Lk, D), r(Hkv, Lk, D)
            args, kw = (q, k, v), {"causal": self.causal}
            mask = L.causal_mask(Lq, Lk) if self.causal else None
            self.want = L.multi_head_attention(f64(q), f64(k), f64(v), mask, None)
            self.bound = C.attention_bound(q, k, v, causal=self.causal, dtype=dt)
        elif op == "layer_norm":
            T, D = dims
            x, w, b = r(T, D, scale=2.0) + dt.type(0.5), r(D), r(D)
            args, kw = (x, w, b), {"eps": 1e-5}
            self.want = L.layer_norm(f64(x), f64(w), f64(b), 1e-5)
            self.bound = C.layer_norm_bound(x, w, b, 1e-5, dt)
        elif op == "rms_norm":
            T, D = dims
            x, w = r(T, D, scale=2.0), r(D)
            args, kw = (x, w), {"eps": 1e-6}
            self.want = L.rms_norm(f64(x), f64(w), 1e-6)
            self.bound = C.rms_norm_bound(x, w, 1e-6, dt)
        elif op in ("gelu_tanh", "silu"):
            x = r(*dims, scale=3.0)
            args = (x,)
            self.want = getattr(L, op)(f64(x))
            self.bound = (C.gelu_tanh_bound if op == "gelu_tanh" else C.silu_bound)(x, self.want, dt)
        elif op == "rope":
            H, T, D = dims
            x = r(H, T, D)
            pos = np.arange(T, dtype=np.int64) + 3
            args, kw = (x, pos), {"theta": 10000.0, "interleaved": False}
            self.want = L.rope(f64(x), pos, 10000.0, False)
            self.bound = C.rope_bound(x, pos, 10000.0, dt)
        else:
            raise ValueError(f"unknown op {op!r}")
        # the same places (mod 4 KiB) in every run: kernel speed depends on them (kernels.buffers)
        self.args, self.kwargs = tuple(spread_copies(args)), kw
        self.work = work(op, self.dims, dt, self.causal)


# ------------------------------------------------------------------- torch


def torch_impl(op: str):
    """A torch function with the op's contract (numpy in, numpy out), or None."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return None
    t = torch.from_numpy

    if op == "matmul":
        return lambda a, b: torch.mm(t(a), t(b)).numpy()
    if op == "softmax":
        return lambda x: torch.softmax(t(x), -1).numpy()
    if op == "attention":
        def attn(q, k, v, causal=False):
            Lq, Lk = q.shape[1], k.shape[1]
            mask = None
            if causal and Lq != Lk:        # bottom-right causal: query i sees keys 0..Lk-Lq+i
                mask = torch.ones(Lq, Lk, dtype=torch.bool).tril(Lk - Lq)
            # a batch dimension of 1: with 3-D inputs torch falls back to its slow unfused path
            return F.scaled_dot_product_attention(t(q)[None], t(k)[None], t(v)[None], attn_mask=mask,
                                                  is_causal=bool(causal and Lq == Lk),
                                                  enable_gqa=True)[0].numpy()
        return attn
    if op == "layer_norm":
        return lambda x, w, b, eps=1e-5: F.layer_norm(t(x), (x.shape[-1],), t(w), t(b), eps).numpy()
    if op == "rms_norm":
        return lambda x, w, eps=1e-6: F.rms_norm(t(x), (x.shape[-1],), t(w), eps).numpy()
    if op == "gelu_tanh":
        return lambda x: F.gelu(t(x), approximate="tanh").numpy()
    if op == "silu":
        return lambda x: F.silu(t(x)).numpy()
    if op == "rope":
        def rope(x, positions, theta=10000.0, interleaved=False):
            D = x.shape[-1]
            inv = theta ** (-torch.arange(0, D, 2, dtype=torch.float64) / D)
            ang = t(positions).to(torch.float64)[:, None] * inv[None, :]
            cos, sin = ang.cos().to(t(x).dtype), ang.sin().to(t(x).dtype)
            xt = t(x)
            if interleaved:                            # pairs (2i, 2i+1), llama2.c / Meta
                x1, x2 = xt[..., 0::2], xt[..., 1::2]
                return torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).flatten(-2).numpy()
            x1, x2 = xt[..., : D // 2], xt[..., D // 2:]     # pairs (i, i + D/2), HF
            return torch.cat([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1).numpy()
        return rope
    return None


def prepare_of(fn, op: str):
    """The `prepare(...) -> CCall` of a C kernel: `fn.prepare`, else its module's
    `prepare_<op>`, else the module's `prepare` when the module is the op's own
    (`refimpl.kernels.c_matmul`).  None when the kernel offers none."""
    p = getattr(fn, "prepare", None)
    if callable(p):
        return p
    mod = sys.modules.get(getattr(fn, "__module__", "") or "")
    if mod is None:
        return None
    p = getattr(mod, f"prepare_{op}", None)
    if callable(p):
        return p
    p = getattr(mod, "prepare", None)
    if callable(p) and mod.__name__.rsplit(".", 1)[-1].endswith(op):
        return p
    return None


def _impl(op, backend):
    if backend == "torch":
        return torch_impl(op)
    from refimpl.kernels import get
    return get(op, backend)


# ------------------------------------------------------------------ verify


def _worst(s) -> str:
    """The worst element of a failed comparison (an ErrorStats), in words."""
    return (f"worst element {s.worst_index}: got {s.worst_got!r}, oracle {s.worst_want!r}, "
            f"bound {s.worst_bound:.3e} (ratio {s.bound_ratio:.3g})")


def verify(case: Case, backend: str, fn) -> dict:
    """Run `fn` on the case (and its prepared C call, if any); check against the bound.

    A TypeError naming float64, raised by the call itself on float64 inputs, is the refusal
    the fast backends' contract allows (`unsupported`: not timed, not a failure); an output
    of the wrong dtype, or any other error, fails the check."""
    from refimpl.verify.compare import error_stats
    row = {"op": case.op, "backend": backend, "shape": case.label, "dtype": str(case.dtype),
           "passed": False, "bound_ratio": None, "max_ulp": None, "nmse": None, "error": None}
    try:
        outs = [("call", fn(*case.args, **case.kwargs))]
    except Exception as e:  # a crash is a failed verification, reported with its message
        row["error"] = f"{type(e).__name__}: {e}"
        if isinstance(e, TypeError) and case.dtype == np.float64 and "float64" in str(e):
            row["unsupported"] = str(e)      # the call refused float64 inputs: the contract allows it
        return row
    try:
        prep = prepare_of(fn, case.op) if backend == "c" else None
        if prep is not None:
            cc = prep(*case.args, **case.kwargs)
            cc.run()
            outs.append(("prepare().run()", cc.out))
        worst = None
        for how, out in outs:
            out = np.asarray(out)
            if out.dtype != case.dtype:
                row["error"] = f"{how} returned dtype {out.dtype}, expected {case.dtype}"
                return row
            s = error_stats(out, case.want, case.bound)
            if worst is None or s.bound_ratio > worst[1].bound_ratio or s.nonfinite_mismatches:
                worst = (how, s)
            if s.nonfinite_mismatches or not s.bound_ratio <= 1.0:
                row["error"] = f"{how}: {_worst(s)}; nonfinite mismatches {s.nonfinite_mismatches}"
        s = worst[1]
        row.update(bound_ratio=s.bound_ratio, max_ulp=s.max_ulp, nmse=s.nmse, passed=row["error"] is None)
    except Exception as e:  # a crash is a failed verification, reported with its message
        row["error"] = f"{type(e).__name__}: {e}"
    return row


def verify_edges(op: str, backend: str, fn, dtype: str) -> dict:
    """The verifier's edge cases for `fn` (`refimpl.verify.check`, no hypothesis examples):
    shapes 1 and primes, several tiles, vector tails after blocks of 4 to 64 lanes, special
    values, at sizes the timed shapes (multiples of 64) never reach; a C kernel's prepared
    call (`prepare(...).run()`, the entry point the timing loop calls) as well as its direct
    call.  A verification row with shape "edge cases (N)"; `error` names the first failing
    case (and the entry point)."""
    from refimpl.verify import check
    row = {"op": op, "backend": backend, "shape": "edge cases", "dtype": dtype, "passed": False,
           "bound_ratio": None, "max_ulp": None, "nmse": None, "error": None}
    entries = [("", fn)]
    prep = prepare_of(fn, op) if backend == "c" else None
    if prep is not None:
        @functools.wraps(fn)            # the same signature for check(): the same keywords passed
        def prepared(*args, **kwargs):
            cc = prep(*args, **kwargs)
            cc.run()
            return cc.out
        entries.append(("prepare().run(): ", prepared))
    reps = []
    try:
        for how, impl in entries:
            reps.append((how, check(impl, op, examples=0, dtype=np.dtype(dtype))))
    except Exception as e:  # a crash is a failed verification, reported with its message
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    stats = [c.stats for _, rep in reps for c in rep.cases if c.stats is not None]
    worst = max(rep.worst_ratio for _, rep in reps)
    row.update(shape=f"edge cases ({len(reps[0][1].cases)})", passed=all(rep.passed for _, rep in reps),
               bound_ratio=worst if math.isfinite(worst) else None,
               max_ulp=max((float(s.max_ulp) for s in stats), default=None),
               nmse=max((float(s.nmse) for s in stats), default=None))
    for how, rep in reps:
        if not rep.passed:
            f = rep.failures[0]
            row["error"] = f"{how}case {f.name!r} ({f.shapes}): " + (f.error or _worst(f.stats))
            break
    return row


# -------------------------------------------------------------------- run


class _Threads:
    """harness.SingleThreaded, with torch imported first when the run may time it (so its pool
    is limited too)."""

    def __enter__(self):
        from refimpl.timing.harness import SingleThreaded
        torch_impl("matmul")                             # imports torch when it is installed
        self._st = SingleThreaded().__enter__()
        return self

    def __exit__(self, *exc):
        return self._st.__exit__(*exc)


def plan(ops=None, backends=None, shapes=None, quick=False):
    """[(op, dims, causal, [backends])] the run will verify and time.

    With `shapes` ({op: [(dims, causal)]}, `parse_shapes`) the ops are its ops; when `ops` is
    given too, both must name the same ops (ValueError naming the op otherwise).  ValueError
    when nothing is left to time: no requested backend has a kernel for a requested op."""
    from refimpl.kernels import available
    have = available()
    for name, given in (("--ops", ops), ("--backends", backends), ("--shapes", shapes)):
        if given is not None and not given:
            raise ValueError(f"{name}: none given")
    ops = list(dict.fromkeys(ops or (shapes.keys() if shapes else SHAPE_DIMS)))
    for op in ops:
        if op not in SHAPE_DIMS:
            raise ValueError(f"--ops: unknown op {op!r}; ops are {list(SHAPE_DIMS)}")
    if shapes:
        extra = [op for op in shapes if op not in ops]
        if extra:
            raise ValueError(f"--shapes: {', '.join(extra)} not in --ops {','.join(ops)} "
                             "(add it to --ops, or leave its shapes out)")
        lacking = [op for op in ops if op not in shapes]
        if lacking:
            raise ValueError(f"--ops: {', '.join(lacking)} has no shape in --shapes (with --shapes, "
                             f"every op of --ops needs its shapes there, e.g. {lacking[0]}:"
                             f"{'x'.join(SHAPE_DIMS[lacking[0]])})")
    backends = list(dict.fromkeys(backends or ALL_BACKENDS))
    for b in backends:
        if b not in ALL_BACKENDS:
            raise ValueError(f"--backends: unknown backend {b!r}; backends are {list(ALL_BACKENDS)}")
    table = shapes or (QUICK_SHAPES if quick else DEFAULT_SHAPES)
    torch_ok = torch_impl("matmul") is not None
    out = []
    for op in ops:
        bks = [b for b in backends if (b in have.get(op, []) or (b == "torch" and torch_ok))]
        if bks:
            out.extend((op, tuple(dims), bool(causal), bks) for dims, causal in table.get(op, []))
    if not out:
        raise ValueError(f"nothing to time: no backend of {','.join(backends)} has a kernel for "
                         f"{','.join(ops)}" + ("" if torch_ok or "torch" not in backends else
                                               " (torch is not installed)"))
    return out


def run(ops=None, backends=None, shapes=None, dtype="float32", cold=False, quick=False,
        budget_s: float | None = None, progress: bool = True, console=None, argv=None,
        rounds: int | None = None, max_samples: int | None = None, gate: bool = True) -> dict:
    """Verify, then time; returns the report dict (see the module docstring for its schema)."""
    from refimpl.timing.harness import (GATE_LEVEL_PCT, GATE_MIN_ROUNDS, GATE_TOL, QuietProbe, cpu_times,
                                        fewest_max_samples, measure_interleaved)
    from refimpl.timing.machine import blas_info, describe
    dtype = str(np.dtype(dtype))
    if dtype not in ("float32", "float64"):
        raise ValueError(f"--dtype must be float32 or float64, got {dtype}")
    if budget_s is None:
        budget_s = 0.03 if quick else DEFAULT_BUDGET_S
    if not (isinstance(budget_s, (int, float)) and 0 < budget_s < math.inf):
        raise ValueError(f"--budget must be a finite number of seconds > 0, got {budget_s}")
    if rounds is None:
        rounds = QUICK_ROUNDS if quick else DEFAULT_ROUNDS
    if not (isinstance(rounds, int) and rounds >= 1):
        raise ValueError(f"--rounds must be an integer >= 1, got {rounds!r}")
    if max_samples is None:
        max_samples = MAX_SAMPLES
    fewest = max(15, fewest_max_samples(rounds))
    if not (isinstance(max_samples, int) and max_samples >= fewest):
        raise ValueError(f"--max-samples must be an integer >= {fewest} (15, and with --rounds {rounds} a "
                         f"sample or more in every round), got {max_samples!r}")
    gate_asked = bool(gate)
    gate = bool(gate and rounds >= 2 * GATE_MIN_ROUNDS)   # fewer rounds leave too few quiet ones
    jobs = plan(ops, backends, shapes, quick)
    check_memory(jobs, dtype)
    machine = describe(bandwidth=True)
    report = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
              "argv": list(argv) if argv is not None else None,
              "settings": {"dtype": dtype, "cold": bool(cold), "budget_s": budget_s, "rounds": rounds,
                           "max_samples": max_samples, "threads": 1, "quick": bool(quick),
                           "gate": gate, "gate_asked": gate_asked, "gate_min_rounds": 2 * GATE_MIN_ROUNDS},
              "machine": machine.as_dict(), "verification": [], "results": [], "passed": False,
              "warnings": []}
    prog = _progress(console) if progress else None
    cases = {}
    with _Threads():
        # the thread counts in force from here on, not describe()'s (cached, read before the limit)
        machine = dataclasses.replace(machine, blas=blas_info())
        report["machine"] = machine.as_dict()
        # 1. verify everything first
        n_verify = sum(len(b) for *_, b in jobs)
        task = prog.add_task("verifying", total=n_verify) if prog else None
        if prog:
            prog.start()
        try:
            failed = []
            for op, dims, causal, bks in jobs:
                case = Case(op, dims, causal, dtype)
                cases[(op, dims, causal)] = case
                for b in list(bks):
                    fn = _impl(op, b)
                    row = verify(case, b, fn)
                    report["verification"].append(row)
                    if not row["passed"]:
                        if row.get("unsupported"):
                            report["warnings"].append(f"{b} {op}: does not support {dtype} "
                                                      f"({row['unsupported']}); not timed")
                            bks.remove(b)
                        elif b == "torch":
                            report["warnings"].append(f"torch {op} {case.label}: {row['error']} "
                                                      "(torch dropped from this case's ratios)")
                            bks.remove(b)
                        else:
                            failed.append(row)
                    if prog:
                        prog.advance(task)
            # ... and each kernel that passed there on the verifier's edge cases (tails, tiles,
            # special values)
            broken = {(f["op"], f["backend"]) for f in failed}
            for op, b in dict.fromkeys((op, b) for op, *_, bks in jobs for b in bks if (op, b) not in broken):
                row = verify_edges(op, b, _impl(op, b), dtype)
                report["verification"].append(row)
                if not row["passed"]:
                    if b == "torch":
                        report["warnings"].append(f"torch {op} edge cases: {row['error']} "
                                                  "(torch dropped from this op's ratios)")
                        for o, *_, bks in jobs:
                            if o == op and b in bks:
                                bks.remove(b)
                    else:
                        failed.append(row)
            if failed:
                report["failed"] = failed
                return report
            # 2. time: every row round-robin (`rounds` slices of budget_s / rounds each), so a
            # drift of the host is shared by all rows instead of hitting whichever ran during it
            slots, targets = [], []
            for op, dims, causal, bks in jobs:
                case = cases[(op, dims, causal)]
                for b in bks:
                    fn = _impl(op, b)
                    prep = prepare_of(fn, op) if b == "c" else None
                    if prep is not None:
                        target = prep(*case.args, **case.kwargs)
                    else:
                        target = functools.partial(fn, *case.args, **case.kwargs)
                    slots.append((case, b))
                    targets.append((target, (), {}, f"{op}/{b}"))
            if not slots:
                raise ValueError("nothing left to time: every kernel was dropped at verification ("
                                 + "; ".join(report["warnings"]) + ")")
            probes = machine_probes()
            targets += [(t, (), {}, f"probe/{nm}") for nm, t in probes]
            if prog:
                prog.update(task, description="timing", completed=0, total=len(targets) * rounds)
            cpu0 = cpu_times()
            w0 = time.perf_counter()
            probe = QuietProbe() if gate else None
            ms = measure_interleaved(targets, rounds=rounds, cold=cold, budget_s=budget_s, max_samples=max_samples,
                                     on_slice=(lambda k, i: prog.advance(task)) if prog else None, gate=probe,
                                     gate_extra_s=min(GATE_EXTRA_S, budget_s * len(targets)))
            report["noise"] = _noise_report(ms, cpu0, cpu_times(), time.perf_counter() - w0)
            if probe is not None:
                report["noise"]["gate"] = {
                    "probe": f"median of {probe.calls} Python-level calls of a {probe.nbytes >> 10} KiB C read",
                    "tol": GATE_TOL, "level_pct": GATE_LEVEL_PCT, "level_ticks": probe.level,
                    "readings": len(probe.readings), "quiet_readings": int(sum(probe.quiet)),
                    "extra_visits": probe.extra_visits,
                    "busy_over_quiet": (float(np.median([x for x, q in zip(probe.readings, probe.quiet) if not q]))
                                        / probe.level if not all(probe.quiet) and probe.level > 0 else None)}
            pms, ms = ms[len(slots):], ms[:len(slots)]
            report["noise"]["probes"] = {nm: _probe_report(nm, t, m) for (nm, t), m in zip(probes, pms)}
            machine, src, warn = core_clock(machine, report["noise"]["probes"].get("core_add_chain"))
            report["machine"] = machine.as_dict() | src
            if warn:
                report["warnings"].append(warn)
            if report["noise"]["other_cpus_busy"] is not None and report["noise"]["other_cpus_busy"] > 0.2:
                report["warnings"].append(
                    f"other CPUs of this machine were {report['noise']['other_cpus_busy']:.0%} busy while timing "
                    "(they share caches and memory bandwidth with the timed CPU)")
            rows_by_case: dict = {}
            for (case, b), m in zip(slots, ms):
                rows_by_case.setdefault(id(case), {})[b] = _row(case, b, m, machine, cold)
            for rows in rows_by_case.values():
                for b, row in rows.items():
                    for ref in ("numpy", "torch"):
                        r = rows.get(ref)
                        row[f"vs_{ref}"] = (r["median_ticks"] / row["median_ticks"]
                                            if r and row["median_ticks"] > 0 else None)
                    report["results"].append(row)
        finally:
            if prog:
                prog.stop()
    report["passed"] = True
    return report


PROBE_ADDS = 1 << 16


def machine_probes() -> list:
    """[(name, target)] timed beside the rows, in the same rounds: the core clock (a dependent
    add chain, 1 core cycle per add) and a shared-cache read of half the L3 (what other tenants'
    traffic and occupancy of the L3 slow)."""
    from refimpl.timing.harness import BufferRead, add_chain_ccall
    from refimpl.timing.machine import cache_sizes
    l3 = next((c["size"] for c in cache_sizes() if c["level"] == 3), 32 << 20)
    return [("core_add_chain", add_chain_ccall(PROBE_ADDS)),
            ("l3_read", BufferRead(max(256, l3 // 2 // 256 * 256)))]   # whole 256-byte trips


def core_clock(machine, probe: dict | None, source: str = "core_add_chain probe (same rounds as the rows)"):
    """(machine, source fields, warning) with core_per_tsc taken from the core_add_chain probe.

    The calibration measures core/TSC once, before timing, in ~0.1 s; the probe is timed in
    the same rounds as the rows, over the whole run.  On this shared host the core clock
    moved by up to 22 % between back-to-back runs (the probe's core/TSC 1.40 in one run,
    1.15 in the next, every row 22 % slower in TSC ticks with it), and the one-shot
    calibration differed from its own run's probe by 0-8 % (12 runs; 7-8 % in three).
    Every estimated core-cycle figure of the run (median_core_cycles, FLOP/cycle, % of
    peak, the roofline's compute roof in ticks) uses the probe's value.  The calibration's
    stays as `core_per_tsc_calibrated`; it is used when the probe did not run or read more
    than 2x away from it (a broken probe, not a clock)."""
    cal = machine.core_per_tsc
    val = (probe or {}).get("core_per_tsc")
    src = {"core_per_tsc_calibrated": cal, "core_per_tsc_source": "calibration"}
    if val is None:
        return machine, src, None
    if not (math.isfinite(val) and cal / 2 <= val <= cal * 2):
        return machine, src, (f"core/TSC from the core_add_chain probe ({val:.3g}) is more than 2x away from "
                               f"the calibration's ({cal:.3g}); core cycles use the calibration's")
    src["core_per_tsc_source"] = source
    return dataclasses.replace(machine, core_per_tsc=float(val)), src, None


def _chain_core_per_tsc(median_ticks: float) -> float | None:
    """Core cycles per tick from the median ticks of the PROBE_ADDS dependent adds (1 cycle each)."""
    return PROBE_ADDS / median_ticks if median_ticks > 0 else None


def core_per_tsc_now(budget_s: float = 0.05) -> float | None:
    """Core/TSC from the add-chain probe timed now (the caller pins the thread)."""
    from refimpl.timing.harness import add_chain_ccall, measure
    return _chain_core_per_tsc(measure(add_chain_ccall(PROBE_ADDS), pin=False, budget_s=budget_s).median)


def _probe_report(name, target, m) -> dict:
    d = {"median_ticks": m.median, "min_ticks": m.min, "cv": m.cv, "cv_raw": m.cv_raw, "cv_within": m.cv_within,
         "n": m.n, "round_medians": m.round_medians, "round_kept": m.round_kept}
    if name == "core_add_chain":
        d["core_per_tsc"] = _chain_core_per_tsc(m.median)
    else:
        d["bytes"] = target.nbytes
        d["bytes_per_tick"] = target.nbytes / m.median if m.median > 0 else None
    return d


def _noise_report(ms, cpu0: dict, cpu1: dict, wall_s: float) -> dict:
    """What the machine did around the timing phase (see the schema's "noise")."""
    from refimpl.timing.harness import busy_fraction
    pinned_cpu = ms[0].cpu if ms else -1
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    return {"timing_wall_s": wall_s, "cpu": pinned_cpu,
            "other_cpus_busy": busy_fraction(cpu0, cpu1, exclude=(pinned_cpu,)) if len(cpu1) > 1 else None,
            "steal_s": sum(m.steal_ticks for m in ms) / hz,
            "preempted": sum(m.preempted for m in ms), "migrations": sum(m.migrations for m in ms)}


def _row(case, backend, m, machine, cold) -> dict:
    counted = m.pmu == "hardware" and m.pmu_cycles is not None      # core cycles from the PMU
    rf = roofline(case.work, max(m.median, 0.0), machine, case.dtype, cold,
                  core_cycles=m.pmu_cycles if counted else None)
    return {"op": case.op, "backend": backend, "shape": case.label, "dims": list(case.dims),
            "causal": case.causal, "dtype": str(case.dtype), "cold": bool(cold), "kind": m.kind,
            "median_ticks": m.median, "min_ticks": m.min, "mad_ticks": m.mad, "p90_ticks": m.p90,
            "mean_ticks": m.mean, "cv": m.cv, "cv_raw": m.cv_raw, "n": m.n, "reps": m.reps, "rounds": m.rounds,
            "cv_within": m.cv_within, "round_medians": m.round_medians, "round_kept": m.round_kept,
            "quiet_rounds": m.quiet_rounds, "median_all_ticks": m.median_all, "cv_all": m.cv_all,
            "unstable": m.unstable, "reasons": m.reasons, "preempted": m.preempted,
            "faults_per_call": m.faults_per_call,
            "median_core_cycles": m.pmu_cycles if counted else m.median * machine.core_per_tsc,
            "core_cycles_source": "pmu" if counted else "estimate",
            "pmu_instructions": m.pmu_instructions if counted else None,
            "ipc": (m.pmu_instructions / m.pmu_cycles
                    if counted and m.pmu_instructions is not None and m.pmu_cycles > 0 else None),
            "flops": case.work.flops, "bytes": case.work.bytes, "intensity": rf.intensity,
            "flop_per_tick": rf.flop_per_tick, "flop_per_core_cycle": rf.flop_per_core_cycle,
            "pct_peak": rf.pct_peak, "bytes_per_tick": rf.bytes_per_tick,
            "roofline_ticks": rf.roofline_ticks, "roofline_bound": rf.bound,
            "roofline_level": rf.bandwidth_level, "measured_over_bound": rf.measured_over_bound,
            "vs_numpy": None, "vs_torch": None}


def _progress(console):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=console, transient=True)


# ----------------------------------------------------------------- output


def _fmt(x, spec="{:.3g}"):
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return spec.format(x)


def fmt_count(x):
    """A count (ticks, FLOPs, bytes) shortened for a table: 1.235M, 45.5k, 26.0."""
    if x >= 1e6:
        return f"{x / 1e6:.3f}M"
    if x >= 1e4:
        return f"{x / 1e3:.1f}k"
    return f"{x:.1f}"


def _core_source(report: dict) -> str:
    cal = report["machine"].get("core_per_tsc_calibrated")
    if cal is None or not _probe_clock(report):
        return ""
    return f"; from the add chain timed beside the rows, {cal:.3f} at calibration"


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    m = report["machine"]
    console.print(f"[bold]{m['cpu_model']}[/] ({m.get('uarch') or 'unknown uarch'}), counter {m['counter']} "
                  f"{m['tsc_hz'] / 1e9:.4f} GHz, core/TSC {m['core_per_tsc']:.3f} (est. core "
                  f"{m['tsc_hz'] * m['core_per_tsc'] / 1e9:.2f} GHz{_core_source(report)}), peak "
                  f"{m['peak_flop_per_cycle'][report['settings']['dtype']]:g} FLOP/core cycle "
                  f"\\[{m['peak_source']}]; timer overhead {m['overhead_ticks']} ticks, step "
                  f"{m['granularity_ticks']}; PMU: {m['perf_reason'] if not m['perf_available'] else 'yes'}"
                  + ("" if m.get("cpu_ids", True) else "; the counter reads no cpu id (no RDTSCP): "
                     "a migration inside a sample is not seen, only pinning prevents it"))
    bw = m.get("bandwidth") or {}
    if bw:
        console.print("bandwidth B/tick (read / copy): " + ", ".join(
            f"{lv} {d['read']:.1f}/{d['copy']:.1f}" for lv, d in bw.items()))
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    bad = [v for v in report["verification"]
           if not v["passed"] and v["backend"] != "torch" and not v.get("unsupported")]
    if bad:
        console.print(f"[bold red]{len(bad)} kernel(s) FAILED verification against the oracle; nothing timed:[/]")
        for v in bad:
            console.print(f"  {v['op']}/{v['backend']} {v['shape']} {v['dtype']}: {v['error']}")
        return
    ok = [v for v in report["verification"] if v["passed"]]
    dropped = [v for v in report["verification"] if not v["passed"]]    # torch failures, float64 refusals
    console.print(("" if dropped else "all ") + f"{len(ok)} kernel checks passed against the float64 oracle "
                  f"(worst bound ratio {max(((v['bound_ratio'] or 0) for v in ok), default=0):.3g})"
                  + (f"; {len(dropped)} dropped, not timed: " + ", ".join(
                      f"{v['op']}/{v['backend']} {v['shape']} "
                      f"({'refuses ' + v['dtype'] if v.get('unsupported') else 'failed; an optional peer'})"
                      for v in dropped) if dropped else ""))
    counted = any(r.get("core_cycles_source") == "pmu" for r in report["results"])
    t = Table(title=f"refimpl bench ({report['settings']['dtype']}, "
                    f"{'cold' if report['settings']['cold'] else 'warm'} cache, 1 thread; ticks = TSC ticks/call, "
                    + ("cyc = core cycles counted by the PMU, IPC = instructions / cyc)" if counted
                       else "cyc = est. core cycles)"))
    cols = [("op", "left"), ("shape", "left"), ("backend", "left"), ("median ticks", "right"),
            ("cv", "right"), ("cyc" if counted else "est. cyc", "right")] + ([("IPC", "right")] if counted else []) + [
            ("FLOP/cyc", "right"), ("% peak", "right"), ("B/tick", "right"), ("FLOP/B", "right"), ("roof", "left"),
            ("x roof", "right"), ("x numpy", "right"), ("x torch", "right")]
    for col, just in cols:
        t.add_column(col, justify=just)
    for r in report["results"]:
        flag = " [red]![/]" if r["unstable"] else ""
        ipc = [_fmt(r.get("ipc"), "{:.2f}")] if counted else []
        t.add_row(r["op"], r["shape"], r["backend"], fmt_count(r["median_ticks"]) + flag, f"{r['cv']:.1%}",
                  fmt_count(r["median_core_cycles"]), *ipc, _fmt(r["flop_per_core_cycle"]),
                  _fmt(r["pct_peak"], "{:.1f}"), _fmt(r["bytes_per_tick"]), _fmt(r["intensity"]),
                  f"{r['roofline_bound'][:3]} {r['roofline_level']}", _fmt(r["measured_over_bound"], "{:.2f}"),
                  _fmt(r["vs_numpy"], "{:.2f}"), _fmt(r["vs_torch"], "{:.2f}"))
    console.print(t)
    nz, st = report.get("noise"), report["settings"]
    if nz:
        busy = nz.get("other_cpus_busy")
        rounds = st.get("rounds", 1)
        how = (f"{rounds} rounds of {st['budget_s'] / rounds:.3g} s per row, round-robin" if rounds > 1
               else f"each row in one block of {st['budget_s']:.3g} s")
        console.print(f"timed on CPU {nz['cpu']}, {how}, {nz['timing_wall_s']:.1f} s in all; other CPUs busy "
                      f"{'-' if busy is None else f'{busy:.0%}'}; steal {nz['steal_s']:.2f} s; "
                      f"{nz['preempted']} preempted sample(s) dropped")
        g = nz.get("gate")
        if g:
            busy = g.get("busy_over_quiet")
            console.print(f"quiet gate: {g['quiet_readings']} of {g['readings']} probe readings within "
                          f"{g['tol']:.0%} of the quiet level"
                          + (f" (the others {busy:.2f}x slower: the host was busy)" if busy else "")
                          + "; each row's statistics pool the slices with quiet readings on both sides "
                            "(median_all_ticks: all slices; --no-gate: off)")
        elif st.get("gate_asked"):
            console.print(f"quiet gate: off, every round kept (it needs --rounds >= {st['gate_min_rounds']}, "
                          f"to leave enough quiet ones; this run had {rounds})")
        pr = nz.get("probes") or {}
        if pr:
            core, l3 = pr.get("core_add_chain") or {}, pr.get("l3_read") or {}
            console.print(f"machine probes (same rounds): core/TSC {_fmt(core.get('core_per_tsc'), '{:.3f}')} "
                          f"(cv {_fmt(core.get('cv'), '{:.1%}')}), L3 read {_fmt(l3.get('bytes_per_tick'), '{:.1f}')} "
                          f"B/tick (cv {_fmt(l3.get('cv'), '{:.1%}')})")
    faulting = [r for r in report["results"] if (r.get("faults_per_call") or 0) >= FAULTS_NOTE]
    if faulting:
        console.print("page faults per call (each maps a 4 KiB page again: part of the row's time): " + "; ".join(
            f"{r['op']}/{r['backend']} {r['shape']} {r['faults_per_call']:.1f}" for r in faulting))
    unstable = [r for r in report["results"] if r["unstable"]]
    if unstable:
        console.print("[red]![/] unstable: " + "; ".join(
            f"{r['op']}/{r['backend']} {r['shape']}: {', '.join(r['reasons'])}" for r in unstable))
    console.print("x numpy / x torch = reference median / this median (> 1: faster). "
                  "x roof = median / roofline minimum.")


def write_json(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=_json_default)
        f.write("\n")


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


def read_json(path: str) -> dict:
    """Load a bench JSON file, checking the schema and the row fields compare uses: ValueError
    naming the file (and the row and field) otherwise."""
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text: {e}") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not JSON: {e}") from None
    if not isinstance(d, dict) or d.get("schema") != SCHEMA:
        raise ValueError(f"{path}: not a refimpl bench file (schema {d.get('schema') if isinstance(d, dict) else None!r}, "
                         f"expected {SCHEMA!r})")
    results = d.get("results", [])
    if not isinstance(results, list):
        raise ValueError(f"{path}: results must be a list of rows, got {type(results).__name__}")
    need = ("op", "backend", "shape", "dtype", "median_ticks", "min_ticks", "cv", "flops", "bytes")
    for i, r in enumerate(results):
        if not isinstance(r, dict):
            raise ValueError(f"{path}: results[{i}] must be an object, got {type(r).__name__}")
        miss = [k for k in need if k not in r]
        if miss:
            raise ValueError(f"{path}: results[{i}] lacks {miss}")
        where = f"{path}: results[{i}] ({r['op']}/{r['backend']} {r['shape']})"
        bad = [k for k in ("op", "backend", "shape", "dtype") if not isinstance(r[k], str)]
        if bad:
            raise ValueError(f"{where}: {bad[0]} must be a string, got {r[bad[0]]!r}")
        # the numbers compare divides by or scales with: median > 0, the rest >= 0 (or null)
        for k, positive, optional in (("median_ticks", True, False), ("cv", False, False),
                                      ("mad_ticks", False, True), ("median_core_cycles", False, True),
                                      ("faults_per_call", False, True)):
            v = r.get(k)
            if v is None and optional:
                continue
            ok = isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
            if not (ok and (v > 0 if positive else v >= 0)):
                raise ValueError(f"{where}: {k} must be a finite number {'> 0' if positive else '>= 0'}"
                                 f"{' or null' if optional else ''}, got {v!r}")
    return d


# ---------------------------------------------------------------- compare


def _key(r):
    return (r["op"], r["backend"], r["shape"], r["dtype"], bool(r.get("cold", False)))


def _noise(r) -> float:
    """Relative noise of a row's median: its robust CV, or 1.4826 MAD / median."""
    cv = r.get("cv") or 0.0
    med = r.get("median_ticks") or 0.0
    mad = r.get("mad_ticks")
    if mad is not None and med > 0:
        cv = max(cv, 1.4826 * mad / med)
    return float(cv)


def compare(old: dict, new: dict, sigmas: float = 3.0, min_change: float = 0.05) -> list[dict]:
    """Rows matched by (op, backend, shape, dtype, cold): ratio new/old of median ticks.

    A row is a regression when ratio > 1 + t and an improvement when
    ratio < 1 / (1 + t), with t = max(sigmas x sqrt(noise_old^2 + noise_new^2),
    min_change): the rows' own noise, floored by `min_change` because separate
    runs differ by more than one run's sample noise (frequency, placement).
    With >= SHIFT_MIN_ROWS rows, each row also carries `vs_shift` (its ratio over the
    run-wide shift, `run_shift`) and `verdict_vs_shift` (the same test on that): what
    moved the row against the others.  When both runs measured their core clock beside
    the rows (machine.core_per_tsc_source, `core_clock`), each row also carries
    `core_ratio` (new / old estimated core cycles) and `verdict_core`: a change of the
    host's core clock (22 % between two back-to-back runs, measured here) moves every
    row's ticks but not its core cycles, while a change of the code moves both.  Else
    those two are None.  `old_faults` / `new_faults` are the rows' page faults per call
    (None when a run did not record them).  Rows of only one run are left out (`unmatched`
    lists them).  The exit status of `refimpl bench compare` follows `verdict`, and is a
    failure too when a row of `old` is missing from `new`.
    """
    for name, v in (("--sigmas", sigmas), ("--min-change", min_change)):
        if not (isinstance(v, (int, float)) and v >= 0):
            raise ValueError(f"{name} must be a number >= 0, got {v!r}")
    olds = {_key(r): r for r in old.get("results", [])}
    cycles = _probe_clock(old) and _probe_clock(new)
    out = []
    for r in new.get("results", []):
        o = olds.get(_key(r))
        if o is None:
            continue
        noise = math.hypot(_noise(o), _noise(r))
        thr = max(sigmas * noise, min_change)
        ratio = r["median_ticks"] / o["median_ticks"] if o["median_ticks"] > 0 else math.inf
        verdict = _verdict(ratio, thr)
        out.append({"op": r["op"], "backend": r["backend"], "shape": r["shape"], "dtype": r["dtype"],
                    "cold": bool(r.get("cold", False)), "old_ticks": o["median_ticks"],
                    "new_ticks": r["median_ticks"], "ratio": ratio, "threshold": thr, "verdict": verdict})
        co, cn = o.get("median_core_cycles"), r.get("median_core_cycles")
        core = cn / co if cycles and co and cn else None
        out[-1]["core_ratio"] = core
        out[-1]["verdict_core"] = _verdict(core, thr) if core is not None else None
        out[-1]["old_faults"], out[-1]["new_faults"] = o.get("faults_per_call"), r.get("faults_per_call")
    shift = run_shift(out)
    for row in out:
        row["vs_shift"] = row["ratio"] / shift["ratio"] if shift else None
        row["verdict_vs_shift"] = (_verdict(row["vs_shift"], row["threshold"]) if shift else None)
    return out


def _label(key) -> str:
    op, backend, shape, dtype, cold = key
    return f"{op}/{backend} {shape} {dtype}" + (" cold" if cold else "")


def unmatched(old: dict, new: dict) -> tuple[list[str], list[str]]:
    """(rows only in `old`, rows only in `new`) as "op/backend shape dtype[ cold]" labels: the rows
    `compare` cannot match.  `refimpl bench compare` fails (exit 1) on a row of `old` missing from
    `new` (a kernel no longer timed cannot show its regression) and lists the new ones."""
    ko = [_key(r) for r in old.get("results", [])]
    kn = [_key(r) for r in new.get("results", [])]
    so, sn = set(ko), set(kn)
    return [_label(k) for k in ko if k not in sn], [_label(k) for k in kn if k not in so]


def settings_differences(old: dict, new: dict) -> list[str]:
    """The settings (dtype, cold, quick) two runs differ in, as "name old -> new": their rows
    differ in shape or in what they measure, so the ratios are not comparable."""
    so, sn = old.get("settings") or {}, new.get("settings") or {}
    return [f"{k} {so.get(k)} -> {sn.get(k)}" for k in ("dtype", "cold", "quick") if so.get(k) != sn.get(k)]


def _probe_clock(report: dict) -> bool:
    """Whether the run's core cycles use a core clock measured beside its rows."""
    return (report.get("machine") or {}).get("core_per_tsc_source", "calibration") != "calibration"


def _verdict(ratio: float, thr: float) -> str:
    return "regression" if ratio > 1 + thr else ("improvement" if ratio < 1 / (1 + thr) else "same")


SHIFT_MIN_ROWS = 4


def run_shift(rows: list[dict]) -> dict | None:
    """The run-wide shift between two runs: the median over rows of new/old, and how many rows
    moved each way.  When the host slows every kernel alike (other tenants' cache and memory
    traffic, measured here at 10-20 % between back-to-back runs), every row's ratio carries it;
    a row's ratio divided by the shift is what moved that row against the others.  A code change
    that slows every kernel alike shows as a shift too: the shift is reported, never discounted
    from the verdicts.  None with fewer than SHIFT_MIN_ROWS rows (no meaningful median)."""
    ratios = [r["ratio"] for r in rows if math.isfinite(r["ratio"]) and r["ratio"] > 0]
    if len(ratios) < SHIFT_MIN_ROWS:
        return None
    return {"ratio": float(np.median(ratios)), "n": len(ratios),
            "slower": sum(x > 1 for x in ratios), "faster": sum(x < 1 for x in ratios)}


def compare_probes(old: dict, new: dict) -> dict:
    """{probe: new/old median ticks} for the machine probes both runs carry (see "noise")."""
    po = (old.get("noise") or {}).get("probes") or {}
    pn = (new.get("noise") or {}).get("probes") or {}
    return {k: pn[k]["median_ticks"] / po[k]["median_ticks"] for k in po
            if k in pn and po[k].get("median_ticks") and pn[k].get("median_ticks")}


def print_compare(rows, console=None, probes: dict | None = None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    shift = run_shift(rows)
    t = Table(title="refimpl bench compare (ratio = new / old median ticks)")
    cols = ["op", "shape", "backend", "dtype", "old", "new", "ratio", "noise thr", "verdict"]
    if shift:
        cols += ["ratio / shift", "against the others"]
    cyc = any(r.get("core_ratio") is not None for r in rows)
    if cyc:
        cols += ["cyc ratio", "in core cycles"]
    for col in cols:
        t.add_column(col)

    def paint(v):
        color = {"regression": "red", "improvement": "green"}.get(v, "")
        return f"[{color}]{v}[/]" if color else v

    for r in rows:
        cells = [r["op"], r["shape"], r["backend"], r["dtype"] + (" cold" if r["cold"] else ""),
                 fmt_count(r["old_ticks"]), fmt_count(r["new_ticks"]), f"{r['ratio']:.3f}",
                 f"±{r['threshold']:.1%}", paint(r["verdict"])]
        if shift:
            cells += [f"{r['vs_shift']:.3f}", paint(r["verdict_vs_shift"])]
        if cyc:
            cells += [_fmt(r.get("core_ratio"), "{:.3f}"), paint(r.get("verdict_core") or "-")]
        t.add_row(*cells)
    console.print(t)
    n_reg = sum(r["verdict"] == "regression" for r in rows)
    console.print(f"{len(rows)} rows matched; {n_reg} regression(s)")
    if shift:
        console.print(f"run-wide shift: the median row moved {shift['ratio'] - 1:+.1%} ({shift['slower']} of "
                      f"{shift['n']} rows slower, {shift['faster']} faster); 'against the others' judges each "
                      "row's ratio / shift with the same threshold (the host, or a change common to every kernel, "
                      "moves all rows alike)")
    if cyc:
        console.print(f"in estimated core cycles (each run's ticks x the core/TSC measured beside its rows): "
                      f"{sum(r.get('verdict_core') == 'regression' for r in rows)} regression(s); a row slower in "
                      "ticks but not in core cycles was slowed by the host's clock, not by the code")
    moved = [r for r in rows if abs((r.get("new_faults") or 0) - (r.get("old_faults") or 0)) >= FAULTS_NOTE]
    if moved:
        console.print("page faults per call, old -> new: " + "; ".join(
            f"{r['op']}/{r['backend']} {r['shape']} {_fmt(r['old_faults'], '{:.1f}')} -> "
            f"{_fmt(r['new_faults'], '{:.1f}')}" for r in moved)
            + " (each maps a 4 KiB page again on every call: the process's heap state, not the kernel's code)")
    if probes:
        console.print("machine probes, new / old median ticks: " + ", ".join(
            f"{k} {v:.3f}" for k, v in probes.items()) + " (a shift here moved every row: the machine, not the code)")


# ------------------------------------------------------------------- plot


def roofline_labels(rows: list[dict], spread: float = 1.25) -> list[tuple[float, float, str]]:
    """Labels of the roofline plot: (intensity, FLOP/tick, text), one per column of points.
    Every backend of one (op, shape) has the same intensity, so its points stand in one
    column told apart by marker; columns within `spread`x of each other in intensity share
    one label, "op shape" lines in intensity order, above the column's highest point."""
    pts = sorted((r["intensity"], r["flop_per_tick"], f"{r['op']} {r['shape']}") for r in rows
                 if r.get("intensity") and r.get("flop_per_tick")
                 and math.isfinite(r["intensity"]) and math.isfinite(r["flop_per_tick"]))
    out, group = [], []
    for p in pts + [None]:
        if group and (p is None or p[0] > spread * group[0][0]):
            names = list(dict.fromkeys(t for _, _, t in group))
            out.append((group[0][0], max(y for _, y, _ in group), "\n".join(names)))
            group = []
        if p is not None:
            group.append(p)
    return out


def plot_roofline(report: dict, path: str) -> None:
    """Roofline PNG: FLOP/tick against FLOP/byte, log-log, every timed kernel placed."""
    from refimpl.timing.plotting import pyplot, save
    plt = pyplot()
    m = report["machine"]
    dtype = report["settings"]["dtype"]
    peak = m["peak_flop_per_cycle"][dtype] * m["core_per_tsc"]
    rows = report["results"]
    fig, ax = plt.subplots(figsize=(12, 6))
    ais = [r["intensity"] for r in rows if r["intensity"] and math.isfinite(r["intensity"])] or [1.0]
    lo, hi = min(ais + [0.05]) / 2, max(ais + [100.0]) * 2
    x = np.geomspace(lo, hi, 200)
    ax.plot(x, np.full_like(x, peak), "k-", lw=1.5, label=f"peak {dtype} {peak:.1f} FLOP/tick")
    for lv, d in (m.get("bandwidth") or {}).items():
        bw = max(d["read"], d["copy"])
        ax.plot(x, np.minimum(peak, x * bw), "--", lw=1, label=f"{lv} {bw:.1f} B/tick")
    markers = {"numpy": "o", "numba": "s", "c": "^", "torch": "D"}
    colors = {"numpy": "tab:blue", "numba": "tab:orange", "c": "tab:green", "torch": "tab:red"}
    for r in rows:
        y = r["flop_per_tick"]
        if not (y and math.isfinite(y)):
            continue
        ax.plot(r["intensity"], y, markers.get(r["backend"], "x"), ms=7, color=colors.get(r["backend"], "k"))
    # a number above each column and the names in a key beside the axes: names written at the
    # columns overprinted where columns stand ~0.1 decade apart (rope, matmul 1x768x3072, silu,
    # layer_norm between 0.4 and 0.9 FLOP/byte)
    key = []
    for k, (x0, y0, text) in enumerate(roofline_labels(rows), 1):
        ax.annotate(str(k), (x0, y0), fontsize=7, fontweight="bold", xytext=(0, 6), textcoords="offset points",
                    ha="center", va="bottom")
        key.append(f"{k:>2}  " + "\n    ".join(text.split("\n")))
    fig.text(0.73, 0.93, "\n".join(key), fontsize=7, family="monospace", va="top")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("FLOP per TSC tick")
    ax.set_title(f"roofline: {m['cpu_model']} ({m.get('uarch')}), 1 core, "
                 f"{'cold' if report['settings']['cold'] else 'warm'} cache")
    for b, mk in markers.items():
        if any(r["backend"] == b for r in rows):
            ax.plot([], [], mk, color=colors[b], label=b)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout(rect=(0, 0, 0.72, 1))             # the key's column on the right
    save(fig, path)
