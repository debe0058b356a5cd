/* Row softmax, float32.  R = rows, N = row length.
 *   out[r, i] = exp(x[r, i] - m_r) / sum_j exp(x[r, j] - m_r),   m_r = max_j x[r, j]
 * Special values (the oracle's rules, refimpl.oracle.layers.softmax): -inf -> exactly 0;
 * a fully -inf row -> all zeros; a NaN anywhere -> the whole row NaN; +inf -> NaN row
 * (inf - inf).  Logits near +-3e38 cannot overflow: x - m <= 0 always and a difference
 * that overflows to -inf correctly gives exp = 0.
 * A NaN (or +inf, giving inf - inf) makes the sum NaN, hence the whole row NaN.
 * Fast path, per row: pass A over chunks of 4096 floats (16 KiB, stays in L1): chunk max,
 * out = exp(x - chunk max), chunk sum, combined into the row's (max M, sum S); pass B
 * scales each chunk by exp(chunk max - M) / S.  Rows up to 4096 are the classic three passes.
 * The exp loop is bound by the FMA pipes (about 9 FMA-pipe operations per vector) and leaves
 * loads, stores and the max pipes idle, so the two cheap passes ride along with it: while
 * chunk c of row r is exponentiated, the max of the next chunk (or row: rows are contiguous) is
 * taken and chunk c of row r - 1 gets its pass-B factor (the last row is scaled on its own).
 * Measured (1 thread, AVX-512, 64-byte aligned): (256, 4096) 0.88 -> 0.71 core cycles per
 * element, (64, 32000) 0.95 -> 0.82-0.85 (x and out do not fit L2 there: L3 traffic dominates).
 * The arithmetic is exactly that of three separate passes (same results, bit for bit).
 * Alignment: NumPy's large arrays start 16 bytes past a 64-byte line, so every 512-bit access
 * of a row would split a line (every other 256-bit one).  A chunk of >= RF_SM_PEEL_MIN floats
 * first does a head of h < RF_VW floats as one masked vector, so that the body's accesses to
 * out (and to x when it shares out's offset, as NumPy's do) are aligned; the chunk's last
 * L - h mod RF_VW floats are a masked vector too.  Shorter chunks do not peel: head and tail
 * cost about one vector's exp, more than the splits save there (AVX2, half the accesses
 * split: >= 2048).  Measured (1 thread, x and out both 16 bytes past a line, median of the old
 * and new kernel timed in alternation): AVX-512 (256, 4096) 242 -> 210 us, (256, 1024) 59 -> 57,
 * (64, 32000) 5-10% faster; AVX2 (256, 4096) 423 -> 391, (128, 2048) 107 -> 98.  Unchanged when
 * out is already aligned; x at another offset than out still splits its loads.  Masked tails
 * (formerly scalar copies) also made rows with one faster: AVX-512 (4096, 60) 358 -> 213 us.
 * Large outputs (> RF_SM_NT_BYTES = 4 MiB, rows of 1024 .. 65536 floats, AVX-512 / AVX2): pass A
 * writes e = exp(x - chunk max) into two scratch rows (2 N floats, malloc'ed per call, alternating
 * between rows, so they stay in L2) instead of into out, and the deferred pass B writes
 * e * factor to out with non-temporal (streaming) stores: out is then only written, never read,
 * and never allocated in the caches: 2 line transfers per line of out (x in, out out) instead of 3
 * (x in, read-for-ownership of out, write-back).  The arithmetic is the same, bit for bit.
 * Threshold: x + out > 8 MiB, a quarter of the 32 MiB L3 (the fraction glibc >= 2.38 uses for
 * memcpy's non-temporal threshold; a constant because cpuid/sysconf report the L3 wrongly under
 * this KVM guest (sysconf says 320 MiB) and the L3 is shared with other guests anyway).  The price:
 * a consumer reading out right after misses in the caches (out is in DRAM), so small outputs that
 * would stay cached keep plain stores.  Measured (1 thread, AVX-512, same x and out buffers as the
 * bench, old and new kernel timed in alternation, medians of 30-80): (64, 32000) 7.8 MiB out
 * 12-35 % faster (2.63M -> 1.71M ticks on one run, 3.38M -> 2.97M on another); (48, 32000)
 * 5.9 MiB 14 % faster; (256, 4096) 4 MiB and (32, 32000) even (so left on plain stores, for the
 * consumer's sake); (16, 32000) and (128, 4096), 2 MiB, 7-15 % slower (x and out stay in L3: the
 * stream to DRAM costs more than the read-for-ownership it saves).  Everything evicted before each
 * call (a 48 MiB buffer written in between): even within 5 % at 2-8 MiB.
 * Tried and dropped: a software prefetch of the next chunk 4 or 16 KiB ahead (no change: the
 * hardware prefetchers already follow the contiguous rows).
 * Error: sum of N exponentials (N+1)u, exp <= EXP_ULPS, reciprocal and product 2u; rows of
 * several chunks add 3u (expf, product, division), inside the (N+3)u term since N > 4096.
 * Within contracts.softmax_bound. */
