"""`refimpl profile`: cycles per token by stage, prefill and decode, against the roofline.

    run(path=None, backends=None, dtype="float32", prompt_len=32, decode=16, repeats=3) -> report
    print_report(report), write_json(report, path), plot(report, path)

Measured.  `Model.forward(ids, cache, trace)` calls `trace(name, array)` right
after each named intermediate, in forward order, so the ticks between two
consecutive trace calls are the cost of the stage just named (the first stage,
`embed`, is timed from the start of `forward`).  Trace names map to stages:

    embed                                   -> embedding
    layers.i.attn_norm, layers.i.ffn_norm    -> norms
    layers.i.q/k/v/attn_probs/attn_out/resid_attn -> attention (projections, RoPE, scores, softmax, P V, W_o, residual)
    layers.i.ffn_hidden/ffn_out/resid_ffn    -> ffn
    final_norm                              -> norms
    logits                                  -> lm_head
After the forward pass the last row of logits goes through the backend's sampler
(temperature 1, top-p 0.9: `refimpl.oracle.sampling.sample`, or on the C backend
the same rule in C, `refimpl.kernels.c_sample`), timed as `sampling`; the oracle's
softmax over V is also timed alone as `softmax` (a part of sampling, not added to
the total; not timed for the C sampler, whose softmax runs inside its one call).
Prefill is one forward of the prompt (T tokens): its figures are ticks / T.
Decode is one forward of 1 token per step with the KV cache: the median over
steps.  Each backend runs `repeats` times and the fastest run per stage is kept
(pinned to one CPU, 1 thread).  The trace callback itself costs one Python call
per trace point (~100 ticks), included.

A trace needs every intermediate as an array, so a traced forward is the Python
composition of the backend's kernels.  Untraced, the C backend's Llama and GPT-2
decode a token in one C call (`refimpl.kernels.c_decode`), several times faster
on small models.  For those, `decode_fused` times that call too, stage by stage
from inside it: the C step reads the counter at its stage boundaries (4 fenced
reads a layer + 3; the same stages, grouped as above), and `decode_fused_call_ticks`
is the whole forward as seen from Python, so what the stages leave of it is the
Python wrapper (argument checks, the logits array, the call).

The peer, "torch" in `backends`: transformers' LlamaForCausalLM / GPT2LMHeadModel with the
same weights (float32), run the same way (prompt, then decode steps with its KV cache, the
same sampler) after its prefill logits pass the float32 bound of the float64 oracle; its
stages come from forward hooks (`refimpl.timing.peer`).

Analytic model (per token, from the config; s = bytes per element):
    FLOPs: projections 2 D (D + 2 Hkv Dh) + 2 D D, attention 4 H Dh P/T + 5 H P/T
    (P = causal (query, key) pairs of the call), RoPE 3 (H + Hkv) Dh,
    FFN 2 D F x (3 gated | 2), activation (4 + 1 silu*up | 9 gelu | 1 relu) F,
    norms 2 x (4 | 7) D per layer + final (pre-norm; post-norm, the classic model: the
    norm closing each sublayer is counted in that sublayer's stage, as its trace span holds
    it, and there is no final norm), LM head 2 D V, softmax 5 V.
    Bytes: a norm moves 2 T D s of rows and D s (RMSNorm) or 2 D s (LayerNorm) of weights
    (bench's formulas, refimpl.timing.metrics); every weight matrix is read once per forward call, so prefill pays
    weights / T per token and decode pays all the weights every token; the KV
    cache read is 2 Hkv Dh S s per layer per call (S = cached + new tokens).
Roofline minimum ticks per stage = max(FLOPs / peak FLOP per tick, bytes /
bandwidth of the smallest cache level holding the model's weights), from
`refimpl.timing.machine`; measured/bound = measured / that minimum.

JSON ("refimpl.profile/1", `--json PATH`): {schema, model, dtype, prompt_len,
decode_steps, repeats, machine (as in bench), config, weight_bytes,
skipped {backend: why}, backends {backend: {prefill: [row], decode: [row],
decode_fused: [row] (empty unless fused_decode), decode_fused_call_ticks (or null),
decode_forward_untraced_ticks, decode_forward_untraced_pmu and decode_fused_call_pmu
({kind, core_cycles, instructions, ipc} medians per token counted by the PMU around each
whole call, or null: see "pmu" at the top level, the counters' kind or null), fused_decode,
peer {model, check_worst_over_bound} (torch only),
prefill_per_layer_ticks_per_token {"layers.i.stage": ticks}, wall_s, core_per_tsc,
core_per_tsc_source, core_per_tsc_calibrated}}} with row = {stage, ticks,
core_cycles (estimated: ticks x the backend's core_per_tsc), flops, bytes,
roofline_ticks, bound ("compute"|"memory": the larger term of the stage's roofline
minimum), measured_over_bound, summed}; all per token; the last row is "total", the
sum of the summed rows, whose bound is instead the level every row's bytes were charged
to and its bandwidth (e.g. "L3 38.3 B/tick").  core_per_tsc is the mean of an add-chain
probe timed just before and just after the backend's runs (`bench.core_clock`: the host's
core clock moves between runs, and the one-shot calibration at start-up differed from a
probe timed through the following run by up to 8 %).
"""
from __future__ import annotations

