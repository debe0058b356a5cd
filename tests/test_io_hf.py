"""HF model directories without torch: config.json mapping, prefixes, sharding,
dropped buffers, and one test per inconsistent checkpoint (item 11)."""
import json

import numpy as np
import pytest

import refimpl.io.load as rload
from refimpl.io import safetensors as st
from refimpl.io.hf import CheckpointError, config_from_dict, load_hf
from refimpl.oracle.config import expected_shapes
from refimpl.oracle.model import random_params

GPT2_JSON = {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": 64, "n_positions": 16,
             "n_embd": 16, "n_layer": 2, "n_head": 4, "n_inner": None, "activation_function": "gelu_new",
             "layer_norm_epsilon": 1e-5, "bos_token_id": 50256, "eos_token_id": 50256, "tie_word_embeddings": True}
LLAMA_JSON = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": 64, "hidden_size": 16,
              "intermediate_size": 24, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
              "max_position_embeddings": 16, "rms_norm_eps": 1e-6, "hidden_act": "silu", "head_dim": 4,
              "rope_parameters": {"rope_theta": 500.0, "rope_type": "default"}, "tie_word_embeddings": False,
              "bos_token_id": 1, "eos_token_id": 2}
BERT_JSON = {"model_type": "bert", "architectures": ["BertModel"], "vocab_size": 64, "hidden_size": 16,
             "num_hidden_layers": 2, "num_attention_heads": 4, "intermediate_size": 24, "hidden_act": "gelu",
             "max_position_embeddings": 16, "type_vocab_size": 2, "layer_norm_eps": 1e-12}
PREFIX = {"gpt2": "transformer.", "llama": "model.", "bert": ""}


def write_dir(path, cfg_json, mutate=None, extra_tensors=None):
    """An HF-style directory: config.json + model.safetensors with prefixed keys (random float32 weights)."""
    cfg = config_from_dict(cfg_json)
    params = random_params(cfg, seed=1)
    tensors = {}
    for k, v in params.items():
        key = k if k == "lm_head.weight" else PREFIX[cfg.arch] + k
        tensors[key] = v.astype(np.float32)
    if mutate:
        mutate(tensors)
    tensors.update(extra_tensors or {})
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(cfg_json))
    st.save_file(tensors, path / "model.safetensors")
    return cfg, params


@pytest.mark.parametrize("cfg_json", [GPT2_JSON, LLAMA_JSON, BERT_JSON], ids=["gpt2", "llama", "bert"])
def test_loads_and_strips_prefix(tmp_path, cfg_json):
    _, params = write_dir(tmp_path / "m", cfg_json)
    cfg, got = load_hf(tmp_path / "m")
    assert set(got) == set(expected_shapes(cfg))
    for k in got:
        np.testing.assert_array_equal(got[k], params[k].astype(np.float32))


def test_config_mapping():
    g = config_from_dict(GPT2_JSON)
    assert (g.arch, g.d_model, g.d_ff, g.n_layers, g.n_heads, g.max_seq_len, g.norm_eps) == \
        ("gpt2", 16, 64, 2, 4, 16, 1e-5)
    assert g.bos_token_id is None and g.tie_embeddings        # 50256 is outside the 64-token vocabulary
    ll = config_from_dict(LLAMA_JSON)
    assert (ll.n_kv_heads, ll.d_ff, ll.rope_theta, ll.norm_eps, ll.rope_interleaved, ll.tie_embeddings) == \
        (2, 24, 500.0, 1e-6, False, False)
    legacy = dict(LLAMA_JSON, rope_theta=1e6)
    del legacy["rope_parameters"]
    assert config_from_dict(legacy).rope_theta == 1e6
    b = config_from_dict(BERT_JSON)
    assert (b.arch, b.norm_eps, b.type_vocab_size, b.causal) == ("bert", 1e-12, 2, False)
    assert config_from_dict(dict(GPT2_JSON, n_inner=40)).d_ff == 40


