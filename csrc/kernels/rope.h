/* refimpl._kernels: rotary position embedding, float32.  H = heads, T = positions, D = head width
 * (even).  Pair i (i < D/2) at position p is rotated by angle p theta^(-2i/D):
 *   (a, b) -> (a cos - b sin, b cos + a sin)
 * half-split (HF Llama): a = x[i], b = x[i + D/2];  interleaved (llama2.c): a = x[2i], b = x[2i+1].
 * Angles, cos and sin are computed in double and rounded once to float.
 * Returns 0, or -1 if its O(D) scratch could not be allocated. */
#include <stdint.h>

/* x (H,T,D), positions (T,) -> out (H,T,D); SIMD path chosen by rf_path() */
int rf_rope_f32(float *out, const float *x, const int64_t *positions, int64_t H, int64_t T, int64_t D,
                double theta, int interleaved);
/* naive reference: cos/sin recomputed for every element */
int rf_rope_f32_ref(float *out, const float *x, const int64_t *positions, int64_t H, int64_t T, int64_t D,
                    double theta, int interleaved);

/* prepared call for timing loops: status receives the return value */
typedef struct {
    float *out;                 /* (H,T,D) */
    const float *x;             /* (H,T,D) */
    const int64_t *positions;   /* (T,) */
    int64_t H;
    int64_t T;
    int64_t D;
    double theta;
    int interleaved;
    int status;
} rf_rope_args;
void rf_rope_thunk(void *ctx);
