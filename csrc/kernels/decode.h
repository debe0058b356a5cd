/* refimpl._kernels: one decode step of a Llama model, float32, composed from this library's kernels
 * (rms_norm, matmul, rope, attention, silu) so that a whole token costs one call from Python.
 *
 * Letters: D = model width, H / Hkv = query / key-value heads, Dh = head width, F = FFN width,
 * V = vocabulary, S = KV-cache capacity, P = the new token's position (0 <= P < S).
 * The step is the oracle's Llama forward (refimpl/oracle/model.py, _llama) at T = 1:
 *   x = E[token]
 *   per layer:  a = RMSNorm(x) w_attn;  [q | k | v] = a W_qkv;  q, k = RoPE(q, k, P)
 *               K[:, P] = k;  V[:, P] = v                                  (the cache, in place)
 *               x = x + Attn(q, K[:, 0..P], V[:, 0..P]) W_o                (GQA, causal)
 *               m = RMSNorm(x) w_ffn;  [g | u] = m W_gu;  x = x + (silu(g) * u) W_down
 *   logits = (RMSNorm(x) w_final) W_lm
 * Every matrix is (in, out), C-contiguous; every kernel and every float operation is the one the
 * Python composition of the "c" backend calls, in the same order, so both give the same bits. */
#ifndef REFIMPL_DECODE_H
#define REFIMPL_DECODE_H
#include <stdint.h>

typedef struct {
    int64_t D, H, Hkv, Dh, F, V, S, n_layers;
    float eps;           /* RMSNorm epsilon */
    double theta;        /* RoPE base */
    int interleaved;     /* RoPE pairs (2i, 2i+1) (llama2.c) instead of (i, i + Dh/2) (HF) */
} rf_llama_dims;

typedef struct {
    const float *attn_norm;   /* (D,) */
    const float *w_qkv;       /* (D, (H + 2 Hkv) Dh): q | k | v */
    const float *w_o;         /* (H Dh, D) */
    const float *ffn_norm;    /* (D,) */
    const float *w_gu;        /* (D, 2 F): gate | up */
    const float *w_down;      /* (F, D) */
    float *k_cache;           /* (Hkv, S, Dh), rows 0 .. P-1 filled; row P written here */
    float *v_cache;           /* (Hkv, S, Dh) */
} rf_llama_layer;

/* floats of scratch rf_llama_decode_f32 needs for these dims */
int64_t rf_llama_scratch_floats(const rf_llama_dims *dims);

/* logits (V,) <- one token through the model (fast kernels, SIMD path chosen by rf_path()).
 * embed (V, D); layers (n_layers,); final_norm (D,); w_lm (D, V); scratch: rf_llama_scratch_floats.
 * Returns 0, -1 if a kernel could not allocate its scratch, -2 if token or pos is out of range. */
int rf_llama_decode_f32(float *logits, const rf_llama_dims *dims, const float *embed,
                        const rf_llama_layer *layers, const float *final_norm, const float *w_lm,
                        int64_t token, int64_t pos, float *scratch);
/* the same composition through the naive _ref kernels */
int rf_llama_decode_f32_ref(float *logits, const rf_llama_dims *dims, const float *embed,
                            const rf_llama_layer *layers, const float *final_norm, const float *w_lm,
                            int64_t token, int64_t pos, float *scratch);
#endif
