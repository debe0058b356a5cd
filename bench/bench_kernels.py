#!/usr/bin/env python
"""Kernel benchmark table (issue 3, item 8): verify every kernel against the
float64 oracle, then time ours against its peer, single-threaded.

    env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python bench/bench_kernels.py [--quick] [--json PATH]

Order of work (llm.c `dev/cpu/matmul_forward.c` style):
  1. every kernel that will be timed runs once on the row's inputs and is
     checked elementwise against the float64 oracle with its contracts.py error
     bound (the model row: logits against the composed bound of
     refimpl.kernels.model_bound).  Any failure: print it and exit 1, nothing
     is timed.  Otherwise print "all kernels passed".
  2. each row times ours and its peer with the same harness
     (refimpl.timing.harness.measure: pinned, warmed up, auto-sized inner
     repetitions; the C kernels from a C loop when they offer `prepare`) in
     7-21 short interleaved paired rounds (3-7 with --quick; which side
     goes first alternates): ratio = median over rounds of (peer round median / our
     round median) (> 1: ours is faster), compared with the row's target ->
     PASS / MISS; the rounds' IQR and min..max are printed beside it.
Rows whose kernel (or the model) is not available yet print "not available".
See bench/README.md for what each row means.
"""
from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import sys
import time
from dataclasses import dataclass, field

import numpy as np

from refimpl.kernels import contracts as C
from refimpl.kernels.buffers import spread_copies
from refimpl.oracle import layers as L
from refimpl.verify.compare import error_stats

F32 = np.float32
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")


# ---------------------------------------------------------------- timing


