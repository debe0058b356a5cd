"""Tokenizers: bytes, llama2.c tokenizer.bin (run.c's merge-by-score BPE, expected
ids worked out by hand below), HF tokenizer.json, and load_tokenizer's choice."""
import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from refimpl.io.tokenizers import ByteTokenizer, Llama2cTokenizer, load_tokenizer

# ids 0..2 specials, 3..258 byte tokens <0x00>..<0xFF>, then these pieces (id, bytes, score)
PIECES = [(259, b" ", -1.0), (260, b"a", -2.0), (261, b"b", -3.0), (262, b"c", -4.0), (263, b"ab", 5.0),
          (264, b" ab", 3.0), (265, b"bc", 6.0), (266, "é".encode(), -5.0), (267, b"abc", 1.0)]


def write_tokenizer_bin(path):
    """llama2.c tokenizer.bin written by hand: int32 max_len, then (float32 score, int32 len, bytes) per token."""
    vocab = [(b"<unk>", 0.0), (b"\n<s>\n", 0.0), (b"\n</s>\n", 0.0)]
    vocab += [(f"<0x{b:02X}>".encode(), 0.0) for b in range(256)]
    vocab += [(p, s) for _, p, s in PIECES]
    data = struct.pack("<i", max(len(p) for p, _ in vocab))
    for p, s in vocab:
        data += struct.pack("<fi", s, len(p)) + p
    path.write_bytes(data)
    return len(vocab)


@pytest.fixture
def tok(tmp_path):
    n = write_tokenizer_bin(tmp_path / "tokenizer.bin")
    t = Llama2cTokenizer.from_file(tmp_path / "tokenizer.bin", vocab_size=n)
    assert t.vocab_size == n == 268
    return t


@pytest.mark.parametrize("text,ids", [
    # [BOS, " ", a, b, c] -> "bc" (6.0) beats "ab" (5.0) -> [BOS, " ", a, bc] -> "abc" (1.0); " abc" absent
    ("abc", [1, 259, 267]),
    # [BOS, " ", a, b] -> "ab" (5.0) -> " ab" (3.0)
    ("ab", [1, 264]),
    # é is one piece; "!" (0x21) falls back to byte token 0x21 + 3 = 36
    ("é!", [1, 259, 266, 36]),
    # ü (C3 BC) is not a piece: two byte tokens 0xC3 + 3, 0xBC + 3
    ("ü", [1, 259, 198, 191]),
    # empty text: no dummy prefix
    ("", [1]),
])
def test_llama2c_encode_by_hand(tok, text, ids):
    assert tok.encode(text) == ids
    assert tok.encode(text, bos=False, eos=True) == ids[1:] + [2]


def test_llama2c_encode_without_bos_merges_the_same(tok):
    assert tok.encode("ab", bos=False) == [264]
    assert tok.encode("ab", bos=False, eos=True) == [264, 2]


@pytest.mark.parametrize("text", ["abc", "ab", "é!", "ü", "a bc ab, c\n"])
def test_llama2c_decode_inverts_encode(tok, text):
    # run.c decode: the leading space right after BOS is dropped (it is the dummy prefix)
    assert tok.decode(tok.encode(text)) == text


def test_llama2c_save_round_trip(tok, tmp_path):
    tok.save(tmp_path / "copy.bin")
    assert (tmp_path / "copy.bin").read_bytes() == (tmp_path.parent / tmp_path.name / "tokenizer.bin").read_bytes()


