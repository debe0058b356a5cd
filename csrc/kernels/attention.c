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
 * PV bound); scaling q before the product adds u|S|, which the bound's dS term includes.
 *
 * Few rows (G Lq <= RF_ATT_FEW = 8: decode, GQA decode, short causal chunks): a 48-row tile would
 * be mostly padding, so each kv head's R = G Lq rows (contiguous in q and out) take another path,
 * in chunks of <= 8 rows, reading K and V once per chunk:
 *   S[r, j] = Qp[r] . k_j    Qp = scale q (packed, zero-padded to Dp); dot products along D for
 *                            KB = RF_VW / R keys x R rows a step (R KB <= RF_VW accumulators), then
 *                            one transpose-and-add tree turns the R KB vectors into R KB scores
 *   P[r, :] = e^(S[r, :] - max)  two passes over the row's Lk scores (scratch (8, Lk + RF_VW) on the
 *                            stack up to 32 KiB, malloc above): no rescales at all
 *   out[r] = (sum_j P[r, j] v_j) / sum_j P[r, j]   P broadcast, v_j rows along D (R x <= 4 vectors)
 * Tails of D: masked loads (AVX-512 / AVX2) or a copy (portable); the score buffer has RF_VW floats
 * of room past Lk so a key step or a softmax vector may always be written whole.
 * Error: within the same bound (same QK^T and PV analysis; the softmax has no rescale term).
 * Measured (prepare().run(), AVX-512, 1 thread; before: the tiled path): H=6 Lk=60 D=48 10.9 -> 1.7 us,
 * H=6 Lk=250 D=48 41 -> 7 us, H=32 Hkv=8 Lk=1024 D=64 294 -> 92 us, H=32 Hkv=8 Lk=60 D=64 20 -> 6.6 us.
 * (R = 1 streams K and V at the L2 bandwidth; R = 4 runs at about 80% of the FMA peak.) */
#ifndef RF_ATT_BR
#define RF_ATT_BR 48           /* query rows per block (multiple of 16, 8 and 4) */
#define RF_ATT_BC 64           /* keys per tile */
#endif
#ifndef RF_ATT_FEW
#define RF_ATT_FEW 8           /* blocks of G Lq <= 8 rows (decode) take the few-rows path */
#define RF_ATT_ROWS 8          /* ... in chunks of up to 8 rows */
#define RF_ATT_FEW_STACK 8192  /* floats of stack scratch for it (32 KiB); more comes from malloc */
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

/* ---- few-rows path (decode): a block of R = G Lq <= RF_ATT_FEW rows per kv head ----
 * The rows are the G heads x Lq positions sharing kv head g (contiguous in q and out).
 *   s[r, j] = (scale q_r) . k_j          dot products along D, KB keys x R rows at a time
 *                                        (R KB <= RF_VW accumulators, one horizontal reduction)
 *   p[r, j] = e^(s[r, j] - max_j s[r, :]) two passes over the row's Lk scores: no rescales
 *   out[r]  = (sum_j p[r, j] v_j) / sum_j p[r, j]
 * K and V are each read once per kv head.  Scratch: R (Lk + RF_VW) scores + R Dp packed q. */

/* lanes i < n of p, zeros above (n < RF_VW); never reads p[n ..] */
RF_INL vf V(vld_part)(const float *p, int n) {
#if defined(__x86_64__) && RF_VW == 16
    return (vf)_mm512_maskz_loadu_ps((__mmask16)((1u << n) - 1u), p);
#elif defined(__x86_64__) && RF_VW == 8
    const vi lane = {0, 1, 2, 3, 4, 5, 6, 7};
    return (vf)_mm256_maskload_ps(p, (__m256i)(lane < n));
#else
    vf x = V(vset1)(0.0f);
    memcpy(&x, p, (size_t)n * sizeof(float));
    return x;
#endif
}