#ifndef RF_SM_CHUNK
#define RF_SM_CHUNK 4096       /* floats per chunk: 16 KiB, half of Zen 4's 32 KiB L1d */
#define RF_SM_MAXCHUNKS 256    /* rows longer than 256 chunks (1M floats) use one chunk */
#endif
#ifndef RF_SM_PEEL_MIN             /* chunks this long (floats) peel an aligning head */
#define RF_SM_PEEL_MIN (RF_VW == 8 ? 2048 : 1024)   /* AVX2: at 1024 the head costs what it saves */
#endif
#ifndef RF_SM_ALIGNED
#define RF_SM_ALIGNED y            /* the pointer the head peeling aligns (y: the stores) */
#endif
#ifndef RF_SM_NT_BYTES              /* outputs larger than this (bytes) take the streaming route */
#define RF_SM_NT_BYTES (4u << 20)   /* x + out > 8 MiB, a quarter of the L3 (reasoning above) */
#endif
#ifndef RF_SM_NT_MIN_N              /* ... if their rows are this long (floats; per chunk, a head and */
#define RF_SM_NT_MIN_N 1024         /* a tail are plain stores, shorter rows would stream little) */
#endif
#ifndef RF_SM_NT_MAX_N              /* ... and at most this long: the 2 scratch rows (512 KiB) stay */
#define RF_SM_NT_MAX_N 65536        /* within half of Zen 4's 1 MiB L2 */
#endif
#ifdef RF_VW
/* ======== SIMD body, compiled once per path (see _vmath.h) ======== */

/* floats from p to the next vector boundary (RF_VW floats, 4 RF_VW bytes), at most n: peeling
 * that many first makes every later full-vector access through p aligned, none splits a line */
RF_INL int64_t V(head_len)(const void *p, int64_t n) {
    int64_t h = (int64_t)((-(uintptr_t)p) & (sizeof(vf) - 1)) / (int64_t)sizeof(float);
    return h < n ? h : n;
}
/* p[0 .. n-1] (0 <= n < RF_VW) in the first lanes, `fill` in the others; p[n ..] is not read */
RF_INL vf V(vld_part)(const float *p /* (n,) */, int64_t n, float fill) {
#if defined(__x86_64__) && RF_VW == 16
    return (vf)_mm512_mask_loadu_ps((__m512)V(vset1)(fill), (__mmask16)((1u << n) - 1u), p);
#elif defined(__x86_64__) && RF_VW == 8
    const vi k = (vi){0, 1, 2, 3, 4, 5, 6, 7} < (int32_t)n;
    return V(vsel)(k, (vf)_mm256_maskload_ps(p, (__m256i)k), V(vset1)(fill));
#else
    vf v = V(vset1)(fill);
    for (int64_t k = 0; k < n; k++) v[k] = p[k];
    return v;
#endif
}
/* p[0 .. n-1] = the first n lanes of v (0 <= n < RF_VW); p[n ..] is not written (AVX2's
 * vmaskmovps store is slower on Zen 4 than the scalar stores) */
RF_INL void V(vst_part)(float *p /* (n,) */, vf v, int64_t n) {
#if defined(__x86_64__) && RF_VW == 16
    _mm512_mask_storeu_ps(p, (__mmask16)((1u << n) - 1u), (__m512)v);
#else
    for (int64_t k = 0; k < n; k++) p[k] = v[k];
#endif
}

