/* Private: vector math on GCC/Clang vector extensions, compiled once per SIMD path.
 *
 * How the SIMD paths are made (softmax.c, attention.c, norms.c, activations.c, rope.c):
 * each op file holds its SIMD body once, between `#ifdef RF_VW` and `#else`, and
 * includes itself three times through RF_INSTANTIATE_PATHS(file):
 *
 *     path      RF_VW (floats per vector)   target                         suffix
 *     avx512    16 (one zmm)                avx512f,bw,vl,dq + avx2,fma    _avx512
 *     avx2       8 (one ymm)                avx2,fma                       _avx2
 *     portable   4 (xmm / NEON q / scalar)  the build's baseline ISA       _portable
 *
 * The avx512/avx2 instances exist only on x86-64; the portable one builds
 * everywhere: vector-extension arithmetic, plus a few x86 intrinsics (max/min,
 * scalef) only under __x86_64__ with a generic fallback.
 * Inside a body, `vf` / `vi` / `vu` are the float / int32 / uint32 vectors of
 * RF_VW lanes and V(name) appends the path suffix.
 *
 * Vector exp (V(vexp)): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, Cephes
 * degree-6 polynomial for e^r (about 1 ulp), then 2^n applied as two normal
 * powers of two so that results in the subnormal range underflow gradually.
 * Domain: x <= 88.3 (every caller passes x <= 0); x < -104 gives +0 (e^-104 is
 * below half the smallest subnormal), -inf gives +0, NaN gives NaN.
 * Measured (every 64th float in [-87.3, 0]): 1.01 ulp (avx512, avx2), 1.25 ulp (portable SSE2,
 * no FMA).  V(vexp_flush), the faster variant for softmax/attention, is described at its definition.
 * Budget: contracts.EXP_ULPS = 4 ulp.
 */
#ifndef RF_VMATH_TYPES
#define RF_VMATH_TYPES
#include <stdint.h>
#include <string.h>
#if defined(__x86_64__)
#include <immintrin.h>
#endif

typedef float rf_vf4 __attribute__((vector_size(16)));
typedef float rf_vf8 __attribute__((vector_size(32)));
typedef float rf_vf16 __attribute__((vector_size(64)));
typedef int32_t rf_vi4 __attribute__((vector_size(16)));
typedef int32_t rf_vi8 __attribute__((vector_size(32)));
typedef int32_t rf_vi16 __attribute__((vector_size(64)));
typedef uint32_t rf_vu4 __attribute__((vector_size(16)));
typedef uint32_t rf_vu8 __attribute__((vector_size(32)));
typedef uint32_t rf_vu16 __attribute__((vector_size(64)));

#define RF_CAT_(a, b) a##b
#define RF_CAT(a, b) RF_CAT_(a, b)
#define RF_STR_(a) #a
#define RF_STR(a) RF_STR_(a)
#define RF_INL static inline __attribute__((always_inline))

#if defined(__clang__)
#define RF_PUSH_TARGET(t) _Pragma(RF_STR(clang attribute push(__attribute__((target(t))), apply_to = function)))
#define RF_POP_TARGET() _Pragma("clang attribute pop")
#else
#define RF_PUSH_TARGET(t) _Pragma("GCC push_options") _Pragma(RF_STR(GCC target(t)))
#define RF_POP_TARGET() _Pragma("GCC pop_options")
#endif
#define RF_AVX512_ISA "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma"
#define RF_AVX2_ISA "avx2,fma"
/* call fn_<path>(args...) for the path rf_path() chose (fn_portable everywhere else) */
#if defined(__x86_64__)
#define RF_DISPATCH(fn, ...) do { switch (rf_path()) { \
    case RF_PATH_AVX512: fn##_avx512(__VA_ARGS__); break; \
    case RF_PATH_AVX2: fn##_avx2(__VA_ARGS__); break; \
    default: fn##_portable(__VA_ARGS__); } } while (0)
#else
#define RF_DISPATCH(fn, ...) fn##_portable(__VA_ARGS__)
#endif
#endif /* RF_VMATH_TYPES */

/* ---- per-instance part: included once per path with RF_VW and RF_SFX defined ---- */
#ifdef RF_VW
#undef vf
#undef vi
#undef vu
#undef V
#define vf RF_CAT(rf_vf, RF_VW)
#define vi RF_CAT(rf_vi, RF_VW)
#define vu RF_CAT(rf_vu, RF_VW)
#define V(name) RF_CAT(name, RF_SFX)