import json
import math
import time

import numpy as np

STAGES = ("embedding", "attention", "ffn", "norms", "lm_head", "sampling")
PEER = "torch"     # transformers' model of the same weights (refimpl.timing.peer), beside the backends
PHASES = ("prefill", "decode", "decode_fused")   # decode_fused: the C backend's one-call step (no trace)
INFO_STAGES = ("softmax",)      # measured inside another stage; not summed

# the built-in default model: a small Llama (GQA) shaped to run in seconds
DEFAULT_MODEL = dict(arch="llama", vocab_size=512, d_model=128, n_layers=2, n_heads=4, n_kv_heads=2,
                     d_ff=352, max_seq_len=128)


def stage_of(name: str) -> str:
    """The stage a trace name closes (see the module docstring)."""
    if name == "embed":
        return "embedding"
    if name == "logits":
        return "lm_head"
    if name == "final_norm":
        return "norms"
    part = name.rsplit(".", 1)[-1]
    if part in ("attn_norm", "ffn_norm"):
        return "norms"
    if part in ("q", "k", "v", "attn_probs", "attn_out", "resid_attn"):
        return "attention"
    if part in ("ffn_hidden", "ffn_out", "resid_ffn"):
        return "ffn"
    return "other"


# ------------------------------------------------------------ analytic model


def analytic(cfg, T: int, S: int, dtype="float32") -> dict:
    """{stage: (flops, bytes)} for one forward of T tokens ending at S cached tokens (whole call)."""
    from refimpl.timing.metrics import causal_pairs, work
    s = np.dtype(dtype).itemsize
    D, H, Hkv, Dh, F, V, NL = (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.d_ff,
                               cfg.vocab_size, cfg.n_layers)
    gated = cfg.arch == "llama"
    P = causal_pairs(T, S)
    w_attn = D * (D + 2 * Hkv * Dh) + D * D
    w_ffn = (3 if gated else 2) * D * F
    # one norm of the T rows as bench times it (metrics.work: RMSNorm 4 TD FLOPs, (2TD + D) s bytes;
    # LayerNorm 7 TD, (2TD + 2D) s).  Pre-norm (GPT-2, Llama): 2 a layer and a final one, each
    # its own traced span ("norms").  Post-norm (classic): LN(x + sublayer) closes the sublayer's
    # span (resid_attn, resid_ffn: TRACE.md), so its work is the sublayer's; no final norm
    norm = work("rms_norm" if cfg.norm == "rmsnorm" else "layer_norm", (T, D), dtype)
    post = cfg.norm_placement == "post"
    act_f = {"silu": 4 + 1, "gelu_tanh": 9, "relu": 1}[cfg.activation]    # per hidden unit (SwiGLU: * up)
    bias = cfg.arch in ("gpt2", "classic")
    out = {}
    out["embedding"] = (T * D if cfg.positions != "rope" else 0, 2 * T * D * s)
    att_f = 2 * T * w_attn + 4 * H * Dh * P + 5 * H * P
    if cfg.positions == "rope":
        att_f += 3 * T * (H + Hkv) * Dh
    att_b = (w_attn + (4 * D if bias else 0)) * s + 2 * Hkv * Dh * S * s + 2 * T * D * s
    ffn_f = 2 * T * w_ffn + act_f * T * F + T * D
    ffn_b = (w_ffn + ((F + D) if bias else 0)) * s + 2 * T * D * s
    if post:
        att_f, att_b, ffn_f, ffn_b = att_f + norm.flops, att_b + norm.bytes, ffn_f + norm.flops, ffn_b + norm.bytes
    out["attention"] = (NL * att_f, NL * att_b)
    out["ffn"] = (NL * ffn_f, NL * ffn_b)
    n_norms = 0 if post else 2 * NL + 1
    out["norms"] = (n_norms * norm.flops, n_norms * norm.bytes)
    out["lm_head"] = (2 * T * D * V, (D * V + T * V) * s)
    out["sampling"] = (5 * V, 2 * V * 8)           # softmax over V in float64 + the draw
    out["softmax"] = (5 * V, 2 * V * 8)
    return out


