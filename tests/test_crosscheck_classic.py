"""The classic (Vaswani et al. 2017) decoder-only model against torch's own
post-LN Transformer layer, in float64.

torch.nn.TransformerEncoderLayer(norm_first=False, activation="relu") is
x = LN_1(x + SelfAttn(x)); x = LN_2(x + W_2 relu(W_1 x)), the paper's block;
with a causal mask it is the decoder-only form the oracle implements.  The
embedding (sqrt(D) E[ids] + sinusoidal PE, written here from the paper's
formula) and the tied LM head are done in torch too.  Criterion as for the HF
cross-checks: max |d logit| <= 1e-9 max |logit|.
"""
import math

import numpy as np
import pytest

from conftest import require
from refimpl.oracle.model import tiny_model


@pytest.mark.crosscheck
@pytest.mark.parametrize("seed", [0, 1])
def test_classic_matches_torch_transformer_layers(seed):
    torch = require("torch")
    m = tiny_model("classic", seed=seed)
    c, P = m.config, m.params
    D, T = c.d_model, 11
    ids = np.random.default_rng(seed).integers(0, c.vocab_size, T)
    t = lambda a: torch.from_numpy(np.array(a))  # noqa: E731

    pos = torch.arange(T, dtype=torch.float64)[:, None]
    i2 = torch.arange(0, D, 2, dtype=torch.float64)[None, :]
    pe = torch.zeros(T, D, dtype=torch.float64)
    pe[:, 0::2] = torch.sin(pos / 10000 ** (i2 / D))
    pe[:, 1::2] = torch.cos(pos / 10000 ** (i2 / D))
    x = (t(P["wte.weight"])[t(ids)] * math.sqrt(D) + pe)[None]             # [1,T,D]
    causal = torch.nn.Transformer.generate_square_subsequent_mask(T, dtype=torch.float64)
    for i in range(c.n_layers):
        h = f"h.{i}."
        layer = torch.nn.TransformerEncoderLayer(D, c.n_heads, c.d_ff, dropout=0.0, activation="relu",
                                                 batch_first=True, norm_first=False,
                                                 layer_norm_eps=c.norm_eps, dtype=torch.float64).eval()
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(t(P[h + "attn.c_attn.weight"].T))   # Conv1D (in,out) -> (out,in)
            layer.self_attn.in_proj_bias.copy_(t(P[h + "attn.c_attn.bias"]))
            layer.self_attn.out_proj.weight.copy_(t(P[h + "attn.c_proj.weight"].T))
            layer.self_attn.out_proj.bias.copy_(t(P[h + "attn.c_proj.bias"]))
            layer.linear1.weight.copy_(t(P[h + "mlp.c_fc.weight"].T))
            layer.linear1.bias.copy_(t(P[h + "mlp.c_fc.bias"]))
            layer.linear2.weight.copy_(t(P[h + "mlp.c_proj.weight"].T))
            layer.linear2.bias.copy_(t(P[h + "mlp.c_proj.bias"]))
            for n in (1, 2):
                getattr(layer, f"norm{n}").weight.copy_(t(P[h + f"ln_{n}.weight"]))
                getattr(layer, f"norm{n}").bias.copy_(t(P[h + f"ln_{n}.bias"]))
            x = layer(x, src_mask=causal, is_causal=True)
    ref = (x[0] @ t(P["wte.weight"]).T).detach().numpy()
    ours = m.forward(ids)
    assert np.abs(ours - ref).max() <= 1e-9 * np.abs(ref).max()