/* unaligned load / store of RF_VW floats (memcpy compiles to one vmovups) */
RF_INL vf V(vld)(const float *p) { vf v; memcpy(&v, p, sizeof v); return v; }
RF_INL void V(vst)(float *p, vf v) { memcpy(p, &v, sizeof v); }
/* every lane = a (a vector literal, not {0} + a: 0 + a is not a when a = -0, so that form costs
 * an add, and it keeps GCC from folding a broadcast from memory into the FMA that uses it) */
#define RF_A4(a) a, a, a, a
#if RF_VW == 16
RF_INL vf V(vset1)(float a) { return (vf){RF_A4(a), RF_A4(a), RF_A4(a), RF_A4(a)}; }
#elif RF_VW == 8
RF_INL vf V(vset1)(float a) { return (vf){RF_A4(a), RF_A4(a)}; }
#else
RF_INL vf V(vset1)(float a) { return (vf){RF_A4(a)}; }
#endif
#undef RF_A4
/* m ? a : b lane by lane (m from a vector comparison: all ones or zero) */
RF_INL vf V(vsel)(vi m, vf a, vf b) { return (vf)((m & (vi)a) | (~m & (vi)b)); }
/* vmax(a, b) = b > a ? b : a and vmin(a, b) = b < a ? b : a, lane by lane: a NaN in b
 * is ignored (the result is a); a NaN in a is kept unless... it is compared false, so a stays */
#if defined(__x86_64__) && RF_VW == 16
RF_INL vf V(vmax)(vf a, vf b) { return (vf)_mm512_max_ps((__m512)b, (__m512)a); }
RF_INL vf V(vmin)(vf a, vf b) { return (vf)_mm512_min_ps((__m512)b, (__m512)a); }
#elif defined(__x86_64__) && RF_VW == 8
RF_INL vf V(vmax)(vf a, vf b) { return (vf)_mm256_max_ps((__m256)b, (__m256)a); }
RF_INL vf V(vmin)(vf a, vf b) { return (vf)_mm256_min_ps((__m256)b, (__m256)a); }
#elif defined(__x86_64__) && RF_VW == 4
RF_INL vf V(vmax)(vf a, vf b) { return (vf)_mm_max_ps((__m128)b, (__m128)a); }
RF_INL vf V(vmin)(vf a, vf b) { return (vf)_mm_min_ps((__m128)b, (__m128)a); }
#else
RF_INL vf V(vmax)(vf a, vf b) { return V(vsel)(b > a, b, a); }
RF_INL vf V(vmin)(vf a, vf b) { return V(vsel)(b < a, b, a); }
#endif
RF_INL float V(hsum)(vf v) {
    float s = 0.0f;
    for (int i = 0; i < RF_VW; i++) s += v[i];
    return s;
}
RF_INL float V(hmax)(vf v) {
    float m = v[0];
    for (int i = 1; i < RF_VW; i++) m = v[i] > m ? v[i] : m;
    return m;
}

/* e^r for |r| <= ln2/2: degree-6 minimax (relative error 0.03 ulp; 0.9 ulp evaluated
 * in float32 with FMA).  Coefficients fitted for this file (Lawson iteration). */
RF_INL vf V(vexp_poly)(vf r) {
    vf p = V(vset1)(1.3836845755577087e-3f);
    p = p * r + 8.374815806746483e-3f;
    p = p * r + 4.166822507977486e-2f;
    p = p * r + 1.6666419804096222e-1f;
    p = p * r + 4.9999991059303284e-1f;
    p = p * r + 1.0f;
    return p * r + 1.0f;
}

/* x = n ln2 + r: returns r and sets *t = x/ln2 + 1.5*2^23 (n sits in its low mantissa bits) */
RF_INL vf V(vexp_reduce)(vf x, vf *t) {
    const float shifter = 12582912.0f;     /* 1.5 * 2^23: adding it rounds to an integer */
    *t = x * 1.44269504088896341f + shifter;
    vf n = *t - shifter;                   /* n = round(x / ln 2) */
    vf r = x - n * 0.693359375f;           /* ln 2 = C1 + C2, C1 exact in 9 bits: n C1 exact */
    return r - n * -2.12194440e-4f;
}