def test_llama2c_bad_files(tmp_path):
    n = write_tokenizer_bin(tmp_path / "tokenizer.bin")
    with pytest.raises(ValueError, match=f"holds {n} tokens but the model's vocab_size is 32000"):
        Llama2cTokenizer.from_file(tmp_path / "tokenizer.bin", vocab_size=32000)
    with pytest.raises(ValueError, match=r"holds more than 10 tokens \(\d+ bytes; 10 tokens of at most"):
        Llama2cTokenizer.from_file(tmp_path / "tokenizer.bin", vocab_size=10)   # refused before the read
    import os
    os.mkfifo(tmp_path / "fifo")                                       # must not block
    with pytest.raises(FileNotFoundError, match="is not a file"):
        Llama2cTokenizer.from_file(tmp_path / "fifo")
    data = (tmp_path / "tokenizer.bin").read_bytes()
    (tmp_path / "cut.bin").write_bytes(data[:-1])
    with pytest.raises(ValueError, match="cut.bin: token 267 bytes truncated"):
        Llama2cTokenizer.from_file(tmp_path / "cut.bin")
    (tmp_path / "neg.bin").write_bytes(struct.pack("<i", 4) + struct.pack("<fi", 0.0, -1))
    with pytest.raises(ValueError, match="length -1"):
        Llama2cTokenizer.from_file(tmp_path / "neg.bin")


def test_llama2c_without_byte_tokens_says_so():
    t = Llama2cTokenizer([b"<unk>", b"<s>", b"</s>", b" ", b"a"], [0.0] * 5, 3)
    assert t.encode("aa", bos=False) == [3, 4, 4]
    with pytest.raises(ValueError, match="byte fallback"):
        t.encode("z")
    with pytest.raises(ValueError, match="token id 9 is out of range"):
        t.decode([9])


def test_byte_tokenizer():
    t = ByteTokenizer()
    assert t.encode("Aé") == [65, 0xC3, 0xA9]
    assert t.decode([65, 0xC3, 0xA9]) == "Aé"
    assert t.decode([0xFF]) == "\ufffd"
    with pytest.raises(ValueError, match="256"):
        t.decode([256])


def test_hf_tokenizer_json(tmp_path):
    from conftest import require
    tk = require("tokenizers")
    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
    t = tk.Tokenizer(tk.models.WordLevel(vocab, unk_token="[UNK]"))
    t.add_special_tokens(["<s>", "</s>"])
    t.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    t.post_processor = tk.processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    t.save(str(tmp_path / "tokenizer.json"))
    h = load_tokenizer(tmp_path)
    assert h.name == "hf" and h.vocab_size == 5 and h.bos_id == 1 and h.eos_id == 2
    assert h.encode("hello world") == [1, 3, 4]
    assert h.encode("hello nope", bos=False, eos=True) == [3, 0, 2]
    assert h.decode([1, 3, 4]) == "hello world"


def test_load_tokenizer_picks_by_what_is_there(tmp_path):
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)
    with pytest.raises(FileNotFoundError, match="no tokenizer"):
        load_tokenizer(tmp_path, default=None)
    write_tokenizer_bin(tmp_path / "tokenizer.bin")
    (tmp_path / "model.bin").write_bytes(b"")
    assert isinstance(load_tokenizer(tmp_path / "model.bin"), Llama2cTokenizer)    # next to the .bin
    assert isinstance(load_tokenizer(tmp_path), Llama2cTokenizer)
    assert isinstance(load_tokenizer(tmp_path / "tokenizer.bin"), Llama2cTokenizer)


def test_gpt2_vocab_and_merges(tmp_path):
    from conftest import require
    require("tokenizers")
    import json
    # byte-level BPE: "Ġ" is the byte-level symbol of the space byte
    vocab = {"h": 0, "i": 1, "Ġ": 2, "hi": 3, "Ġhi": 4, "!": 5}
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\nh i\nĠ hi\n")
    t = load_tokenizer(tmp_path)
    assert t.name == "hf"
    assert t.encode("hi hi!") == [3, 4, 5]
    assert t.decode([3, 4, 5]) == "hi hi!"


