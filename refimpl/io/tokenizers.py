"""Tokenizers: built-in bytes, llama2.c `tokenizer.bin`, and HF `tokenizer.json`.

Every tokenizer has `encode(text, bos=...) -> list[int]`, `decode(ids) -> str`,
`vocab_size`, `bos_id`, `eos_id` (None when the vocabulary has none).

* `ByteTokenizer`: id = the byte's value (0..255) of the UTF-8 text; no
  special tokens; decoding joins the bytes and replaces invalid UTF-8 with
  U+FFFD.  Fits a model of exactly 256 ids, or a smaller vocabulary when the
  text's bytes fall inside it (ASCII: 128; the tiny models); its decode refuses
  ids past 255, and `refimpl generate` refuses it for a vocabulary past 256.
* `Llama2cTokenizer`: llama2.c's `tokenizer.bin`: int32 max_token_length, then
  per token: float32 score, int32 byte length, the bytes.  The vocabulary size
  is not stored: it is every record up to the end of the file.  Encoding is
  run.c's `encode`: optional BOS (id 1), a dummy-prefix " " token when the
  text is not empty, one token per UTF-8 code point when the code point is in
  the vocabulary, else byte fallback (byte b -> id b + 3, the `<0xXX>` tokens
  at ids 3..258), then repeatedly merge the adjacent pair whose concatenation
  is in the vocabulary with the highest score (leftmost on ties), optional EOS
  (id 2).  Decoding is run.c's `decode`: `<0xXX>` pieces become that byte, and
  the leading space of the piece right after BOS is dropped.
* `HFTokenizer`: `tokenizer.json` (or GPT-2's vocab.json + merges.txt) through
  the `tokenizers` package (optional dependency).
"""
from __future__ import annotations

import heapq
import json
import re
import struct
from pathlib import Path

from refimpl.io.safetensors import read_rest

_BYTE_PIECE = re.compile(rb"<0x([0-9A-Fa-f]{2})>")


class ByteTokenizer:
    """id = byte value of the UTF-8 encoding (vocab 256, no special tokens)."""

    vocab_size = 256
    bos_id = None
    eos_id = None
    name = "bytes"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        ids = [int(i) for i in ids]
        bad = [i for i in ids if not 0 <= i < 256]
        if bad:
            raise ValueError(f"byte tokenizer: token id {bad[0]} is out of range 0..255")
        return bytes(ids).decode("utf-8", errors="replace")


