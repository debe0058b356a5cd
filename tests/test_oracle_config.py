"""Config's own checks: what the math cannot run with is refused, naming the field."""
import math

import pytest

from refimpl.oracle.config import Config

BASE = dict(arch="llama", vocab_size=10, d_model=8, n_layers=1, n_heads=2, d_ff=8, max_seq_len=8)


@pytest.mark.parametrize("field,value", [
    ("norm_eps", math.nan), ("norm_eps", math.inf), ("norm_eps", -1e-5), ("norm_eps", 0.0), ("norm_eps", "1e-5"),
    ("rope_theta", math.nan), ("rope_theta", -math.inf), ("rope_theta", 0), ("rope_theta", 10 ** 400),
    ("rope_theta", True),
])
def test_eps_and_theta_must_be_finite_and_positive(field, value):
    with pytest.raises(ValueError, match=rf"config\.{field} must be a finite number > 0"):
        Config(**BASE, **{field: value})


@pytest.mark.parametrize("field", ["rope_interleaved", "tie_embeddings"])
@pytest.mark.parametrize("value", ["false", 1, None])
def test_flags_must_be_booleans(field, value):
    with pytest.raises(ValueError, match=rf"config\.{field} must be True or False"):
        Config(**BASE, **{field: value})


def test_ordinary_values_pass():
    c = Config(**BASE, norm_eps=1e-6, rope_theta=500000, tie_embeddings=False, rope_interleaved=True)
    assert c.norm_eps == 1e-6 and c.rope_theta == 500000


@pytest.mark.parametrize("field,value", [
    ("type_vocab_size", 0), ("type_vocab_size", -1), ("type_vocab_size", 2.5),
    ("n_layers", True), ("vocab_size", False), ("d_model", 8.0),
])
def test_sizes_must_be_positive_ints_not_bools(field, value):
    with pytest.raises(ValueError, match=rf"config\.{field} must be a positive int"):
        Config(**{**BASE, field: value})


@pytest.mark.parametrize("eos, stored, ids", [
    (None, None, ()), (2, 2, (2,)), ([2], 2, (2,)), ([2, 7], (2, 7), (2, 7)), ((7, 2), (7, 2), (7, 2)), ([], None, ()),
])
def test_one_or_several_eos_ids(eos, stored, ids):
    c = Config(**BASE, eos_token_id=eos)
    assert c.eos_token_id == stored and c.eos_token_ids == ids
    assert Config.from_dict(c.to_dict()) == c                     # a JSON list reads back the same


@pytest.mark.parametrize("field,value", [
    ("eos_token_id", -1), ("eos_token_id", [2, "3"]), ("eos_token_id", True), ("eos_token_id", 2.0),
    ("bos_token_id", -1), ("bos_token_id", [1]), ("bos_token_id", False),
])
def test_bad_token_ids_are_refused_by_name(field, value):
    with pytest.raises(ValueError, match=rf"config\.{field} must be an int >= 0"):
        Config(**BASE, **{field: value})
