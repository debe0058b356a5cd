/* Multi-head attention, float32, flash-style.  Letters: H, Hkv, Lq, Lk, D as in attention.h;
 * G = H / Hkv query heads per kv head; R = rows of a query block.
 *   S = (scale q) k^T;  P = softmax(S masked);  out = P v        per head, never an Lq x Lk buffer
 *
 * Blocking (Zen 4: 32 KiB L1d, 1 MiB L2 per core):
 *   query block  R <= BR = 48 rows: a tile of positions x the G heads sharing one kv head
 *                (GQA/MQA read each K/V tile once for all G heads; K/V are never copied);
 *   key tile     BC = 64 keys of k and v (16 KiB each at D = 64), read in place.
 * Per block: Qt = (scale q)^T (D x 48, packed once), then for each key tile
 *   St = K_tile Qt        (64 x 48 scores, keys x rows: a register-blocked micro-GEMM that
 *                          broadcasts k[j, d] and loads Qt[d, rows]: no transposition of K)
 *   online softmax per row, vectorised across rows: m_new = max(m, max_j S), alpha = e^(m - m_new),
 *   P = e^(S - m_new), l = alpha l + sum_j P, O = alpha O
 *   O += P^T v_tile       (48 x D, micro-GEMM broadcasting P, loading rows of v)
 * and finally out = O / l.  Scratch (St, Qt, O, one padded v tile): O(BR BC + BR D + BC D).
 * Causal: key tiles past the block's last visible key are skipped; only tiles crossing the
 * diagonal are masked.  Micro-kernels: avx512 QK 8 keys x 48 rows (24 zmm), PV 6 rows x 64
 * columns (24 zmm); avx2 QK 4 x 24, PV 4 x 24 (12 ymm); portable QK 4 x 12, PV 4 x 12.
 * Error: contracts.attention_bound (QK^T bound, softmax bound, (EXP_ULPS + 2)u per key tile,
 * PV bound); scaling q before the product adds u|S|, which the bound's dS term includes. */
#ifndef RF_ATT_BR
#define RF_ATT_BR 48           /* query rows per block (multiple of 16, 8 and 4) */
#define RF_ATT_BC 64           /* keys per tile */
#endif
#ifdef RF_VW
/* ======== SIMD body, compiled once per path (see _vmath.h) ======== */
#if RF_VW == 16
#define MRK 8
#define NVQ 3
#define MRO 6
#define NVO 4
#else
#define MRK 4
#define NVQ 3
#define MRO 4
#define NVO 3
#endif
#define BR RF_ATT_BR
#define BC RF_ATT_BC

/* St[jj + kk][r0 ..] = sum_d k_kk[d] Qt[d][r0 ..] for MRK keys and nv row vectors */
RF_INL void V(qk_micro)(float *St /* (BC,BR) */, const float *Qt /* (D,BR) */,
                        const float *const *kp /* MRK rows of k, each (D,) */,
                        int64_t D, int jj, int r0, const int nv) {
    vf acc[MRK][NVQ];
#pragma GCC unroll 8
    for (int kk = 0; kk < MRK; kk++)
#pragma GCC unroll 4
        for (int v = 0; v < NVQ; v++) acc[kk][v] = V(vset1)(0.0f);
    for (int64_t d = 0; d < D; d++) {
        vf qv[NVQ];
#pragma GCC unroll 4
        for (int v = 0; v < NVQ; v++)
            if (v < nv) qv[v] = V(vld)(Qt + d * BR + r0 + v * RF_VW);
#pragma GCC unroll 8
        for (int kk = 0; kk < MRK; kk++) {
            vf kb = V(vset1)(kp[kk][d]);
#pragma GCC unroll 4
            for (int v = 0; v < NVQ; v++)
                if (v < nv) acc[kk][v] += kb * qv[v];
        }
    }
#pragma GCC unroll 8
    for (int kk = 0; kk < MRK; kk++)
#pragma GCC unroll 4
        for (int v = 0; v < NVQ; v++)
            if (v < nv) V(vst)(St + (jj + kk) * BR + r0 + v * RF_VW, acc[kk][v]);
}