def test_an_explicit_tokenizer_file_is_loaded_whatever_its_name(tmp_path):
    from refimpl.io.tokenizers import load_tokenizer_file
    n = write_tokenizer_bin(tmp_path / "my-vocab.model")
    t = load_tokenizer_file(tmp_path / "my-vocab.model", vocab_size=n)
    assert isinstance(t, Llama2cTokenizer) and t.encode("ab") == [1, 264]
    with pytest.raises(FileNotFoundError, match="nothere.json"):
        load_tokenizer_file(tmp_path / "nothere.json")
    (tmp_path / "notes.txt").write_text("hello")                      # not a tokenizer: an error naming it
    with pytest.raises(ValueError, match="notes.txt.*llama2.c tokenizer.bin"):
        load_tokenizer_file(tmp_path / "notes.txt")


def test_an_explicit_tokenizer_json_of_any_name(tmp_path):
    from conftest import require

    from refimpl.io.tokenizers import load_tokenizer_file
    tk = require("tokenizers")
    t = tk.Tokenizer(tk.models.WordLevel({"[UNK]": 0, "hello": 1}, unk_token="[UNK]"))
    t.pre_tokenizer = tk.pre_tokenizers.Whitespace()
    t.save(str(tmp_path / "mine.json"))
    h = load_tokenizer_file(tmp_path / "mine.json")
    assert h.name == "hf" and h.encode("hello x", bos=False) == [1, 0]


def test_malformed_tokenizer_json_names_the_file(tmp_path):
    from conftest import require
    require("tokenizers")
    (tmp_path / "tokenizer.json").write_text('{"model": {"type": "NoSuchModel"}}')
    with pytest.raises(ValueError, match=r"tokenizer .*tokenizer\.json: not a valid tokenizer\.json"):
        load_tokenizer(tmp_path)


def test_json_that_is_not_a_tokenizer_says_so(tmp_path):
    from conftest import require

    from refimpl.io.tokenizers import load_tokenizer_file
    require("tokenizers")
    (tmp_path / "config.json").write_text('{\n  "architectures": ["LlamaForCausalLM"], "vocab_size": 97}')
    with pytest.raises(ValueError, match=r'config\.json: valid JSON, but not a tokenizer\.json \(no "model"'):
        load_tokenizer_file(tmp_path / "config.json")
    (tmp_path / "t.json").write_text('{"model": ')                    # not JSON: the parser's message stays
    with pytest.raises(ValueError, match=r"t\.json: not a valid tokenizer\.json: "):
        load_tokenizer_file(tmp_path / "t.json")


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_heap_merge_is_run_cs_merge_loop(data):
    """Llama2cTokenizer.merge (a heap, O(n log n)) against merge_naive (run.c's rescanning loop,
    O(n^2): a 100k-character prompt took minutes before the context check): the same tokens for
    random vocabularies with tied scores, pieces present twice, and scores at run.c's -1e10."""
    chars = [b"a", b"b", b"c", b" "]
    pieces = [b"<unk>", b"<s>", b"</s>"] + chars
    for _ in range(data.draw(st.integers(0, 25))):
        pieces.append(data.draw(st.sampled_from(pieces[3:])) + data.draw(st.sampled_from(pieces[3:])))
    scores = [data.draw(st.sampled_from([-1e10, -3.0, -1.0, 0.0, 0.0, 2.5])) for _ in pieces]
    tok = Llama2cTokenizer(pieces, scores, max(map(len, pieces)))
    ids = [1] + [pieces.index(c) for c in data.draw(st.lists(st.sampled_from(chars), max_size=60))]
    assert tok.merge(ids) == tok.merge_naive(ids)


def test_encode_merges_a_long_prompt_as_run_c_does():
    pieces = [b"<unk>", b"<s>", b"</s>", b" ", b"a", b"aa", b"aaaa", b"aaaaaaaa"]
    tok = Llama2cTokenizer(pieces, [0.0, 0.0, 0.0, 0.0, 0.0, 1.0, 2.0, 3.0], 8)
    text = "a" * 3001
    ids = tok.encode(text)
    assert ids == tok.merge_naive([1] + [3] + [4] * 3001)
    assert b"".join(pieces[i] for i in ids[1:]) == b" " + text.encode()
