/* Private: float32 GEMM framework <-> micro-kernels, and the block-size table.
 *
 * Packed layouts (Goto/BLIS):
 *   Ap: an MC x KC block of A as MR-tall micro-panels; panel p holds rows
 *       p*MR .. p*MR+MR-1, stored k-major: Ap[p*KC*MR + k*MR + i] (zero-padded rows).
 *   Bp: a KC x NC panel of B as NR-wide micro-panels; panel q holds columns
 *       q*NR .. q*NR+NR-1, stored k-major: Bp[q*kc*NR + k*NR + j] (zero-padded columns).
 * A micro-kernel computes the MR x NR tile Ap_panel (kc x MR)^T @ Bp_panel (kc x NR)
 * and stores (accumulate = 0) or adds (accumulate = 1) its top-left mr x nr corner
 * into C (row stride ldc).
 */
#ifndef REFIMPL__MATMUL_H
#define REFIMPL__MATMUL_H
#include <stdint.h>
#include "_dispatch.h"


/* C[mr,nr] (+)= Ap (kc, MR) ^T @ Bp (kc, NR) */
typedef void (*rf_sgemm_ukr_fn)(int64_t kc,
                                const float *ap,  /* (kc, MR) packed */
                                const float *bp,  /* (kc, NR) packed */
                                float *c,         /* (mr, nr) tile of C, row stride ldc */
                                int64_t ldc, int mr, int nr, int accumulate);
/* Ap (ceil(mc/MR) micro-panels of kc x MR) <- A block (mc, kc), row stride lda; zero-padded */
typedef void (*rf_pack_a_fn)(float *ap, const float *a, int64_t lda, int64_t mc, int64_t kc);
/* Bp (ceil(nc/NR) micro-panels of kc x NR) <- B block (kc, nc), row stride ldb; zero-padded */
typedef void (*rf_pack_b_fn)(float *bp, const float *b, int64_t ldb, int64_t kc, int64_t nc);
/* Y (M,N) = X (M,K) @ W (K,N) without packing, for M <= SMALL_M (M = 1 is the decode GEMV):
 * W is streamed once per group of rows of X */
typedef void (*rf_sgemm_small_fn)(float *y,        /* (M,N) out */
                                  const float *x,  /* (M,K) */
                                  const float *w,  /* (K,N) */
                                  int64_t M, int64_t K, int64_t N,
                                  int stream /* W comes from DRAM: prefetch ahead */);

/* ---- the block-size table: one row per SIMD path ----------------------------------
 * MR x NR register tile; KC inner block (Bp micro-panel KC*NR*4 bytes in L1 / L2),
 * MC rows of A per packed block (MC*KC*4 bytes in L2; used rounded down to a multiple
 * of MR), NC columns of B per panel (L3); M <= SMALL_M skips packing (small kernel).
 * Measured on Zen 4 (bench/matmul_tune.py); -DRF_SGEMM_<PATH>=... overrides a row.    */
/*                          MR  NR   KC   MC    NC  SMALL_M */
#ifndef RF_SGEMM_PORTABLE
#define RF_SGEMM_PORTABLE    2, 16, 256, 128, 4096, 4
#endif
#ifndef RF_SGEMM_AVX2
#define RF_SGEMM_AVX2        6, 16, 512, 144, 4096, 4
#endif
#ifndef RF_SGEMM_AVX512
#define RF_SGEMM_AVX512      8, 32, 512, 128, 4096, 8
#endif

#define RF_ARG1(a, ...) a
#define RF_ARG2(a, b, ...) b
#define RF_MR(row) RF_ARG1(row)
#define RF_NR(row) RF_ARG2(row)

typedef struct {
    const char *name;
    int mr, nr, kc, mc, nc, small_m;
    rf_sgemm_ukr_fn ukr;
    rf_pack_a_fn pack_a;
    rf_pack_b_fn pack_b;
    rf_sgemm_small_fn small;
} rf_sgemm_cfg;

void rf_sgemm_ukr_portable(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,
                           int mr, int nr, int accumulate);
void rf_sgemm_pack_a_portable(float *ap, const float *a, int64_t lda, int64_t mc, int64_t kc);
void rf_sgemm_pack_b_portable(float *bp, const float *b, int64_t ldb, int64_t kc, int64_t nc);
void rf_sgemm_small_portable(float *y, const float *x, const float *w, int64_t M, int64_t K, int64_t N,
                          int stream);
#if defined(RF_X86)
void rf_sgemm_ukr_avx2(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,
                       int mr, int nr, int accumulate);
void rf_sgemm_pack_a_avx2(float *ap, const float *a, int64_t lda, int64_t mc, int64_t kc);
void rf_sgemm_pack_b_avx2(float *bp, const float *b, int64_t ldb, int64_t kc, int64_t nc);
void rf_sgemm_small_avx2(float *y, const float *x, const float *w, int64_t M, int64_t K, int64_t N,
                          int stream);
void rf_sgemm_ukr_avx512(int64_t kc, const float *ap, const float *bp, float *c, int64_t ldc,
                         int mr, int nr, int accumulate);
void rf_sgemm_pack_a_avx512(float *ap, const float *a, int64_t lda, int64_t mc, int64_t kc);
void rf_sgemm_pack_b_avx512(float *bp, const float *b, int64_t ldb, int64_t kc, int64_t nc);
void rf_sgemm_small_avx512(float *y, const float *x, const float *w, int64_t M, int64_t K, int64_t N,
                          int stream);
#endif

/* generic packers (any MR / NR), the portable path's and the fallback of the others.
 * B is packed row by row: read front to back, one stream the hardware prefetcher follows
 * (a walk down each NR-wide column panel instead reads with a stride of ldb floats, and
 * ran ~10 % slower when B came from DRAM: 128 x 768 x 768, cold cache, AVX-512 path) */
static inline void rf_pack_b_generic(float *bp, const float *b, int64_t ldb, int64_t kc, int64_t nc, int NR) {
    for (int64_t k = 0; k < kc; k++) {
        const float *src = b + k * ldb;
        for (int64_t j0 = 0; j0 < nc; j0 += NR) {
            int64_t w = nc - j0 < NR ? nc - j0 : NR;
            float *dst = bp + (j0 / NR) * kc * NR + k * NR;
            for (int64_t j = 0; j < w; j++) dst[j] = src[j0 + j];
            for (int64_t j = w; j < NR; j++) dst[j] = 0.0f;
        }
    }
}

static inline void rf_pack_a_generic(float *ap, const float *a, int64_t lda, int64_t mc, int64_t kc, int MR) {
    for (int64_t i0 = 0; i0 < mc; i0 += MR) {
        int64_t h = mc - i0 < MR ? mc - i0 : MR;
        float *dst = ap + (i0 / MR) * kc * MR;
        const float *src = a + i0 * lda;
        for (int64_t k = 0; k < kc; k++) {
            for (int64_t i = 0; i < h; i++) dst[k * MR + i] = src[i * lda + k];
            for (int64_t i = h; i < MR; i++) dst[k * MR + i] = 0.0f;
        }
    }
}

/* store / add the mr x nr corner of a full MR x NR tile held in tmp (row stride nrfull) */
static inline void rf_tile_writeback(float *c, int64_t ldc, const float *tmp, int nrfull,
                                     int mr, int nr, int accumulate) {
    for (int i = 0; i < mr; i++)
        for (int j = 0; j < nr; j++)
            c[i * ldc + j] = accumulate ? c[i * ldc + j] + tmp[i * nrfull + j] : tmp[i * nrfull + j];
}
#endif
