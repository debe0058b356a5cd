/* Matrix product C = A @ B for row-major float32 / float64 operands.
 *
 * M = rows of A and C, K = inner size, N = columns of B and C.
 *
 * float32: rf_matmul_f32_ref (naive, the reference) and rf_matmul_f32, a
 * Goto/BLIS GEMM: five loops around a register-blocked micro-kernel,
 *     jc: NC columns of B -> pc: KC rows of B, pack Bp (KC x NC) ->
 *     ic: MC rows of A, pack Ap (MC x KC) -> jr: NR columns -> ir: MR rows -> ukr,
 * with the micro-kernel and block sizes of the SIMD path in force (_matmul.h table).
 * M = 1 (decode GEMV) and other small M run an unpacked kernel that streams B once
 * per group of rows.
 * float64: rf_matmul_f64, plain cache-blocked loops.
 */
#include "matmul.h"
#include "_matmul.h"

#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* ---------------------------------------------------------------- reference -- */

/* C[i,j] = sum_k A[i,k] B[k,j], k ascending, float accumulator */
void rf_matmul_f32_ref(float *c,        /* (M,N) out */
                       const float *a,  /* (M,K) */
                       const float *b,  /* (K,N) */
                       int64_t M, int64_t K, int64_t N) {
    for (int64_t i = 0; i < M; i++)
        for (int64_t j = 0; j < N; j++) {
            float s = 0.0f;
            for (int64_t k = 0; k < K; k++) s += a[i * K + k] * b[k * N + j];
            c[i * N + j] = s;
        }
}

/* ------------------------------------------------------------------ float64 -- */

/* C = A @ B: C zeroed, then C[i, j0:j1] += A[i,k] B[k, j0:j1] over k- and j-blocks */
void rf_matmul_f64(double *c,        /* (M,N) out */
                   const double *a,  /* (M,K) */
                   const double *b,  /* (K,N) */
                   int64_t M, int64_t K, int64_t N) {
    enum { KB = 128, JB = 512 };
    for (int64_t i = 0; i < M * N; i++) c[i] = 0.0;
    for (int64_t k0 = 0; k0 < K; k0 += KB) {
        int64_t k1 = k0 + KB < K ? k0 + KB : K;
        for (int64_t j0 = 0; j0 < N; j0 += JB) {
            int64_t j1 = j0 + JB < N ? j0 + JB : N;
            for (int64_t i = 0; i < M; i++) {
                double *ci = c + i * N;
                for (int64_t k = k0; k < k1; k++) {
                    double aik = a[i * K + k];
                    const double *bk = b + k * N;
                    for (int64_t j = j0; j < j1; j++) ci[j] += aik * bk[j];
                }
            }
        }
    }
}

/* ------------------------------------------------------- the block table -- */