@pytest.mark.parametrize("cfg_json,change,words", [
    (GPT2_JSON, {"activation_function": "relu"}, ["activation_function", "relu"]),
    (LLAMA_JSON, {"rope_scaling": {"type": "linear", "factor": 2.0}}, ["rope_scaling"]),
    (LLAMA_JSON, {"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4, "factor": 2.0}}, ["yarn"]),
    (LLAMA_JSON, {"attention_bias": True}, ["attention_bias"]),
    (LLAMA_JSON, {"head_dim": 8}, ["head_dim"]),
    (BERT_JSON, {"hidden_act": "relu"}, ["hidden_act"]),
    (BERT_JSON, {"position_embedding_type": "relative_key"}, ["position_embedding_type"]),
    ({"model_type": "t5"}, {}, ["model_type", "t5"]),
    (GPT2_JSON, {"n_head": 5}, ["n_heads=5"]),
    (GPT2_JSON, {"n_embd": None}, ["n_embd", "missing"]),
])
def test_unsupported_config(cfg_json, change, words):
    with pytest.raises(CheckpointError) as e:
        config_from_dict(dict(cfg_json, **change), "some/config.json")
    for w in words:
        assert w in str(e.value), str(e.value)
    assert "some/config.json" in str(e.value)


def test_missing_tensor(tmp_path):
    write_dir(tmp_path / "m", GPT2_JSON, mutate=lambda t: t.pop("transformer.h.1.mlp.c_fc.bias"))
    with pytest.raises(CheckpointError, match=r"missing tensor 'h\.1\.mlp\.c_fc\.bias'"):
        rload.load(tmp_path / "m")


def test_extra_tensor(tmp_path):
    write_dir(tmp_path / "m", LLAMA_JSON,
              extra_tensors={"model.layers.0.self_attn.q_norm.weight": np.ones(4, np.float32)})
    with pytest.raises(CheckpointError, match=r"unexpected tensor 'layers\.0\.self_attn\.q_norm\.weight'"):
        rload.load(tmp_path / "m")


def test_shape_mismatch_config_vs_weights(tmp_path):
    # config says 2 kv heads (k_proj (8, 16)); the weights hold 4 (k_proj (16, 16))
    def widen(t):
        for i in range(2):
            for n in ("k_proj", "v_proj"):
                t[f"model.layers.{i}.self_attn.{n}.weight"] = np.zeros((16, 16), np.float32)
    write_dir(tmp_path / "m", LLAMA_JSON, mutate=widen)
    with pytest.raises(CheckpointError,
                       match=r"'layers\.0\.self_attn\.k_proj\.weight' has shape \(16, 16\).*\(8, 16\)"):
        rload.load(tmp_path / "m")


def test_known_buffers_dropped_and_tied_head(tmp_path):
    cfg, params = write_dir(tmp_path / "g", GPT2_JSON, extra_tensors={
        "transformer.h.0.attn.bias": np.ones((1, 1, 16, 16), np.float32),
        "transformer.h.1.attn.masked_bias": np.full((), -1e4, np.float32)})
    t = st.load_file(tmp_path / "g" / "model.safetensors")
    t["lm_head.weight"] = t["transformer.wte.weight"]              # tied and equal: dropped
    st.save_file(t, tmp_path / "g" / "model.safetensors")
    _, got = load_hf(tmp_path / "g")
    assert "lm_head.weight" not in got and "h.0.attn.bias" not in got
    t["lm_head.weight"] = t["transformer.wte.weight"] + 1          # tied but different: refused
    st.save_file(t, tmp_path / "g" / "model.safetensors")
    with pytest.raises(CheckpointError, match="tied.*'lm_head.weight' differs"):
        load_hf(tmp_path / "g")
    write_dir(tmp_path / "b", dict(BERT_JSON, architectures=["BertForMaskedLM"]), extra_tensors={
        "bert.pooler.dense.weight": np.zeros((16, 16), np.float32),
        "cls.predictions.bias": np.zeros(64, np.float32)})
    load_hf(tmp_path / "b")


def test_sharded_checkpoint(tmp_path):
    cfg, params = write_dir(tmp_path / "one", LLAMA_JSON)
    t = st.load_file(tmp_path / "one" / "model.safetensors")
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_JSON))
    keys = sorted(t)
    shards = {"model-00001-of-00002.safetensors": keys[::2], "model-00002-of-00002.safetensors": keys[1::2]}
    for f, ks in shards.items():
        st.save_file({k: t[k] for k in ks}, d / f)
    index = {"metadata": {}, "weight_map": {k: f for f, ks in shards.items() for k in ks}}
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    _, got = load_hf(d)
    for k in got:
        np.testing.assert_array_equal(got[k], params[k].astype(np.float32))
    index["weight_map"][keys[0]] = "../evil.safetensors"
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not a plain file name"):
        load_hf(d)
    index["weight_map"][keys[0]] = "model-00002-of-00002.safetensors"   # listed in the wrong shard
    (d / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(CheckpointError, match="not listed for this shard|should be in shard"):
        load_hf(d)


def test_half_precision_weights_widen_exactly(tmp_path):
    _, params = write_dir(tmp_path / "m", BERT_JSON)
    t = st.load_file(tmp_path / "m" / "model.safetensors")
    st.save_file({k: v.astype(np.float16) for k, v in t.items()}, tmp_path / "m" / "model.safetensors")
    _, got = load_hf(tmp_path / "m")
    for k, v in got.items():
        assert v.dtype == np.float32
        np.testing.assert_array_equal(v, t[k].astype(np.float16).astype(np.float32))


def test_pickle_checkpoint_refused(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2_JSON))
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")
    with pytest.raises(CheckpointError, match="never unpickles"):
        load_hf(tmp_path)


