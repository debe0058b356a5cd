/* AVX-512 float32 micro-kernel and GEMV (x86-64 only; per-function target attribute).
 *
 * Micro-kernel: an MR x NR tile of C in MR*NR/16 zmm accumulators; per k, NR/16 zmm
 * loads of Bp and MR broadcasts of Ap feed MR*NR/16 FMAs.  Zen 4 runs one zmm FMA per
 * cycle (double-pumped on its two 256-bit pipes): 32 FLOP/cycle at best. */
#include "_matmul.h"

#if defined(RF_X86)
#include <immintrin.h>
#include <stdint.h>

enum { MR = RF_MR(RF_SGEMM_AVX512), NR = RF_NR(RF_SGEMM_AVX512), NV = NR / 16 };

/* C[mr,nr] (+)= sum_k Ap[k, 0:mr]^T Bp[k, 0:nr], computing only the first MRU rows and
 * 16*NVU columns of the MR x NR tile (mr <= MRU, nr <= 16*NVU): edge tiles of the packed
 * panels then cost about what they hold.  Stores are masked to the mr x nr corner. */
RF_TARGET_AVX512
static inline __attribute__((always_inline))
void ukr_body(int64_t kc,
              const float *restrict ap,  /* (kc, MR) packed */
              const float *restrict bp,  /* (kc, NR) packed, 64-byte aligned */
              float *restrict c,         /* (mr, nr), row stride ldc */
              int64_t ldc, int mr, int nr, int accumulate, const int MRU, const int NVU) {
    /* the C tile is read or written only after the k loop: start fetching it now */
    for (int i = 0; i < mr; i++) {
        __builtin_prefetch(c + i * ldc, 1, 3);
        __builtin_prefetch(c + i * ldc + nr - 1, 1, 3);
    }
    __m512 acc[MR][NV];
#pragma GCC unroll 32
    for (int i = 0; i < MRU; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NVU; v++) acc[i][v] = _mm512_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m512 bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NVU; v++) bv[v] = _mm512_load_ps(bp + k * NR + 16 * v);
#pragma GCC unroll 32
        for (int i = 0; i < MRU; i++) {
            __m512 ai = _mm512_set1_ps(ap[k * MR + i]);
#pragma GCC unroll 4
            for (int v = 0; v < NVU; v++) acc[i][v] = _mm512_fmadd_ps(ai, bv[v], acc[i][v]);
        }
    }
    __mmask16 m[NV];
#pragma GCC unroll 4
    for (int v = 0; v < NVU; v++) {
        int r = nr - 16 * v;
        m[v] = r >= 16 ? (__mmask16)0xffff : r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1u);
    }
#pragma GCC unroll 32
    for (int i = 0; i < MRU; i++) {
        if (i >= mr) break;
#pragma GCC unroll 4
        for (int v = 0; v < NVU; v++) {
            float *ci = c + i * ldc + 16 * v;
            __m512 out = accumulate ? _mm512_add_ps(_mm512_maskz_loadu_ps(m[v], ci), acc[i][v]) : acc[i][v];
            _mm512_mask_storeu_ps(ci, m[v], out);
        }
    }
}

/* C[mr,nr] (+)= sum_k Ap[k, 0:mr]^T Bp[k, 0:nr]: the full tile, or a half-height and/or
 * half-width variant for edge tiles */
RF_TARGET_AVX512
void rf_sgemm_ukr_avx512(int64_t kc,
                         const float *restrict ap,  /* (kc, MR) packed */
                         const float *restrict bp,  /* (kc, NR) packed, 64-byte aligned */
                         float *restrict c,         /* (mr, nr), row stride ldc */
                         int64_t ldc, int mr, int nr, int accumulate) {
    enum { MRH = (MR + 1) / 2, NVH = (NV + 1) / 2 };
    if (mr > MRH) {
        if (nr > 16 * NVH) ukr_body(kc, ap, bp, c, ldc, mr, nr, accumulate, MR, NV);
        else ukr_body(kc, ap, bp, c, ldc, mr, nr, accumulate, MR, NVH);
    } else {
        if (nr > 16 * NVH) ukr_body(kc, ap, bp, c, ldc, mr, nr, accumulate, MRH, NV);
        else ukr_body(kc, ap, bp, c, ldc, mr, nr, accumulate, MRH, NVH);
    }
}