def _local_measure(fn, *args, budget_s=0.25, min_samples=7, **kw):
    """Fallback timer (used only if refimpl.timing is missing): warm-up, min/median of N, in ns."""
    for _ in range(2):
        fn(*args, **kw)
    t_end = time.perf_counter() + budget_s
    samples = []
    while len(samples) < min_samples or time.perf_counter() < t_end:
        t0 = time.perf_counter_ns()
        fn(*args, **kw)
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return {"median": float(samples[len(samples) // 2]), "min": float(samples[0]), "unit": "ns",
            "cv": float(np.std(samples) / np.mean(samples)), "n": len(samples), "unstable": False,
            "samples": [float(x) for x in samples], "reps": 1}


def measure(target, *args, budget_s, min_samples, warmup=True, reps=None, **kw) -> dict:
    """{median, min, unit, cv, n, unstable, samples, reps} of one call: the project harness when it imports.

    warmup=False: a single warm-up call (it refills the caches after the other side of a pair ran) and
    `reps` inner repetitions fixed by the row's first round instead of re-sized."""
    try:
        from refimpl.timing.harness import measure as harness_measure
    except ImportError:
        return _local_measure(target, *args, budget_s=budget_s, min_samples=min_samples, **kw)
    extra = {} if warmup else {"warmup_s": 0.0, "warmup_calls": 1, "reps": reps}
    m = harness_measure(target, *args, budget_s=budget_s, min_samples=min_samples, **extra, **kw)
    return {"median": m.median, "min": m.min, "unit": "ticks", "cv": m.cv, "n": m.n,
            "unstable": m.unstable, "reasons": list(m.reasons), "kind": m.kind,
            "samples": list(m.samples), "reps": m.reps}


# ---------------------------------------------------------------- paired ratios
#
# Ours and the peer are timed in R interleaved rounds: each round measures both back to back with
# a short budget (which side goes first alternates), and the row's ratio is the median over rounds
# of (peer round median / ours round median).  On a machine whose load drifts (other tenants, a
# neighbour's build: here on scales from tens of ms to seconds) the two sides of one round see the
# same machine state, so the drift cancels in each round's ratio instead of landing on one side of
# it, and the median over rounds discards the rounds a burst of load hit unevenly.  This is the
# usual paired design for comparing two programs on a noisy machine (interleaved A/B benchmarking).
# Rounds are short and as many as a fixed time per row allows (PairPlan.row_budget_s, between
# min_rounds and max_rounds): the shorter a round, the less the state can change inside it.

@dataclass(frozen=True)
class PairPlan:
    side_budget_s: float      # harness budget per side and round
    min_samples: int          # harness samples per side and round, at least
    row_budget_s: float       # wall time per row the round count aims at (about the old 2 x 0.4 s)
    min_rounds: int
    max_rounds: int


PLAN = PairPlan(side_budget_s=0.025, min_samples=3, row_budget_s=0.9, min_rounds=7, max_rounds=21)
PLAN_QUICK = PairPlan(side_budget_s=0.012, min_samples=2, row_budget_s=0.2, min_rounds=3, max_rounds=7)
SPREAD_UNSTABLE = 0.10      # interquartile range of the round ratios / their median


def ratio_summary(round_ratios, target=None) -> dict:
    """Median, quartiles, min/max and flags of per-round ratios (peer round median / ours round median).

    `unstable`: the middle half of the rounds spans more than SPREAD_UNSTABLE of the median ratio.
    `borderline`: the target lies inside that interquartile range, so typical rounds disagree on
    PASS/MISS (the verdict, taken on the median, could flip on a re-run)."""
    x = np.asarray(round_ratios, dtype=np.float64)
    if x.size == 0 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise ValueError(f"round_ratios must be a non-empty list of positive finite numbers, got {list(x)}")
    med = float(np.median(x))
    q1, q3 = (float(v) for v in np.percentile(x, [25, 75]))
    out = {"ratio": med, "ratio_min": float(x.min()), "ratio_q1": q1, "ratio_q3": q3,
           "ratio_max": float(x.max()), "ratio_iqr_rel": (q3 - q1) / med, "round_ratios": [float(v) for v in x]}
    out["ratio_unstable"] = bool(out["ratio_iqr_rel"] > SPREAD_UNSTABLE)
    out["ratio_borderline"] = bool(target is not None and q1 < target < q3)
    return out


def n_rounds(plan: PairPlan, spent_s: float, round_s: float, done: int) -> int:
    """Odd number of rounds in [plan.min_rounds, plan.max_rounds] that fits plan.row_budget_s, given
    `done` rounds already took `spent_s` and one more round costs about `round_s`."""
    fit = done + (max(plan.row_budget_s - spent_s, 0.0) / round_s if round_s > 0 else plan.max_rounds)
    n = int(min(max(fit, plan.min_rounds), plan.max_rounds))
    return n if n % 2 else (n + 1 if n < plan.max_rounds else n - 1)


def pooled(rounds) -> dict:
    """One side's figures over all rounds: median, min and robust CV (1.4826 MAD / median, as the
    harness) of every sample pooled (per-call time)."""
    x = np.asarray([s for m in rounds for s in m["samples"]], dtype=np.float64)
    med = float(np.median(x))
    cv = 1.4826 * float(np.median(np.abs(x - med))) / med if med > 0 else 0.0
    return {"median": med, "min": float(x.min()), "cv": cv, "n": int(x.size),
            "unit": rounds[0]["unit"], "kind": rounds[0].get("kind"),
            "rounds_unstable": sum(bool(m.get("unstable")) for m in rounds)}


def time_pair(r, quick) -> None:
    """Interleaved paired rounds of ours and the peer (see the comment above); fills r.result."""
    plan = PLAN_QUICK if quick else PLAN
    sides = {"ours": (r.ours, r.ours_args, r.ours_kw), "peer": (r.peer, r.peer_args, r.peer_kw)}
    per_side = {"ours": [], "peer": []}
    reps = {}
    rounds = []
    try:
        from refimpl.timing.harness import pinned
        pin = pinned()
    except ImportError:
        pin = contextlib.nullcontext()
    with pin:   # both sides on the same CPU all along
        total = plan.min_rounds
        t_start = time.perf_counter()
        i = 0
        while i < total:
            t_round = time.perf_counter()
            order = ("ours", "peer") if i % 2 == 0 else ("peer", "ours")
            got = {}
            for side in order:
                fn, args, kw = sides[side]
                first = side not in reps      # full warm-up (JIT, first-call costs) and reps sizing
                m = measure(fn, *args, budget_s=plan.side_budget_s, min_samples=plan.min_samples,
                            warmup=first, reps=reps.get(side), **kw)
                reps.setdefault(side, m["reps"])
                got[side] = m
                per_side[side].append(m)
            rounds.append({"first": order[0], "ours": got["ours"]["median"], "peer": got["peer"]["median"],
                           "ratio": got["peer"]["median"] / got["ours"]["median"]})
            i += 1
            if i == 2:                        # round 0 includes the warm-ups: size on round 1
                now = time.perf_counter()
                total = n_rounds(plan, now - t_start, now - t_round, i)
    r.result.update(ours=pooled(per_side["ours"]), peer=pooled(per_side["peer"]), rounds=rounds,
                    **ratio_summary([x["ratio"] for x in rounds], r.target))


# ---------------------------------------------------------------- machine


def blas_report() -> tuple[list[str], list[dict]]:
    """Warnings about OpenBLAS environment overrides, and threadpoolctl's view of the BLAS."""
    warnings = []
    for var in OPENBLAS_VARS:
        if var in os.environ:
            warnings.append(f"{var}={os.environ[var]} is set: OpenBLAS reads it at load time and may pick a "
                            f"slower kernel. Re-run as: env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE "
                            f"{sys.executable} {' '.join(sys.argv)}")
    try:
        from threadpoolctl import threadpool_info
        info = [{k: d.get(k) for k in ("internal_api", "version", "architecture", "num_threads", "filepath")}
                for d in threadpool_info()]
    except ImportError:
        info = [{"error": "threadpoolctl not installed"}]
    return warnings, info


def machine_facts():
    """(tsc_hz, core_per_tsc, fp32 peak FLOP per core cycle, DRAM copy B/tick) or Nones."""
    try:
        from refimpl.timing.machine import describe
        m = describe(bandwidth=True)
        dram = m.bandwidth.get("DRAM", {}).get("copy") if m.bandwidth else None
        return {"tsc_hz": m.tsc_hz, "core_per_tsc": m.core_per_tsc,
                "peak_f32_per_cycle": m.peak_flop_per_cycle.get("float32"), "dram_copy_B_per_tick": dram,
                "cpu": m.cpu_model, "uarch": m.uarch}
    except Exception as e:  # the timing package is optional for this script
        return {"tsc_hz": None, "core_per_tsc": None, "peak_f32_per_cycle": None,
                "dram_copy_B_per_tick": None, "error": f"{type(e).__name__}: {e}"}


class single_thread:
    """threadpoolctl limit 1 (BLAS/OpenMP), torch.set_num_threads(1), numba 1 thread; restored on exit."""

    def __enter__(self):
        from threadpoolctl import threadpool_limits
        self._tp = threadpool_limits(limits=1)
        self._torch = None
        try:
            import torch
            self._torch = (torch, torch.get_num_threads())
            torch.set_num_threads(1)
        except ImportError:
            pass
        return self

    def __exit__(self, *exc):
        self._tp.restore_original_limits()
        if self._torch:
            self._torch[0].set_num_threads(self._torch[1])
        return False


# ---------------------------------------------------------------- rows


@dataclass
class Row:
    name: str                   # what is timed, e.g. "C matmul f32"
    shape: str
    peer_name: str
    target: float               # ratio (peer time / our time) to reach
    ours: object = None         # callable or CCall, or None (not available)
    ours_args: tuple = ()
    ours_kw: dict = field(default_factory=dict)
    peer: object = None         # callable
    peer_args: tuple = ()
    peer_kw: dict = field(default_factory=dict)
    check: object = None        # () -> (ok, message): runs ours once against the oracle
    flops: float | None = None
    missing: str | None = None  # why the row cannot run
    result: dict = field(default_factory=dict)


def rng_arrays(seed, *shapes, scale=1.0):
    """Seeded float32 arrays, laid out the same way (mod 4 KiB) in every run (buffers.spread_copies)."""
    rng = np.random.default_rng(seed)
    return spread_copies([(rng.standard_normal(s) * scale).astype(F32) for s in shapes])


def _kernel(op, backend):
    """The registered kernel, or (None, reason)."""
    from refimpl.kernels import get
    try:
        return get(op, backend), None
    except KeyError as e:
        return None, str(e).strip('"')


def _bound_check(what, fn, args, kw, want, bound):
    def check():
        got = fn(*args, **kw)
        s = error_stats(got, want, bound)
        ok = s.nonfinite_mismatches == 0 and s.bound_ratio <= 1.0
        msg = (f"{what}: bound ratio {s.bound_ratio:.3g} (max {s.max_ulp:.3g} ulp, nmse {s.nmse:.2e})"
               + ("" if ok else f"; worst element {s.worst_index}: got {s.worst_got!r}, oracle "
                  f"{s.worst_want!r}, bound {s.worst_bound:.3e}; nonfinite mismatches {s.nonfinite_mismatches}"))
        return ok, msg
    return check


def _c_target(fn, args, kw):
    """A C kernel is timed from a C loop when its wrapper offers prepare(...) -> CCall."""
    prep = getattr(fn, "prepare", None)
    if prep is None:
        return fn, args, kw
    return prep(*args, **kw), (), {}


def matmul_rows(backend, sizes, peer_target, quick):
    import functools
    fn, why = _kernel("matmul", backend)
    rows = []
    for (M, K, N) in sizes:
        label = f"({M}x{K})({K}x{N})" if (M, K) != (K, N) else f"N={N}"
        r = Row(f"{'C' if backend == 'c' else 'Numba'} matmul f32", label, "NumPy (OpenBLAS)", peer_target,
                flops=2.0 * M * K * N)
        if fn is None:
            r.missing = why
            rows.append(r)
            continue
        a, b = rng_arrays(M * 7 + N, (M, K), (K, N))
        want = a.astype(np.float64) @ b.astype(np.float64)
        r.check = _bound_check(r.name + " " + label, fn, (a, b), {}, want, C.matmul_bound(a, b, F32))
        r.ours, r.ours_args, r.ours_kw = (_c_target(fn, (a, b), {}) if backend == "c" else (fn, (a, b), {}))
        r.peer, r.peer_args = functools.partial(np.matmul), (a, b)
        rows.append(r)
    return rows


def softmax_rows(quick):
    fn, why = _kernel("softmax", "c")
    rows = []
    try:
        import torch
    except ImportError:
        torch = None
    for (R, N) in [(256, 4096), (64, 32000)]:
        x, = rng_arrays(R + N, (R, N), scale=4.0)
        want = L.softmax(x.astype(np.float64), axis=-1)
        bound = C.softmax_bound(x, want, F32)
        for peer_name, target in (("torch.softmax", 1.5), ("NumPy oracle", 4.0)):
            r = Row("C softmax f32", f"({R}, {N})", peer_name, target)
            if fn is None:
                r.missing = why
            elif peer_name.startswith("torch") and torch is None:
                r.missing = "torch not installed"
            else:
                r.check = _bound_check(f"C softmax ({R},{N})", fn, (x,), {}, want, bound)
                r.ours, r.ours_args, r.ours_kw = _c_target(fn, (x,), {})
                if peer_name.startswith("torch"):
                    tx = torch.from_numpy(x)
                    r.peer, r.peer_args = (lambda t: torch.softmax(t, -1)), (tx,)
                else:
                    from refimpl.kernels import get
                    r.peer, r.peer_args = get("softmax", "numpy"), (x,)
            rows.append(r)
    return rows


def sample_rows(quick):
    """The C sampler against the oracle's (refimpl.oracle.sampling.sample: np.lexsort of the V
    ids), temperature 1, top-p 0.9, on LLM vocabulary sizes; checked first to draw the oracle's
    token for 32 seeds."""
    from refimpl.oracle.sampling import XorShift64Star, sample
    try:
        from refimpl.kernels.c_sample import sample as c_sample
    except ImportError as e:
        c_sample, why = None, str(e)
    rows = []
    for V in (32000, 50257):
        r = Row("C sampler f64", f"V={V} top-p 0.9", "NumPy oracle", 3.0)
        if c_sample is None:
            r.missing = why
            rows.append(r)
            continue
        z, = rng_arrays(V, (V,), scale=3.0)

        def check(z=z, V=V):
            bad = [s for s in range(1, 33) if c_sample(z, 1.0, None, 0.9, XorShift64Star(s))
                   != sample(z, 1.0, None, 0.9, XorShift64Star(s))]
            return not bad, f"C sampler V={V}: the oracle's token for {32 - len(bad)} of 32 seeds"
        r.check = check
        r.ours, r.ours_args = c_sample, (z, 1.0, None, 0.9, XorShift64Star(1))
        r.peer, r.peer_args = sample, (z, 1.0, None, 0.9, XorShift64Star(1))
        rows.append(r)
    return rows


def attention_row(name, backend, H, Hkv, Lq, Lk, D, causal, target, repeat_kv_for_torch=False):
    fn, why = _kernel("attention", backend)
    label = (f"H={H} L={Lq}" if (H, Lq) == (Hkv, Lk) else f"H={H} Hkv={Hkv} Lq={Lq} Lk={Lk}") + f" D={D}" \
        + (" causal" if causal else "")
    r = Row(name, label, "torch SDPA" + (" (K/V repeated)" if repeat_kv_for_torch else ""), target)
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        r.missing = "torch not installed"
        return r
    if fn is None:
        r.missing = why
        return r
    q, k, v = rng_arrays(H * Lq + Lk, (H, Lq, D), (Hkv, Lk, D), (Hkv, Lk, D))
    mask = L.causal_mask(Lq, Lk) if causal else None
    q64, k64, v64 = (a.astype(np.float64) for a in (q, k, v))
    want = L.multi_head_attention(q64, k64, v64, mask, None)
    bound = C.attention_bound(q, k, v, causal=causal, dtype=F32)
    r.check = _bound_check(f"{name} {label}", fn, (q, k, v), {"causal": causal}, want, bound)
    if backend == "c":
        r.ours, r.ours_args, r.ours_kw = _c_target(fn, (q, k, v), {"causal": causal})
    else:
        r.ours, r.ours_args, r.ours_kw = fn, (q, k, v), {"causal": causal}
    # torch gets a batch dimension of 1: with 3-D inputs SDPA falls back to its unfused "math" path
    # (measured here: 232 ms instead of 61 ms at H=12, L=1024), which would flatter our ratio
    tq, tk, tv = (torch.from_numpy(a)[None] for a in (q, k, v))
    if H != Hkv:                       # repeated outside the timed region: torch sees plain MHA
        tk, tv = tk.repeat_interleave(H // Hkv, 1).contiguous(), tv.repeat_interleave(H // Hkv, 1).contiguous()
    tmask = None
    if causal and Lq != Lk and Lq > 1:  # bottom-right causal: query i sees keys 0..Lk-Lq+i
        tmask = torch.from_numpy(mask)
    is_causal = bool(causal and Lq == Lk)  # (Lq = 1 with causal sees every key: no mask at all)
    r.peer = lambda a, b, c: F.scaled_dot_product_attention(a, b, c, attn_mask=tmask, is_causal=is_causal)
    r.peer_args = (tq, tk, tv)
    return r


def model_row(quick):
    """llama2.c stories15M-shaped model, C backend: decode tokens/s against the weight-streaming bound."""
    r = Row("C model decode", "dim 288 L6 H6 hidden 768 V 32000",
            "weight-streaming bound", 0.85)
    try:
        from refimpl.oracle.config import Config
        from refimpl.oracle.model import Model, random_params
        cfg = Config(arch="llama", vocab_size=32000, d_model=288, n_layers=6, n_heads=6, n_kv_heads=6, d_ff=768,
                     max_seq_len=256, norm_eps=1e-5, rope_interleaved=True, tie_embeddings=True)
        params = random_params(cfg, seed=0)
        model = Model(cfg, params, dtype="float32", backend="c")
    except Exception as e:
        r.missing = f"{type(e).__name__}: {e}"
        return r
    # every weight is read once per decoded token (the tied embedding table by the classifier)
    wbytes = sum(int(np.prod(np.shape(p))) for p in model.params.values()) * 4
    prompt = np.array([1, 345, 2211, 17, 999, 4], dtype=np.int64)
    n_new = 8 if quick else 32

    def check():
        from refimpl.kernels.model_bound import logits_with_bound
        ref, bound = logits_with_bound(model, prompt)
        got = model.forward(prompt)
        s = error_stats(got, ref, bound)
        ok = s.nonfinite_mismatches == 0 and s.bound_ratio <= 1.0
        return ok, f"C model logits: composed-bound ratio {s.bound_ratio:.3g} (nmse {s.nmse:.2e})"

    def decode_seconds_per_token():
        g = model.generate(prompt, n_new)
        return g.decode_seconds / max(len(g.tokens) - 1, 1)

    r.check = check
    r.ours = decode_seconds_per_token
    r.result["weight_bytes_per_token"] = wbytes
    return r


def build_rows(quick):
    rows = []
    rows += matmul_rows("c", [(256, 256, 256), (512, 512, 512), (1024, 1024, 1024)], 0.9, quick)
    rows += matmul_rows("c", [(128, 768, 768), (1, 768, 3072)], 0.9, quick)
    rows += matmul_rows("numba", [(512, 512, 512)], 0.4, quick)
    rows += softmax_rows(quick)
    for Lx in (512, 1024, 2048):
        rows.append(attention_row("C attention f32", "c", 12, 12, Lx, Lx, 64, True, 1.2))
    rows.append(attention_row("C attention decode f32", "c", 32, 8, 1, 1024, 64, True, 1.0, repeat_kv_for_torch=True))
    rows.append(attention_row("Numba attention f32", "numba", 12, 12, 1024, 1024, 64, True, 0.5))
    rows += sample_rows(quick)
    rows.append(model_row(quick))
    return rows


# ---------------------------------------------------------------- run


def verify_all(rows) -> bool:
    print("== verifying every kernel against the float64 oracle (contracts.py bounds)")
    ok_all = True
    done = {}
    for r in rows:
        if r.missing or r.check is None:
            continue
        key = (r.name, r.shape)            # two peers, one kernel run: verify it once
        if key in done:
            r.result["verified"], r.result["verification"] = done[key]
            continue
        try:
            ok, msg = r.check()
        except Exception as e:
            ok, msg = False, f"{r.name} {r.shape}: {type(e).__name__}: {e}"
        done[key] = (ok, msg)
        r.result["verified"] = ok
        r.result["verification"] = msg
        print(("  ok    " if ok else "  FAIL  ") + msg)
        ok_all &= ok
    return ok_all


def _spread(res) -> str:
    """'q1..q3 [min..max]' of a row's round ratios."""
    if "ratio_min" not in res:
        return "-"
    return f"{res['ratio_q1']:.2f}..{res['ratio_q3']:.2f} [{res['ratio_min']:.2f}..{res['ratio_max']:.2f}]"


def time_rows(rows, facts, quick):
    plan = PLAN_QUICK if quick else PLAN
    print(f"== timing (single-threaded; {plan.min_rounds}-{plan.max_rounds} interleaved paired rounds per row, "
          f"ratio = median over rounds of peer/ours, higher = ours faster)")
    for r in rows:
        if r.missing:
            continue
        if r.name == "C model decode":
            _time_model(r, facts, quick)
            continue
        time_pair(r, quick)
        mo = r.result["ours"]
        if r.flops and mo["unit"] == "ticks":
            fpt = r.flops / mo["median"]
            r.result["flop_per_tick"] = fpt
            if facts.get("core_per_tsc") and facts.get("peak_f32_per_cycle"):
                per_cycle = fpt / facts["core_per_tsc"]
                r.result["flop_per_core_cycle"] = per_cycle
                r.result["pct_peak"] = 100.0 * per_cycle / facts["peak_f32_per_cycle"]
        print(f"  {r.name:24s} {r.shape:36s} {r.peer_name:26s} ratio {r.result['ratio']:.2f} "
              f"(rounds: {', '.join(f'{x:.2f}' for x in r.result['round_ratios'])})", flush=True)


def _time_model(r, facts, quick):
    """Median over reps of (tokens/s) / (bound tokens/s), the DRAM copy bandwidth measured right
    before and right after each rep (the mean of the two is the rep's bound): on a shared machine
    the bandwidth drifts, and a ratio is only fair when its two sides see the same load."""
    reps = 3 if quick else 11
    r.ours()                                                   # warm-up (first-call costs)
    wbytes = r.result["weight_bytes_per_token"]
    try:
        from refimpl.timing.machine import dram_copy_bandwidth
    except ImportError:
        dram_copy_bandwidth = None
    if dram_copy_bandwidth is None or not facts.get("tsc_hz"):
        s_tok = sorted(r.ours() for _ in range(reps))[reps // 2]
        r.result.update(tokens_per_s=1 / s_tok, ratio=None, note="no DRAM bandwidth measurement")
        return
    pairs = []
    bw_before = dram_copy_bandwidth()
    for _ in range(reps):
        s_tok = r.ours()
        bw_after = dram_copy_bandwidth()
        bound_tok_s = 0.5 * (bw_before + bw_after) * facts["tsc_hz"] / wbytes
        pairs.append(((1 / s_tok) / bound_tok_s, s_tok, bound_tok_s))
        bw_before = bw_after
    pairs.sort()
    ratio, s_tok, bound_tok_s = pairs[reps // 2]
    facts["dram_copy_B_per_tick"] = bound_tok_s * wbytes / facts["tsc_hz"]
    r.result.update(ratio_summary([p[0] for p in pairs], r.target))     # spread and flags, as the other rows
    r.result.update(tokens_per_s=1 / s_tok, bound_tokens_per_s=bound_tok_s, ratio=ratio,
                    ratios=[p[0] for p in pairs],
                    ours={"median": s_tok * 1e9, "unit": "ns", "n": reps},
                    peer={"median": 1e9 / bound_tok_s, "unit": "ns (bound)"})
    print(f"  {r.name:24s} {r.shape:36s} {r.peer_name:26s} ratio {ratio:.2f} "
          f"(per rep: {', '.join(f'{p[0]:.2f}' for p in pairs)})", flush=True)


def _fmt_time(m, facts):
    if not m:
        return "-"
    v, unit = m["median"], m["unit"]
    if unit == "ticks":
        ns = v / facts["tsc_hz"] * 1e9 if facts.get("tsc_hz") else None
        return f"{v:,.0f} t" + (f" ({_ns(ns)})" if ns is not None else "")
    return _ns(v)


def _ns(ns):
    if ns >= 1e6:
        return f"{ns / 1e6:.2f} ms"
    if ns >= 1e3:
        return f"{ns / 1e3:.1f} us"
    return f"{ns:.0f} ns"


def verdict(res, target) -> str:
    """PASS/MISS on the paired median ratio, with '(unstable)' / '(borderline)' from its round spread."""
    ratio = res.get("ratio")
    if ratio is None:
        return "-"
    v = "PASS" if ratio >= target else "MISS"
    flags = [f for f in ("unstable", "borderline") if res.get("ratio_" + f)]
    return v + (f" ({', '.join(flags)})" if flags else "")


def print_table(rows, facts):
    head = ["row", "shape", "ours", "peer", "peer time", "ratio", "rounds: IQR [min..max]", "target", ""]
    lines = []
    for r in rows:
        res = r.result
        if r.missing:
            lines.append([r.name, r.shape, "not available", r.peer_name, "-", "-", "-", f">= {r.target:g}x",
                          "n/a"])
            continue
        ratio = res.get("ratio")
        lines.append([r.name, r.shape, _fmt_time(res.get("ours"), facts), r.peer_name,
                      _fmt_time(res.get("peer"), facts), "-" if ratio is None else f"{ratio:.2f}x",
                      _spread(res), f">= {r.target:g}x", verdict(res, r.target)])
    widths = [max(len(str(x[i])) for x in lines + [head]) for i in range(len(head))]
    fmt = " | ".join(f"{{:{w}s}}" for w in widths)
    print()
    print(fmt.format(*head))
    print("-+-".join("-" * w for w in widths))
    for ln in lines:
        print(fmt.format(*ln))
    print(f"(ours / peer time: medians of every sample pooled over the rounds; ratio: median over rounds of "
          f"peer/ours; unstable: IQR > {SPREAD_UNSTABLE:.0%} of the ratio; borderline: target inside the IQR)")
    extra = [r for r in rows if "flop_per_tick" in r.result]
    if extra:
        print()
        print("matmul throughput: FLOP per TSC tick, FLOP per core cycle (estimated), % of fp32 peak per core cycle")
        for r in extra:
            res = r.result
            pc = res.get("flop_per_core_cycle")
            print(f"  {r.name:18s} {r.shape:24s} {res['flop_per_tick']:6.1f} FLOP/tick"
                  + (f"  {pc:6.1f} FLOP/cycle  {res['pct_peak']:5.1f}% of {facts['peak_f32_per_cycle']:g}"
                     if pc is not None else ""))
    for r in rows:
        if r.name == "C model decode" and "tokens_per_s" in r.result:
            res = r.result
            mb = res["weight_bytes_per_token"] / 1e6
            bound = (f"; bound {res['bound_tokens_per_s']:.1f} tokens/s at DRAM copy "
                     f"{facts['dram_copy_B_per_tick']:.2f} B/tick" if res.get("bound_tokens_per_s") else "")
            print(f"\nmodel decode: {res['tokens_per_s']:.1f} tokens/s; weights {mb:.1f} MB/token{bound}")
    missing = [r for r in rows if r.missing]
    if missing:
        print("\nnot available:")
        for r in missing:
            print(f"  {r.name} {r.shape}: {r.missing}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="fewer, shorter paired rounds (a smoke run, noisier ratios)")
    ap.add_argument("--json", metavar="PATH", help="also write the table and machine facts as JSON")
    ap.add_argument("--only", metavar="TEXT", help="only the rows whose name contains TEXT (e.g. numba, softmax)")
    args = ap.parse_args(argv)

    warnings, blas = blas_report()
    for w in warnings:
        print("WARNING: " + w)
    for b in blas:
        print("BLAS: " + ", ".join(f"{k}={v}" for k, v in b.items() if k != "filepath"))
    facts = machine_facts()
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    t0 = time.perf_counter()
    with single_thread():
        rows = build_rows(args.quick)
        if args.only:
            rows = [r for r in rows if args.only.lower() in r.name.lower()]
        if not verify_all(rows):
            print("verification FAILED: nothing timed")
            return 1
        print("all kernels passed")
        time_rows(rows, facts, args.quick)
    print_table(rows, facts)
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    if args.json:
        doc = {"schema": "refimpl.bench_kernels/2", "created": _dt.datetime.now(_dt.timezone.utc).isoformat(),
               "argv": sys.argv, "quick": args.quick, "python": platform.python_version(),
               "warnings": warnings, "blas": blas, "machine": facts,
               "rows": [{"name": r.name, "shape": r.shape, "peer_name": r.peer_name, "target": r.target,
                         "available": r.missing is None, "missing": r.missing,
                         "passed": None if r.result.get("ratio") is None else r.result["ratio"] >= r.target,
                         **r.result} for r in rows]}
        with open(args.json, "w") as f:
            json.dump(doc, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