/* per 128-bit block b: (x0+x1, x2+x3, y0+y1, y2+y3) of that block (shufps 0x88 + 0xdd) */
#if RF_VW == 16
#define RF_H88 0, 2, 16, 18, 4, 6, 20, 22, 8, 10, 24, 26, 12, 14, 28, 30
#define RF_HDD 1, 3, 17, 19, 5, 7, 21, 23, 9, 11, 25, 27, 13, 15, 29, 31
#elif RF_VW == 8
#define RF_H88 0, 2, 8, 10, 4, 6, 12, 14
#define RF_HDD 1, 3, 9, 11, 5, 7, 13, 15
#else
#define RF_H88 0, 2, 4, 6
#define RF_HDD 1, 3, 5, 7
#endif
RF_INL vf V(hpair)(vf x, vf y) {
    return __builtin_shufflevector(x, y, RF_H88) + __builtin_shufflevector(x, y, RF_HDD);
}
#undef RF_H88
#undef RF_HDD

/* RF_VW vectors t[0 ..] -> one vector whose lane i is the sum of the lanes of t[i]
 * (a transpose-and-add tree: RF_VW - 1 steps of two shuffles and one add) */
RF_INL vf V(hsum_many)(vf *t) {
#if RF_VW == 16
    /* halves, then 128-bit blocks across t[i], t[i + 8], t[i + 4], t[i + 12] (vshuff32x4) */
#pragma GCC unroll 8
    for (int i = 0; i < 8; i++)
        t[i] = __builtin_shufflevector(t[i], t[i + 8], 0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23)
               + __builtin_shufflevector(t[i], t[i + 8], 8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29,
                                         30, 31);
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        t[i] = __builtin_shufflevector(t[i], t[i + 4], 0, 1, 2, 3, 8, 9, 10, 11, 16, 17, 18, 19, 24, 25, 26, 27)
               + __builtin_shufflevector(t[i], t[i + 4], 4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23, 28, 29,
                                         30, 31);
    /* block b of t[i] now holds t[i + 8 (b & 1) + 4 (b >> 1)] (before the tree) */
#elif RF_VW == 8
#pragma GCC unroll 4
    for (int i = 0; i < 4; i++)
        t[i] = __builtin_shufflevector(t[i], t[i + 4], 0, 1, 2, 3, 8, 9, 10, 11)
               + __builtin_shufflevector(t[i], t[i + 4], 4, 5, 6, 7, 12, 13, 14, 15);
#endif
    return V(hpair)(V(hpair)(t[0], t[1]), V(hpair)(t[2], t[3]));
}
/* which input of V(hsum_many) lands in lane i */
#if RF_VW == 16
#define RF_HSLOT(i) (((i) & 3) | (((i) & 4) << 1) | (((i) & 8) >> 1))
#else
#define RF_HSLOT(i) (i)
#endif

/* S[r, j0 + kk] = Qp[r] . k_(j0+kk), all keys 0 .. nk-1, for R rows and KB = RF_VW / R keys a step
 * (S rows ldS >= nk + RF_VW floats apart: a step stores KB scores even past nk) */
RF_INL void V(qk_few_micro)(float *S /* (R,ldS) */, int64_t ldS, const float *Qp /* (R,Dp) */, int64_t Dp,
                            const float *kg /* (nk,D) */, int64_t D, int64_t nk, const int R) {
    const int KB = RF_VW / R;
    const int64_t Df = D / RF_VW * RF_VW;
    const int tail = (int)(D - Df);
    for (int64_t j0 = 0; j0 < nk; j0 += KB) {
        const float *kp[RF_VW];
#pragma GCC unroll 16
        for (int kk = 0; kk < KB; kk++) kp[kk] = kg + (j0 + kk < nk ? j0 + kk : nk - 1) * D;
        vf acc[RF_VW];
#pragma GCC unroll 16
        for (int i = 0; i < RF_VW; i++) acc[i] = V(vset1)(0.0f);
        for (int64_t d = 0; d < Df; d += RF_VW) {
            vf kv[RF_VW];
#pragma GCC unroll 16
            for (int kk = 0; kk < KB; kk++) kv[kk] = V(vld)(kp[kk] + d);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                vf qv = V(vld)(Qp + r * Dp + d);
#pragma GCC unroll 16
                for (int kk = 0; kk < KB; kk++) acc[RF_HSLOT(r * KB + kk)] += qv * kv[kk];
            }
        }
        if (tail) {        /* Qp is zero-padded to Dp: only k needs a partial load */
            vf kv[RF_VW];
#pragma GCC unroll 16
            for (int kk = 0; kk < KB; kk++) kv[kk] = V(vld_part)(kp[kk] + Df, tail);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                vf qv = V(vld)(Qp + r * Dp + Df);
#pragma GCC unroll 16
                for (int kk = 0; kk < KB; kk++) acc[RF_HSLOT(r * KB + kk)] += qv * kv[kk];
            }
        }
        vf s = V(hsum_many)(acc);      /* lane r KB + kk: row r, key j0 + kk */
        if (R == 1) {
            V(vst)(S + j0, s);
        } else {
            float t[RF_VW];
            V(vst)(t, s);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) memcpy(S + r * ldS + j0, t + r * KB, (size_t)KB * sizeof(float));
        }
    }
}
#undef RF_HSLOT

