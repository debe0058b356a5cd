/* refimpl._kernels: elementwise activations, float32, N = number of elements (any shape, flat).
 *   gelu_tanh(x) = 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))       (GPT-2 gelu_new)
 *   silu(x)      = x / (1 + exp(-x))                                      (swish) */
#include <stdint.h>

/* x (N,) -> out (N,); SIMD path chosen by rf_path() */
void rf_gelu_tanh_f32(float *out, const float *x, int64_t N);
void rf_silu_f32(float *out, const float *x, int64_t N);
/* naive references: libm tanhf / expf */
void rf_gelu_tanh_f32_ref(float *out, const float *x, int64_t N);
void rf_silu_f32_ref(float *out, const float *x, int64_t N);

/* prepared calls for timing loops */
typedef struct {
    float *out;        /* (N,) */
    const float *x;    /* (N,) */
    int64_t N;
} rf_act_args;
void rf_gelu_tanh_thunk(void *ctx);
void rf_silu_thunk(void *ctx);