def weight_bytes(cfg, dtype="float32") -> int:
    from refimpl.oracle.config import expected_shapes
    return sum(int(np.prod(sh)) for sh in expected_shapes(cfg).values()) * np.dtype(dtype).itemsize


# ---------------------------------------------------------------- measuring


class _Tracer:
    def __init__(self):
        from refimpl._clock import lib
        self._start = lib.rf_ticks_start
        self.marks = []

    def begin(self):
        self.marks = [("<start>", self._start())]

    def __call__(self, name, array):
        self.marks.append((name, self._start()))

    def stages(self) -> dict:
        out = {}
        for (_, t0), (name, t1) in zip(self.marks, self.marks[1:]):
            st = stage_of(name)
            out[st] = out.get(st, 0) + (t1 - t0)
        return out

    def per_layer(self) -> dict:
        out = {}
        for (_, t0), (name, t1) in zip(self.marks, self.marks[1:]):
            if name.startswith("layers."):
                key = ".".join(name.split(".")[:2]) + "." + stage_of(name)
                out[key] = out.get(key, 0) + (t1 - t0)
        return out


def _sample_parts(logits_row, rng, sampler=None) -> tuple[int, int, int | None]:
    """(token, ticks of the sampler, ticks of its softmax alone).  `sampler`: the backend's
    (`model.ops.sample`; default the oracle's).  The softmax is timed alone only for the
    oracle's sampler, whose softmax it is (None for the C sampler, whose softmax is inside)."""
    from refimpl._clock import lib
    from refimpl.oracle import layers as L
    from refimpl.oracle.sampling import sample
    sampler = sampler or sample
    t_sm = None
    if sampler is sample:
        z = np.asarray(logits_row, dtype=np.float64)
        t0 = lib.rf_ticks_start()
        L.softmax(z, axis=-1)
        t_sm = lib.rf_ticks_start() - t0
    t1 = lib.rf_ticks_start()
    tok = sampler(logits_row, temperature=1.0, top_p=0.9, rng=rng)
    t2 = lib.rf_ticks_start()
    return tok, t2 - t1, t_sm


def _put_sampling(stages: dict, parts) -> int:
    """Store _sample_parts' ticks in `stages` (no softmax key when it was not timed alone);
    returns the token."""
    tok, stages["sampling"], t_sm = parts
    if t_sm is not None:
        stages["softmax"] = t_sm
    return tok


def prompt_ids(cfg, prompt_len: int, decode: int, seed: int = 0) -> np.ndarray:
    """The profiled prompt: `prompt_len` seeded random token ids (checked against the model)."""
    if cfg.arch == "bert":
        raise ValueError("profile: BERT is an encoder (no decode); profile a causal decoder")
    if prompt_len < 1 or decode < 0:
        raise ValueError(f"profile: prompt_len={prompt_len} must be >= 1 and decode={decode} >= 0")
    if prompt_len + decode > cfg.max_seq_len:
        raise ValueError(f"profile: prompt_len + decode = {prompt_len + decode} exceeds the model's "
                         f"max_seq_len {cfg.max_seq_len}")
    return np.random.default_rng(seed).integers(0, cfg.vocab_size, size=prompt_len)