#define RF_CFG(name, row, path) \
    { name, row, rf_sgemm_ukr_##path, rf_sgemm_pack_a_##path, rf_sgemm_pack_b_##path, rf_sgemm_small_##path }
static const rf_sgemm_cfg CFG_PORTABLE = RF_CFG("portable", RF_SGEMM_PORTABLE, portable);
#if defined(RF_X86)
static const rf_sgemm_cfg CFG_AVX2 = RF_CFG("avx2", RF_SGEMM_AVX2, avx2);
static const rf_sgemm_cfg CFG_AVX512 = RF_CFG("avx512", RF_SGEMM_AVX512, avx512);
#endif

static const rf_sgemm_cfg *cfg_in_force(void) {
#if defined(RF_X86)
    switch (rf_path()) {
    case RF_PATH_AVX512: return &CFG_AVX512;
    case RF_PATH_AVX2: return &CFG_AVX2;
    default: break;
    }
#endif
    return &CFG_PORTABLE;
}

const char *rf_matmul_f32_blocking(int64_t *out6) {
    const rf_sgemm_cfg *g = cfg_in_force();
    out6[0] = g->mr; out6[1] = g->nr; out6[2] = g->kc; out6[3] = g->mc; out6[4] = g->nc;
    out6[5] = g->small_m;
    return g->name;
}

/* ------------------------------------------------------- packing buffers -- */

/* one 64-byte aligned buffer per thread, kept between calls, grown on demand, and freed when
 * its thread exits (a pthread key's destructor: a pool that keeps starting threads would
 * otherwise leak one buffer, up to ~9 MB, per thread) */
static __thread float *tl_buf;
static __thread size_t tl_cap;   /* floats */
static pthread_key_t buf_key;
static pthread_once_t buf_once = PTHREAD_ONCE_INIT;
static int buf_key_ok;

static void buf_key_make(void) { buf_key_ok = pthread_key_create(&buf_key, free) == 0; }

static void set_buffer(float *p, size_t cap) {
    tl_buf = p;
    tl_cap = cap;
    pthread_once(&buf_once, buf_key_make);
    if (buf_key_ok) pthread_setspecific(buf_key, p);   /* the destructor frees what is held at exit */
}

static float *pack_buffer(size_t floats) {
    if (floats > tl_cap) {
        free(tl_buf);
        set_buffer(NULL, 0);
        size_t bytes = (floats * sizeof(float) + 63) / 64 * 64;
        float *p = aligned_alloc(64, bytes);
        if (!p) return NULL;
        set_buffer(p, bytes / sizeof(float));
    }
    return tl_buf;
}

void rf_matmul_release(void) {
    free(tl_buf);
    set_buffer(NULL, 0);
}

/* block size for n items: an even split into ceil(n/blk) blocks, rounded up to a multiple
 * of q, never above blk rounded down to a multiple of q (so packed buffers sized for it fit) */
static int64_t balanced(int64_t n, int64_t blk, int64_t q) {
    int64_t cap = blk / q * q;
    if (cap < q) cap = q;
    int64_t parts = (n + cap - 1) / cap;
    int64_t s = (n + parts - 1) / parts;
    s = (s + q - 1) / q * q;
    return s < cap ? s : cap;
}

/* ----------------------------------------------------------- the GEMM -- */

static void sgemm_packed(const rf_sgemm_cfg *g, float *c, const float *a, const float *b,
                         int64_t M, int64_t K, int64_t N) {
    const int MR = g->mr, NR = g->nr;
    const int64_t KC = balanced(K, g->kc, 1);
    const int64_t MC = balanced(M, g->mc, MR);
    const int64_t NC = g->nc;
    const int64_t ncmax = N < NC ? N : NC;
    const size_t a_floats = (size_t)MC * KC;
    const size_t b_floats = (size_t)KC * ((ncmax + NR - 1) / NR * NR);
    float *buf = pack_buffer(a_floats + b_floats + 16);
    if (!buf) {   /* out of memory: the reference path needs no buffer */
        rf_matmul_f32_ref(c, a, b, M, K, N);
        return;
    }
    float *ap = buf, *bp = buf + (a_floats + 15) / 16 * 16;
    for (int64_t jc = 0; jc < N; jc += NC) {
        int64_t nc = N - jc < NC ? N - jc : NC;
        for (int64_t pc = 0; pc < K; pc += KC) {
            int64_t kc = K - pc < KC ? K - pc : KC;
            g->pack_b(bp, b + pc * N + jc, N, kc, nc);
            for (int64_t ic = 0; ic < M; ic += MC) {
                int64_t mc = M - ic < MC ? M - ic : MC;
                g->pack_a(ap, a + ic * K + pc, K, mc, kc);
                for (int64_t jr = 0; jr < nc; jr += NR) {
                    int nr = nc - jr < NR ? (int)(nc - jr) : NR;
                    for (int64_t ir = 0; ir < mc; ir += MR) {
                        int mr = mc - ir < MR ? (int)(mc - ir) : MR;
                        g->ukr(kc, ap + (ir / MR) * kc * MR, bp + (jr / NR) * kc * NR,
                               c + (ic + ir) * N + jc + jr, N, mr, nr, pc > 0);
                    }
                }
            }
        }
    }
}

static void matmul_f32(float *c, const float *a, const float *b, int64_t M, int64_t K, int64_t N, int stream) {
    if (M <= 0 || N <= 0) return;
    if (K <= 0) {
        memset(c, 0, (size_t)M * (size_t)N * sizeof(float));
        return;
    }
    const rf_sgemm_cfg *g = cfg_in_force();
    if (M <= g->small_m) {   /* decode (M = 1) and other short A: stream B, no packing */
        g->small(c, a, b, M, K, N, stream);
        return;
    }
    sgemm_packed(g, c, a, b, M, K, N);
}

/* C = A @ B, float32, on the SIMD path in force */
void rf_matmul_f32(float *c,        /* (M,N) out */
                   const float *a,  /* (M,K) */
                   const float *b,  /* (K,N) */
                   int64_t M, int64_t K, int64_t N) {
    matmul_f32(c, a, b, M, K, N, 0);
}

/* the same, for B streamed from DRAM (a model's weights in decode): the GEMV prefetches ahead */
void rf_matmul_f32_stream(float *c,        /* (M,N) out */
                          const float *a,  /* (M,K) */
                          const float *b,  /* (K,N) */
                          int64_t M, int64_t K, int64_t N) {
    matmul_f32(c, a, b, M, K, N, 1);
}

/* ----------------------------------------------------------- thunks -- */

void rf_matmul_f32_thunk(void *ctx) {
    rf_matmul_f32_args *p = ctx;
    rf_matmul_f32(p->c, p->a, p->b, p->M, p->K, p->N);
}

void rf_matmul_f32_ref_thunk(void *ctx) {
    rf_matmul_f32_args *p = ctx;
    rf_matmul_f32_ref(p->c, p->a, p->b, p->M, p->K, p->N);
}

void rf_matmul_f64_thunk(void *ctx) {
    rf_matmul_f64_args *p = ctx;
    rf_matmul_f64(p->c, p->a, p->b, p->M, p->K, p->N);
}
