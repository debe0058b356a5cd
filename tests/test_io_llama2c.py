"""llama2.c checkpoints: file layout (checked against files built by hand),
writer/reader round trips, the RoPE row permutation, and bad files."""
import struct

import numpy as np
import pytest

import refimpl.io.load as rload
from refimpl.io.llama2c import (Llama2cError, half_split_to_interleaved, interleaved_to_half_split,
                                load_llama2c, save_llama2c)
from refimpl.oracle.model import Model, random_params, tiny_config

D, F, L, H, HKV, V, P = 8, 12, 2, 2, 1, 10, 4
DH = D // H
KV = HKV * DH


def hand_v0(shared=True):
    """A v0 file written by hand from run.c's memory_map_weights: each block is filled with its own number."""
    blocks = [("embedding", V * D), ("rms_att", L * D), ("wq", L * D * D), ("wk", L * KV * D), ("wv", L * KV * D),
              ("wo", L * D * D), ("rms_ffn", L * D), ("w1", L * F * D), ("w2", L * D * F), ("w3", L * F * D),
              ("rms_final", D), ("freq_real", P * DH // 2), ("freq_imag", P * DH // 2)]
    if not shared:
        blocks.append(("wcls", V * D))
    data = struct.pack("<7i", D, F, L, H, HKV, V if shared else -V, P)
    for i, (_, n) in enumerate(blocks):
        data += struct.pack(f"<{n}f", *([float(i + 1)] * n))
    return data, {name: i + 1 for i, (name, _) in enumerate(blocks)}


def hand_v1(shared=False):
    """v1 as llama2.c export.py `version1_export` writes it."""
    blocks = [("rms_att", L * D), ("rms_ffn", L * D), ("rms_final", D), ("embedding", V * D), ("wq", L * D * D),
              ("wk", L * KV * D), ("wv", L * KV * D), ("wo", L * D * D), ("w1", L * F * D), ("w2", L * D * F),
              ("w3", L * F * D)]
    if not shared:
        blocks.append(("wcls", V * D))
    head = struct.pack("<Ii7iB", 0x616B3432, 1, D, F, L, H, HKV, V, P, int(shared))
    data = head + b"\0" * (256 - len(head))
    for i, (_, n) in enumerate(blocks):
        data += struct.pack(f"<{n}f", *([float(i + 1)] * n))
    return data, {name: i + 1 for i, (name, _) in enumerate(blocks)}


MAPPING = {"embedding": "embed_tokens.weight", "rms_final": "norm.weight", "wcls": "lm_head.weight",
           "rms_att": "layers.1.input_layernorm.weight", "wq": "layers.1.self_attn.q_proj.weight",
           "wk": "layers.0.self_attn.k_proj.weight", "wv": "layers.1.self_attn.v_proj.weight",
           "wo": "layers.0.self_attn.o_proj.weight", "rms_ffn": "layers.0.post_attention_layernorm.weight",
           "w1": "layers.1.mlp.gate_proj.weight", "w2": "layers.1.mlp.down_proj.weight",
           "w3": "layers.0.mlp.up_proj.weight"}


@pytest.mark.parametrize("maker,shared", [(hand_v0, True), (hand_v0, False), (hand_v1, True), (hand_v1, False)])
def test_layout_of_hand_written_files(tmp_path, maker, shared):
    data, marks = maker(shared)
    (tmp_path / "m.bin").write_bytes(data)
    cfg, params = load_llama2c(tmp_path / "m.bin")
    assert (cfg.d_model, cfg.d_ff, cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.vocab_size, cfg.max_seq_len) == \
        (D, F, L, H, HKV, V, P)
    assert cfg.rope_interleaved and cfg.norm_eps == 1e-5 and cfg.rope_theta == 10000.0
    assert cfg.tie_embeddings == shared
    for block, key in MAPPING.items():
        if block == "wcls" and shared:
            assert key not in params
            continue
        assert np.all(params[key] == marks[block]), (block, key)


@pytest.mark.parametrize("version", [0, 1])
@pytest.mark.parametrize("tied", [True, False])
def test_round_trip(tmp_path, version, tied):
    cfg = tiny_config("llama", norm_eps=1e-5, rope_interleaved=True, tie_embeddings=tied, max_seq_len=16)
    params = {k: v.astype(np.float32) for k, v in random_params(cfg, seed=3).items()}
    save_llama2c(tmp_path / "m.bin", cfg, params, version=version)
    cfg2, got = load_llama2c(tmp_path / "m.bin")
    assert cfg2.tie_embeddings == tied and cfg2.n_kv_heads == cfg.n_kv_heads
    assert set(got) == set(params)
    for k in params:
        np.testing.assert_array_equal(got[k], params[k], err_msg=k)


def test_permutation_is_an_inverse_pair():
    w = np.arange(6 * 8 * 3, dtype=np.float64).reshape(6 * 8, 3)
    np.testing.assert_array_equal(interleaved_to_half_split(half_split_to_interleaved(w, 6), 6), w)
    # one head of width 4: half-split rows (0, 1 | 2, 3) pair as (0,2), (1,3) -> interleaved order 0, 2, 1, 3
    np.testing.assert_array_equal(half_split_to_interleaved(np.arange(4.0)[:, None], 1)[:, 0], [0, 2, 1, 3])


def test_half_split_model_written_as_interleaved_computes_the_same(tmp_path):
    """A half-split (HF layout) model saved as llama2.c computes the same logits under interleaved RoPE."""
    cfg = tiny_config("llama", norm_eps=1e-5, rope_interleaved=False, max_seq_len=16)
    params = {k: v.astype(np.float32) for k, v in random_params(cfg, seed=4).items()}
    save_llama2c(tmp_path / "m.bin", cfg, params)
    ids = np.array([5, 0, 96, 3, 3, 17, 42, 8, 1])
    want = Model(cfg, params).forward(ids)
    got = rload.load(tmp_path / "m.bin", dtype="float64").forward(ids)
    # same float32 weights, float64 math: only the RoPE arithmetic order differs
    assert np.abs(got - want).max() <= 1e-12 * np.abs(want).max()


def test_file_size_must_match_header(tmp_path):
    data, _ = hand_v0(True)
    (tmp_path / "short.bin").write_bytes(data[:-4])
    with pytest.raises(Llama2cError, match=rf"short.bin: file is {len(data) - 4} bytes .* implies {len(data)} bytes"):
        rload.load(tmp_path / "short.bin")
    (tmp_path / "long.bin").write_bytes(data + b"\0" * 4)
    with pytest.raises(Llama2cError, match=rf"file is {len(data) + 4} bytes"):
        load_llama2c(tmp_path / "long.bin")
    # the same data read as unshared needs a classifier the file does not have
    bad = struct.pack("<7i", D, F, L, H, HKV, -V, P) + data[28:]
    (tmp_path / "unshared.bin").write_bytes(bad)
    with pytest.raises(Llama2cError, match="shared_classifier=False"):
        load_llama2c(tmp_path / "unshared.bin")


def test_sizes_past_int64_and_sparse_files(tmp_path):
    """A 256-byte v1 file with dim = 2^30, hidden_dim = 2^30 - 1, 16 layers: the implied size
    wrapped int64 (np.prod) to exactly 256 bytes and passed the size check.  And a small
    header followed by 512 MiB of holes was read whole before the size check refused it."""
    import tracemalloc

    from refimpl.io.llama2c import MAGIC
    h = struct.pack("<Ii7iB", MAGIC, 1, 2 ** 30, 2 ** 30 - 1, 16, 1, 1, 15, 1, 1)
    (tmp_path / "wrap.bin").write_bytes(h + b"\0" * (256 - len(h)))
    with pytest.raises(Llama2cError, match=r"wrap.bin: file is 256 bytes but .* implies \d{20,} bytes"):
        load_llama2c(tmp_path / "wrap.bin")
    data, _ = hand_v0(True)
    (tmp_path / "sparse.bin").write_bytes(data)
    with open(tmp_path / "sparse.bin", "r+b") as f:
        f.truncate(len(data) + (1 << 29))
    tracemalloc.start()                                                # counts the bytes objects read
    try:
        with pytest.raises(Llama2cError, match=rf"file is {len(data) + (1 << 29)} bytes"):
            load_llama2c(tmp_path / "sparse.bin")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20                                             # the 512 MiB body was never read


def test_bad_headers(tmp_path):
    cases = {
        "tiny.bin": b"\0" * 10,
        "zero.bin": struct.pack("<7i", 0, F, L, H, HKV, V, P),
        "heads.bin": struct.pack("<7i", D, F, L, 3, 1, V, P),
        "v2.bin": struct.pack("<Ii", 0x616B3432, 2) + b"\0" * 250,
    }
    msgs = {"tiny.bin": "too short", "zero.bin": "dim = 0", "heads.bin": "not a multiple", "v2.bin": "version 2"}
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(Llama2cError, match=msgs[name]) as e:
            load_llama2c(tmp_path / name)
        assert name in str(e.value)


def test_writer_refuses_what_the_format_cannot_say(tmp_path):
    cfg = tiny_config("llama")                            # norm_eps 1e-6: run.c hard-codes 1e-5
    with pytest.raises(ValueError, match="norm_eps"):
        save_llama2c(tmp_path / "m.bin", cfg, random_params(cfg))
    cfg = tiny_config("llama", norm_eps=1e-5, rope_theta=5e5)
    with pytest.raises(ValueError, match="rope_theta"):
        save_llama2c(tmp_path / "m.bin", cfg, random_params(cfg))
    cfg = tiny_config("gpt2")
    with pytest.raises(ValueError, match="arch"):
        save_llama2c(tmp_path / "m.bin", cfg, random_params(cfg))


@pytest.mark.parametrize("head,kind", [
    (b"PK\x03\x04\x00\x00\x08\x08", "zip"),                      # torch.save since 1.6: a ZIP archive
    (b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8", "pickle"),         # legacy torch.save: pickle of its magic number
    (b"\x80\x04\x95\x33\x00\x00\x00\x00", "pickle"),             # pickle protocol 4 (FRAME)
])
def test_torch_checkpoint_named_model_bin_is_named_as_such(tmp_path, head, kind):
    (tmp_path / "model.bin").write_bytes(head + b"\0" * 300)
    with pytest.raises(Llama2cError) as e:
        rload.load(tmp_path / "model.bin")
    msg = str(e.value)
    assert f"this is a PyTorch {kind} checkpoint" in msg and "never unpickles" in msg and "model.bin" in msg
    assert "header field" not in msg