def test_load_paths(tmp_path):
    write_dir(tmp_path / "m", GPT2_JSON)
    m = rload.load(tmp_path / "m" / "model.safetensors", dtype="float64")
    assert m.config.arch == "gpt2" and m.dtype == np.float64
    with pytest.raises(FileNotFoundError, match="nothere"):
        rload.load(tmp_path / "nothere")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ValueError, match="x.txt"):
        rload.load(tmp_path / "x.txt")


def test_truncated_safetensors_in_model_dir(tmp_path):
    write_dir(tmp_path / "m", GPT2_JSON)
    f = tmp_path / "m" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(st.SafetensorsError, match=r"model\.safetensors.*'wte\.weight'|model\.safetensors.*truncated"):
        rload.load(tmp_path / "m")


def test_pickle_file_path_refused(tmp_path):
    (tmp_path / "pytorch_model.bin").write_bytes(b"\x80\x04junk")
    with pytest.raises(ValueError, match="never unpickles"):
        rload.load(tmp_path / "pytorch_model.bin")


@pytest.mark.parametrize("cfg_json,key,value", [
    (GPT2_JSON, "layer_norm_epsilon", float("nan")),
    (GPT2_JSON, "layer_norm_epsilon", -1e-5),
    (GPT2_JSON, "layer_norm_epsilon", 0),
    (LLAMA_JSON, "rms_norm_eps", float("inf")),
    (BERT_JSON, "layer_norm_eps", -1.0),
    (LLAMA_JSON, "rope_theta", float("nan")),
    (LLAMA_JSON, "rope_theta", float("inf")),
    (LLAMA_JSON, "rope_theta", 10 ** 400),
])
def test_absurd_eps_and_theta_are_refused_naming_field_and_file(tmp_path, cfg_json, key, value):
    c = dict(cfg_json, **{key: value})
    if key == "rope_theta":
        c["rope_parameters"] = {"rope_theta": value, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(c))          # NaN / Infinity as Python's json writes them
    with pytest.raises(CheckpointError) as e:
        rload.load(tmp_path)
    msg = str(e.value)
    assert "config.json" in msg and repr(key) in msg and "must be a finite number" in msg


@pytest.mark.parametrize("value,ok", [("false", None), ("true", None), (2, None), ([], None),
                                      (False, False), (0, False), (True, True), (1, True)])
def test_tie_word_embeddings_must_be_a_boolean(value, ok):
    c = dict(GPT2_JSON, tie_word_embeddings=value)
    if ok is None:
        with pytest.raises(CheckpointError, match="'tie_word_embeddings' must be true or false"):
            config_from_dict(c)
    else:
        assert config_from_dict(c).tie_embeddings is ok


