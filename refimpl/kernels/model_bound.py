"""The composed error bound of a whole forward pass.

A float32 evaluation of a model (the C or Numba backend, or the oracle run
in float32) is compared with the float64 oracle on the *same* float32
weights.  Worst-case (deterministic) bounds compose uselessly through a deep
network (each |W| multiplies the bound by ~0.8 sqrt(K) whatever the signs),
so the composition here is the probabilistic one of Higham & Mary (2019,
"A new approach to probabilistic rounding error analysis"): rounding errors
are modelled as independent and mean-zero, each tensor X carries sigma_X,
the standard deviation of |X_float32 - X_float64| elementwise, and the bound
is LAMBDA * sigma with LAMBDA = 6.  Propagation (first order):

    linear   Y = X W + b        s_Y^2 = s_X^2 (W^2) + (sqrt(K+1) u (|X| |W|))^2 + (u Y)^2
    residual Z = X + Y          s_Z^2 = s_X^2 + s_Y^2 + (u Z)^2
    LayerNorm n = (x - mean)/s   s_n,i^2 = (s_i^2 + mean(s^2)/D + n_i^2 mean(n^2 s^2)/D) / s^2
    RMSNorm  n = x / r           s_n,i^2 = (s_i^2 + n_i^2 mean(n^2 s^2)/D) / r^2
             then y = w n (+ b): s_y = |w| s_n, plus the op's own bound from contracts.py
    RoPE     rotation of pairs   s_y^2 = s_x^2 + s_partner^2, plus contracts.rope_bound
    GELU/SiLU                    s_y = |f'(x)| s_x, plus the op's own bound
    product  y = a b             s_y^2 = a^2 s_b^2 + b^2 s_a^2 + (u y)^2
    attention S = q k^T s:       s_S^2 = (s_q^2 (k^2)^T + q^2 (s_k^2)^T) s^2
              P = softmax(S):    s_P,ij^2 = P_ij^2 (s_S,ij^2 + sum_l P_il^2 s_S,il^2)
              O = P V:           s_O^2 = s_P^2 V^2 + P^2 s_V^2, plus contracts.attention_bound
The ops' own bounds B from contracts.py are worst-case; an error bounded by B
has a root mean square <= B, so each enters its sigma as one more term of the
root sum of squares (conservative).  Supported: GPT-2, Llama and the BERT encoder (post-norm, padding mask, erf GELU:
|d gelu_erf| <= 0.5|x| u + 2u|y| for a float32 erf, doubled).
"""
from __future__ import annotations

import math

import numpy as np

from refimpl.kernels import contracts as C
from refimpl.oracle import layers as L

LAMBDA = 6.0                 # bound = LAMBDA * sigma
_erf = np.vectorize(math.erf, otypes=[np.float64])


def _rss(*terms):
    """Root of the sum of squares of independent error terms."""
    return np.sqrt(sum(np.square(t) for t in terms))


