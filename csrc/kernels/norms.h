/* refimpl._kernels: LayerNorm and RMSNorm over the last axis, float32.  T = rows, D = row width.
 *   layer_norm: out = (x - mean) / sqrt(var + eps) * w + b     (biased variance, eps inside sqrt)
 *   rms_norm:   out = x / sqrt(mean(x^2) + eps) * w */
#include <stdint.h>

/* x (T,D), w (D,), b (D,) -> out (T,D); SIMD path chosen by rf_path() */
void rf_layer_norm_f32(float *out, const float *x, const float *w, const float *b,
                       int64_t T, int64_t D, float eps);
/* x (T,D), w (D,) -> out (T,D) */
void rf_rms_norm_f32(float *out, const float *x, const float *w, int64_t T, int64_t D, float eps);
/* naive references (sums in double) */
void rf_layer_norm_f32_ref(float *out, const float *x, const float *w, const float *b,
                           int64_t T, int64_t D, float eps);
void rf_rms_norm_f32_ref(float *out, const float *x, const float *w, int64_t T, int64_t D, float eps);

/* prepared calls for timing loops (b is ignored by rms_norm) */
typedef struct {
    float *out;        /* (T,D) */
    const float *x;    /* (T,D) */
    const float *w;    /* (D,) */
    const float *b;    /* (D,) */
    int64_t T;
    int64_t D;
    float eps;
} rf_norm_args;
void rf_layer_norm_thunk(void *ctx);
void rf_rms_norm_thunk(void *ctx);