/* max of x[0 .. L-1], NaN ignored (-inf if nothing else) */
static float V(chunk_max)(const float *x /* (L,) */, int64_t L) {
    const vf ninf = V(vset1)(-INFINITY);
    vf m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    int64_t i = 0;
    for (; i + 4 * RF_VW <= L; i += 4 * RF_VW) {
        m0 = V(vmax)(m0, V(vld)(x + i));
        m1 = V(vmax)(m1, V(vld)(x + i + RF_VW));
        m2 = V(vmax)(m2, V(vld)(x + i + 2 * RF_VW));
        m3 = V(vmax)(m3, V(vld)(x + i + 3 * RF_VW));
    }
    for (; i + RF_VW <= L; i += RF_VW) m0 = V(vmax)(m0, V(vld)(x + i));
    float m = V(hmax)(V(vmax)(V(vmax)(m0, m1), V(vmax)(m2, m3)));
    for (; i < L; i++) m = x[i] > m ? x[i] : m;
    return m;
}

/* non-temporal store of one vector to p, which must be vector aligned (RF_VW floats); the
 * portable path has none (plain store) and never takes the streaming route */
RF_INL void V(vst_nt)(float *p, vf v) {
#if defined(__x86_64__) && RF_VW == 16
    _mm512_stream_ps(p, (__m512)v);
#elif defined(__x86_64__) && RF_VW == 8
    _mm256_stream_ps(p, (__m256)v);
#else
    V(vst)(p, v);
#endif
}

/* op[0 .. L-1] = yp[0 .. L-1] * f (op == yp: in place), the body's stores streamed if nt (op + h
 * aligned by the head; nt requires L >= RF_VW or nothing is streamed) */
RF_INL void V(scale_chunk_)(float *op /* (L,) */, const float *yp /* (L,) */, int64_t L, float f, const int nt) {
    const vf vf_ = V(vset1)(f);
    int64_t i = nt || L >= RF_SM_PEEL_MIN ? V(head_len)(op, L) : 0;
    if (i) V(vst_part)(op, V(vld_part)(yp, i, 0.0f) * vf_, i);
    if (nt) for (; i + RF_VW <= L; i += RF_VW) V(vst_nt)(op + i, V(vld)(yp + i) * vf_);
    else for (; i + RF_VW <= L; i += RF_VW) V(vst)(op + i, V(vld)(yp + i) * vf_);
    if (i < L) V(vst_part)(op + i, V(vld_part)(yp + i, L - i, 0.0f) * vf_, L - i);
}
static void V(scale_chunk)(float *yp /* (L,) */, int64_t L, float f) { V(scale_chunk_)(yp, yp, L, f, 0); }

/* one chunk (L <= RF_SM_CHUNK floats) whose max is m: e = exp(x - m) into y, returns sum e (NaN if
 * x holds a NaN or +inf).  The exp loop is bound by the FMA pipes and leaves loads, stores and the
 * max pipes idle, so two more jobs ride along:
 *   *mn = max of the next Ln floats x[L .. L + Ln - 1] (the next chunk, or the next row: rows are
 *         contiguous), the first pass of the next chunk;
 *   op[0 .. L-1] = yp[0 .. L-1] * fp (yp != NULL): the final scaling of the same chunk of the
 *         previous row, in place (op == yp) or, nt = 1, from the scratch row yp to out with
 *         streaming stores.
 * Alignment: the first h < RF_VW floats (a head, masked vectors) take y + h (nt: op + h, which the
 * streaming stores require) to a vector boundary, so the body's stores to y and, in the usual case
 * where the buffers share their offset and the row length is a multiple of RF_VW, its loads of x,
 * xn and yp are aligned: NumPy's large arrays start 16 bytes past a 64-byte line, where every
 * 512-bit access would split a line.
 * m = -inf (nothing finite): y = 0, the sum 0 or NaN. */