class _Bounded:
    """The float64 forward pass of one model with an error sigma beside every tensor."""

    def __init__(self, model, dtype):
        self.m = model
        self.c = model.config
        self.dt = np.dtype(dtype)
        self.u = C.unit_roundoff(dtype)

    def p(self, name):
        return self.m.params[name].astype(np.float64)

    def w(self, name, layout="out_in"):
        w = self.p(name)
        return w.T if layout == "out_in" else w

    def linear(self, x, sx, w_io, b=None):  # [T,In],[T,In],[In,Out] -> y, sy
        K = x.shape[-1]
        y = x @ w_io if b is None else x @ w_io + b
        local = math.sqrt(K + 1) * self.u * (np.abs(x) @ np.abs(w_io))
        return y, _rss(np.sqrt(np.square(sx) @ np.square(w_io)), local, self.u * y)

    def add(self, x, sx, y, sy):
        z = x + y
        return z, _rss(sx, sy, self.u * z)

    def layer_norm(self, x, sx, prefix):
        w, b, eps = self.p(prefix + ".weight"), self.p(prefix + ".bias"), self.c.norm_eps
        D = x.shape[-1]
        mean = x.mean(-1, keepdims=True)
        s = np.sqrt(((x - mean) ** 2).mean(-1, keepdims=True) + eps)
        n = (x - mean) / s
        v2 = sx ** 2
        sn = np.sqrt(v2 + v2.mean(-1, keepdims=True) / D + n ** 2 * (n ** 2 * v2).mean(-1, keepdims=True) / D) / s
        return n * w + b, _rss(np.abs(w) * sn, C.layer_norm_bound(x, w, b, eps, self.dt))

    def rms_norm(self, x, sx, prefix):
        w, eps = self.p(prefix + ".weight"), self.c.norm_eps
        D = x.shape[-1]
        r = np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        n = x / r
        v2 = sx ** 2
        sn = np.sqrt(v2 + n ** 2 * (n ** 2 * v2).mean(-1, keepdims=True) / D) / r
        return n * w, _rss(np.abs(w) * sn, C.rms_norm_bound(x, w, eps, self.dt))

    def rope(self, x, sx, pos):  # [n,T,Dh]
        c = self.c
        y = L.rope(x, pos, c.rope_theta, c.rope_interleaved)
        Dh = x.shape[-1]
        partner = np.arange(Dh) ^ 1 if c.rope_interleaved else (np.arange(Dh) + Dh // 2) % Dh
        return y, _rss(sx, sx[..., partner], C.rope_bound(x, pos, c.rope_theta, self.dt))

    def gelu_tanh(self, x, sx):
        y = L.gelu_tanh(x)
        h = 1e-6 * (1 + np.abs(x))
        slope = np.abs(L.gelu_tanh(x + h) - L.gelu_tanh(x - h)) / (2 * h)
        return y, _rss(slope * sx, C.gelu_tanh_bound(x, y, self.dt))

    def silu(self, x, sx):
        y = L.silu(x)
        sig = 1 / (1 + np.exp(-x))
        slope = np.abs(sig * (1 + x * (1 - sig)))
        return y, _rss(slope * sx, C.silu_bound(x, y, self.dt))

    def gelu_erf(self, x, sx):
        y = L.gelu_erf(x)
        phi = np.exp(-0.5 * x * x) / math.sqrt(2 * math.pi)                      # normal pdf
        cdf = 0.5 * (1 + _erf(x / math.sqrt(2)))                                   # normal cdf
        slope = np.abs(cdf + x * phi)                                              # d/dx x Phi(x)
        # float32 erf: |d erf| <= u, times |x|/2; the sum and the product: 2u|y|
        local = C.C_SAFETY * (0.5 * np.abs(x) * self.u + 2 * self.u * np.abs(y))
        return y, _rss(slope * sx, local)

    def attention(self, q, sq, k, sk, v, sv, keep=None):  # [H,T,Dh],[Hkv,S,Dh]x2 -> [T,D] x2
        """Causal attention, or (keep [S] bool given) full attention over the kept keys."""
        H, T, Dh = q.shape
        Hkv, S, _ = k.shape
        scale = 1.0 / math.sqrt(Dh)
        if keep is None:
            mask = L.causal_mask(T, S)
            local = C.attention_bound(q, k, v, causal=True, scale=scale, dtype=self.dt)
        else:
            mask = L.padding_mask(keep, T)
            local = C.attention_bound(q, k[:, keep], v[:, keep], causal=False, scale=scale, dtype=self.dt)
        outs, sigmas = [], []
        for h in range(H):
            g = L.kv_head_of(h, H, Hkv)
            P = L.attention_probs(q[h], k[g], mask, scale)                        # [T,S]
            vS = np.where(mask, (sq[h] ** 2 @ (k[g] ** 2).T + q[h] ** 2 @ (sk[g] ** 2).T) * scale ** 2, 0.0)
            vP = P ** 2 * (vS + (P ** 2 * vS).sum(-1, keepdims=True))
            outs.append(P @ v[g])
            sigmas.append(np.sqrt(vP @ v[g] ** 2 + P ** 2 @ sv[g] ** 2 + local[h] ** 2))
        return L.merge_heads(np.stack(outs)), L.merge_heads(np.stack(sigmas))

    # -- architectures ------------------------------------------------------
    def gpt2(self, ids):
        c = self.c
        T = ids.shape[0]
        x = self.p("wte.weight")[ids] + self.p("wpe.weight")[np.arange(T)]
        ex = self.u * np.abs(x)
        for i in range(c.n_layers):
            h = f"h.{i}."
            a, ea = self.layer_norm(x, ex, h + "ln_1")
            qkv, eqkv = self.linear(a, ea, self.w(h + "attn.c_attn.weight", "in_out"), self.p(h + "attn.c_attn.bias"))
            q, k, v = (L.split_heads(t, c.n_heads) for t in np.split(qkv, 3, -1))
            eq, ek, ev = (L.split_heads(t, c.n_heads) for t in np.split(eqkv, 3, -1))
            o, eo = self.attention(q, eq, k, ek, v, ev)
            o, eo = self.linear(o, eo, self.w(h + "attn.c_proj.weight", "in_out"), self.p(h + "attn.c_proj.bias"))
            x, ex = self.add(x, ex, o, eo)
            m, em = self.layer_norm(x, ex, h + "ln_2")
            f, ef = self.linear(m, em, self.w(h + "mlp.c_fc.weight", "in_out"), self.p(h + "mlp.c_fc.bias"))
            g, eg = self.gelu_tanh(f, ef)
            f, ef = self.linear(g, eg, self.w(h + "mlp.c_proj.weight", "in_out"), self.p(h + "mlp.c_proj.bias"))
            x, ex = self.add(x, ex, f, ef)
        x, ex = self.layer_norm(x, ex, "ln_f")
        head = "wte.weight" if c.tie_embeddings else "lm_head.weight"
        return self.linear(x, ex, self.w(head))

    def llama(self, ids):
        c = self.c
        T = ids.shape[0]
        pos = np.arange(T)
        x = self.p("embed_tokens.weight")[ids]
        ex = np.zeros_like(x)
        for i in range(c.n_layers):
            h = f"layers.{i}."
            a, ea = self.rms_norm(x, ex, h + "input_layernorm")
            proj = {}
            for name, heads in (("q", c.n_heads), ("k", c.n_kv_heads), ("v", c.n_kv_heads)):
                y, ey = self.linear(a, ea, self.w(h + f"self_attn.{name}_proj.weight"))
                proj[name] = (L.split_heads(y, heads), L.split_heads(ey, heads))
            q, eq = self.rope(*proj["q"], pos)
            k, ek = self.rope(*proj["k"], pos)
            v, ev = proj["v"]
            o, eo = self.attention(q, eq, k, ek, v, ev)
            o, eo = self.linear(o, eo, self.w(h + "self_attn.o_proj.weight"))
            x, ex = self.add(x, ex, o, eo)
            m, em = self.rms_norm(x, ex, h + "post_attention_layernorm")
            gate, egate = self.linear(m, em, self.w(h + "mlp.gate_proj.weight"))
            up, eup = self.linear(m, em, self.w(h + "mlp.up_proj.weight"))
            s, es = self.silu(gate, egate)
            f = s * up
            ef = _rss(s * eup, up * es, self.u * f)
            f, ef = self.linear(f, ef, self.w(h + "mlp.down_proj.weight"))
            x, ex = self.add(x, ex, f, ef)
        x, ex = self.rms_norm(x, ex, "norm")
        head = "embed_tokens.weight" if c.tie_embeddings else "lm_head.weight"
        return self.linear(x, ex, self.w(head))

    def bert(self, ids, attention_mask=None, token_type_ids=None):
        c = self.c
        T = ids.shape[0]
        keep = np.ones(T, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
        tt = np.zeros(T, np.int64) if token_type_ids is None else np.asarray(token_type_ids, np.int64)
        e = "embeddings."
        x = self.p(e + "word_embeddings.weight")[ids] + self.p(e + "position_embeddings.weight")[np.arange(T)] \
            + self.p(e + "token_type_embeddings.weight")[tt]
        x, ex = self.layer_norm(x, 2 * self.u * np.abs(x), e + "LayerNorm")
        for i in range(c.n_layers):
            h = f"encoder.layer.{i}."
            s = h + "attention.self."
            (q, eq), (k, ek), (v, ev) = [
                (L.split_heads(y, c.n_heads), L.split_heads(ey, c.n_heads))
                for y, ey in (self.linear(x, ex, self.w(s + n + ".weight"), self.p(s + n + ".bias"))
                              for n in ("query", "key", "value"))]
            o, eo = self.attention(q, eq, k, ek, v, ev, keep)
            o, eo = self.linear(o, eo, self.w(h + "attention.output.dense.weight"),
                                self.p(h + "attention.output.dense.bias"))
            x, ex = self.layer_norm(*self.add(x, ex, o, eo), h + "attention.output.LayerNorm")
            f, ef = self.linear(x, ex, self.w(h + "intermediate.dense.weight"), self.p(h + "intermediate.dense.bias"))
            g, eg = self.gelu_erf(f, ef)
            f, ef = self.linear(g, eg, self.w(h + "output.dense.weight"), self.p(h + "output.dense.bias"))
            x, ex = self.layer_norm(*self.add(x, ex, f, ef), h + "output.LayerNorm")
        return x, ex


def logits_with_bound(model, ids, dtype=np.float32, **bert_inputs):  # [T] -> [T,V] (BERT: [T,D]), bound
    """Float64 output of `model` (its weights as stored) and the composed bound for a `dtype` evaluation.

    BERT takes attention_mask= and token_type_ids= and returns the last hidden state.
    """
    b = _Bounded(model, dtype)
    arch = model.config.arch
    if arch not in ("gpt2", "llama", "bert"):
        raise ValueError(f"composed bounds are derived for gpt2, llama and bert, not {arch!r}")
    logits, sigma = getattr(b, arch)(np.asarray(ids, dtype=np.int64), **bert_inputs)
    return logits, LAMBDA * sigma


def greedy_agrees(fast_ids, ref_logits, bound) -> tuple[bool, str]:
    """Greedy ids must equal the oracle's argmax, except where the oracle's top-2
    margin is inside the bound (a tie the bound cannot resolve).  -> (ok, why)"""
    for t, (tok, z, e) in enumerate(zip(fast_ids, ref_logits, bound)):
        best = int(np.argmax(z))
        if tok == best:
            continue
        # allowed only if `tok` could be the argmax under the bound
        margin = z[best] - z[tok]
        if margin > e[best] + e[tok]:
            return False, (f"step {t}: fast path chose {tok}, oracle {best}, margin {margin:.3e} "
                           f"> bound {e[best] + e[tok]:.3e}")
    return True, ""
