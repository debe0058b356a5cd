/* Portable C float32 micro-kernel and GEMV (plain C the compiler may autovectorize;
 * builds on any target).  MR x NR from the RF_SGEMM_PORTABLE row of _matmul.h. */
#include "_matmul.h"

enum { MR = RF_MR(RF_SGEMM_PORTABLE), NR = RF_NR(RF_SGEMM_PORTABLE) };

/* C[mr,nr] (+)= sum_k Ap[k, 0:mr]^T Bp[k, 0:nr] */
void rf_sgemm_ukr_portable(int64_t kc,
                           const float *restrict ap,  /* (kc, MR) packed */
                           const float *restrict bp,  /* (kc, NR) packed */
                           float *restrict c,         /* (mr, nr), row stride ldc */
                           int64_t ldc, int mr, int nr, int accumulate) {
    float acc[MR][NR];
    for (int i = 0; i < MR; i++)
        for (int j = 0; j < NR; j++) acc[i][j] = 0.0f;
    for (int64_t k = 0; k < kc; k++) {
        const float *bk = bp + k * NR;
        for (int i = 0; i < MR; i++) {
            float ai = ap[k * MR + i];
            for (int j = 0; j < NR; j++) acc[i][j] += ai * bk[j];
        }
    }
    rf_tile_writeback(c, ldc, &acc[0][0], NR, mr, nr, accumulate);
}

void rf_sgemm_pack_a_portable(float *ap, const float *a, int64_t lda, int64_t mc, int64_t kc) {
    rf_pack_a_generic(ap, a, lda, mc, kc, MR);
}

void rf_sgemm_pack_b_portable(float *bp, const float *b, int64_t ldb, int64_t kc, int64_t nc) {
    rf_pack_b_generic(bp, b, ldb, kc, nc, NR);
}

/* y[j] = sum_k x[k] W[k,j]: 4 rows of W per pass over a chunk of y kept in L1, so W is
 * read once, front to back */
static void rf_sgemv_portable(float *restrict y,        /* (N) out */
                       const float *restrict x,  /* (K) */
                       const float *restrict w,  /* (K,N) */
                       int64_t K, int64_t N) {
    enum { JB = 4096 };
    for (int64_t j0 = 0; j0 < N; j0 += JB) {
        int64_t j1 = j0 + JB < N ? j0 + JB : N;
        for (int64_t j = j0; j < j1; j++) y[j] = 0.0f;
        int64_t k = 0;
        for (; k + 4 <= K; k += 4) {
            const float x0 = x[k], x1 = x[k + 1], x2 = x[k + 2], x3 = x[k + 3];
            const float *w0 = w + k * N, *w1 = w0 + N, *w2 = w1 + N, *w3 = w2 + N;
            for (int64_t j = j0; j < j1; j++) y[j] += (x0 * w0[j] + x1 * w1[j]) + (x2 * w2[j] + x3 * w3[j]);
        }
        for (; k < K; k++) {
            const float xk = x[k], *wk = w + k * N;
            for (int64_t j = j0; j < j1; j++) y[j] += xk * wk[j];
        }
    }
}

/* Y (M,N) = X (M,K) @ W (K,N) for small M: one GEMV per row of X */
void rf_sgemm_small_portable(float *restrict y,        /* (M,N) out */
                             const float *restrict x,  /* (M,K) */
                             const float *restrict w,  /* (K,N) */
                             int64_t M, int64_t K, int64_t N, int stream) {
    (void)stream;   /* plain C: the hardware prefetcher only */
    for (int64_t i = 0; i < M; i++) rf_sgemv_portable(y + i * N, x + i * K, w, K, N);
}