def profile_model(model, prompt_len: int, decode: int, repeats: int = 3, seed: int = 0, pmu=None) -> dict:
    """Measured ticks per token by stage: {"prefill": {stage: ticks/token}, "decode": {...}, ...};
    with `pmu` (a `counter.PMU`), the untraced decode calls are counted too (`Counted`)."""
    ids = prompt_ids(model.config, prompt_len, decode, seed)
    import gc
    gc_was = gc.isenabled()
    gc.disable()               # no collection inside a timed stage
    try:
        return _profile_runs(model, ids, prompt_len, decode, repeats, seed, pmu)
    finally:
        if gc_was:
            gc.enable()


class Counted:
    """`with c: ...` records the ticks of the block and, given a PMU (`counter.PMU`), its counts
    (core cycles and instructions; the CPU clock's ns for the "cpu-clock" stand-in) read around
    it; a block during which the kernel multiplexed the counters has no counts.  For whole
    forward calls (a read is a system call, ~1 us: not for stages)."""

    def __init__(self, pmu=None):
        from refimpl._clock import lib
        self._ticks = lib.rf_ticks_start
        self.pmu = pmu
        self.ticks: list[int] = []
        self.counts: list[tuple[int, int]] = []

    def __enter__(self):
        self._p0 = self.pmu.read() if self.pmu is not None else None
        self._t0 = self._ticks()
        return self

    def __exit__(self, *exc):
        t1 = self._ticks()
        if self.pmu is not None:
            p0, p1 = self._p0, self.pmu.read()
            if p1[3] - p0[3] >= p1[2] - p0[2]:
                self.counts.append((p1[0] - p0[0], p1[1] - p0[1]))
        self.ticks.append(t1 - self._t0)
        return False

    def median(self) -> float | None:
        return float(np.median(self.ticks)) if self.ticks else None

    def pmu_summary(self) -> dict | None:
        """{kind, core_cycles, instructions, ipc}: medians over the blocks, or None."""
        if not self.counts:
            return None
        c = np.array(self.counts, dtype=np.float64)
        cyc, ins = float(np.median(c[:, 0])), float(np.median(c[:, 1]))
        return {"kind": self.pmu.kind, "core_cycles": cyc, "instructions": ins,
                "ipc": ins / cyc if self.pmu.kind == "hardware" and cyc > 0 else None}


def _min_per_key(best: dict | None, new: dict) -> dict:
    """Per key, the smaller of two repeats' figures: the fastest run per stage."""
    return new if best is None else {k: min(v, best.get(k, v)) for k, v in new.items()}


def _fastest(a: Counted | None, b: Counted) -> Counted:
    """Of two repeats' records of the same calls, the one with the smaller median ticks."""
    return b if a is None or (b.median() is not None and b.median() < a.median()) else a