/* O[r0 + i][d0 ..] += sum_j Pt[j][r0 + i] vt[j][d0 ..] for mr rows and nv column vectors */
RF_INL void V(pv_micro)(float *O /* (BR,Dp) */, const float *Pt /* (BC,BR) */,
                        const float *vt /* (nk, ldv) */, int64_t ldv, int nk, int64_t Dp,
                        int r0, int64_t d0, const int mr, const int nv) {
    vf acc[MRO][NVO];
#pragma GCC unroll 8
    for (int i = 0; i < MRO; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NVO; v++)
            if (i < mr && v < nv) acc[i][v] = V(vld)(O + (r0 + i) * Dp + d0 + v * RF_VW);
    for (int j = 0; j < nk; j++) {
        vf vv[NVO];
#pragma GCC unroll 4
        for (int v = 0; v < NVO; v++)
            if (v < nv) vv[v] = V(vld)(vt + j * ldv + d0 + v * RF_VW);
#pragma GCC unroll 8
        for (int i = 0; i < MRO; i++) {
            if (i < mr) {
                vf pb = V(vset1)(Pt[j * BR + r0 + i]);
#pragma GCC unroll 4
                for (int v = 0; v < NVO; v++)
                    if (v < nv) acc[i][v] += pb * vv[v];
            }
        }
    }
#pragma GCC unroll 8
    for (int i = 0; i < MRO; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NVO; v++)
            if (i < mr && v < nv) V(vst)(O + (r0 + i) * Dp + d0 + v * RF_VW, acc[i][v]);
}

/* the micro-kernels with compile-time shapes (switch so each call is fully unrolled) */
static void V(qk_block)(float *St, const float *Qt, const float *const *kp, int64_t D, int jj,
                        int r0, int nv) {
    switch (nv) {
    case 1: V(qk_micro)(St, Qt, kp, D, jj, r0, 1); break;
    case 2: V(qk_micro)(St, Qt, kp, D, jj, r0, 2); break;
    default: V(qk_micro)(St, Qt, kp, D, jj, r0, 3); break;
    }
}

#define RF_PV_CASE(MR)                                                          \
    case MR:                                                                    \
        switch (nv) {                                                           \
        case 1: V(pv_micro)(O, Pt, vt, ldv, nk, Dp, r0, d0, MR, 1); break;      \
        case 2: V(pv_micro)(O, Pt, vt, ldv, nk, Dp, r0, d0, MR, 2); break;      \
        case 3: V(pv_micro)(O, Pt, vt, ldv, nk, Dp, r0, d0, MR, 3); break;      \
        default: V(pv_micro)(O, Pt, vt, ldv, nk, Dp, r0, d0, MR, NVO); break;   \
        }                                                                       \
        break;
static void V(pv_block)(float *O, const float *Pt, const float *vt, int64_t ldv, int nk, int64_t Dp,
                        int r0, int64_t d0, int mr, int nv) {
    switch (mr) {
    RF_PV_CASE(1)
    RF_PV_CASE(2)
    RF_PV_CASE(3)
#if MRO > 4
    RF_PV_CASE(4)
    RF_PV_CASE(5)
    default: RF_PV_CASE(MRO)
#else
    default: RF_PV_CASE(MRO)
#endif
    }
}
#undef RF_PV_CASE

