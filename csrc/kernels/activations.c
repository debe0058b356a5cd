/* Elementwise activations, float32.  N = number of elements.
 * Both are written through the logistic function sigma(z) = 1 / (1 + e^-z), evaluated with
 * e = e^-|z| <= 1 so nothing overflows:  sigma(z) = 1 / (1 + e) for z >= 0, e / (1 + e) for z < 0.
 *   gelu_tanh(x) = x sigma(2y),  y = sqrt(2/pi) (x + 0.044715 x^3)   [0.5 (1 + tanh y) = sigma(2y)]
 *   silu(x)      = x sigma(x)
 * Error: e^-|z| <= EXP_ULPS (vector exp with gradual underflow, so x e^x stays accurate down
 * to x = -104), then 1 + e, the division and the product: 3u; for gelu the rounding of y moves
 * sigma by |2y| sigma(2y) sigma(-2y) 4u <= 0.9u relative to |x|: contracts.gelu_tanh_bound and
 * silu_bound.  Special values follow the oracle: NaN -> NaN, +inf -> +inf, -inf -> NaN
 * (gelu: -inf * 0; silu: -inf * sigma(-inf) = -inf * 0, as the oracle's -inf / inf). */
#ifdef RF_VW
/* ======== SIMD body, compiled once per path (see _vmath.h) ======== */
/* sigma(z) lane by lane */
RF_INL vf V(vsigmoid)(vf z) {
    vi neg = z < 0.0f;
    vf az = (vf)((vi)z & 0x7fffffff);          /* |z| */
    vf e = V(vexp)(-az);
    vf num = V(vsel)(neg, e, V(vset1)(1.0f));
    return num / (1.0f + e);
}

RF_INL vf V(vgelu)(vf x) {
    vf y = (x + 0.044715f * (x * x * x)) * 0.7978845608028654f;
    return x * V(vsigmoid)(y + y);
}

RF_INL vf V(vsilu)(vf x) { return x * V(vsigmoid)(x); }

#define RF_ACT_LOOP(F)                                                   \
    int64_t i = 0;                                                      \
    for (; i + 2 * RF_VW <= N; i += 2 * RF_VW) {                        \
        V(vst)(out + i, F(V(vld)(x + i)));                              \
        V(vst)(out + i + RF_VW, F(V(vld)(x + i + RF_VW)));              \
    }                                                                   \
    for (; i + RF_VW <= N; i += RF_VW) V(vst)(out + i, F(V(vld)(x + i))); \
    if (i < N) {                                                        \
        float tmp[RF_VW] = {0};                                         \
        for (int k = 0; i + k < N; k++) tmp[k] = x[i + k];              \
        vf r = F(V(vld)(tmp));                                          \
        for (int k = 0; i + k < N; k++) out[i + k] = r[k];              \
    }

static void V(gelu_tanh)(float *out /* (N,) */, const float *x /* (N,) */, int64_t N) { RF_ACT_LOOP(V(vgelu)) }
static void V(silu)(float *out /* (N,) */, const float *x /* (N,) */, int64_t N) { RF_ACT_LOOP(V(vsilu)) }
#undef RF_ACT_LOOP
#else
/* ======== common part: references, dispatch, thunks ======== */
#include <math.h>
#include "activations.h"
#include "_dispatch.h"
#define RF_SELF "activations.c"
#include "_vmath.h"

/* naive: the formulas as written, libm tanhf / expf */
void rf_gelu_tanh_f32_ref(float *out /* (N,) */, const float *x /* (N,) */, int64_t N) {
    for (int64_t i = 0; i < N; i++)
        out[i] = 0.5f * x[i] * (1.0f + tanhf(0.7978845608028654f * (x[i] + 0.044715f * x[i] * x[i] * x[i])));
}

void rf_silu_f32_ref(float *out /* (N,) */, const float *x /* (N,) */, int64_t N) {
    for (int64_t i = 0; i < N; i++) out[i] = x[i] / (1.0f + expf(-x[i]));
}

void rf_gelu_tanh_f32(float *out, const float *x, int64_t N) { RF_DISPATCH(gelu_tanh, out, x, N); }
void rf_silu_f32(float *out, const float *x, int64_t N) { RF_DISPATCH(silu, out, x, N); }

void rf_gelu_tanh_thunk(void *ctx) {
    rf_act_args *a = (rf_act_args *)ctx;
    rf_gelu_tanh_f32(a->out, a->x, a->N);
}

void rf_silu_thunk(void *ctx) {
    rf_act_args *a = (rf_act_args *)ctx;
    rf_silu_f32(a->out, a->x, a->N);
}
#endif