RF_INL float V(softmax_chunk_)(float *y /* (L,) */, const float *x /* (L,) */, int64_t L, float m, int64_t Ln,
                               float *mn, const float *yp /* (L,) or NULL */, float fp, float *op /* (L,) */,
                               const int nt) {
    const vf ninf = V(vset1)(-INFINITY), zero = V(vset1)(0.0f);
    const float *xn = x + L;           /* (Ln,) the next chunk */
    if (m == -INFINITY || !yp) {       /* no previous chunk to scale: do it (or nothing) apart */
        if (yp) V(scale_chunk_)(op, yp, L, fp, nt);
        yp = NULL;
    }
    if (m == -INFINITY) {              /* nothing finite: zeros, or NaN if a NaN is there */
        /* (an int flag: GCC 12 -O3 vectorizes `fill = x[j] != x[j] ? NAN : fill` into a loop that
         * returns 0 when the NaN is not at x[0], which left masked rows holding a NaN at zero) */
        int nan = 0;
        for (int64_t j = 0; j < L; j++) { nan |= x[j] != x[j]; y[j] = 0.0f; }
        *mn = Ln > 0 ? V(chunk_max)(xn, Ln) : -INFINITY;
        return nan ? NAN : 0.0f;       /* NaN makes the row's sum NaN */
    }
    const vf vm = V(vset1)(m), vfp = V(vset1)(fp);
    vf s0 = zero, s1 = zero, s2 = zero, s3 = zero;
    vf m0 = ninf, m1 = ninf, m2 = ninf, m3 = ninf;
    /* head x[0 .. h-1], padded with -inf (exp -> 0) so the same vector exp is used */
    const int64_t h = nt && yp ? V(head_len)(op, L) : L >= RF_SM_PEEL_MIN ? V(head_len)(RF_SM_ALIGNED, L) : 0;
    if (h) {
        s2 = V(vexp_flush)(V(vld_part)(x, h, -INFINITY) - vm);
        V(vst_part)(y, s2, h);
        m0 = V(vld_part)(xn, h < Ln ? h : Ln, -INFINITY);
        if (yp) V(vst_part)(op, V(vld_part)(yp, h, 0.0f) * vfp, h);
    }
    const int64_t Lmin = L < Ln ? L : Ln;
    const int64_t Lf = Lmin > h ? h + (Lmin - h) / (4 * RF_VW) * (4 * RF_VW) : h;   /* max of xn fused */
    const int64_t L4 = h + (L - h) / (4 * RF_VW) * (4 * RF_VW);
    int64_t i = h;
#define RF_SM_EXP4                                                                                  \
    vf a = V(vexp_flush)(V(vld)(x + i) - vm), b = V(vexp_flush)(V(vld)(x + i + RF_VW) - vm);       \
    vf c = V(vexp_flush)(V(vld)(x + i + 2 * RF_VW) - vm), d = V(vexp_flush)(V(vld)(x + i + 3 * RF_VW) - vm); \
    V(vst)(y + i, a); V(vst)(y + i + RF_VW, b);                                                     \
    V(vst)(y + i + 2 * RF_VW, c); V(vst)(y + i + 3 * RF_VW, d);                                     \
    s0 += a; s1 += b; s2 += c; s3 += d;
#define RF_SM_MAX4                                                                                  \
    m0 = V(vmax)(m0, V(vld)(xn + i)); m1 = V(vmax)(m1, V(vld)(xn + i + RF_VW));                     \
    m2 = V(vmax)(m2, V(vld)(xn + i + 2 * RF_VW)); m3 = V(vmax)(m3, V(vld)(xn + i + 3 * RF_VW));
#define RF_SM_SCALE4                                                                                \
    for (int k = 0; k < 4 * RF_VW; k += RF_VW) {                                                    \
        if (nt) V(vst_nt)(op + i + k, V(vld)(yp + i + k) * vfp);                                    \
        else V(vst)(op + i + k, V(vld)(yp + i + k) * vfp);                                          \
    }
    if (yp) {
        for (; i < Lf; i += 4 * RF_VW) { RF_SM_EXP4 RF_SM_MAX4 RF_SM_SCALE4 }
        for (; i < L4; i += 4 * RF_VW) { RF_SM_EXP4 RF_SM_SCALE4 }
    } else {
        for (; i < Lf; i += 4 * RF_VW) { RF_SM_EXP4 RF_SM_MAX4 }
        for (; i < L4; i += 4 * RF_VW) { RF_SM_EXP4 }
    }
#undef RF_SM_EXP4
#undef RF_SM_MAX4
#undef RF_SM_SCALE4
    /* the last vectors and the tail (padded with -inf as the head), the same three jobs; the
     * max of xn goes on with them if the next chunk is at least as long (Lf = L4 then) */
    const int fuse = Ln >= L;
    for (; i + RF_VW <= L; i += RF_VW) {
        vf a = V(vexp_flush)(V(vld)(x + i) - vm);
        V(vst)(y + i, a);
        s0 += a;
        if (fuse) m1 = V(vmax)(m1, V(vld)(xn + i));
        if (yp) {
            if (nt) V(vst_nt)(op + i, V(vld)(yp + i) * vfp);
            else V(vst)(op + i, V(vld)(yp + i) * vfp);
        }
    }
    if (i < L) {
        vf a = V(vexp_flush)(V(vld_part)(x + i, L - i, -INFINITY) - vm);
        V(vst_part)(y + i, a, L - i);
        s1 += a;
        if (fuse) m2 = V(vmax)(m2, V(vld_part)(xn + i, L - i, -INFINITY));
        if (yp) V(vst_part)(op + i, V(vld_part)(yp + i, L - i, 0.0f) * vfp, L - i);
    }
    /* the rest of the next chunk's max */
    float mx = V(hmax)(V(vmax)(V(vmax)(m0, m1), V(vmax)(m2, m3)));
    const int64_t done = fuse ? L : Lf;                    /* xn[0 .. done-1] is in mx */
    if (done < Ln) {
        float mr = V(chunk_max)(xn + done, Ln - done);
        mx = mr > mx ? mr : mx;
    }
    *mn = mx;
    return V(hsum)((s0 + s1) + (s2 + s3));
}