static void V(qk_few)(float *S, int64_t ldS, const float *Qp, int64_t Dp, const float *kg, int64_t D, int64_t nk,
                      int R) {
    switch (R) {
    case 1: V(qk_few_micro)(S, ldS, Qp, Dp, kg, D, nk, 1); break;
    case 2: V(qk_few_micro)(S, ldS, Qp, Dp, kg, D, nk, 2); break;
    case 3: V(qk_few_micro)(S, ldS, Qp, Dp, kg, D, nk, 3); break;
#if RF_VW >= 8
    case 4: V(qk_few_micro)(S, ldS, Qp, Dp, kg, D, nk, 4); break;
    case 5: V(qk_few_micro)(S, ldS, Qp, Dp, kg, D, nk, 5); break;
    case 6: V(qk_few_micro)(S, ldS, Qp, Dp, kg, D, nk, 6); break;
    case 7: V(qk_few_micro)(S, ldS, Qp, Dp, kg, D, nk, 7); break;
    default: V(qk_few_micro)(S, ldS, Qp, Dp, kg, D, nk, 8); break;
#else
    default: V(qk_few_micro)(S, ldS, Qp, Dp, kg, D, nk, 4); break;
#endif
    }
}

/* row softmax of s[0 .. n-1] in place, unnormalised: s = e^(s - max); s[n .. nk-1] = 0.
 * Returns sum_j s[j] (NaN if a score is NaN).  s has RF_VW floats of room past nk: the last,
 * partial vector is read whole (lanes past n replaced by -inf, e^-inf = 0) and written whole. */
static float V(softmax_few_row)(float *s /* (nk + RF_VW,) */, int64_t n, int64_t nk) {
    const vf ninf = V(vset1)(-INFINITY), zero = V(vset1)(0.0f);
    vi lane;
    for (int i = 0; i < RF_VW; i++) lane[i] = i;
    const int64_t nf = n / RF_VW * RF_VW;
    const vi tailm = lane < (int)(n - nf);        /* lanes of the partial vector inside the row */
    vf m0 = ninf, m1 = ninf;
    int64_t j = 0;
    for (; j + 2 * RF_VW <= nf; j += 2 * RF_VW) {
        m0 = V(vmax)(m0, V(vld)(s + j));
        m1 = V(vmax)(m1, V(vld)(s + j + RF_VW));
    }
    if (j < nf) m0 = V(vmax)(m0, V(vld)(s + j));
    if (nf < n) m1 = V(vmax)(m1, V(vsel)(tailm, V(vld)(s + nf), ninf));
    float m = V(hmax)(V(vmax)(m0, m1));
    const vf vm = V(vset1)(m == -INFINITY ? 0.0f : m);     /* all -inf: e^-inf = 0 */
    vf a0 = zero, a1 = zero;
    for (j = 0; j + 2 * RF_VW <= nf; j += 2 * RF_VW) {
        vf p0 = V(vexp_flush)(V(vld)(s + j) - vm), p1 = V(vexp_flush)(V(vld)(s + j + RF_VW) - vm);
        V(vst)(s + j, p0);
        V(vst)(s + j + RF_VW, p1);
        a0 += p0;
        a1 += p1;
    }
    if (j < nf) {
        vf p = V(vexp_flush)(V(vld)(s + j) - vm);
        V(vst)(s + j, p);
        a0 += p;
    }
    if (nf < n) {
        vf p = V(vexp_flush)(V(vsel)(tailm, V(vld)(s + nf), ninf) - vm);
        V(vst)(s + nf, p);
        a1 += p;
    }
    for (j = n; j < nk; j++) s[j] = 0.0f;                  /* masked keys: p = 0 */
    return V(hsum)(a0 + a1);
}