class Llama2cTokenizer:
    """llama2.c `tokenizer.bin` with run.c's BPE merge-by-score encoder."""

    name = "llama2c"

    def __init__(self, vocab: list[bytes], scores: list[float], max_token_length: int, source: str = "<memory>"):
        if len(vocab) != len(scores):
            raise ValueError(f"tokenizer {source}: {len(vocab)} pieces but {len(scores)} scores")
        self.vocab, self.scores, self.max_token_length = list(vocab), list(scores), max_token_length
        self.source = source
        self.lookup: dict[bytes, int] = {}
        for i, piece in enumerate(self.vocab):           # a repeated piece maps to its lowest id
            self.lookup.setdefault(piece, i)
        self.bos_id = 1 if len(vocab) > 1 else None
        self.eos_id = 2 if len(vocab) > 2 else None

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    # -- file format --------------------------------------------------------
    @classmethod
    def from_file(cls, path, vocab_size: int | None = None) -> "Llama2cTokenizer":
        p = Path(path)
        if not p.is_file():                          # a FIFO would block the read
            raise FileNotFoundError(f"tokenizer {p} does not exist or is not a file")
        size = p.stat().st_size
        with open(p, "rb") as f:
            data = f.read(4)
            if len(data) < 4:
                raise ValueError(f"tokenizer {p}: {len(data)} bytes, too short for max_token_length")
            (max_len,) = struct.unpack_from("<i", data, 0)
            if max_len <= 0:
                raise ValueError(f"tokenizer {p}: max_token_length = {max_len} must be positive")
            most = 4 + vocab_size * (8 + max_len) if vocab_size is not None else size
            if size > most:                          # more bytes than vocab_size records can hold: not read
                raise ValueError(f"tokenizer {p}: holds more than {vocab_size} tokens ({size} bytes; {vocab_size} "
                                 f"tokens of at most {max_len} bytes take {most}) but the model's vocab_size is "
                                 f"{vocab_size}")
            data = read_rest(f, data, size)
        vocab, scores, off = [], [], 4
        while off < len(data):
            if off + 8 > len(data):
                raise ValueError(f"tokenizer {p}: token {len(vocab)} record header truncated at byte {off}")
            score, n = struct.unpack_from("<fi", data, off)
            off += 8
            if n < 0 or n > max_len:
                raise ValueError(f"tokenizer {p}: token {len(vocab)} has length {n}, outside 0..max_token_length="
                                 f"{max_len}")
            if off + n > len(data):
                raise ValueError(f"tokenizer {p}: token {len(vocab)} bytes truncated at byte {off}")
            vocab.append(bytes(data[off:off + n]))
            scores.append(score)
            off += n
        if vocab_size is not None and len(vocab) != vocab_size:
            raise ValueError(f"tokenizer {p}: holds {len(vocab)} tokens but the model's vocab_size is {vocab_size}")
        return cls(vocab, scores, max_len, str(p))

    def save(self, path) -> None:
        """Write llama2.c's tokenizer.bin format."""
        parts = [struct.pack("<i", self.max_token_length)]
        for piece, score in zip(self.vocab, self.scores):
            parts.append(struct.pack("<fi", score, len(piece)) + piece)
        Path(path).write_bytes(b"".join(parts))

    # -- run.c encode / decode ---------------------------------------------
    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        tokens: list[int] = []
        if bos:
            tokens.append(1)
        raw = text.encode("utf-8")
        if raw:                                           # sentencepiece's add_dummy_prefix
            tokens.extend(self._piece_or_bytes(b" "))
        i = 0
        while i < len(raw):                               # one UTF-8 code point (<= 4 bytes) at a time
            j = i + 1
            while j < len(raw) and (raw[j] & 0xC0) == 0x80 and j - i < 4:
                j += 1
            tokens.extend(self._piece_or_bytes(raw[i:j]))
            i = j
        tokens = self.merge(tokens)                       # run.c merges over BOS too
        if eos:
            tokens.append(2)
        return tokens

    def _pair(self, a: int, b: int) -> int:
        """The id of piece a + piece b if run.c would merge them (score > -1e10), else -1."""
        tid = self.lookup.get(self.vocab[a] + self.vocab[b], -1)
        return tid if tid != -1 and self.scores[tid] > -1e10 else -1

    def merge_naive(self, ids: list[int]) -> list[int]:
        """run.c's loop as written: merge the best-scoring adjacent pair (the first of equal
        ones), rescanning every pair after each merge: O(n^2) in the pieces of the prompt."""
        body = list(ids)
        while True:
            best, best_id, best_idx = -1e10, -1, -1
            for k in range(len(body) - 1):
                tid = self._pair(body[k], body[k + 1])
                if tid != -1 and self.scores[tid] > best:
                    best, best_id, best_idx = self.scores[tid], tid, k
            if best_idx == -1:
                return body
            body[best_idx:best_idx + 2] = [best_id]

    def merge(self, ids: list[int]) -> list[int]:
        """The same merges as `merge_naive`, in O(n log n): the candidate pairs in a heap keyed by
        (-score, left piece's first position), so the best and, among equal scores, the leftmost
        comes first, as run.c's strict > picks; the pieces in a linked list; a pair whose pieces
        changed since it was pushed is skipped when it comes up (each piece has a version)."""
        n = len(ids)
        tok, nxt, prv = list(ids), list(range(1, n + 1)), list(range(-1, n - 1))
        ver = [0] * n
        if n:
            nxt[-1] = -1
        heap: list[tuple] = []

        def push(i):
            j = nxt[i]
            if j != -1:
                tid = self._pair(tok[i], tok[j])
                if tid != -1:
                    heapq.heappush(heap, (-self.scores[tid], i, ver[i], ver[j], tid))
        for i in range(n - 1):
            push(i)
        while heap:
            _, i, vi, vj, tid = heapq.heappop(heap)
            j = nxt[i]
            if ver[i] != vi or j == -1 or ver[j] != vj:
                continue                                  # i or its right neighbour changed
            tok[i], ver[i] = tid, vi + 1                  # piece j joins piece i
            ver[j] += 1
            nxt[i] = nxt[j]
            if nxt[j] != -1:
                prv[nxt[j]] = i
            if prv[i] != -1:
                push(prv[i])
            push(i)
        out, i = [], 0 if n else -1
        while i != -1:
            out.append(tok[i])
            i = nxt[i]
        return out

    def _piece_or_bytes(self, s: bytes) -> list[int]:
        tid = self.lookup.get(s)
        if tid is not None:
            return [tid]
        out = [b + 3 for b in s]                          # byte fallback: <0xXX> at id byte + 3
        if out and max(out) >= self.vocab_size:
            raise ValueError(f"tokenizer {self.source}: byte fallback for {s!r} needs id {max(out)} but the "
                             f"vocabulary has {self.vocab_size} tokens (no <0xXX> byte tokens)")
        return out

    def piece_bytes(self, token: int, prev: int | None = None) -> bytes:
        """The bytes token `token` stands for, after `prev` (run.c `decode`)."""
        if not 0 <= token < self.vocab_size:
            raise ValueError(f"tokenizer {self.source}: token id {token} is out of range 0..{self.vocab_size - 1}")
        piece = self.vocab[token]
        if prev == 1 and piece.startswith(b" "):
            piece = piece[1:]
        m = _BYTE_PIECE.fullmatch(piece)
        return bytes([int(m.group(1), 16)]) if m else piece

    def decode(self, ids, prev: int | None = None) -> str:
        out = []
        for t in ids:
            t = int(t)
            if t == 1 and self.bos_id == 1:               # BOS prints nothing
                prev = t
                continue
            out.append(self.piece_bytes(t, prev))
            prev = t
        return b"".join(out).decode("utf-8", errors="replace")