def _profile_runs(model, ids, prompt_len, decode, repeats, seed, pmu=None):
    from refimpl.oracle.sampling import XorShift64Star
    tr = _Tracer()
    best_pre, best_dec, best_layers, best_plain, best_fused, best_call = None, None, None, None, None, None
    # warm-up: compiles Numba kernels, faults in pages
    cache = model.new_cache()
    model.forward(ids, cache)
    for _ in range(min(2, decode)):
        model.forward(np.array([1]), cache)
    for _ in range(repeats):
        rng = XorShift64Star(seed + 1)
        cache = model.new_cache()
        tr.begin()
        logits = model.forward(ids, cache, trace=tr)
        pre = tr.stages()
        layers = tr.per_layer()
        tok = _put_sampling(pre, _sample_parts(logits[-1], rng, model.ops.sample))
        pre = {k: v / prompt_len for k, v in pre.items()}
        steps = []
        for _ in range(decode):
            tr.begin()
            logits = model.forward(np.array([tok]), cache, trace=tr)
            st = tr.stages()
            tok = _put_sampling(st, _sample_parts(logits[-1], rng, model.ops.sample))
            steps.append(st)
        dec = {k: float(np.median([s.get(k, 0) for s in steps])) for k in steps[0]} if steps else {}
        # the same decode steps without a trace: what generate() pays per token (forward only).  A
        # trace needs every intermediate, so it keeps the Python composition; untraced, the C
        # backend's Llama and GPT-2 run each step as one C call (refimpl.kernels.c_decode)
        cache = model.new_cache()
        model.forward(ids, cache)
        plain = Counted(pmu)
        for _ in range(decode):
            with plain:
                model.forward(np.array([1]), cache)
        best_plain = _fastest(best_plain, plain)
        if getattr(model, "fused_decode", False) and decode:
            fu, call = _fused_decode(model, ids, decode, seed, pmu)
            best_fused = _min_per_key(best_fused, fu)
            best_call = _fastest(best_call, call)
        best_pre, best_dec = _min_per_key(best_pre, pre), _min_per_key(best_dec, dec)
        best_layers = _min_per_key(best_layers, layers)
    return {"prefill": best_pre, "decode": best_dec, "prefill_per_layer": best_layers,
            "decode_forward_untraced": best_plain.median() if best_plain else None,
            "decode_forward_untraced_pmu": best_plain.pmu_summary() if best_plain else None,
            "decode_fused": best_fused, "decode_fused_call_pmu": best_call.pmu_summary() if best_call else None}


def _fused_decode(model, ids, decode: int, seed: int, pmu=None) -> tuple[dict, Counted]:
    """The decode steps as the C backend runs them untraced, one C call a token, with the counter
    read at the stage boundaries inside that call (`refimpl.kernels.c_decode`, `step.stamps`): per
    step the stages' ticks, the sampler's as in the traced run, and "call", the whole forward as
    seen from Python (the C step and its Python wrapper).  Medians over the steps, and the calls'
    record (`Counted`: their PMU counts, given a PMU)."""
    from refimpl.oracle.sampling import XorShift64Star
    rng = XorShift64Star(seed + 1)
    step = model.fused_step()
    cache = model.new_cache()
    tok = _sample_parts(model.forward(ids, cache)[-1], rng, model.ops.sample)[0]
    steps = []
    call = Counted(pmu)
    step.stamps = True
    try:
        for _ in range(decode):
            with call:
                logits = model.forward(np.array([tok]), cache)
            st = dict(step.last_stages, call=call.ticks[-1])
            tok = _put_sampling(st, _sample_parts(logits[-1], rng, model.ops.sample))
            steps.append(st)
    finally:
        step.stamps = False
    return {k: float(np.median([st[k] for st in steps])) for k in steps[0]}, call


def _stage_rows(measured: dict, work: dict, T: int, machine, dtype, wbytes) -> list[dict]:
    peak = machine.peak_flop_per_tick(dtype)
    level, bw = machine.bandwidth_for(wbytes)
    rows = []
    for st in STAGES + INFO_STAGES:
        f, b = work.get(st, (0, 0))
        f, b = f / T, b / T
        roof = max(f / peak, b / bw if bw and math.isfinite(bw) else 0.0)
        m = measured.get(st)
        rows.append({"stage": st, "ticks": m, "core_cycles": m * machine.core_per_tsc if m is not None else None,
                     "flops": f, "bytes": b, "roofline_ticks": roof, "bound": "compute" if f / peak >= b / bw else "memory",
                     "measured_over_bound": (m / roof) if (m is not None and roof > 0) else None,
                     "summed": st not in INFO_STAGES})
    tot_m = sum(r["ticks"] or 0 for r in rows if r["summed"])
    tot_f = sum(r["flops"] for r in rows if r["summed"])
    tot_b = sum(r["bytes"] for r in rows if r["summed"])
    tot_roof = sum(r["roofline_ticks"] for r in rows if r["summed"])
    rows.append({"stage": "total", "ticks": tot_m, "core_cycles": tot_m * machine.core_per_tsc, "flops": tot_f,
                 "bytes": tot_b, "roofline_ticks": tot_roof, "bound": f"{level} {bw:.1f} B/tick",
                 "measured_over_bound": tot_m / tot_roof if tot_roof > 0 else None, "summed": False})
    return rows


