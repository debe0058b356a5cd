/* LayerNorm and RMSNorm, float32.  T = rows, D = row width.
 *   layer_norm:  mu = sum x / D;  var = sum (x - mu)^2 / D;  out = (x - mu) (1 / sqrt(var + eps)) w + b
 *   rms_norm:    ms = sum x^2 / D;  out = x (1 / sqrt(ms + eps)) w
 * Two passes (LayerNorm three) over a row, sums in float32 with 4 vector accumulators: the error
 * analysis of contracts.layer_norm_bound / rms_norm_bound (gamma(D) for each sum).
 * A row is redone by the _ref row in double, which gives the oracle's answer, when float32 cannot:
 *   - its sums are not finite: x^2 overflows above |x| ~ 1.8e19, or inf / NaN inputs (NaN rows);
 *   - var + eps < 2^-100: x^2 below 2^-126 lost bits to the subnormal range or rounded to 0
 *     (tiny rows with eps = 0 or an eps that small gave inf or 250 bounds off);
 *   - LayerNorm only, var + eps <= 2^-40 mu^2: the row is constant to a few ulps of its mean, and
 *     the float32 mean's own rounding (up to gamma(D) |mu|) is the variance (a constant row of
 *     0.001 with eps = 0 gave values of 0.24 where the oracle's exact mean gives 0 / 0 = NaN).
 * Tests: tests/test_kernel_boundaries.py (test_norms_fall_back_to_double_where_float32_cannot). */
#define RF_NORM_TINY 0x1p-100f
#define RF_NORM_FLAT 0x1p-40f
#ifdef RF_VW
/* ======== SIMD body, compiled once per path (see _vmath.h) ======== */
RF_INL float V(row_sum)(const float *x /* (D,) */, int64_t D, float shift, int squares) {
    /* sum (x - shift) if !squares, else sum (x - shift)^2 */
    const vf zero = V(vset1)(0.0f), sh = V(vset1)(shift);
    vf a0 = zero, a1 = zero, a2 = zero, a3 = zero;
    int64_t i = 0;
    if (squares) {
        for (; i + 4 * RF_VW <= D; i += 4 * RF_VW) {
            vf p = V(vld)(x + i) - sh, q = V(vld)(x + i + RF_VW) - sh;
            vf r = V(vld)(x + i + 2 * RF_VW) - sh, s = V(vld)(x + i + 3 * RF_VW) - sh;
            a0 += p * p; a1 += q * q; a2 += r * r; a3 += s * s;
        }
        for (; i + RF_VW <= D; i += RF_VW) { vf p = V(vld)(x + i) - sh; a0 += p * p; }
    } else {
        for (; i + 4 * RF_VW <= D; i += 4 * RF_VW) {
            a0 += V(vld)(x + i); a1 += V(vld)(x + i + RF_VW);
            a2 += V(vld)(x + i + 2 * RF_VW); a3 += V(vld)(x + i + 3 * RF_VW);
        }
        for (; i + RF_VW <= D; i += RF_VW) a0 += V(vld)(x + i);
    }
    float s = V(hsum)((a0 + a1) + (a2 + a3));
    for (; i < D; i++) s += squares ? (x[i] - shift) * (x[i] - shift) : x[i];
    return s;
}

static void V(layer_norm)(float *out /* (T,D) */, const float *x /* (T,D) */, const float *w /* (D,) */,
                          const float *b /* (D,) */, int64_t T, int64_t D, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * D;
        float *yr = out + t * D;
        float mu = V(row_sum)(xr, D, 0.0f, 0) / (float)D;
        float var = V(row_sum)(xr, D, mu, 1) / (float)D;
        float v = var + eps;
        if (!(v >= RF_NORM_TINY && v <= FLT_MAX && v > RF_NORM_FLAT * mu * mu)) {   /* NaN fails too */
            rf_layer_norm_f32_ref(yr, xr, w, b, 1, D, eps);      /* the double row decides (above) */
            continue;
        }
        float rs = 1.0f / sqrtf(v);
        const vf vmu = V(vset1)(mu), vrs = V(vset1)(rs);
        int64_t i = 0;
        for (; i + RF_VW <= D; i += RF_VW)
            V(vst)(yr + i, (V(vld)(xr + i) - vmu) * vrs * V(vld)(w + i) + V(vld)(b + i));
        for (; i < D; i++) yr[i] = (xr[i] - mu) * rs * w[i] + b[i];
    }
}

