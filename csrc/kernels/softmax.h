/* refimpl._kernels: row softmax, float32.
 * R = rows, N = row length.  out[r, :] = exp(x[r, :] - max x[r, :]) / sum exp(x[r, :] - max x[r, :])
 * -inf entries give exactly 0; a fully -inf row gives all zeros; a NaN makes its row NaN. */
#include <stdint.h>

/* x (R,N) -> out (R,N); SIMD path chosen by rf_path() */
void rf_softmax_f32(float *out, const float *x, int64_t R, int64_t N);
/* naive reference: libm expf, one row at a time */
void rf_softmax_f32_ref(float *out, const float *x, int64_t R, int64_t N);

/* prepared call for timing loops: rf_softmax_thunk(&args) == rf_softmax_f32(args...) */
typedef struct {
    float *out;        /* (R,N) */
    const float *x;    /* (R,N) */
    int64_t R;
    int64_t N;
} rf_softmax_args;
void rf_softmax_thunk(void *ctx);