def _load_model(path, dtype, backend):
    if path is None:
        from refimpl.oracle.model import tiny_model
        return tiny_model(dtype=dtype, backend=backend, **{k: v for k, v in DEFAULT_MODEL.items()})
    import refimpl
    return refimpl.load(path, dtype=dtype, backend=backend)


def run(path=None, backends=None, dtype="float32", prompt_len: int = 32, decode: int = 16,
        repeats: int = 3, pmu="auto") -> dict:
    """Profile the model at `path` (or the built-in tiny Llama) on each backend.  `pmu`: "auto"
    counts the untraced decode calls with the hardware counters where perf_event_open gives
    them (`harness.default_pmu`), None never, or a `counter.PMU` to use."""
    from refimpl.timing.bench import _Threads, core_clock, core_per_tsc_now
    from refimpl.timing.harness import default_pmu, pinned
    from refimpl.timing.machine import describe
    from refimpl.kernels.registry import BACKENDS
    from refimpl.timing import peer
    known = list(BACKENDS) + [PEER]
    if backends is not None and not backends:
        raise ValueError("--backends: none given")
    backends = list(dict.fromkeys(backends or known))     # c,c: once
    for b in backends:
        if b not in known:
            raise ValueError(f"--backends: unknown backend {b!r}; backends are {known}")
    if repeats < 1:
        raise ValueError(f"--repeats must be >= 1, got {repeats}")
    pmu = default_pmu() if isinstance(pmu, str) and pmu == "auto" else pmu
    machine = describe(bandwidth=True)
    report = {"schema": "refimpl.profile/1", "model": path or f"built-in tiny model {DEFAULT_MODEL}",
              "dtype": dtype, "prompt_len": prompt_len, "decode_steps": decode, "repeats": repeats,
              "machine": machine.as_dict(), "backends": {}, "skipped": {},
              "pmu": pmu.kind if pmu is not None else None}
    cfg = None
    with _Threads(), pinned():
        for b in backends:
            if b == PEER:
                why = peer.available() or (None if dtype == "float32" else f"the peer runs float32, not {dtype}")
                if why:
                    report["skipped"][b] = why
                    continue
            try:
                model = _load_model(path, dtype, "numpy" if b == PEER else b)
                if b == PEER:
                    hf = peer.hf_peer(model)
                    peer_check = peer.check_peer(hf, model, prompt_ids(model.config, prompt_len, decode))
            except (KeyError, ValueError, ImportError) as e:
                if path is not None and b == "numpy":
                    raise
                report["skipped"][b] = f"{type(e).__name__}: {e}"
                continue
            cfg = model.config
            t0 = time.perf_counter()
            cpt0 = core_per_tsc_now()
            if b == PEER:
                meas = peer.profile_peer(hf, cfg.arch, prompt_ids(cfg, prompt_len, decode), decode, repeats,
                                         pmu=pmu)
            else:
                meas = profile_model(model, prompt_len, decode, repeats, pmu=pmu)
            clocks = [x for x in (cpt0, core_per_tsc_now()) if x is not None]
            mach, src, warn = core_clock(machine, {"core_per_tsc": sum(clocks) / len(clocks)} if clocks else None,
                                         "add chain timed before and after this backend's runs")
            if warn:
                report.setdefault("warnings", []).append(f"{b}: {warn}")
            wb = weight_bytes(cfg, dtype)
            S_pre = prompt_len
            S_dec = prompt_len + max(decode, 1) // 2 + 1     # the middle decode step's context
            report["backends"][b] = {
                "prefill": _stage_rows(meas["prefill"], analytic(cfg, prompt_len, S_pre, dtype), prompt_len,
                                       mach, dtype, wb),
                "decode": _stage_rows(meas["decode"], analytic(cfg, 1, S_dec, dtype), 1, mach, dtype, wb)
                if decode else [],
                "prefill_per_layer_ticks_per_token": {k: v / prompt_len for k, v in meas["prefill_per_layer"].items()},
                "decode_forward_untraced_ticks": meas["decode_forward_untraced"],
                "decode_forward_untraced_pmu": meas["decode_forward_untraced_pmu"],
                "decode_fused_call_pmu": meas["decode_fused_call_pmu"],
                "decode_fused": (_stage_rows(meas["decode_fused"], analytic(cfg, 1, S_dec, dtype), 1, mach, dtype, wb)
                                 if meas["decode_fused"] else []),
                "decode_fused_call_ticks": meas["decode_fused"]["call"] if meas["decode_fused"] else None,
                "fused_decode": bool(getattr(model, "fused_decode", False)),
                "core_per_tsc": mach.core_per_tsc, **src,
                "wall_s": time.perf_counter() - t0,
            }
            if b == PEER:
                import torch
                import transformers
                report["backends"][b]["peer"] = {
                    "model": f"transformers {transformers.__version__} {type(hf).__name__}, torch {torch.__version__}",
                    "check_worst_over_bound": peer_check}
    if cfg is None:
        raise ValueError(f"profile: no backend could run the model: {report['skipped']}")
    report["config"] = cfg.to_dict()
    report["weight_bytes"] = weight_bytes(cfg, dtype)
    return report