static void V(rms_norm)(float *out /* (T,D) */, const float *x /* (T,D) */, const float *w /* (D,) */,
                        int64_t T, int64_t D, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * D;
        float *yr = out + t * D;
        float v = V(row_sum)(xr, D, 0.0f, 1) / (float)D + eps;
        if (!(v >= RF_NORM_TINY && v <= FLT_MAX)) {             /* NaN fails too */
            rf_rms_norm_f32_ref(yr, xr, w, 1, D, eps);           /* the double row decides (above) */
            continue;
        }
        float rs = 1.0f / sqrtf(v);
        const vf vrs = V(vset1)(rs);
        int64_t i = 0;
        for (; i + RF_VW <= D; i += RF_VW) V(vst)(yr + i, V(vld)(xr + i) * vrs * V(vld)(w + i));
        for (; i < D; i++) yr[i] = xr[i] * rs * w[i];
    }
}
#else
/* ======== common part: references, dispatch, thunks ======== */
#include <float.h>
#include <math.h>
#include "norms.h"
#include "_dispatch.h"

/* naive, sums in double */
void rf_layer_norm_f32_ref(float *out /* (T,D) */, const float *x /* (T,D) */, const float *w /* (D,) */,
                           const float *b /* (D,) */, int64_t T, int64_t D, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * D;
        double mu = 0.0, var = 0.0;
        for (int64_t i = 0; i < D; i++) mu += xr[i];
        mu /= (double)D;
        for (int64_t i = 0; i < D; i++) var += (xr[i] - mu) * (xr[i] - mu);
        var /= (double)D;
        double rs = 1.0 / sqrt(var + (double)eps);
        for (int64_t i = 0; i < D; i++) out[t * D + i] = (float)((xr[i] - mu) * rs * w[i] + b[i]);
    }
}

void rf_rms_norm_f32_ref(float *out /* (T,D) */, const float *x /* (T,D) */, const float *w /* (D,) */,
                         int64_t T, int64_t D, float eps) {
    for (int64_t t = 0; t < T; t++) {
        const float *xr = x + t * D;
        double ms = 0.0;
        for (int64_t i = 0; i < D; i++) ms += (double)xr[i] * xr[i];
        ms /= (double)D;
        double rs = 1.0 / sqrt(ms + (double)eps);
        for (int64_t i = 0; i < D; i++) out[t * D + i] = (float)(xr[i] * rs * w[i]);
    }
}

#define RF_SELF "norms.c"
#include "_vmath.h"

void rf_layer_norm_f32(float *out, const float *x, const float *w, const float *b,
                       int64_t T, int64_t D, float eps) {
    RF_DISPATCH(layer_norm, out, x, w, b, T, D, eps);
}

void rf_rms_norm_f32(float *out, const float *x, const float *w, int64_t T, int64_t D, float eps) {
    RF_DISPATCH(rms_norm, out, x, w, T, D, eps);
}

void rf_layer_norm_thunk(void *ctx) {
    rf_norm_args *a = (rf_norm_args *)ctx;
    rf_layer_norm_f32(a->out, a->x, a->w, a->b, a->T, a->D, a->eps);
}

void rf_rms_norm_thunk(void *ctx) {
    rf_norm_args *a = (rf_norm_args *)ctx;
    rf_rms_norm_f32(a->out, a->x, a->w, a->T, a->D, a->eps);
}
#endif