/* e^x with gradual underflow (domain and accuracy in the file comment) */
RF_INL vf V(vexp)(vf x) {
    x = V(vmax)(x, V(vset1)(-104.0f));     /* NaN stays NaN; -inf -> -104 -> +0 */
#if defined(__x86_64__) && RF_VW == 16
    /* AVX-512: scalef applies 2^n with correct overflow and gradual underflow */
    vf t;
    vf r = V(vexp_reduce)(x, &t);
    vf n = t - 12582912.0f;
    return (vf)_mm512_scalef_ps((__m512)V(vexp_poly)(r), (__m512)n);
#else
    x = V(vmin)(x, V(vset1)(88.3f));
    vf t;
    vf p = V(vexp_poly)(V(vexp_reduce)(x, &t));
    vi ni = (vi)((vu)t - 0x4B400000u);     /* n as an integer */
    vi n1 = ni >> 1, n2 = ni - n1;         /* 2^n = 2^n1 2^n2, both normal for n >= -150 */
    vf s1 = (vf)((vu)(n1 + 127) << 23), s2 = (vf)((vu)(n2 + 127) << 23);
    return p * s1 * s2;
#endif
}

/* e^x for x <= 0, the fast variant for softmax and attention: the reduction of V(vexp), a
 * degree-5 polynomial 1 + r q(r) (1.9 ulp evaluated in float32; fitted like V(vexp_poly)),
 * and on AVX2/portable results below 2^-126 flush to +0 (AVX-512 scalef underflows
 * gradually); their bounds allow 2 tiny absolute.  -inf -> +0 exactly, NaN -> NaN.
 * Measured (every 64th float in [-87.3, 0]): 1.97 ulp (2.25 portable); one FMA-pipe operation fewer than V(vexp). */
RF_INL vf V(vexp_flush)(vf x) {
    const float shifter = 12582912.0f;
#if defined(__x86_64__) && RF_VW == 16
    vf xc = V(vmax)(x, V(vset1)(-104.0f));
#else
    const vf lo = V(vset1)(-87.33f);
    vi keep = ~(x < lo);                   /* NaN compares false: kept */
    vf xc = V(vmin)(V(vmax)(x, lo), V(vset1)(88.3f));
#endif
    vf t = xc * 1.44269504088896341f + shifter;
    vf n = t - shifter;
    vf r = xc - n * 0.693359375f;          /* ln 2 = C1 + C2 as in V(vexp) */
    r = r - n * -2.12194440e-4f;
    vf q = V(vset1)(8.290272206068039e-3f);
    q = q * r + 4.189816117286682e-2f;
    q = q * r + 1.666763871908188e-1f;
    q = q * r + 4.999914765357971e-1f;
    q = q * r + 9.999997019767761e-1f;
    vf p = q * r + 1.0f;
#if defined(__x86_64__) && RF_VW == 16
    return (vf)_mm512_scalef_ps((__m512)p, (__m512)n);
#else
    vf s = (vf)(((vu)t + 127u) << 23);     /* 2^n: (0x4B400000 + n + 127) << 23 keeps n + 127 */
    return (vf)((vi)(p * s) & keep);
#endif
}
#endif /* RF_VW */

/* ---- instantiation: an op file defines RF_SELF "file.c" and includes this header;
 * the file is then included once per path with RF_VW / RF_SFX set (its RF_VW part). ---- */
#if defined(RF_SELF) && !defined(RF_VW)
#if defined(__x86_64__)
#define RF_VW 16
#define RF_SFX _avx512
RF_PUSH_TARGET(RF_AVX512_ISA)
#include "_vmath.h"
#include RF_SELF
RF_POP_TARGET()
#undef RF_VW
#undef RF_SFX
#define RF_VW 8
#define RF_SFX _avx2
RF_PUSH_TARGET(RF_AVX2_ISA)
#include "_vmath.h"
#include RF_SELF
RF_POP_TARGET()
#undef RF_VW
#undef RF_SFX
#endif
#define RF_VW 4
#define RF_SFX _portable
#include "_vmath.h"
#include RF_SELF
#undef RF_VW
#undef RF_SFX
#undef RF_SELF
#endif
