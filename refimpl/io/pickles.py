"""Recognise PyTorch checkpoints (which refimpl never unpickles) by their first bytes.

    torch.save (>= 1.6)   a ZIP archive:   b"PK\\x03\\x04"
    older torch.save /    a pickle stream: b"\\x80" + protocol 2..5 + a first opcode
      pickle.dump                          (FRAME, LONG1 of torch's magic number, EMPTY_DICT, ...)

Neither can start a llama2.c checkpoint (as its int32 dim: 67 million for the
ZIP magic, >= 2.6 million for a pickle), so the llama2.c reader checks first.
A safetensors header size can start like a pickle, so the safetensors reader
only uses this to explain a header it already refused.
"""
from __future__ import annotations

# first opcodes after PROTO: FRAME, LONG1, EMPTY_DICT, EMPTY_LIST, GLOBAL, MARK, SHORT_BINUNICODE, BININT, BINPUT
_FIRST_OPCODES = frozenset(b"\x95\x8a}]c(\x8cJq")


def torch_checkpoint_kind(head: bytes) -> str | None:
    """'zip' or 'pickle' when `head` (the file's first bytes) starts a PyTorch checkpoint, else None."""
    head = bytes(head[:4])
    if head == b"PK\x03\x04":
        return "zip"
    if len(head) >= 3 and head[0] == 0x80 and 2 <= head[1] <= 5 and head[2] in _FIRST_OPCODES:
        return "pickle"
    return None


def torch_checkpoint_message(kind: str, source: str) -> str:
    return (f"{source}: this is a PyTorch {kind} checkpoint (torch.save); refimpl never unpickles: "
            "convert it to safetensors")
