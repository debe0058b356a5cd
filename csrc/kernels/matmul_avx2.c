/* AVX2+FMA float32 micro-kernel and GEMV (x86-64 only; per-function target attribute).
 * MR x NR tile in MR*NR/8 ymm accumulators (16 ymm registers: 6 x 16 uses 12). */
#include "_matmul.h"

#if defined(RF_X86)
#include <immintrin.h>

enum { MR = RF_MR(RF_SGEMM_AVX2), NR = RF_NR(RF_SGEMM_AVX2), NV = NR / 8 };

/* C[mr,nr] (+)= sum_k Ap[k, 0:mr]^T Bp[k, 0:nr] */
RF_TARGET_AVX2
void rf_sgemm_ukr_avx2(int64_t kc,
                       const float *restrict ap,  /* (kc, MR) packed */
                       const float *restrict bp,  /* (kc, NR) packed, 64-byte aligned */
                       float *restrict c,         /* (mr, nr), row stride ldc */
                       int64_t ldc, int mr, int nr, int accumulate) {
    /* the C tile is read or written only after the k loop: start fetching it now */
    for (int i = 0; i < mr; i++) {
        __builtin_prefetch(c + i * ldc, 1, 3);
        __builtin_prefetch(c + i * ldc + NR - 1, 1, 3);
    }
    __m256 acc[MR][NV];
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) acc[i][v] = _mm256_setzero_ps();
    for (int64_t k = 0; k < kc; k++) {
        __m256 bv[NV];
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) bv[v] = _mm256_load_ps(bp + k * NR + 8 * v);
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++) {
            __m256 ai = _mm256_broadcast_ss(ap + k * MR + i);
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) acc[i][v] = _mm256_fmadd_ps(ai, bv[v], acc[i][v]);
        }
    }
    if (mr == MR && nr == NR) {
#pragma GCC unroll 16
        for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
            for (int v = 0; v < NV; v++) {
                float *ci = c + i * ldc + 8 * v;
                _mm256_storeu_ps(ci, accumulate ? _mm256_add_ps(_mm256_loadu_ps(ci), acc[i][v]) : acc[i][v]);
            }
        return;
    }
    float tmp[MR * NR] __attribute__((aligned(32)));
#pragma GCC unroll 16
    for (int i = 0; i < MR; i++)
#pragma GCC unroll 4
        for (int v = 0; v < NV; v++) _mm256_store_ps(tmp + i * NR + 8 * v, acc[i][v]);
    rf_tile_writeback(c, ldc, tmp, NR, mr, nr, accumulate);
}

RF_TARGET_AVX2
void rf_sgemm_pack_a_avx2(float *ap, const float *a, int64_t lda, int64_t mc, int64_t kc) {
    rf_pack_a_generic(ap, a, lda, mc, kc, MR);
}

RF_TARGET_AVX2
void rf_sgemm_pack_b_avx2(float *bp, const float *b, int64_t ldb, int64_t kc, int64_t nc) {
    rf_pack_b_generic(bp, b, ldb, kc, nc, NR);
}

/* y[j] = sum_k x[k] W[k,j]: R rows of W per pass over a chunk of y kept in L1, so W is read
 * once, front to back (R row streams); scalar code for the last < 8 columns */
RF_TARGET_AVX2
static void rf_sgemv_avx2(float *restrict y,        /* (N) out */
                   const float *restrict x,  /* (K) */
                   const float *restrict w,  /* (K,N) */
                   int64_t K, int64_t N, int stream) {
    enum { R = 8, JB = 4096 };
    for (int64_t j0 = 0; j0 < N; j0 += JB) {
        int64_t j1 = j0 + JB < N ? j0 + JB : N;
        for (int64_t j = j0; j < j1; j++) y[j] = 0.0f;
        int64_t k = 0;
        for (; k + R <= K; k += R) {
            __m256 xr[R];
#pragma GCC unroll 16
            for (int r = 0; r < R; r++) xr[r] = _mm256_broadcast_ss(x + k + r);
            const float *wk = w + k * N;
            const int pf = stream && k + 2 * R <= K;   /* prefetch the next R rows into L2 while this block runs */
            int64_t j = j0;
            for (; j + 8 <= j1; j += 8) {
                if (pf && !((j - j0) & 15)) {       /* one prefetch per 64-byte line of each row */
#pragma GCC unroll 16
                    for (int r = 0; r < R; r++) __builtin_prefetch(wk + (R + r) * N + j, 0, 2);
                }
                __m256 s0 = _mm256_loadu_ps(y + j), s1 = _mm256_setzero_ps();
#pragma GCC unroll 16
                for (int r = 0; r < R; r += 2) {
                    s0 = _mm256_fmadd_ps(xr[r], _mm256_loadu_ps(wk + r * N + j), s0);
                    s1 = _mm256_fmadd_ps(xr[r + 1], _mm256_loadu_ps(wk + (r + 1) * N + j), s1);
                }
                _mm256_storeu_ps(y + j, _mm256_add_ps(s0, s1));
            }
            for (; j < j1; j++) {
                float s = y[j];
                for (int r = 0; r < R; r++) s = __builtin_fmaf(x[k + r], wk[r * N + j], s);
                y[j] = s;
            }
        }
        for (; k < K; k++) {   /* the last < R rows, one at a time */
            __m256 xk = _mm256_broadcast_ss(x + k);
            const float *wk = w + k * N;
            int64_t j = j0;
            for (; j + 8 <= j1; j += 8)
                _mm256_storeu_ps(y + j, _mm256_fmadd_ps(xk, _mm256_loadu_ps(wk + j), _mm256_loadu_ps(y + j)));
            for (; j < j1; j++) y[j] = __builtin_fmaf(x[k], wk[j], y[j]);
        }
    }
}

/* Y (M,N) = X (M,K) @ W (K,N) for small M: one GEMV per row of X */
RF_TARGET_AVX2
void rf_sgemm_small_avx2(float *restrict y,        /* (M,N) out */
                         const float *restrict x,  /* (M,K) */
                         const float *restrict w,  /* (K,N) */
                         int64_t M, int64_t K, int64_t N, int stream) {
    for (int64_t i = 0; i < M; i++) rf_sgemv_avx2(y + i * N, x + i * K, w, K, N, stream);
}
#endif