/* the rows; nt = 1: pass A writes e into the scratch rows sc (2 rows of N floats, alternating: they
 * stay in L2) and the deferred pass B streams e * factor from there to out, so out is only written,
 * never read (no read-for-ownership: 2 line transfers per line of out instead of 3) */
RF_INL void V(softmax_rows_)(float *out /* (R,N) */, const float *x /* (R,N) */, int64_t R, int64_t N,
                             float *sc /* (2,N) or unused */, const int nt) {
    float mc[RF_SM_MAXCHUNKS];         /* chunk maxima of the current row */
    float fprev[RF_SM_MAXCHUNKS];      /* final factors of the previous row's chunks, not applied yet */
    int64_t nc = (N + RF_SM_CHUNK - 1) / RF_SM_CHUNK;
    int64_t C = nc <= RF_SM_MAXCHUNKS ? RF_SM_CHUNK : N;   /* one chunk for very long rows */
    if (C == N) nc = 1;
    float mnext = V(chunk_max)(x, N < C ? N : C);          /* max of the first chunk */
    int pending = 0;                   /* row r - 1 still needs its factors fprev */
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * N;   /* (N,) */
        float *yr = out + r * N;       /* (N,) the result */
        float *er = nt ? sc + (r & 1) * N : yr;            /* (N,) pass A's e = exp(x - mc) */
        float *ep = nt ? sc + ((r + 1) & 1) * N : r ? yr - N : yr;   /* (N,) the previous row's e */
        /* pass A, per chunk: its max mc (found while the previous chunk was exponentiated),
         * e = exp(x - mc), running M = max mc and S = sum over chunks of sc exp(mc - M);
         * meanwhile the same chunk of row r - 1 gets its factor */
        float M = -INFINITY, S = 0.0f;
        for (int64_t c = 0; c < nc; c++) {
            int64_t c0 = c * C, L = N - c0 < C ? N - c0 : C;
            int64_t Ln = c + 1 < nc ? (N - c0 - L < C ? N - c0 - L : C)     /* next chunk of this row */
                                    : (r + 1 < R ? (N < C ? N : C) : 0);     /* first chunk of the next row */
            float m = mnext, s = V(softmax_chunk_)(er + c0, xr + c0, L, m, Ln, &mnext,
                                                   pending ? ep + c0 : NULL, pending ? fprev[c] : 1.0f,
                                                   pending ? yr - N + c0 : yr, nt);
            mc[c] = m;
            if (m > M) { S = S * expf(M - m) + s; M = m; }
            else S += m == -INFINITY ? s : s * expf(m - M);
        }
        pending = 0;
        if (M == -INFINITY) {           /* fully masked row: zeros (NaN if it held a NaN) */
            if (S != S || nt) for (int64_t j = 0; j < N; j++) yr[j] = S != S ? NAN : 0.0f;
            continue;
        }
        /* pass B, deferred to the next row's pass A: out = e exp(mc - M) / S per chunk (a NaN S
         * makes the row NaN) */
        for (int64_t c = 0; c < nc; c++)
            fprev[c] = nc == 1 ? 1.0f / S : (mc[c] == -INFINITY ? 0.0f : expf(mc[c] - M)) / S;
        pending = 1;
    }
    if (pending) {                     /* the last row */
        float *yr = out + (R - 1) * N, *er = nt ? sc + ((R - 1) & 1) * N : yr;
        for (int64_t c = 0; c < nc; c++) {
            int64_t c0 = c * C, L = N - c0 < C ? N - c0 : C;
            V(scale_chunk_)(yr + c0, er + c0, L, fprev[c], nt);
        }
    }