static int V(attention)(float *out /* (H,Lq,D) */, const float *q /* (H,Lq,D) */,
                        const float *k /* (Hkv,Lk,D), heads kv_stride apart */,
                        const float *v /* (Hkv,Lk,D), heads kv_stride apart */,
                        int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t kv_stride,
                        float scale, int causal) {
    const int64_t G = H / Hkv;
    const int64_t Dp = (D + RF_VW - 1) / RF_VW * RF_VW;     /* O and packed v row width */
    const int pack_v = Dp != D;                              /* v rows cannot be read in place */
    /* scratch: Qt (D,BR), St (BC,BR), O (BR,Dp), Vp (BC,Dp), m/l/alpha (BR), lim (BR) */
    size_t nfl = (size_t)D * BR + (size_t)BC * BR + (size_t)BR * Dp + (pack_v ? (size_t)BC * Dp : 0)
                 + 3 * BR + 64;
    float *scratch = (float *)malloc(nfl * sizeof(float) + BR * sizeof(int32_t) + 64);
    if (!scratch) return -1;
    float *Qt = (float *)(((uintptr_t)scratch + 63) & ~(uintptr_t)63);
    float *St = Qt + (size_t)D * BR, *O = St + (size_t)BC * BR, *Vp = O + (size_t)BR * Dp;
    float *mrow = Vp + (pack_v ? (size_t)BC * Dp : 0), *lrow = mrow + BR, *alpha = lrow + BR;
    int32_t *lim = (int32_t *)(alpha + BR);
    const float *qrow[BR];
    float *orow[BR];
    const vf ninf = V(vset1)(-INFINITY), zero = V(vset1)(0.0f);

    /* a query block: Bp positions x Gc heads of one kv group */
    const int64_t Bp = G >= BR ? 1 : BR / G, Gc = G >= BR ? BR : G;
    for (int64_t g = 0; g < Hkv; g++) {
        const float *kg = k + g * kv_stride, *vg = v + g * kv_stride;   /* (Lk,D) each */
        for (int64_t hc = 0; hc < G; hc += Gc) {
            for (int64_t p0 = 0; p0 < Lq; p0 += Bp) {
                /* rows of this block, their causal limits (last visible key) */
                int R = 0;
                int64_t maxlim = 0, minlim = Lk - 1;
                for (int64_t hh = hc; hh < hc + Gc && hh < G; hh++)
                    for (int64_t i = p0; i < p0 + Bp && i < Lq; i++) {
                        int64_t h = g * G + hh;
                        qrow[R] = q + (h * Lq + i) * D;
                        orow[R] = out + (h * Lq + i) * D;
                        int64_t li = causal ? Lk - Lq + i : Lk - 1;
                        lim[R] = (int32_t)li;
                        maxlim = li > maxlim ? li : maxlim;
                        minlim = li < minlim ? li : minlim;
                        R++;
                    }
                const int nvr = (R + RF_VW - 1) / RF_VW, Rp = nvr * RF_VW;
                for (int r = R; r < Rp; r++) lim[r] = (int32_t)(Lk - 1);
                /* Qt = (scale q)^T, zero rows beyond R */
                for (int64_t d = 0; d < D; d++) {
                    for (int r = 0; r < R; r++) Qt[d * BR + r] = qrow[r][d] * scale;
                    for (int r = R; r < Rp; r++) Qt[d * BR + r] = 0.0f;
                }
                for (int rv = 0; rv < nvr; rv++) {
                    V(vst)(mrow + rv * RF_VW, ninf);
                    V(vst)(lrow + rv * RF_VW, zero);
                }
                memset(O, 0, (size_t)R * Dp * sizeof(float));

                for (int64_t j0 = 0; j0 <= maxlim; j0 += BC) {
                    /* keys j0 .. j0 + nk - 1 (none past the block's last visible key) */
                    int nk = (int)((maxlim + 1 - j0) < BC ? (maxlim + 1 - j0) : BC);
                    /* St = K_tile Qt */
                    for (int jj = 0; jj < nk; jj += MRK) {
                        const float *kp[MRK];
                        for (int kk = 0; kk < MRK; kk++) {
                            int64_t key = j0 + jj + kk;
                            kp[kk] = kg + (key < j0 + nk ? key : j0 + nk - 1) * D;  /* clamp: unused */
                        }
                        for (int rv = 0; rv < nvr; rv += NVQ)
                            V(qk_block)(St, Qt, kp, D, jj, rv * RF_VW, nvr - rv < NVQ ? nvr - rv : NVQ);
                    }
                    /* causal mask on a tile crossing the diagonal: key > lim -> -inf */
                    if (j0 + nk - 1 > minlim) {
                        for (int rv = 0; rv < nvr; rv++) {
                            vi lv;
                            memcpy(&lv, lim + rv * RF_VW, sizeof lv);
                            for (int j = 0; j < nk; j++) {
                                vi kv = (vi){0} + (int32_t)(j0 + j);
                                float *s = St + j * BR + rv * RF_VW;
                                V(vst)(s, V(vsel)(kv > lv, ninf, V(vld)(s)));
                            }
                        }
                    }
                    /* online softmax, vectorised across rows */
                    for (int rv = 0; rv < nvr; rv++) {
                        vf mx = ninf;
                        for (int j = 0; j < nk; j++) mx = V(vmax)(mx, V(vld)(St + j * BR + rv * RF_VW));
                        vf mold = V(vld)(mrow + rv * RF_VW);
                        vf mnew = V(vmax)(mold, mx);
                        vf muse = V(vsel)(mnew == ninf, zero, mnew);   /* all masked so far: e^-inf = 0 */
                        vf al = V(vexp_flush)(mold - muse);
                        vf s0 = zero, s1 = zero;
                        int j = 0;
                        for (; j + 1 < nk; j += 2) {
                            float *a = St + j * BR + rv * RF_VW, *b = a + BR;
                            vf pa = V(vexp_flush)(V(vld)(a) - muse), pb = V(vexp_flush)(V(vld)(b) - muse);
                            V(vst)(a, pa); V(vst)(b, pb);
                            s0 += pa; s1 += pb;
                        }
                        if (j < nk) {
                            float *a = St + j * BR + rv * RF_VW;
                            vf pa = V(vexp_flush)(V(vld)(a) - muse);
                            V(vst)(a, pa);
                            s0 += pa;
                        }
                        V(vst)(lrow + rv * RF_VW, V(vld)(lrow + rv * RF_VW) * al + (s0 + s1));
                        V(vst)(mrow + rv * RF_VW, mnew);
                        V(vst)(alpha + rv * RF_VW, al);
                    }
                    /* O = alpha O (rows whose max moved) */
                    if (j0 > 0)
                        for (int r = 0; r < R; r++) {
                            if (alpha[r] == 1.0f) continue;
                            vf a = V(vset1)(alpha[r]);
                            float *o = O + r * Dp;
                            for (int64_t d = 0; d < Dp; d += RF_VW) V(vst)(o + d, V(vld)(o + d) * a);
                        }
                    /* O += P^T v_tile */
                    const float *vt = vg + j0 * D;
                    int64_t ldv = D;
                    if (pack_v) {
                        for (int j = 0; j < nk; j++) {
                            memcpy(Vp + j * Dp, vt + j * D, (size_t)D * sizeof(float));
                            for (int64_t d = D; d < Dp; d++) Vp[j * Dp + d] = 0.0f;
                        }
                        vt = Vp;
                        ldv = Dp;
                    }
                    for (int r0 = 0; r0 < R; r0 += MRO)
                        for (int64_t d0 = 0; d0 < Dp; d0 += NVO * RF_VW) {
                            int64_t nv = (Dp - d0) / RF_VW;
                            V(pv_block)(O, St, vt, ldv, nk, Dp, r0, d0, R - r0 < MRO ? R - r0 : MRO,
                                        (int)(nv < NVO ? nv : NVO));
                        }
                }
                /* out = O / l (l = 0 only if every score was -inf: zeros, as the oracle) */
                for (int r = 0; r < R; r++) {
                    float l = lrow[r], inv = l == 0.0f ? 0.0f : 1.0f / l;
                    for (int64_t d = 0; d < D; d++) orow[r][d] = O[r * Dp + d] * inv;
                }
            }
        }
    }
    free(scratch);
    return 0;
}
#undef MRK
#undef NVQ
#undef MRO
#undef NVO
#undef BR
#undef BC
#else
/* ======== common part: reference, dispatch, thunk ======== */
#include <math.h>
#include <stdlib.h>
#include "attention.h"
#include "_dispatch.h"
#define RF_SELF "attention.c"
#include "_vmath.h"

