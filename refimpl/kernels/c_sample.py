"""The sampling rule of refimpl.oracle.sampling in C (csrc/kernels/sample.c), for the "c" backend.

    sample(logits, temperature=0.0, top_k=None, top_p=None, rng=None) -> token id

The same contract as `refimpl.oracle.sampling.sample`: greedy at temperature 0 (the oracle's
argmax), otherwise exactly one draw of `rng` per token and the same rule, in float64.  The
oracle orders all V ids with np.lexsort, ~3 ms at V = 32000 (more than a stories15M-sized
forward on the C backend); the C sampler splits them by the binade of p and sorts a binade
only when the rule walks into it.  Its softmax runs on the SIMD path in force, with its own
float64 vector exp (< 1 ulp from libm's), and its sums over all V ids (the softmax's, and the
renormalising total when no top_k applies) run in id order split into lanes; the rule's running
sums over a sorted prefix go front to back in the order.  So its probabilities and totals can
differ from the oracle's in the last bits: the token can differ only when the draw (or top_p)
lies within that rounding of a running-sum boundary (tests/test_kernels_c_sample.py holds it
to that).

Bad logits are refused as by the oracle (step 0 of the rule, `checked_inputs`): a NaN,
and when sampling a +inf, all -inf, or max / temperature overflowing float64.
"""
from __future__ import annotations

import numpy as np

from refimpl._kernels import ffi, lib
from refimpl.oracle.sampling import XorShift64Star, check_top, checked_inputs, greedy


def sample(logits, temperature=0.0, top_k=None, top_p=None, rng: XorShift64Star | None = None,
           reference: bool = False) -> int:
    """One token id from `logits` [V] by the rule of refimpl.oracle.sampling (see the module
    docstring).  `reference=True` runs the naive C (an O(V^2) insertion sort; for tests)."""
    z, temperature = checked_inputs(logits, temperature, rng)
    if temperature is None:
        return greedy(z)
    top_k, top_p = check_top(top_k, top_p)
    z = np.ascontiguousarray(z)
    V = z.shape[0]
    p = np.empty(V, np.float64)
    work = np.empty(lib.rf_sample_work_words(V), np.uint64)
    fn = lib.rf_sample_f64_ref if reference else lib.rf_sample_f64
    r = rng.next_f64()
    return int(fn(ffi.from_buffer("double[]", z), V, temperature, min(top_k or 0, V), top_p or 0.0, r,
                  ffi.from_buffer("double[]", p, require_writable=True),
                  ffi.from_buffer("uint64_t[]", work, require_writable=True)))