# ------------------------------------------------------------------- output


def _t(x):
    from refimpl.timing.bench import fmt_count
    return "-" if x is None else fmt_count(x)


def print_report(report: dict, console=None) -> None:
    from rich.console import Console
    from rich.table import Table
    console = console or Console()
    cfg = report["config"]
    console.print(f"[bold]refimpl profile[/]: {report['model']}  ({cfg['arch']}, D={cfg['d_model']}, "
                  f"L={cfg['n_layers']}, H={cfg['n_heads']}/{cfg['n_kv_heads']}, F={cfg['d_ff']}, "
                  f"V={cfg['vocab_size']}; weights {report['weight_bytes'] / 1e6:.2f} MB {report['dtype']}); "
                  f"prompt {report['prompt_len']} tokens, {report['decode_steps']} decode steps")
    for b, why in report["skipped"].items():
        console.print(f"[yellow]skipped {b}:[/] {why}")
    for w in report.get("warnings", []):
        console.print(f"[yellow]warning:[/] {w}")
    for b, d in report["backends"].items():
        if "peer" in d:
            console.print(f"{b}: {d['peer']['model']}, the same weights; its prefill logits are within "
                          f"{d['peer']['check_worst_over_bound']:.2g} x the float32 bound of the float64 oracle; "
                          "stages from forward hooks; transformers' own set-up before the first layer (its forward "
                          "wrappers, positions, mask) counts as embedding (refimpl.timing.peer)")
        for phase in PHASES:
            rows = d.get(phase)
            if not rows:
                continue
            what = ("decode as one C call per token, stages timed inside the call" if phase == "decode_fused"
                    else phase)
            t = Table(title=f"{b}: {what}, per token (ticks = TSC ticks; cyc = est. core cycles, "
                            f"core/TSC {d.get('core_per_tsc', report['machine']['core_per_tsc']):.3f})")
            for col in ("stage", "ticks", "est. cyc", "FLOPs", "bytes", "roofline min", "bound", "measured/bound"):
                t.add_column(col, justify="left" if col in ("stage", "bound") else "right")
            for r in rows:
                name = r["stage"] + (" (in sampling)" if r["stage"] in INFO_STAGES else "")
                t.add_row(name, _t(r["ticks"]), _t(r["core_cycles"]), _t(r["flops"]), _t(r["bytes"]),
                          f"{r['roofline_ticks']:.0f}", r["bound"],
                          "-" if r["measured_over_bound"] is None else f"{r['measured_over_bound']:.1f}")
            console.print(t)
            u = d.get("decode_forward_untraced_ticks")
            if phase == "decode" and u:
                traced = sum(r["ticks"] or 0 for r in rows if r["summed"] and r["stage"] not in ("sampling",))
                how = ("one C call per token (refimpl.kernels.c_decode)" if d.get("fused_decode")
                       else "the same steps, without hooks" if "peer" in d
                       else "the same Python composition, without trace calls")
                console.print(f"decode forward without a trace: {_t(u)} ticks/token "
                              f"({u / traced:.2f} of the traced stages above, sampling excluded): {how}"
                              if traced else f"decode forward without a trace: {_t(u)} ticks/token: {how}")
                _print_counted(console, d.get("decode_forward_untraced_pmu"))
            call = d.get("decode_fused_call_ticks")
            if phase == "decode_fused" and call:
                inside = sum(r["ticks"] or 0 for r in rows if r["summed"] and r["stage"] != "sampling")
                console.print(f"the forward call from Python in these steps (the sampler runs between them): "
                              f"{_t(call)} ticks/token; the stages inside it "
                              f"(sampling excluded) are {inside / call:.2f} of that, the rest is the Python "
                              "wrapper (checks, the logits array, the call)")
                _print_counted(console, d.get("decode_fused_call_pmu"))


