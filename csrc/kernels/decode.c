/* One Llama or GPT-2 decode step, float32: the compositions documented in decode.h, through a
 * table of kernels so the fast step and the _ref step share one body. */
#include <math.h>
#include <string.h>
#include "decode.h"
#include "matmul.h"
#include "norms.h"
#include "rope.h"
#include "attention.h"
#include "activations.h"
#include "clock/_tsc.h"

enum { ST_EMBEDDING, ST_NORMS, ST_ATTENTION, ST_FFN, ST_LM_HEAD };
_Static_assert(ST_LM_HEAD + 1 == RF_DECODE_N_STAGES, "decode.h lists RF_DECODE_N_STAGES stages");

/* the stage boundaries of one step (decode.h): each interval is charged to the stage it closes */
typedef struct {
    rf_decode_stages *out;   /* NULL: no counter read */
    uint64_t last;
} stamps;

static stamps stamps_begin(rf_decode_stages *out) {
    stamps s = {out, out ? rf__start() : 0};
    return s;
}

static inline void stamp(stamps *s, int stage) {
    if (s->out) {
        uint64_t t = rf__start();
        s->out->ticks[stage] += t - s->last;
        s->last = t;
    }
}

typedef struct {
    void (*rms_norm)(float *out, const float *x, const float *w, int64_t T, int64_t D, float eps);
    void (*layer_norm)(float *out, const float *x, const float *w, const float *b, int64_t T, int64_t D,
                       float eps);
    void (*matmul)(float *c, const float *a, const float *b, int64_t M, int64_t K, int64_t N);
    int (*rope)(float *out, const float *x, const int64_t *positions, int64_t H, int64_t T, int64_t D,
                double theta, int interleaved);
    int (*attention)(float *out, const float *q, const float *k, const float *v,
                     int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
                     int64_t kv_stride, float scale, int causal);
    void (*silu)(float *out, const float *x, int64_t N);
    void (*gelu_tanh)(float *out, const float *x, int64_t N);
} rf_decode_kernels;

/* the reference attention has no kv stride: one call per kv head, over its group of query heads */
static int attention_ref_strided(float *out /* (H,Lq,D) */, const float *q /* (H,Lq,D) */,
                                 const float *k /* Hkv heads of (Lk,D), kv_stride apart */, const float *v,
                                 int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
                                 int64_t kv_stride, float scale, int causal) {
    const int64_t G = H / Hkv;
    for (int64_t g = 0; g < Hkv; g++) {
        int rc = rf_attention_f32_ref(out + g * G * Lq * D, q + g * G * Lq * D, k + g * kv_stride,
                                      v + g * kv_stride, G, 1, Lq, Lk, D, scale, causal);
        if (rc) return rc;
    }
    return 0;
}

static const rf_decode_kernels fast = {
    rf_rms_norm_f32, rf_layer_norm_f32, rf_matmul_f32_stream, rf_rope_f32, rf_attention_f32_strided,
    rf_silu_f32, rf_gelu_tanh_f32,
};
static const rf_decode_kernels naive = {
    rf_rms_norm_f32_ref, rf_layer_norm_f32_ref, rf_matmul_f32_ref, rf_rope_f32_ref, attention_ref_strided,
    rf_silu_f32_ref, rf_gelu_tanh_f32_ref,
};

#define RF_PAD16(n) (((n) + 15) / 16 * 16)   /* keep every scratch vector 64-byte aligned relative to the base */

/* covers both steps: Llama's layout below (9D + 3F floats at Hkv = H); GPT-2 takes 7D + 2F of it */
int64_t rf_decode_scratch_floats(const rf_decode_dims *d) {
    const int64_t qkv = (d->H + 2 * d->Hkv) * d->Dh;
    return 3 * RF_PAD16(d->D) + RF_PAD16(qkv) + 2 * RF_PAD16(d->H * d->Dh) + RF_PAD16(d->Hkv * d->Dh)
           + RF_PAD16(2 * d->F) + RF_PAD16(d->F);
}

/* K[:, pos] = k, V[:, pos] = v (Hkv heads of Dh each), then att (H,1,Dh) = the causal attention of
 * q (H,1,Dh) over cache rows 0 .. pos */