/* O[r, d0 + v RF_VW ..] = inv[r] sum_j S[r, j] v_j[d0 + v RF_VW ..] for R rows and nv vectors; the
 * last vector holds `part` floats when part > 0 (partial loads and stores), else all are full.
 * Two accumulator sets (even/odd keys) when R nv is too small to hide the FMA latency. */
RF_INL void V(pv_few_micro)(float *O /* (R,D) */, const float *inv /* (R,) */, const float *S /* (R,ldS) */,
                            int64_t ldS, const float *vg /* (nk,D) */, int64_t D, int64_t nk, int64_t d0,
                            const int R, const int nv, const int part) {
    const int JU = R * nv <= 6 ? 2 : 1;
    vf acc[2][RF_ATT_FEW][4];
#pragma GCC unroll 2
    for (int u = 0; u < JU; u++)
#pragma GCC unroll 8
        for (int r = 0; r < R; r++)
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++) acc[u][r][v] = V(vset1)(0.0f);
    const float *vp = vg + d0;
    int64_t j = 0;
    for (; j + JU <= nk; j += JU) {
#pragma GCC unroll 2
        for (int u = 0; u < JU; u++) {
            vf vv[4];
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++)
                vv[v] = part && v == nv - 1 ? V(vld_part)(vp + (j + u) * D + v * RF_VW, part)
                                            : V(vld)(vp + (j + u) * D + v * RF_VW);
#pragma GCC unroll 8
            for (int r = 0; r < R; r++) {
                vf pb = V(vset1)(S[r * ldS + j + u]);
#pragma GCC unroll 4
                for (int v = 0; v < nv; v++) acc[u][r][v] += pb * vv[v];
            }
        }
    }
    if (j < nk) {                      /* JU = 2 and nk odd: the last key into set 0 */
        vf vv[4];
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++)
            vv[v] = part && v == nv - 1 ? V(vld_part)(vp + j * D + v * RF_VW, part) : V(vld)(vp + j * D + v * RF_VW);
#pragma GCC unroll 8
        for (int r = 0; r < R; r++) {
            vf pb = V(vset1)(S[r * ldS + j]);
#pragma GCC unroll 4
            for (int v = 0; v < nv; v++) acc[0][r][v] += pb * vv[v];
        }
    }
#pragma GCC unroll 8
    for (int r = 0; r < R; r++) {
        vf vi_ = V(vset1)(inv[r]);
#pragma GCC unroll 4
        for (int v = 0; v < nv; v++) {
            vf a = JU == 2 ? acc[0][r][v] + acc[1][r][v] : acc[0][r][v];
            a = a * vi_;
            float *o = O + r * D + d0 + v * RF_VW;
            if (part && v == nv - 1) memcpy(o, &a, (size_t)part * sizeof(float));
            else V(vst)(o, a);
        }
    }
}

/* rows r0 .. r0 + R - 1 for every column: full chunks of NVF vectors, then the rest and a partial vector */
#if RF_VW == 16
#define RF_PV_NVF(R) ((R) <= 6 ? 4 : 3)
#else
#define RF_PV_NVF(R) ((R) <= 3 ? 4 : (R) <= 4 ? 3 : (R) <= 6 ? 2 : 1)
#endif
RF_INL void V(pv_few_rows)(float *O, const float *inv, const float *S, int64_t ldS, const float *vg, int64_t D,
                           int64_t nk, const int R) {
    const int NVF = RF_PV_NVF(R);
    const int64_t nfull = D / RF_VW;            /* full vectors per row */
    const int part = (int)(D - nfull * RF_VW);
    int64_t d0 = 0, left = nfull;
    for (; left >= NVF; left -= NVF, d0 += NVF * RF_VW)
        V(pv_few_micro)(O, inv, S, ldS, vg, D, nk, d0, R, NVF, 0);
    /* the rest: left < NVF full vectors, plus a partial one */
    int nv = (int)left + (part > 0);
    if (nv == 0) return;
    if (part) {
        switch (nv) {
        case 1: V(pv_few_micro)(O, inv, S, ldS, vg, D, nk, d0, R, 1, part); break;
        case 2: V(pv_few_micro)(O, inv, S, ldS, vg, D, nk, d0, R, 2, part); break;
        case 3: V(pv_few_micro)(O, inv, S, ldS, vg, D, nk, d0, R, 3, part); break;
        default: V(pv_few_micro)(O, inv, S, ldS, vg, D, nk, d0, R, 4, part); break;
        }
    } else {
        switch (nv) {
        case 1: V(pv_few_micro)(O, inv, S, ldS, vg, D, nk, d0, R, 1, 0); break;
        case 2: V(pv_few_micro)(O, inv, S, ldS, vg, D, nk, d0, R, 2, 0); break;
        default: V(pv_few_micro)(O, inv, S, ldS, vg, D, nk, d0, R, 3, 0); break;
        }
    }
}
#undef RF_PV_NVF