/* r[0..15] (16 rows of 16) -> out[c] = column c (lane i = r[i][c]) */
RF_TARGET_AVX512
static inline void transpose16(__m512 out[16], const __m512 r[16]) {
    __m512 t[16], u[16];
    for (int i = 0; i < 8; i++) {
        t[2 * i] = _mm512_unpacklo_ps(r[2 * i], r[2 * i + 1]);
        t[2 * i + 1] = _mm512_unpackhi_ps(r[2 * i], r[2 * i + 1]);
    }
    /* u[4g + j], 128-bit lane L = rows 4g..4g+3 of column 4L + j */
    for (int g = 0; g < 4; g++) {
        __m512d t0 = _mm512_castps_pd(t[4 * g]), t1 = _mm512_castps_pd(t[4 * g + 1]);
        __m512d t2 = _mm512_castps_pd(t[4 * g + 2]), t3 = _mm512_castps_pd(t[4 * g + 3]);
        u[4 * g + 0] = _mm512_castpd_ps(_mm512_unpacklo_pd(t0, t2));
        u[4 * g + 1] = _mm512_castpd_ps(_mm512_unpackhi_pd(t0, t2));
        u[4 * g + 2] = _mm512_castpd_ps(_mm512_unpacklo_pd(t1, t3));
        u[4 * g + 3] = _mm512_castpd_ps(_mm512_unpackhi_pd(t1, t3));
    }
    for (int j = 0; j < 4; j++) {
        __m512 v0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0x88), w0 = _mm512_shuffle_f32x4(u[j], u[4 + j], 0xdd);
        __m512 v1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0x88), w1 = _mm512_shuffle_f32x4(u[8 + j], u[12 + j], 0xdd);
        out[j] = _mm512_shuffle_f32x4(v0, v1, 0x88);
        out[8 + j] = _mm512_shuffle_f32x4(v0, v1, 0xdd);
        out[4 + j] = _mm512_shuffle_f32x4(w0, w1, 0x88);
        out[12 + j] = _mm512_shuffle_f32x4(w0, w1, 0xdd);
    }
}

/* Ap micro-panels <- A (mc, kc): 16 x 16 in-register transposes of MR rows x 16 columns */
RF_TARGET_AVX512
void rf_sgemm_pack_a_avx512(float *restrict ap,       /* (ceil(mc/MR), kc, MR) out */
                            const float *restrict a,  /* (mc, kc), row stride lda */
                            int64_t lda, int64_t mc, int64_t kc) {
    if (MR > 16) {
        rf_pack_a_generic(ap, a, lda, mc, kc, MR);
        return;
    }
    const __mmask16 mr_mask = (__mmask16)((1u << MR) - 1u);
    for (int64_t i0 = 0; i0 < mc; i0 += MR) {
        int h = mc - i0 < MR ? (int)(mc - i0) : MR;
        float *dst = ap + (i0 / MR) * kc * MR;
        const float *src = a + i0 * lda;
        for (int64_t k = 0; k < kc; k += 16) {
            int n = kc - k < 16 ? (int)(kc - k) : 16;
            __mmask16 m = (__mmask16)((1u << n) - 1u);
            __m512 r[16], col[16];
            for (int i = 0; i < 16; i++)
                r[i] = i < h ? _mm512_maskz_loadu_ps(m, src + i * lda + k) : _mm512_setzero_ps();
            transpose16(col, r);
            for (int c = 0; c < n; c++) _mm512_mask_storeu_ps(dst + (k + c) * MR, mr_mask, col[c]);
        }
    }
}

/* Bp micro-panels <- B (kc, nc), row by row as rf_pack_b_generic (B read front to back):
 * per row of B, NR/16 vector copies into each full panel, then the edge panel masked
 * (zero-filled) */