#if defined(__x86_64__)
    if (nt) _mm_sfence();              /* the streamed stores are ordered before later stores */
#endif
}

static void V(softmax_rows)(float *out /* (R,N) */, const float *x /* (R,N) */, int64_t R, int64_t N) {
    V(softmax_rows_)(out, x, R, N, NULL, 0);
}
static void V(softmax_rows_nt)(float *out /* (R,N) */, const float *x /* (R,N) */, int64_t R, int64_t N,
                               float *sc /* (2,N) */) {
    V(softmax_rows_)(out, x, R, N, sc, 1);
}
#else
/* ======== common part: reference, dispatch, thunk ======== */
#include <math.h>
#include <stdlib.h>
#include "softmax.h"
#include "_dispatch.h"
#define RF_SELF "softmax.c"
#include "_vmath.h"

/* naive: per row max, expf, sum, divide */
void rf_softmax_f32_ref(float *out /* (R,N) */, const float *x /* (R,N) */, int64_t R, int64_t N) {
    for (int64_t r = 0; r < R; r++) {
        const float *xr = x + r * N;
        float *yr = out + r * N;
        float m = -INFINITY;
        int nan = 0;
        for (int64_t i = 0; i < N; i++) {
            if (isnan(xr[i])) nan = 1;
            else if (xr[i] > m) m = xr[i];
        }
        if (nan || m == -INFINITY) {
            for (int64_t i = 0; i < N; i++) yr[i] = nan ? NAN : 0.0f;
            continue;
        }
        float s = 0.0f;
        for (int64_t i = 0; i < N; i++) { yr[i] = expf(xr[i] - m); s += yr[i]; }
        for (int64_t i = 0; i < N; i++) yr[i] /= s;
    }
}

void rf_softmax_f32(float *out, const float *x, int64_t R, int64_t N) {
#if defined(__x86_64__)
    int path = rf_path();
    if ((path == RF_PATH_AVX512 || path == RF_PATH_AVX2) && R >= 2 && N >= RF_SM_NT_MIN_N
        && N <= RF_SM_NT_MAX_N && (uint64_t)R * (uint64_t)N * sizeof(float) > (uint64_t)RF_SM_NT_BYTES) {
        float *raw = malloc((size_t)(2 * N + 16) * sizeof(float));
        if (raw) {                     /* else: the in-place route below */
            /* the scratch rows at out's offset within a 64-byte line (the body's accesses align) */
            float *sc = raw + (((uintptr_t)out - (uintptr_t)raw) & 63) / sizeof(float);
            if (path == RF_PATH_AVX512) softmax_rows_nt_avx512(out, x, R, N, sc);
            else softmax_rows_nt_avx2(out, x, R, N, sc);
            free(raw);
            return;
        }
    }
#endif
    RF_DISPATCH(softmax_rows, out, x, R, N);
}

void rf_softmax_thunk(void *ctx) {
    rf_softmax_args *a = (rf_softmax_args *)ctx;
    rf_softmax_f32(a->out, a->x, a->R, a->N);
}
#endif