/* one function per row count (a single switch over all of them is too big for -g builds) */
#define RF_PV_FEW_FN(R) \
    static void V(pv_few_##R)(float *O, const float *inv, const float *S, int64_t ldS, const float *vg, \
                              int64_t D, int64_t nk) { V(pv_few_rows)(O, inv, S, ldS, vg, D, nk, R); }
RF_PV_FEW_FN(1)
RF_PV_FEW_FN(2)
RF_PV_FEW_FN(3)
RF_PV_FEW_FN(4)
RF_PV_FEW_FN(5)
RF_PV_FEW_FN(6)
RF_PV_FEW_FN(7)
RF_PV_FEW_FN(8)
#undef RF_PV_FEW_FN

static void V(pv_few)(float *O, const float *inv, const float *S, int64_t ldS, const float *vg, int64_t D,
                      int64_t nk, int R) {
    switch (R) {
    case 1: V(pv_few_1)(O, inv, S, ldS, vg, D, nk); break;
    case 2: V(pv_few_2)(O, inv, S, ldS, vg, D, nk); break;
    case 3: V(pv_few_3)(O, inv, S, ldS, vg, D, nk); break;
    case 4: V(pv_few_4)(O, inv, S, ldS, vg, D, nk); break;
    case 5: V(pv_few_5)(O, inv, S, ldS, vg, D, nk); break;
    case 6: V(pv_few_6)(O, inv, S, ldS, vg, D, nk); break;
    case 7: V(pv_few_7)(O, inv, S, ldS, vg, D, nk); break;
    default: V(pv_few_8)(O, inv, S, ldS, vg, D, nk); break;
    }
}

/* whether scale q[d] overflows float32 for a finite q[d] (d < D): the row's scores q.k scale may
 * still be finite, so that row is packed unscaled and its scores are scaled after the dot */
static int V(scale_overflows)(const float *q, int64_t D, float scale) {
    int ovf = 0;
    for (int64_t d = 0; d < D; d++) ovf |= isinf(q[d] * scale) && !isinf(q[d]);
    return ovf;
}

/* Qp rows (rc, Dp) = s_r q rows (rc, D), zero-padded, s_r = 1 where scale_overflows (flagged in
 * post[r]), else scale; returns whether any row was flagged */
static int V(scale_q_rows)(float *Qp, int64_t Dp, const float *q, int64_t D, int rc, float scale,
                           unsigned char *post) {
    int any = 0;
    for (int r = 0; r < rc; r++) {
        post[r] = (unsigned char)V(scale_overflows)(q + r * D, D, scale);
        const float s = post[r] ? 1.0f : scale;
        for (int64_t d = 0; d < D; d++) Qp[r * Dp + d] = q[r * D + d] * s;
        for (int64_t d = D; d < Dp; d++) Qp[r * Dp + d] = 0.0f;
        any |= post[r];
    }
    return any;
}

/* the few-rows path for G Lq <= RF_ATT_FEW (arguments as V(attention)); the R rows of a kv head
 * go through QK, softmax and PV in chunks of at most RF_ATT_ROWS */