RF_TARGET_AVX512
void rf_sgemm_pack_b_avx512(float *restrict bp,       /* (ceil(nc/NR), kc, NR) out, 64-byte aligned */
                            const float *restrict b,  /* (kc, nc), row stride ldb */
                            int64_t ldb, int64_t kc, int64_t nc) {
    const int64_t nfull = nc / NR, w = nc - nfull * NR;
    __mmask16 m[NV];
    for (int v = 0; v < NV; v++) {
        int64_t r = w - 16 * v;
        m[v] = r >= 16 ? (__mmask16)0xffff : r <= 0 ? (__mmask16)0 : (__mmask16)((1u << r) - 1u);
    }
    for (int64_t k = 0; k < kc; k++) {
        const float *src = b + k * ldb;
        float *dst = bp + k * NR;
        for (int64_t q = 0; q < nfull; q++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++)
                _mm512_store_ps(dst + q * kc * NR + 16 * v, _mm512_loadu_ps(src + q * NR + 16 * v));
        if (w)
            for (int v = 0; v < NV; v++)
                _mm512_store_ps(dst + nfull * kc * NR + 16 * v, _mm512_maskz_loadu_ps(m[v], src + nfull * NR + 16 * v));
    }
}

/* Y (MM,N) = X (MM,K) @ W (K,N) for MM <= 4 rows: R rows of W per pass over a chunk of
 * the MM rows of Y kept in L1, so W is read once, front to back (R row streams), and each
 * W vector feeds MM FMAs.  Registers: MM*R broadcasts of X, R vectors of W, 2 sums. */
RF_TARGET_AVX512
static inline __attribute__((always_inline))
void rows_kernel(float *restrict y,        /* (MM,N) out, row stride N */
                 const float *restrict x,  /* (MM,K), row stride K */
                 const float *restrict w,  /* (K,N) */
                 int64_t K, int64_t N, const int MM) {
    enum { R = 4, JB = 2048 };
    for (int64_t j0 = 0; j0 < N; j0 += JB) {
        int64_t j1 = j0 + JB < N ? j0 + JB : N;
        for (int m = 0; m < MM; m++)
            for (int64_t j = j0; j < j1; j += 16) {
                __mmask16 msk = j1 - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (j1 - j)) - 1u);
                _mm512_mask_storeu_ps(y + m * N + j, msk, _mm512_setzero_ps());
            }
        for (int64_t k = 0; k < K; k += R) {
            int nk = K - k < R ? (int)(K - k) : R;   /* rows of W this pass (the last may be short) */
            __m512 xr[4][R];
#pragma GCC unroll 4
            for (int m = 0; m < MM; m++)
#pragma GCC unroll 4
                for (int r = 0; r < R; r++) xr[m][r] = _mm512_set1_ps(r < nk ? x[m * K + k + r] : 0.0f);
            const float *wk = w + k * N;
            for (int64_t j = j0; j < j1; j += 16) {
                __mmask16 msk = j1 - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (j1 - j)) - 1u);
                __m512 wv[R];
#pragma GCC unroll 4
                for (int r = 0; r < R; r++)   /* rows past K read nothing and count 0 */
                    wv[r] = _mm512_maskz_loadu_ps(r < nk ? msk : (__mmask16)0, wk + r * N + j);
#pragma GCC unroll 4
                for (int m = 0; m < MM; m++) {
                    __m512 s0 = _mm512_maskz_loadu_ps(msk, y + m * N + j);
                    __m512 s1 = _mm512_mul_ps(xr[m][1], wv[1]);
                    s0 = _mm512_fmadd_ps(xr[m][0], wv[0], s0);
                    s0 = _mm512_fmadd_ps(xr[m][2], wv[2], s0);
                    s1 = _mm512_fmadd_ps(xr[m][3], wv[3], s1);
                    _mm512_mask_storeu_ps(y + m * N + j, msk, _mm512_add_ps(s0, s1));
                }
            }
        }
    }
}

