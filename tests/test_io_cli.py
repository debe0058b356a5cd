"""`refimpl generate` and the loaded model's input checks (token ids out of
range, prompt longer than the context)."""

import json

import numpy as np
import pytest

import refimpl.io.load as rload
from refimpl.cli import main
from refimpl.io.llama2c import save_llama2c
from refimpl.io.tokenizers import ByteTokenizer, Llama2cTokenizer
from refimpl.oracle.model import random_params, tiny_config
from test_io_hf import GPT2_JSON, write_dir
from test_io_tokenizers import write_tokenizer_bin

GPT2_128 = dict(GPT2_JSON, vocab_size=128)              # ASCII prompts fit the byte tokenizer


@pytest.fixture
def gpt2_dir(tmp_path):
    write_dir(tmp_path / "gpt2", GPT2_128)
    return tmp_path / "gpt2"


def test_generate_greedy_prints_the_models_tokens(gpt2_dir, capsys):
    rc = main(["generate", str(gpt2_dir), "--prompt", "hi!", "--max-new-tokens", "5"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    prompt = ByteTokenizer().encode("hi!")
    gen = rload.load(gpt2_dir).generate(prompt, 5)                     # float32, greedy, as the CLI defaults
    assert out == ByteTokenizer().decode(prompt + gen.tokens) + "\n"
    assert "tokens/s" in err and "3 prompt tokens" in err and "5 new tokens" in err


def test_generate_sampling_is_seeded(gpt2_dir, capsys):
    args = ["generate", str(gpt2_dir), "--prompt", "ab", "--max-new-tokens", "6", "--temperature", "0.9",
            "--top-k", "20", "--top-p", "0.9", "--seed", "7", "--dtype", "float64"]
    assert main(args) == 0
    first = capsys.readouterr().out
    assert main(args) == 0
    assert capsys.readouterr().out == first


def test_prompt_longer_than_context_exits_2(gpt2_dir, capsys):
    rc = main(["generate", str(gpt2_dir), "--prompt", "x" * 17])
    err = capsys.readouterr().err
    assert rc == 2
    assert "17 tokens" in err and "max_seq_len = 16" in err


def test_prompt_outside_vocabulary_exits_2(tmp_path, capsys):
    write_dir(tmp_path / "m", GPT2_JSON)                                # vocab 64: 'z' = 122 does not fit
    rc = main(["generate", str(tmp_path / "m"), "--prompt", "z"])
    assert rc == 2
    assert "token id 122" in capsys.readouterr().err


def test_broken_checkpoint_exits_2(tmp_path, capsys):
    write_dir(tmp_path / "m", GPT2_JSON, mutate=lambda t: t.pop("transformer.ln_f.bias"))
    assert main(["generate", str(tmp_path / "m"), "--prompt", "a"]) == 2
    assert "missing tensor 'ln_f.bias'" in capsys.readouterr().err


def test_generate_llama2c_with_its_tokenizer(tmp_path, capsys):
    n = write_tokenizer_bin(tmp_path / "tokenizer.bin")
    cfg = tiny_config("llama", vocab_size=n, norm_eps=1e-5, rope_interleaved=True, max_seq_len=16)
    save_llama2c(tmp_path / "model.bin", cfg, {k: v.astype(np.float32) for k, v in random_params(cfg).items()})
    rc = main(["generate", str(tmp_path / "model.bin"), "--prompt", "abc", "--max-new-tokens", "3"])
    out, err = capsys.readouterr()
    assert rc == 0, err
    tok = Llama2cTokenizer.from_file(tmp_path / "tokenizer.bin")
    prompt = tok.encode("abc")
    assert prompt == [1, 259, 267]
    gen = rload.load(tmp_path / "model.bin").generate(prompt, 3, stop=[1, 2])
    assert out == tok.decode(prompt + gen.tokens) + "\n"
    assert "no tokenizer found" not in err


def test_loaded_model_rejects_token_ids_out_of_range(gpt2_dir):
    m = rload.load(gpt2_dir)
    with pytest.raises(ValueError, match=r"ids\[2\] = 128 is out of range: vocab_size is 128"):
        m.forward(np.array([1, 2, 128]))
    with pytest.raises(ValueError, match="out of range"):
        m.forward(np.array([-1]))
    with pytest.raises(ValueError, match=r"prompt\[0\] = 500 is out of range"):
        m.generate([500], 2)


def test_loaded_model_rejects_prompt_longer_than_context(gpt2_dir):
    m = rload.load(gpt2_dir)
    with pytest.raises(ValueError, match="17 new tokens exceed the context limit max_seq_len = 16"):
        m.forward(np.arange(17))
    with pytest.raises(ValueError, match="context limit max_seq_len = 16"):
        m.generate(np.arange(17), 1)
    gen = m.generate(np.arange(14), 10)                                 # fits, then stops at the context
    assert gen.stopped == "context" and len(gen.tokens) == 3


def test_bert_does_not_generate(tmp_path, capsys):
    from test_io_hf import BERT_JSON
    write_dir(tmp_path / "b", BERT_JSON)
    assert main(["generate", str(tmp_path / "b"), "--prompt", "a"]) == 2
    assert "BERT" in capsys.readouterr().err


def test_unknown_checkpoint_path_exits_2(tmp_path, capsys):
    assert main(["generate", str(tmp_path / "nothere"), "--prompt", "a"]) == 2
    assert "nothere" in capsys.readouterr().err


def test_generate_uses_the_tokenizer_file_it_is_given(gpt2_dir, tmp_path, capsys):
    n = write_tokenizer_bin(tmp_path / "vocab.tok")                     # 268 tokens, the model has 128
    assert main(["generate", str(gpt2_dir), "--prompt", "hi", "--tokenizer", str(tmp_path / "vocab.tok")]) == 2
    err = capsys.readouterr().err
    # loaded (and refused), not ignored: 268 records of <= max_token_length bytes cannot be 128
    assert "vocab.tok" in err and n > 128 and "holds more than 128 tokens" in err
    (tmp_path / "t.json").write_text("{not json")
    assert main(["generate", str(gpt2_dir), "--prompt", "hi", "--tokenizer", str(tmp_path / "t.json")]) == 2
    assert "t.json" in capsys.readouterr().err


def test_malformed_tokenizer_next_to_the_checkpoint_exits_2(gpt2_dir, capsys):
    from conftest import require
    require("tokenizers")
    (gpt2_dir / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    assert main(["generate", str(gpt2_dir), "--prompt", "hi"]) == 2
    assert "tokenizer.json: not a valid tokenizer.json" in capsys.readouterr().err


def test_a_huge_declared_context_does_not_allocate_it(tmp_path, capsys):
    from test_io_hf import LLAMA_JSON
    write_dir(tmp_path / "m", dict(LLAMA_JSON, vocab_size=128, max_position_embeddings=10 ** 12))
    assert main(["generate", str(tmp_path / "m"), "--prompt", "hi", "--max-new-tokens", "3"]) == 0, \
        capsys.readouterr().err
    m = rload.load(tmp_path / "m")
    gen = m.generate([1, 2], 3)
    assert len(gen.tokens) == 3
    with pytest.raises(MemoryError, match=r"KV cache of 1000000000000 positions .* needs .* GiB"):
        m.new_cache()
    cache = m.new_cache(4)
    m.forward(np.array([1, 2, 3]), cache)
    with pytest.raises(ValueError, match="exceed the KV cache's capacity of 4 positions"):
        m.forward(np.array([1, 2]), cache)


@pytest.mark.parametrize("opt, value, words", [("--top-p", "2", "top_p must be in (0, 1], got 2.0"),
                                               ("--top-p", "0", "top_p must be in (0, 1]"),
                                               ("--top-k", "0", "top_k must be >= 1, got 0")])
@pytest.mark.parametrize("temperature", ["0", "0.8"])
def test_bad_top_k_top_p_are_refused_even_when_greedy(gpt2_dir, capsys, opt, value, words, temperature):
    args = ["generate", str(gpt2_dir), "--prompt", "hi", opt, value, "--temperature", temperature, "--seed", "1"]
    assert main(args) == 2
    out, err = capsys.readouterr()
    assert words in err and out == ""
    with pytest.raises(ValueError, match="top_k must be >= 1"):       # the API too
        rload.load(gpt2_dir).generate([1, 2], 3, top_k=0)


def test_generate_help_shows_the_default_length_and_the_bos_rule(gpt2_dir, capsys):
    with pytest.raises(SystemExit):
        main(["generate", "--help"])
    help_text = " ".join(capsys.readouterr().out.split())
    assert "--max-new-tokens N new tokens at most (default 32)" in help_text
    assert "a model without one, e.g. GPT-2 or tiny:ARCH, needs --prompt" in help_text
    assert main(["generate", str(gpt2_dir)]) == 2                      # GPT-2 has no BOS: as the help says
    assert "no BOS token: give --prompt" in capsys.readouterr().err


def test_generate_and_load_accept_tiny_models(tmp_path, monkeypatch, capsys):
    from refimpl.oracle.model import tiny_model
    monkeypatch.chdir(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not a tokenizer")        # in the cwd: must not be picked up
    assert main(["generate", "tiny:gpt2:1", "--prompt", "ABC", "--max-new-tokens", "4"]) == 0
    out, err = capsys.readouterr()
    gen = tiny_model("gpt2", seed=1, dtype="float32").generate([65, 66, 67], 4)
    assert out == ByteTokenizer().decode([65, 66, 67] + gen.tokens) + "\n" and "tiny model" in err
    assert main(["generate", "tiny:llama", "--prompt", "abc"]) == 2    # bytes >= the vocabulary of 97
    assert "token id 97, outside the model's vocabulary 0..96" in capsys.readouterr().err
    assert main(["generate", "tiny:nope", "--prompt", "A"]) == 2
    assert "tiny:ARCH[:SEED] with ARCH one of" in capsys.readouterr().err
    for bad_seed in ("-1", "x"):
        assert main(["generate", f"tiny:llama:{bad_seed}", "--prompt", "A"]) == 2
        assert f"model 'tiny:llama:{bad_seed}': the seed must be an integer >= 0" in capsys.readouterr().err
    m = rload.load("tiny:classic:2", dtype="float64")                  # the one resolver (profile uses it too)
    assert m.config.arch == "classic"
    assert all(np.array_equal(m.params[k], v) for k, v in tiny_model("classic", seed=2).params.items())


def test_generate_stops_at_any_of_several_eos_ids(tmp_path, capsys):
    """Llama 3's config lists three EOS ids; the loader kept none of a list of two or more, so
    `refimpl generate` never stopped at EOS.  generation_config.json's ids win, as in transformers."""
    prompt = ByteTokenizer().encode("hi")
    write_dir(tmp_path / "free", GPT2_128)
    free = rload.load(tmp_path / "free").generate(prompt, 6).tokens
    eos = [t for t in range(128) if t not in free][:1] + [free[2]]          # one unused id, one it emits
    write_dir(tmp_path / "eos", dict(GPT2_128, eos_token_id=eos))
    cfg = rload.load(tmp_path / "eos").config
    assert cfg.eos_token_ids == tuple(eos)
    assert main(["generate", str(tmp_path / "eos"), "--prompt", "hi", "--max-new-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    assert out == ByteTokenizer().decode(prompt + free[: free.index(free[2]) + 1]) + "\n" and "stopped: stop" in err
    write_dir(tmp_path / "gen", dict(GPT2_128, eos_token_id=eos[0]))
    (tmp_path / "gen" / "generation_config.json").write_text(json.dumps({"eos_token_id": eos}))
    assert rload.load(tmp_path / "gen").config.eos_token_ids == tuple(eos)
    (tmp_path / "gen" / "generation_config.json").write_text("[1]")
    with pytest.raises(ValueError, match="generation_config.json: must be a JSON object"):
        rload.load(tmp_path / "gen")


def test_generate_without_a_tokenizer_refuses_a_vocabulary_past_the_bytes(tmp_path, capsys):
    """With no tokenizer the ids are bytes: a 1000-id model generated ids >= 256 and then
    failed with a traceback while printing them."""
    write_dir(tmp_path / "big", dict(GPT2_JSON, vocab_size=1000))
    assert main(["generate", str(tmp_path / "big"), "--prompt", "hi", "--max-new-tokens", "3"]) == 2
    err = capsys.readouterr().err
    assert "vocabulary (1000 ids) is larger than the 256 byte values: give --tokenizer" in err


def test_generate_names_a_prompt_the_tokenizer_cannot_encode(gpt2_dir, tmp_path, capsys):
    """A tokenizer.json whose BPE unk_token is not in its vocabulary loads, and its encode raised
    the tokenizers package's bare Exception: a traceback from `refimpl generate`."""
    from conftest import require
    require("tokenizers")
    (tmp_path / "t.json").write_text(json.dumps({"version": "1.0", "added_tokens": [], "model": {
        "type": "BPE", "unk_token": "<unk>", "vocab": {"h": 0, "e": 1, "he": 2}, "merges": ["h e"]}}))
    assert main(["generate", str(gpt2_dir), "--prompt", "hello", "--tokenizer", str(tmp_path / "t.json")]) == 2
    err = capsys.readouterr().err
    assert "t.json: cannot encode the text" in err and "Traceback" not in err