def _tokenizers_package(path):
    try:
        import tokenizers
    except ImportError as e:
        raise ImportError(f"reading {path} needs the optional 'tokenizers' package "
                          "(pip install refimpl[crosscheck])") from e
    return tokenizers


class HFTokenizer:
    """`tokenizer.json` through the `tokenizers` package (or GPT-2's vocab.json + merges.txt)."""

    name = "hf"

    def __init__(self, path, tok=None):
        self.source = str(path)
        if tok is None:
            if not Path(path).is_file():             # a FIFO would block the read
                raise FileNotFoundError(f"tokenizer {path} does not exist or is not a file")
            tk = _tokenizers_package(path)
            try:
                tok = tk.Tokenizer.from_file(str(path))
            except Exception as e:     # the tokenizers package raises a bare Exception for a bad file
                why = _not_a_tokenizer(path) or f"not a valid tokenizer.json: {e}"
                raise ValueError(f"tokenizer {path}: {why}") from None
        self.tok = tok
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)
        self.bos_id = self.eos_id = None
        for attr, names in (("bos_id", ("<s>", "<|begin_of_text|>", "[CLS]")),
                            ("eos_id", ("</s>", "<|endoftext|>", "<|end_of_text|>", "[SEP]"))):
            for n in names:
                tid = self.tok.token_to_id(n)
                if tid is not None:
                    setattr(self, attr, tid)
                    break

    @classmethod
    def from_vocab_merges(cls, vocab, merges) -> "HFTokenizer":
        """GPT-2's byte-level BPE from vocab.json + merges.txt (no BOS added, as GPT-2)."""
        tk = _tokenizers_package(vocab)
        try:
            bpe = tk.ByteLevelBPETokenizer(str(vocab), str(merges))
        except Exception as e:         # a bare Exception from the tokenizers package
            raise ValueError(f"tokenizer {vocab} + {merges}: not a valid GPT-2 vocab.json / merges.txt: {e}") from None
        return cls(vocab, bpe._tokenizer)

    def encode(self, text: str, bos: bool = True, eos: bool = False) -> list[int]:
        try:
            ids = list(self.tok.encode(text, add_special_tokens=bos).ids)
        except Exception as e:         # a bare Exception from the tokenizers package (an unk_token not in vocab)
            raise ValueError(f"tokenizer {self.source}: cannot encode the text: {e}") from None
        if eos and self.eos_id is not None and (not ids or ids[-1] != self.eos_id):
            ids.append(self.eos_id)
        return ids

    def decode(self, ids) -> str:
        return self.tok.decode([int(i) for i in ids], skip_special_tokens=True)