/* y[j] = sum_k x[k] W[k,j] (M = 1): R = 8 rows of W per pass over a chunk of y kept in L1,
 * full vectors in the main loop; 8 row streams keep more loads in flight than rows_kernel */
RF_TARGET_AVX512
static void gemv(float *restrict y,        /* (N) out */
                 const float *restrict x,  /* (K) */
                 const float *restrict w,  /* (K,N) */
                 int64_t K, int64_t N, int stream) {
    enum { R = 8, JB = 4096 };
    for (int64_t j0 = 0; j0 < N; j0 += JB) {
        int64_t j1 = j0 + JB < N ? j0 + JB : N;
        for (int64_t j = j0; j < j1; j += 16) {
            __mmask16 m = j1 - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (j1 - j)) - 1u);
            _mm512_mask_storeu_ps(y + j, m, _mm512_setzero_ps());
        }
        int64_t k = 0;
        for (; k + R <= K; k += R) {
            __m512 xr[R];
#pragma GCC unroll 16
            for (int r = 0; r < R; r++) xr[r] = _mm512_set1_ps(x[k + r]);
            const float *wk = w + k * N;
            int64_t j = j0;
            const int pf = stream && k + 2 * R <= K;   /* prefetch the next R rows into L2 while this block runs */
            for (; j + 16 <= j1; j += 16) {
                if (pf) {
#pragma GCC unroll 16
                    for (int r = 0; r < R; r++) _mm_prefetch((const char *)(wk + (R + r) * N + j), _MM_HINT_T1);
                }
                __m512 s0 = _mm512_loadu_ps(y + j), s1 = _mm512_setzero_ps();
#pragma GCC unroll 16
                for (int r = 0; r < R; r += 2) {
                    s0 = _mm512_fmadd_ps(xr[r], _mm512_loadu_ps(wk + r * N + j), s0);
                    s1 = _mm512_fmadd_ps(xr[r + 1], _mm512_loadu_ps(wk + (r + 1) * N + j), s1);
                }
                _mm512_storeu_ps(y + j, _mm512_add_ps(s0, s1));
            }
            if (j < j1) {   /* the last < 16 columns of the chunk, masked */
                __mmask16 m = (__mmask16)((1u << (j1 - j)) - 1u);
                __m512 s0 = _mm512_maskz_loadu_ps(m, y + j);
#pragma GCC unroll 16
                for (int r = 0; r < R; r++)
                    s0 = _mm512_fmadd_ps(xr[r], _mm512_maskz_loadu_ps(m, wk + r * N + j), s0);
                _mm512_mask_storeu_ps(y + j, m, s0);
            }
        }
        for (; k < K; k++) {   /* the last < R rows, one at a time */
            __m512 xk = _mm512_set1_ps(x[k]);
            const float *wk = w + k * N;
            for (int64_t j = j0; j < j1; j += 16) {
                __mmask16 m = j1 - j >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << (j1 - j)) - 1u);
                __m512 s = _mm512_fmadd_ps(xk, _mm512_maskz_loadu_ps(m, wk + j), _mm512_maskz_loadu_ps(m, y + j));
                _mm512_mask_storeu_ps(y + j, m, s);
            }
        }
    }
}

/* Y (M,N) = X (M,K) @ W (K,N), no packing, M small: groups of up to 4 rows of X */
RF_TARGET_AVX512
void rf_sgemm_small_avx512(float *restrict y,        /* (M,N) out */
                           const float *restrict x,  /* (M,K) */
                           const float *restrict w,  /* (K,N) */
                           int64_t M, int64_t K, int64_t N, int stream) {
    int64_t i = 0;
    for (; i + 4 <= M; i += 4) rows_kernel(y + i * N, x + i * K, w, K, N, 4);
    switch (M - i) {
    case 3: rows_kernel(y + i * N, x + i * K, w, K, N, 3); break;
    case 2: rows_kernel(y + i * N, x + i * K, w, K, N, 2); break;
    case 1: gemv(y + i * N, x + i * K, w, K, N, stream); break;
    default: break;
    }
}

#endif