static int cache_and_attend(const rf_decode_kernels *kn, float *att, const float *q, const float *k,
                            const float *v, float *k_cache, float *v_cache, const rf_decode_dims *d,
                            int64_t pos) {
    const int64_t Dh = d->Dh, S = d->S;
    for (int64_t g = 0; g < d->Hkv; g++) {
        memcpy(k_cache + (g * S + pos) * Dh, k + g * Dh, (size_t)Dh * sizeof(float));
        memcpy(v_cache + (g * S + pos) * Dh, v + g * Dh, (size_t)Dh * sizeof(float));
    }
    const float scale = (float)(1.0 / sqrt((double)Dh));
    return kn->attention(att, q, k_cache, v_cache, d->H, d->Hkv, 1, pos + 1, Dh, S * Dh, scale, 1);
}

static void add(float *x /* (n,) */, const float *y /* (n,) */, int64_t n) {
    for (int64_t i = 0; i < n; i++) x[i] += y[i];
}

static int llama(const rf_decode_kernels *kn, float *logits /* (V,) */, const rf_decode_dims *d,
                 const float *embed /* (V,D) */, const rf_llama_layer *layers /* (n_layers,) */,
                 const float *final_norm /* (D,) */, const float *w_lm /* (D,V) */,
                 int64_t token, int64_t pos, float *scratch, rf_decode_stages *stages) {
    const int64_t D = d->D, H = d->H, Hkv = d->Hkv, Dh = d->Dh, F = d->F, S = d->S;
    if (token < 0 || token >= d->V || pos < 0 || pos >= S) return -2;
    stamps st = stamps_begin(stages);
    const int64_t nq = H * Dh, nkv = Hkv * Dh;
    float *x = scratch;                          /* (D,) the residual stream */
    float *a = x + RF_PAD16(D);                  /* (D,) normalised x */
    float *y = a + RF_PAD16(D);                  /* (D,) a sublayer's output */
    float *qkv = y + RF_PAD16(D);                /* (H + 2 Hkv) Dh: q | k | v */
    float *q = qkv + RF_PAD16(nq + 2 * nkv);     /* (H,1,Dh) rotated q */
    float *att = q + RF_PAD16(nq);               /* (H,1,Dh) = (H Dh,) heads merged */
    float *k = att + RF_PAD16(nq);               /* (Hkv,1,Dh) rotated k */
    float *gu = k + RF_PAD16(nkv);               /* (2F,) gate | up */
    float *f = gu + RF_PAD16(2 * F);             /* (F,) silu(gate) * up */
    int rc;

    memcpy(x, embed + token * D, (size_t)D * sizeof(float));
    stamp(&st, ST_EMBEDDING);
    for (int64_t l = 0; l < d->n_layers; l++) {
        const rf_llama_layer *L = &layers[l];
        /* attention block */
        kn->rms_norm(a, x, L->attn_norm, 1, D, d->eps);
        stamp(&st, ST_NORMS);
        kn->matmul(qkv, a, L->w_qkv, 1, D, nq + 2 * nkv);
        if ((rc = kn->rope(q, qkv, &pos, H, 1, Dh, d->theta, d->interleaved))) return rc;
        if ((rc = kn->rope(k, qkv + nq, &pos, Hkv, 1, Dh, d->theta, d->interleaved))) return rc;
        if ((rc = cache_and_attend(kn, att, q, k, qkv + nq + nkv, L->k_cache, L->v_cache, d, pos))) return rc;
        kn->matmul(y, att, L->w_o, 1, nq, D);
        add(x, y, D);
        stamp(&st, ST_ATTENTION);
        /* feed-forward block */
        kn->rms_norm(a, x, L->ffn_norm, 1, D, d->eps);
        stamp(&st, ST_NORMS);
        kn->matmul(gu, a, L->w_gu, 1, D, 2 * F);
        kn->silu(f, gu, F);
        for (int64_t i = 0; i < F; i++) f[i] *= gu[F + i];
        kn->matmul(y, f, L->w_down, 1, F, D);
        add(x, y, D);
        stamp(&st, ST_FFN);
    }
    kn->rms_norm(a, x, final_norm, 1, D, d->eps);
    stamp(&st, ST_NORMS);
    kn->matmul(logits, a, w_lm, 1, D, d->V);
    stamp(&st, ST_LM_HEAD);
    return 0;
}