/* naive: for each (h, i): s_j = scale q.k_j (masked -> skipped), p = softmax(s), out = sum p_j v_j */
int rf_attention_f32_ref(float *out /* (H,Lq,D) */, const float *q /* (H,Lq,D) */,
                         const float *k /* (Hkv,Lk,D) */, const float *v /* (Hkv,Lk,D) */,
                         int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
                         float scale, int causal) {
    float *s = (float *)malloc((size_t)(Lk > 0 ? Lk : 1) * sizeof(float));   /* (Lk,) */
    if (!s) return -1;
    for (int64_t h = 0; h < H; h++) {
        int64_t g = h / (H / Hkv);
        const float *kg = k + g * Lk * D, *vg = v + g * Lk * D;
        for (int64_t i = 0; i < Lq; i++) {
            const float *qi = q + (h * Lq + i) * D;
            float *oi = out + (h * Lq + i) * D;
            int64_t last = causal ? Lk - Lq + i : Lk - 1;     /* last visible key */
            float m = -INFINITY;
            for (int64_t j = 0; j <= last; j++) {
                float dot = 0.0f;
                for (int64_t d = 0; d < D; d++) dot += qi[d] * kg[j * D + d];
                s[j] = dot * scale;
                m = s[j] > m ? s[j] : m;
            }
            if (m == -INFINITY) m = 0.0f;
            float l = 0.0f;
            for (int64_t j = 0; j <= last; j++) { s[j] = expf(s[j] - m); l += s[j]; }
            for (int64_t d = 0; d < D; d++) oi[d] = 0.0f;
            for (int64_t j = 0; j <= last; j++)
                for (int64_t d = 0; d < D; d++) oi[d] += s[j] * vg[j * D + d];
            for (int64_t d = 0; d < D; d++) oi[d] = l == 0.0f ? 0.0f : oi[d] / l;
        }
    }
    free(s);
    return 0;
}

int rf_attention_f32_strided(float *out, const float *q, const float *k, const float *v,
                             int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t kv_stride,
                             float scale, int causal) {
    if (H <= 0 || Lq <= 0 || D <= 0 || Lk <= 0 || Hkv <= 0) return 0;
    int rc = 0;
    RF_DISPATCH(rc = attention, out, q, k, v, H, Hkv, Lq, Lk, D, kv_stride, scale, causal);
    return rc;
}

int rf_attention_f32(float *out, const float *q, const float *k, const float *v,
                     int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
                     float scale, int causal) {
    return rf_attention_f32_strided(out, q, k, v, H, Hkv, Lq, Lk, D, Lk * D, scale, causal);
}

void rf_attention_thunk(void *ctx) {
    rf_attention_args *a = (rf_attention_args *)ctx;
    a->status = rf_attention_f32_strided(a->out, a->q, a->k, a->v, a->H, a->Hkv, a->Lq, a->Lk, a->D,
                                         a->kv_stride, a->scale, a->causal);
}
#endif
