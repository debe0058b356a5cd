/* Rotary position embedding, float32.  H = heads, T = positions, D = head width (even), i < D/2.
 *   angle(p, i) = p theta^(-2i/D)   (double);  c = (float) cos(angle), s = (float) sin(angle)
 *   (a, b) -> (a c - b s, b c + a s)     a, b = x[i], x[i + D/2] (half-split) or x[2i], x[2i+1]
 * Fast path: per position, one cos/sin table of D/2 entries serves all H heads; the half-split
 * rotation is vectorised, the interleaved one is a plain loop the compiler vectorises.
 * Error: c, s rounded once (u/2 each) and two products and a sum (FMA): inside contracts.rope_bound. */
#ifdef RF_VW
/* ======== SIMD body, compiled once per path (see _vmath.h) ======== */
static void V(rope)(float *out /* (H,T,D) */, const float *x /* (H,T,D) */, const int64_t *pos /* (T,) */,
                    int64_t H, int64_t T, int64_t D, const double *inv_freq /* (D/2,) */,
                    float *cs /* (D,): cos then sin */, int interleaved) {
    const int64_t half = D / 2;
    const float *c = cs, *s = cs + half;
    for (int64_t t = 0; t < T; t++) {
        for (int64_t i = 0; i < half; i++) {
            double a = (double)pos[t] * inv_freq[i];
            cs[i] = (float)cos(a);
            cs[half + i] = (float)sin(a);
        }
        for (int64_t h = 0; h < H; h++) {
            const float *xr = x + (h * T + t) * D;
            float *yr = out + (h * T + t) * D;
            if (interleaved) {
                for (int64_t i = 0; i < half; i++) {
                    float a = xr[2 * i], b = xr[2 * i + 1];
                    yr[2 * i] = a * c[i] - b * s[i];
                    yr[2 * i + 1] = b * c[i] + a * s[i];
                }
                continue;
            }
            int64_t i = 0;
            for (; i + RF_VW <= half; i += RF_VW) {
                vf a = V(vld)(xr + i), b = V(vld)(xr + half + i);
                vf vc = V(vld)(c + i), vs = V(vld)(s + i);
                V(vst)(yr + i, a * vc - b * vs);
                V(vst)(yr + half + i, b * vc + a * vs);
            }
            for (; i < half; i++) {
                float a = xr[i], b = xr[half + i];
                yr[i] = a * c[i] - b * s[i];
                yr[half + i] = b * c[i] + a * s[i];
            }
        }
    }
}
#else
/* ======== common part: reference, dispatch, thunk ======== */
#include <math.h>
#include <stdlib.h>
#include "rope.h"
#include "_dispatch.h"
#define RF_SELF "rope.c"
#include "_vmath.h"

/* naive: every element recomputes its angle, cos and sin */
int rf_rope_f32_ref(float *out /* (H,T,D) */, const float *x /* (H,T,D) */, const int64_t *pos /* (T,) */,
                    int64_t H, int64_t T, int64_t D, double theta, int interleaved) {
    const int64_t half = D / 2;
    for (int64_t h = 0; h < H; h++)
        for (int64_t t = 0; t < T; t++)
            for (int64_t i = 0; i < half; i++) {
                double ang = (double)pos[t] * pow(theta, -(double)(2 * i) / (double)D);
                float c = (float)cos(ang), s = (float)sin(ang);
                int64_t ia = interleaved ? 2 * i : i, ib = interleaved ? 2 * i + 1 : i + half;
                const float *xr = x + (h * T + t) * D;
                float a = xr[ia], b = xr[ib];
                out[(h * T + t) * D + ia] = a * c - b * s;
                out[(h * T + t) * D + ib] = b * c + a * s;
            }
    return 0;
}

int rf_rope_f32(float *out, const float *x, const int64_t *positions, int64_t H, int64_t T, int64_t D,
                double theta, int interleaved) {
    if (H <= 0 || T <= 0 || D <= 0) return 0;
    const int64_t half = D / 2;
    double *inv_freq = (double *)malloc((size_t)(half + 1) * sizeof(double));   /* (D/2,) */
    float *cs = (float *)malloc((size_t)(D + 1) * sizeof(float));                /* (D,) */
    if (!inv_freq || !cs) { free(inv_freq); free(cs); return -1; }
    for (int64_t i = 0; i < half; i++) inv_freq[i] = pow(theta, -(double)(2 * i) / (double)D);
    RF_DISPATCH(rope, out, x, positions, H, T, D, inv_freq, cs, interleaved);
    free(inv_freq);
    free(cs);
    return 0;
}

void rf_rope_thunk(void *ctx) {
    rf_rope_args *a = (rf_rope_args *)ctx;
    a->status = rf_rope_f32(a->out, a->x, a->positions, a->H, a->T, a->D, a->theta, a->interleaved);
}
#endif