static int gpt2(const rf_decode_kernels *kn, float *logits /* (V,) */, const rf_decode_dims *d,
                const float *wte /* (V,D) */, const float *wpe /* (S,D) */,
                const rf_gpt2_layer *layers /* (n_layers,) */, const float *lnf_w /* (D,) */,
                const float *lnf_b /* (D,) */, const float *w_lm /* (D,V) */,
                int64_t token, int64_t pos, float *scratch, rf_decode_stages *stages) {
    const int64_t D = d->D, F = d->F;
    if (token < 0 || token >= d->V || pos < 0 || pos >= d->S) return -2;
    stamps st = stamps_begin(stages);
    float *x = scratch;                          /* (D,) the residual stream */
    float *a = x + RF_PAD16(D);                  /* (D,) normalised x */
    float *y = a + RF_PAD16(D);                  /* (D,) a sublayer's output */
    float *qkv = y + RF_PAD16(D);                /* (3D,) q | k | v, q = (H,1,Dh) */
    float *att = qkv + RF_PAD16(3 * D);          /* (H,1,Dh) = (D,) heads merged */
    float *f = att + RF_PAD16(D);                /* (F,) W_fc m + b_fc */
    float *g = f + RF_PAD16(F);                  /* (F,) gelu_tanh of it */
    int rc;

    for (int64_t i = 0; i < D; i++) x[i] = wte[token * D + i] + wpe[pos * D + i];
    stamp(&st, ST_EMBEDDING);
    for (int64_t l = 0; l < d->n_layers; l++) {
        const rf_gpt2_layer *L = &layers[l];
        /* attention block */
        kn->layer_norm(a, x, L->ln1_w, L->ln1_b, 1, D, d->eps);
        stamp(&st, ST_NORMS);
        kn->matmul(qkv, a, L->w_attn, 1, D, 3 * D);
        add(qkv, L->b_attn, 3 * D);
        if ((rc = cache_and_attend(kn, att, qkv, qkv + D, qkv + 2 * D, L->k_cache, L->v_cache, d, pos))) return rc;
        kn->matmul(y, att, L->w_proj, 1, D, D);
        add(y, L->b_proj, D);
        add(x, y, D);
        stamp(&st, ST_ATTENTION);
        /* feed-forward block */
        kn->layer_norm(a, x, L->ln2_w, L->ln2_b, 1, D, d->eps);
        stamp(&st, ST_NORMS);
        kn->matmul(f, a, L->w_fc, 1, D, F);
        add(f, L->b_fc, F);
        kn->gelu_tanh(g, f, F);
        kn->matmul(y, g, L->w_mproj, 1, F, D);
        add(y, L->b_mproj, D);
        add(x, y, D);
        stamp(&st, ST_FFN);
    }
    kn->layer_norm(a, x, lnf_w, lnf_b, 1, D, d->eps);
    stamp(&st, ST_NORMS);
    kn->matmul(logits, a, w_lm, 1, D, d->V);
    stamp(&st, ST_LM_HEAD);
    return 0;
}

int rf_llama_decode_f32(float *logits, const rf_decode_dims *dims, const float *embed,
                        const rf_llama_layer *layers, const float *final_norm, const float *w_lm,
                        int64_t token, int64_t pos, float *scratch, rf_decode_stages *stages) {
    return llama(&fast, logits, dims, embed, layers, final_norm, w_lm, token, pos, scratch, stages);
}

int rf_llama_decode_f32_ref(float *logits, const rf_decode_dims *dims, const float *embed,
                            const rf_llama_layer *layers, const float *final_norm, const float *w_lm,
                            int64_t token, int64_t pos, float *scratch, rf_decode_stages *stages) {
    return llama(&naive, logits, dims, embed, layers, final_norm, w_lm, token, pos, scratch, stages);
}

int rf_gpt2_decode_f32(float *logits, const rf_decode_dims *dims, const float *wte, const float *wpe,
                       const rf_gpt2_layer *layers, const float *lnf_w, const float *lnf_b,
                       const float *w_lm, int64_t token, int64_t pos, float *scratch,
                       rf_decode_stages *stages) {
    return gpt2(&fast, logits, dims, wte, wpe, layers, lnf_w, lnf_b, w_lm, token, pos, scratch, stages);
}

int rf_gpt2_decode_f32_ref(float *logits, const rf_decode_dims *dims, const float *wte, const float *wpe,
                           const rf_gpt2_layer *layers, const float *lnf_w, const float *lnf_b,
                           const float *w_lm, int64_t token, int64_t pos, float *scratch,
                           rf_decode_stages *stages) {
    return gpt2(&naive, logits, dims, wte, wpe, layers, lnf_w, lnf_b, w_lm, token, pos, scratch, stages);
}