static int V(attention_few)(float *out, const float *q, const float *k, const float *v, int64_t H, int64_t Hkv,
                            int64_t Lq, int64_t Lk, int64_t D, int64_t kv_stride, float scale, int causal) {
    const int R = (int)(H / Hkv * Lq);
    const int RC = R < RF_ATT_ROWS ? R : RF_ATT_ROWS;             /* rows per chunk */
    const int64_t Dp = (D + RF_VW - 1) / RF_VW * RF_VW;
    const int64_t ldS = (Lk + 2 * RF_VW - 1) / RF_VW * RF_VW;   /* >= Lk + RF_VW */
    /* scratch: scores S (RC,ldS), packed scale q Qp (RC,Dp), inv (RC) */
    const size_t nfl = (size_t)RC * ldS + (size_t)RC * Dp + RF_ATT_ROWS;
    float stackbuf[RF_ATT_FEW_STACK] __attribute__((aligned(64)));
    float *heap = NULL, *S = stackbuf;
    if (nfl > RF_ATT_FEW_STACK) {
        heap = (float *)malloc(nfl * sizeof(float));
        if (!heap) return -1;
        S = heap;
    }
    float *Qp = S + (size_t)RC * ldS, *inv = Qp + (size_t)RC * Dp;
    for (int64_t g = 0; g < Hkv; g++) {
        const float *kg = k + g * kv_stride, *vg = v + g * kv_stride;   /* (Lk,D) each */
        for (int c0 = 0; c0 < R; c0 += RC) {
            const int rc = R - c0 < RC ? R - c0 : RC;
            /* rows c0 .. c0 + rc - 1 of the kv group: G heads x Lq positions, contiguous in q and out */
            const float *qc = q + (g * R + c0) * D;   /* (rc,D) */
            float *oc = out + (g * R + c0) * D;       /* (rc,D) */
            /* q scaled before the dot, unless scale q overflows where q does not (the score
             * q.k scale may still be finite): then the scores are scaled after it */
            unsigned char post[RF_ATT_ROWS];
            const int any_post = V(scale_q_rows)(Qp, Dp, qc, D, rc, scale, post);
            for (int r0 = 0; r0 < rc; r0 += RF_VW)   /* portable: rows 4 at a time */
                V(qk_few)(S + r0 * ldS, ldS, Qp + r0 * Dp, Dp, kg, D, Lk, rc - r0 < RF_VW ? rc - r0 : RF_VW);
            for (int r = 0; r < rc; r++) {
                int64_t n = causal ? Lk - Lq + (c0 + r) % Lq + 1 : Lk;    /* keys row c0 + r sees */
                if (any_post && post[r])
                    for (int64_t j = 0; j < n; j++) S[r * ldS + j] *= scale;
                float l = V(softmax_few_row)(S + r * ldS, n, Lk);
                inv[r] = l == 0.0f ? 0.0f : 1.0f / l;  /* l = 0 only if every score was -inf */
            }
            V(pv_few)(oc, inv, S, ldS, vg, D, Lk, rc);
        }
    }
    free(heap);
    return 0;
}

static int V(attention)(float *out /* (H,Lq,D) */, const float *q /* (H,Lq,D) */,
                        const float *k /* (Hkv,Lk,D), heads kv_stride apart */,
                        const float *v /* (Hkv,Lk,D), heads kv_stride apart */,
                        int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t kv_stride,
                        float scale, int causal) {
    const int64_t G = H / Hkv;
    if (G * Lq <= RF_ATT_FEW)
        return V(attention_few)(out, q, k, v, H, Hkv, Lq, Lk, D, kv_stride, scale, causal);
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
    unsigned char post[BR];                                  /* rows whose scores are scaled after the dot */
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
                /* Qt = (s_r q)^T, zero rows beyond R: s_r = scale, or 1 for a row whose scale q overflows
                 * where q does not (post[r]: that row's scores are scaled after the dot, per tile) */
                int any_post = 0;
                float rs[BR];                             /* per row: scale, or 1 where scale q overflows */
                for (int r = 0; r < R; r++) {
                    post[r] = (unsigned char)V(scale_overflows)(qrow[r], D, scale);
                    rs[r] = post[r] ? 1.0f : scale;
                    any_post |= post[r];
                }
                for (int64_t d = 0; d < D; d++) {
                    for (int r = 0; r < R; r++) Qt[d * BR + r] = qrow[r][d] * rs[r];
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
                    if (any_post)
                        for (int j = 0; j < nk; j++)
                            for (int r = 0; r < R; r++)
                                if (post[r]) St[j * BR + r] *= scale;
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
