/* refimpl._kernels: one decode step of a Llama or a GPT-2 model, float32, composed from this
 * library's kernels (norms, matmul, rope, attention, activations) so that a whole token costs one
 * call from Python.
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
 * GPT-2 (the oracle's _gpt2 at T = 1; Conv1D weights, biases, LayerNorm, MHA: Hkv = H):
 *   x = E[token] + P[pos]
 *   per layer:  a = LN_1(x);  [q | k | v] = a W_attn + b_attn;  K[:, P] = k;  V[:, P] = v
 *               x = x + (Attn(q, K[:, 0..P], V[:, 0..P]) W_proj + b_proj)
 *               m = LN_2(x);  x = x + (gelu_tanh(m W_fc + b_fc) W_mproj + b_mproj)
 *   logits = LN_f(x) W_lm
 * Every matrix is (in, out), C-contiguous; every kernel and every float operation is the one the
 * Python composition of the "c" backend calls, in the same order, so both give the same bits. */
#ifndef REFIMPL_DECODE_H
#define REFIMPL_DECODE_H
#include <stdint.h>

typedef struct {
    int64_t D, H, Hkv, Dh, F, V, S, n_layers;
    float eps;           /* RMSNorm / LayerNorm epsilon */
    double theta;        /* RoPE base (Llama) */
    int interleaved;     /* RoPE pairs (2i, 2i+1) (llama2.c) instead of (i, i + Dh/2) (HF) (Llama) */
} rf_decode_dims;

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

typedef struct {
    const float *ln1_w, *ln1_b;        /* (D,) each */
    const float *w_attn;               /* (D, 3D): q | k | v */
    const float *b_attn;               /* (3D,) */
    const float *w_proj, *b_proj;      /* (D, D), (D,) */
    const float *ln2_w, *ln2_b;        /* (D,) each */
    const float *w_fc, *b_fc;          /* (D, F), (F,) */
    const float *w_mproj, *b_mproj;    /* (F, D), (D,) */
    float *k_cache;                    /* (H, S, Dh), rows 0 .. P-1 filled; row P written here */
    float *v_cache;                    /* (H, S, Dh) */
} rf_gpt2_layer;

/* Where a decode step's time went: `stages` (may be NULL: nothing is read) gets, added to what it
 * holds, the ticks of the step's own counter (fenced rdtsc on x86-64, cntvct_el0 on aarch64,
 * CLOCK_MONOTONIC ns elsewhere: the clock module's counter) between consecutive stage boundaries,
 * each interval charged to the stage it closes:
 *   embedding  x = E[token] (+ P[pos])
 *   norms      every RMSNorm / LayerNorm, the final one included
 *   attention  QKV projection (+ bias), RoPE, the cache write, attention, output projection, residual
 *   ffn        up / gate projections, activation, down projection, residual
 *   lm_head    the logits' projection
 * (the names and grouping of refimpl.timing.profile).  Reading the counter costs one fenced
 * read per boundary: 4 per layer + 3. */
#define RF_DECODE_N_STAGES 5
typedef struct {
    uint64_t ticks[5];   /* RF_DECODE_N_STAGES: embedding, norms, attention, ffn, lm_head */
} rf_decode_stages;

/* floats of scratch either decode step needs for these dims */
int64_t rf_decode_scratch_floats(const rf_decode_dims *dims);

/* logits (V,) <- one token through the model (fast kernels, SIMD path chosen by rf_path()).
 * embed (V, D); layers (n_layers,); final_norm (D,); w_lm (D, V); scratch: rf_decode_scratch_floats.
 * Returns 0, -1 if a kernel could not allocate its scratch, -2 if token or pos is out of range.
 * stages: NULL, or the ticks per stage (above) are added to it. */
int rf_llama_decode_f32(float *logits, const rf_decode_dims *dims, const float *embed,
                        const rf_llama_layer *layers, const float *final_norm, const float *w_lm,
                        int64_t token, int64_t pos, float *scratch, rf_decode_stages *stages);
/* the same composition through the naive _ref kernels */
int rf_llama_decode_f32_ref(float *logits, const rf_decode_dims *dims, const float *embed,
                            const rf_llama_layer *layers, const float *final_norm, const float *w_lm,
                            int64_t token, int64_t pos, float *scratch, rf_decode_stages *stages);

/* GPT-2: wte (V, D), wpe (S, D), layers (n_layers,), lnf_w and lnf_b (D,), w_lm (D, V); as above */
int rf_gpt2_decode_f32(float *logits, const rf_decode_dims *dims, const float *wte, const float *wpe,
                       const rf_gpt2_layer *layers, const float *lnf_w, const float *lnf_b,
                       const float *w_lm, int64_t token, int64_t pos, float *scratch,
                       rf_decode_stages *stages);
int rf_gpt2_decode_f32_ref(float *logits, const rf_decode_dims *dims, const float *wte, const float *wpe,
                           const rf_gpt2_layer *layers, const float *lnf_w, const float *lnf_b,
                           const float *w_lm, int64_t token, int64_t pos, float *scratch,
                           rf_decode_stages *stages);
#endif
