"""Output decoding: from logits to a token id, reproducibly.

Every step is specified precisely enough that a C or Rust port with the same
seed and the same probabilities p (step 2) produces the same token stream.  p's
exponentials and softmax sum are float64 but not correctly rounded (libm's exp,
NumPy's pairwise sum), so a port whose p differ in the last bits agrees except
where a draw or top_p falls within that rounding of a cumulative-sum boundary.

The RNG: xorshift64* (Marsaglia 2003; Vigna 2016), as in llama2.c
-------------------------------------------------------------------
    state: uint64, initialised to `seed`, or to 0x853C49E6748FEA9B when seed == 0
           (xorshift has no zero state)
    next_u32():  state ^= state >> 12
                 state ^= state << 25      (mod 2^64)
                 state ^= state >> 27
                 return (state * 0x2545F4914F6CDD1D mod 2^64) >> 32
    next_f64():  (next_u32() >> 8) / 2^24          # exactly representable, in [0, 1)

The sampling rule, for logits z (float, length V)
--------------------------------------------------
0. Logits with a NaN are refused (ValueError naming the first), and, when sampling,
   logits with a +inf, all -inf, or whose max / temperature overflows float64: the
   rule has no answer for them.
1. temperature == 0: greedy. Return argmax z; ties go to the lowest token id.
   No random number is drawn.
2. Otherwise, in float64: p = softmax(z / temperature) (max-shifted; see
   oracle.layers.softmax).
3. Order tokens by (p descending, id ascending).  This order is used below.
4. top_k (if given, k >= 1): keep the first k tokens of that order.
5. top_p (if given, 0 < p <= 1): renormalise the kept probabilities to sum 1,
   then keep the shortest prefix of the order whose cumulative sum (float64,
   summed in that order) is >= top_p.  Tokens tied in probability with the
   last kept one are *not* added: ties are broken by id, like everything else.
6. Draw r = next_f64().  Renormalise the kept probabilities q (divide by
   their float64 sum, summed in the order).  Walk the kept tokens in the order
   accumulating q; return the first token whose cumulative sum exceeds r;
   if rounding leaves none, return the last kept token.
Exactly one random number is drawn per sampled (non-greedy) token.
"""
from __future__ import annotations

import math
import os

import numpy as np

from refimpl.oracle.layers import softmax

_MASK64 = (1 << 64) - 1
_MULT = 0x2545F4914F6CDD1D
_ZERO_SEED_STATE = 0x853C49E6748FEA9B


class XorShift64Star:
    """The portable RNG (see module docstring). Pure Python ints: exact on every platform."""

    def __init__(self, seed: int):
        seed = int(seed) & _MASK64
        self.state = seed if seed != 0 else _ZERO_SEED_STATE

    def next_u32(self) -> int:
        s = self.state
        s ^= s >> 12
        s ^= (s << 25) & _MASK64
        s ^= s >> 27
        self.state = s
        return ((s * _MULT) & _MASK64) >> 32

    def next_f64(self) -> float:
        return (self.next_u32() >> 8) / 16777216.0


def random_seed() -> int:
    """A fresh nonzero seed from the OS (used when the caller gives none)."""
    return int.from_bytes(os.urandom(8), "little") or 1


def greedy(logits) -> int:  # [V] -> id
    """argmax; numpy's argmax returns the first (lowest) index of a tie."""
    return int(np.argmax(logits))


def sampling_order(p) -> np.ndarray:  # [V] -> [V] ids
    """Token ids sorted by probability descending, then id ascending."""
    ids = np.arange(p.shape[0])
    return np.lexsort((ids, -p))


def check_logits(logits) -> np.ndarray:  # -> [V] float64
    """`logits` as a float64 array; ValueError unless it is a non-empty 1-D [V]."""
    z = np.asarray(logits, dtype=np.float64)
    if z.ndim != 1 or z.shape[0] == 0:
        raise ValueError(f"logits must be a non-empty 1-D array [V], got shape {z.shape}")
    return z