def _print_counted(console, c: dict | None) -> None:
    """The PMU's counts of the line above's calls, per token."""
    if not c:
        return
    if c["kind"] == "hardware":
        console.print(f"  counted by the PMU: {_t(c['core_cycles'])} core cycles, {_t(c['instructions'])} "
                      f"instructions a token (IPC {c['ipc']:.2f})")
    else:
        console.print(f"  counted by the {c['kind']} counter: {_t(c['core_cycles'])} ns a token")


def write_json(report: dict, path: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(report, f, indent=1, default=lambda o: o.item() if hasattr(o, "item") else str(o))
        f.write("\n")


def plot_series(report: dict) -> dict:
    """What `plot` draws, one entry per bar (backend x phase): labels, per-stage ticks per
    token (the summed stages), the roofline minimum, and the decode forward without a trace
    (None for prefill, or when not measured): on the C backend that is one C call per token,
    several times below the traced Python composition the bar is made of.  A backend that
    decodes in one C call gets a third bar: that call's stages, timed inside it."""
    out = {"labels": [], "stages": [], "roofline": [], "untraced": []}
    for b, d in report["backends"].items():
        for phase in PHASES:
            if d.get(phase):
                out["labels"].append(f"{b}\n{phase}" if phase != "decode_fused" else f"{b}\ndecode\n(1 C call)")
                out["stages"].append({r["stage"]: (r["ticks"] or 0) for r in d[phase] if r["summed"]})
                out["roofline"].append(next(r["roofline_ticks"] for r in d[phase] if r["stage"] == "total"))
                out["untraced"].append(d.get("decode_forward_untraced_ticks") if phase == "decode" else None)
    return out


def plot(report: dict, path: str) -> None:
    """Stacked bars: ticks per token by stage, prefill and decode, per backend; the roofline
    minimum and the untraced decode forward marked."""
    from refimpl.timing.plotting import pyplot, save
    plt = pyplot()
    ps = plot_series(report)
    labels, data, roofs = ps["labels"], ps["stages"], ps["roofline"]
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(labels)) + 3, 5))
    bottom = np.zeros(len(labels))
    for st in STAGES:
        vals = np.array([dd.get(st, 0) for dd in data], dtype=float)
        ax.bar(labels, vals, bottom=bottom, label=st)
        bottom += vals
    ax.scatter(labels, roofs, marker="_", s=600, c="k", label="roofline minimum", zorder=3)
    fwd = [(lb, u) for lb, u in zip(labels, ps["untraced"]) if u]
    if fwd:
        ax.scatter([lb for lb, _ in fwd], [u for _, u in fwd], marker="_", s=600, c="k", linestyle="--",
                   linewidths=2.5, alpha=0.55, label="decode forward without a trace (sampling excluded)", zorder=3)
    ax.set_ylabel("TSC ticks per token")
    ax.set_title(f"refimpl profile: {report['config']['arch']} D={report['config']['d_model']} "
                 f"({report['dtype']})")
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    save(fig, path)