def _not_a_tokenizer(path) -> str | None:
    """Why a file that parses as JSON is no tokenizer.json (the package's message for it, e.g. a
    config.json, is a misleading JSON syntax error); None if it is not JSON or has a "model" object."""
    try:
        doc = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if isinstance(doc, dict) and isinstance(doc.get("model"), dict):
        return None
    return 'valid JSON, but not a tokenizer.json (no "model" object)'


def load_tokenizer_file(path, vocab_size: int | None = None):
    """The tokenizer in the file (or directory) the user named: a .json file is read as an HF
    tokenizer.json (vocab.json needs merges.txt beside it), any other file as a llama2.c
    tokenizer.bin, a directory as `load_tokenizer` searches it; anything else raises
    naming the path (an explicitly given tokenizer is never silently replaced)."""
    p = Path(path)
    if p.is_dir():
        return load_tokenizer(p, vocab_size, default=None)
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file {p} does not exist")
    if p.name == "vocab.json":
        if not (p.parent / "merges.txt").is_file():
            raise FileNotFoundError(f"tokenizer {p}: a GPT-2 vocab.json needs merges.txt beside it")
        return HFTokenizer.from_vocab_merges(p, p.parent / "merges.txt")
    if p.suffix == ".json":
        return HFTokenizer(p)
    try:
        return Llama2cTokenizer.from_file(p, vocab_size)
    except ValueError as e:
        raise ValueError(f"{e} (a tokenizer file not named *.json is read as a llama2.c tokenizer.bin)") from None


def load_tokenizer(path, vocab_size: int | None = None, default: str | None = "bytes"):
    """Pick a tokenizer for a checkpoint path.

    `path` may be a tokenizer file (tokenizer.json / *.bin tokenizer), a model
    directory (looks for tokenizer.json, then vocab.json + merges.txt, then
    tokenizer.bin), or a llama2.c model .bin (looks next to it in the same
    order).  When nothing is found,
    `default="bytes"` returns the ByteTokenizer; `default=None` raises.
    """
    p = Path(path)
    if p.is_file() and p.name == "tokenizer.json":
        return HFTokenizer(p)
    if p.is_file() and p.name.startswith("tokenizer") and p.suffix == ".bin":
        return Llama2cTokenizer.from_file(p, vocab_size)
    d = p if p.is_dir() else p.parent
    if (d / "tokenizer.json").is_file():
        return HFTokenizer(d / "tokenizer.json")
    if (d / "vocab.json").is_file() and (d / "merges.txt").is_file():
        return HFTokenizer.from_vocab_merges(d / "vocab.json", d / "merges.txt")
    if (d / "tokenizer.bin").is_file():
        return Llama2cTokenizer.from_file(d / "tokenizer.bin", vocab_size)
    if default == "bytes":
        return ByteTokenizer()
    raise FileNotFoundError(f"no tokenizer.json, vocab.json + merges.txt or tokenizer.bin for {p}")
