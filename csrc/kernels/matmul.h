/* refimpl._kernels: matrix product C = A @ B, row-major (C-contiguous) operands.
 *
 * Letters: M = rows of A and C, K = inner size, N = columns of B and C.
 * Every function writes all M*N outputs (K = 0 gives zeros); sizes may be 0.
 * The output must not overlap an input (the Python wrapper checks).
 */
#ifndef REFIMPL_MATMUL_H
#define REFIMPL_MATMUL_H
#include <stdint.h>

/* naive triple loop: C[i,j] = sum_k A[i,k] B[k,j]; the reference and fallback */
void rf_matmul_f32_ref(float *c,        /* (M,N) out */
                       const float *a,  /* (M,K) */
                       const float *b,  /* (K,N) */
                       int64_t M, int64_t K, int64_t N);

/* C = A @ B, float32: packed Goto/BLIS GEMM (GEMV when M = 1), SIMD path chosen by rf_path() */
void rf_matmul_f32(float *c,        /* (M,N) out */
                   const float *a,  /* (M,K) */
                   const float *b,  /* (K,N) */
                   int64_t M, int64_t K, int64_t N);
/* the same, for B streamed from memory once per call (a model's weights in decode, larger than the
 * caches together): the M-small path prefetches the next rows of B into L2 ahead of use, which pays
 * off from DRAM and costs ~15% when B already sits in L3 */
void rf_matmul_f32_stream(float *c,        /* (M,N) out */
                          const float *a,  /* (M,K) */
                          const float *b,  /* (K,N) */
                          int64_t M, int64_t K, int64_t N);

/* C = A @ B, float64: cache-blocked loops (correct, not tuned) */
void rf_matmul_f64(double *c,        /* (M,N) out */
                   const double *a,  /* (M,K) */
                   const double *b,  /* (K,N) */
                   int64_t M, int64_t K, int64_t N);

/* packed arguments for the timing thunks: the clock calls thunk(&args) from a C loop */
typedef struct {
    float *c;          /* (M,N) out */
    const float *a;    /* (M,K) */
    const float *b;    /* (K,N) */
    int64_t M, K, N;
} rf_matmul_f32_args;

typedef struct {
    double *c;         /* (M,N) out */
    const double *a;   /* (M,K) */
    const double *b;   /* (K,N) */
    int64_t M, K, N;
} rf_matmul_f64_args;

/* rf_matmul_f32(args->c, args->a, args->b, args->M, args->K, args->N) */
void rf_matmul_f32_thunk(void *ctx);
/* rf_matmul_f64(args->c, args->a, args->b, args->M, args->K, args->N) */
void rf_matmul_f64_thunk(void *ctx);
/* rf_matmul_f32_ref(...) through the same argument struct */
void rf_matmul_f32_ref_thunk(void *ctx);

/* block sizes the float32 path in force uses: {MR, NR, KC, MC, NC, SMALL_M}; returns its name */
const char *rf_matmul_f32_blocking(int64_t *out6 /* (6,) out */);
/* free this thread's packing buffers (they are kept between calls and regrown on demand) */
void rf_matmul_release(void);
#endif