def test_config_json_with_a_huge_integer_names_the_file(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(GPT2_JSON)[:-1] + ', "x": ' + "9" * 5000 + "}")
    with pytest.raises(CheckpointError, match=r"config\.json: not valid JSON"):
        rload.load(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(dict(GPT2_JSON, layer_norm_epsilon=10 ** 400)))
    with pytest.raises(CheckpointError, match=r"config\.json: field 'layer_norm_epsilon' must be a finite number, "
                                              r"got an integer of 401 digits"):
        rload.load(tmp_path)


def test_a_named_safetensors_file_is_the_one_loaded(tmp_path):
    """load("dir/finetuned.safetensors") read dir/model.safetensors instead."""
    write_dir(tmp_path / "m", LLAMA_JSON)
    t = st.load_file(tmp_path / "m" / "model.safetensors")
    st.save_file({k: v * 0 for k, v in t.items()}, tmp_path / "m" / "zeros.safetensors")
    _, p = rload.load_params(tmp_path / "m" / "zeros.safetensors")
    assert not any(a.any() for a in p.values())
    _, p = rload.load_params(tmp_path / "m" / "model.safetensors")
    assert p["norm.weight"].any()


def test_an_lm_head_twice_is_refused(tmp_path):
    """lm_head.weight and model.lm_head.weight both strip to lm_head.weight: the later one won."""
    untied = dict(LLAMA_JSON, tie_word_embeddings=False)
    write_dir(tmp_path / "m", untied, extra_tensors={"model.lm_head.weight": np.zeros((64, 16), np.float32)})
    with pytest.raises(CheckpointError, match="LM head appears twice, as 'lm_head.weight' and 'model.lm_head.weight'"):
        load_hf(tmp_path / "m")


@pytest.mark.parametrize("cfg_json, key", [(LLAMA_JSON, "num_hidden_layers"), (GPT2_JSON, "n_layer")])
def test_a_layer_count_beyond_the_tensors_is_refused_before_listing_names(tmp_path, cfg_json, key):
    """num_hidden_layers = 10^8 in a 2-layer file: expected_shapes listed ~9 names a layer first
    (~100 GB) and ran out of memory."""
    write_dir(tmp_path / "m", cfg_json)
    (tmp_path / "m" / "config.json").write_text(json.dumps(dict(cfg_json, **{key: 10 ** 6})))   # 10^8 ran out of memory
    with pytest.raises(CheckpointError, match=r"layer count \(1000000\) differs from the layers the tensors hold "
                                              r"\(2, numbered 0..1\)"):
        load_hf(tmp_path / "m")


def test_a_sparse_file_behind_a_small_header_is_refused_before_it_is_read(tmp_path):
    """A valid header followed by gigabytes of holes was read whole, then refused."""
    write_dir(tmp_path / "m", GPT2_JSON)
    f = tmp_path / "m" / "model.safetensors"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size + (1 << 29))                      # 512 MiB of holes: no disk used
    import tracemalloc                                                  # counts the bytes objects read
    tracemalloc.start()
    try:
        with pytest.raises(st.SafetensorsError, match="model.safetensors"):
            rload.load(tmp_path / "m")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20                                             # the 512 MiB body was never read


def test_one_shard_s_path_loads_the_whole_sharded_checkpoint(tmp_path):
    """Naming one shard of a sharded checkpoint loaded that shard alone (the named-file rule)."""
    write_dir(tmp_path / "one", LLAMA_JSON)
    t = st.load_file(tmp_path / "one" / "model.safetensors")
    d = tmp_path / "sharded"
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_JSON))
    keys = sorted(t)
    halves = {"model-00001-of-00002.safetensors": keys[: len(keys) // 2],
              "model-00002-of-00002.safetensors": keys[len(keys) // 2:]}
    for name, ks in halves.items():
        st.save_file({k: t[k] for k in ks}, d / name)
    (d / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: name for name, ks in halves.items() for k in ks}}))
    _, whole = rload.load_params(d)
    _, via_shard = rload.load_params(d / "model-00001-of-00002.safetensors")
    assert sorted(via_shard) == sorted(whole)
