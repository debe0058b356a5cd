"""`refimpl profile`'s peer: transformers' model with the same weights, checked against the
float64 oracle before it is timed, its stages split by forward hooks.  (No timing assertion
but one of attribution: 32 times the FFN's weights put the most ticks in the ffn stage.)"""
import numpy as np
import pytest

from conftest import require
from refimpl.oracle.model import Model, random_params, tiny_config
from refimpl.timing import peer, profile

STAGES = ("embedding", "attention", "ffn", "norms", "lm_head")


@pytest.fixture(autouse=True)
def _torch_and_transformers():
    require("torch")
    require("transformers")


def _model(arch="llama", seed=0, **overrides):
    cfg = tiny_config(arch, **overrides)
    return Model(cfg, {k: v.astype(np.float32) for k, v in random_params(cfg, seed).items()}, "float32")


@pytest.mark.parametrize("arch, overrides", [("llama", {}), ("llama", {"tie_embeddings": True}), ("gpt2", {}),
                                             ("gpt2", {"tie_embeddings": False})])
def test_peer_has_the_models_weights_and_passes_the_check(arch, overrides):
    m = _model(arch, **overrides)
    hf = peer.hf_peer(m)
    ids = np.array([3, 17, 5, 40, 2])
    assert peer.check_peer(hf, m, ids) <= 1.0


def test_a_wrong_weight_fails_the_check_and_is_not_timed():
    import torch
    m = _model()
    hf = peer.hf_peer(m)
    with torch.no_grad():
        hf.model.layers[1].self_attn.q_proj.weight.mul_(1.01)
    with pytest.raises(peer.PeerError, match="float32 bound of|x the float32 bound"):
        peer.check_peer(hf, m, np.array([3, 17, 5, 40, 2]))


def test_models_without_a_peer_are_refused_by_name():
    with pytest.raises(peer.PeerError, match="interleaved RoPE"):
        peer.hf_peer(_model(rope_interleaved=True))
    with pytest.raises(peer.PeerError, match="no transformers peer for arch 'classic'"):
        peer.hf_peer(_model("classic"))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_hooks_split_a_forward_into_the_stages_and_layers(arch):
    m = _model(arch)
    hf = peer.hf_peer(m)
    tr = peer._HookTracer(hf, arch)
    try:
        tr.begin()
        peer._logits(hf, np.array([3, 17, 5]))
        st, layers = tr.stages(), tr.per_layer()
    finally:
        tr.remove()
    assert sorted(st) == sorted(STAGES) and all(v > 0 for v in st.values())
    assert sorted(layers) == sorted(f"layers.{i}.{s}" for i in range(m.config.n_layers)
                                    for s in ("norms", "attention", "ffn"))
    assert sum(layers.values()) < sum(st.values())
    assert not any(mod._forward_hooks or mod._forward_pre_hooks for mod in hf.modules())   # removed


def test_hooks_charge_the_work_to_its_stage():
    """d_ff 48 -> 1536 (32x the FFN's weights): the ffn stage grows the most, by ratio.  The two
    models run alternately (a slower stretch of the shared host hits both) and the stages are
    compared by their big/small ratio, which a uniform slowdown leaves in order (by absolute
    gains, a 1.7x slower host during the big model's runs once made attention 'gain' most)."""
    tracers = []
    for overrides in ({}, {"d_ff": 1536}):
        hf = peer.hf_peer(_model(**overrides))
        tracers.append((hf, peer._HookTracer(hf, "llama")))
    runs = ([], [])
    try:
        for _ in range(7):
            for (hf, tr), out in zip(tracers, runs):
                tr.begin()
                peer._logits(hf, np.array([3, 17, 5, 9]))
                out.append(tr.stages())
    finally:
        for _, tr in tracers:
            tr.remove()
    small, big = ({k: min(r[k] for r in rs) for k in STAGES} for rs in runs)
    growth = {k: big[k] / small[k] for k in STAGES}
    assert max(growth, key=growth.get) == "ffn", (small, big)


def test_profile_runs_the_peer_beside_the_backends():
    rep = profile.run(backends=["c", "torch"], prompt_len=4, decode=3, repeats=1)
    assert rep["skipped"] == {}
    d = rep["backends"]["torch"]
    assert d["peer"]["model"].startswith("transformers ") and 0 <= d["peer"]["check_worst_over_bound"] <= 1
    assert d["fused_decode"] is False and d["decode_fused"] == []
    for phase in ("prefill", "decode"):
        rows = {r["stage"]: r for r in d[phase]}
        assert all(rows[s]["ticks"] > 0 for s in STAGES + ("sampling",)), phase
    assert d["decode_forward_untraced_ticks"] > 0
    assert set(d["prefill_per_layer_ticks_per_token"]) == {f"layers.{i}.{s}" for i in range(2)
                                                          for s in ("norms", "attention", "ffn")}
    for s in STAGES:                  # the same work model as the backends' rows
        a = next(r for r in d["decode"] if r["stage"] == s)
        b = next(r for r in rep["backends"]["c"]["decode"] if r["stage"] == s)
        assert (a["flops"], a["bytes"]) == (b["flops"], b["bytes"])


def test_profile_skips_the_peer_for_float64_and_says_why():
    rep = profile.run(backends=["numpy", "torch"], dtype="float64", prompt_len=4, decode=1, repeats=1)
    assert "torch" not in rep["backends"] and "runs float32" in rep["skipped"]["torch"]


def test_profile_counts_the_peers_untraced_calls_where_a_pmu_counts():
    from refimpl.timing import counter
    try:
        pmu = counter.PMU("cpu-clock")
    except OSError as e:
        pytest.skip(f"perf_event_open refuses even software counters here: {e}")
    rep = profile.run(backends=["torch"], prompt_len=4, decode=4, repeats=1, pmu=pmu)
    d = rep["backends"]["torch"]
    c = d["decode_forward_untraced_pmu"]
    assert c["kind"] == "cpu-clock" and d["decode_fused_call_pmu"] is None
    assert 0.9 < c["core_cycles"] * 1e-9 * rep["machine"]["tsc_hz"] / d["decode_forward_untraced_ticks"] < 1.15