def check_finite_logits(z, temperature: float | None) -> np.ndarray:  # [V] float64 -> the same
    """Step 0 of the rule: ValueError for a NaN in `z`, and with a `temperature` (sampling) for a
    +inf, all -inf, or max(z) / temperature overflowing float64 (one pass over z when fine)."""
    top = float(z.max())                            # NaN if any is NaN
    if temperature is not None:
        top /= temperature                          # Python floats: nan, +inf or -inf for every bad case
    if math.isfinite(top) or (temperature is None and not math.isnan(top)):
        return z
    bad = np.isnan(z) if temperature is None else np.isnan(z) | np.isposinf(z)
    if bad.any():
        i = int(np.argmax(bad))
        raise ValueError(f"logits[{i}] = {z[i]}: " + ("greedy decoding needs logits without NaN"
                         if temperature is None else "sampling needs logits without NaN or +inf"))
    if np.isneginf(z).all():
        raise ValueError("logits are all -inf: no token has a probability")
    raise ValueError(f"max(logits) / temperature = {z.max()} / {temperature} overflows float64")


def checked_inputs(logits, temperature, rng) -> tuple[np.ndarray, float | None]:  # -> z [V] float64, T
    """Step 0's checks, shared by every sampler: (z, temperature), temperature None for greedy."""
    z = check_logits(logits)
    temperature = check_temperature(temperature, rng)
    return check_finite_logits(z, temperature), temperature


def ordered_sum(x) -> float:  # [n] -> sum
    """float64 sum front to back, as the rule's sums run (a port's plain loop gives the same bits)."""
    return float(np.cumsum(x)[-1]) if x.shape[0] else 0.0


def check_top(top_k=None, top_p=None) -> tuple[int | None, float | None]:
    """top_k as an int >= 1 (any size: beyond V it keeps every token) and top_p as a float in
    (0, 1], each or None; TypeError for a top_k that is not an integer (1.9, nan, True) or a top_p
    that is not a number ("0.5", True), ValueError for values out of range."""
    if top_k is not None:
        if not isinstance(top_k, (int, np.integer)) or isinstance(top_k, bool):
            raise TypeError(f"top_k must be an integer, got {type(top_k).__name__} {top_k!r}")
        top_k = int(top_k)
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None:
        if not isinstance(top_p, (int, float, np.integer, np.floating)) or isinstance(top_p, (bool, np.bool_)):
            raise TypeError(f"top_p must be a number in (0, 1], got {type(top_p).__name__} {top_p!r}")
        if not 0.0 < float(top_p) <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        top_p = float(top_p)
    return top_k, top_p


def check_temperature(temperature, rng) -> float | None:
    """The temperature as a float > 0, or None for greedy (None or 0); ValueError for a
    negative or non-finite one, or for sampling without an rng."""
    if temperature is None or temperature == 0:
        return None
    if not (isinstance(temperature, (int, float, np.floating, np.integer)) and math.isfinite(temperature)):
        raise ValueError(f"temperature must be a finite number >= 0, got {temperature!r}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if rng is None:
        raise ValueError("sampling with temperature > 0 needs an rng (pass seed= to generate)")
    if not callable(getattr(rng, "next_f64", None)):
        raise TypeError(f"rng must be an XorShift64Star (the specified generator: XorShift64Star(seed)), "
                        f"got {type(rng).__name__}")
    return float(temperature)


def kept_tokens(p, top_k=None, top_p=None) -> np.ndarray:  # [V] -> [n] ids, in sampling order
    """The candidate set after top-k then top-p (steps 3-5 of the rule)."""
    top_k, top_p = check_top(top_k, top_p)
    order = sampling_order(p)
    if top_k is not None:
        order = order[:top_k]
    if top_p is not None:
        q = p[order] / ordered_sum(p[order])
        cum = np.cumsum(q)
        n = int(np.searchsorted(cum, top_p, side="left")) + 1          # first index with cum >= top_p
        order = order[: min(n, order.shape[0])]
    return order


def sample(logits, temperature=0.0, top_k=None, top_p=None, rng: XorShift64Star | None = None) -> int:
    """One token id from `logits` [V] by the documented rule."""
    z, temperature = checked_inputs(logits, temperature, rng)
    if temperature is None:
        return greedy(z)
    p = softmax(z / temperature)
    kept = kept_tokens(p, top_k, top_p)
    q = p[kept] / ordered_sum(p[kept])
    r = rng.next_f64()
    cum = np.cumsum(q)
    i = int(np.searchsorted(cum, r, side="right"))                  # first index with cum > r
    return int(kept[min(i, kept.shape[0] - 1)])
