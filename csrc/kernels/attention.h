/* refimpl._kernels: multi-head attention, float32, flash-style (online softmax).
 * H = query heads, Hkv = key/value heads (H % Hkv == 0; head h reads kv head h / (H/Hkv)),
 * Lq = query positions, Lk = key positions, D = head width.
 *   out[h, i, :] = sum_j softmax_j(scale q[h, i, :] . k[g, j, :], masked) v[g, j, :]
 * causal (needs Lq <= Lk): query i sees keys 0 .. Lk - Lq + i.
 * Returns 0, or -1 if its O(tile) scratch could not be allocated. */
#include <stdint.h>

/* q (H,Lq,D), k (Hkv,Lk,D), v (Hkv,Lk,D) -> out (H,Lq,D); SIMD path chosen by rf_path() */
int rf_attention_f32(float *out, const float *q, const float *k, const float *v,
                     int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
                     float scale, int causal);
/* the same, with kv head g of k and v starting at k + g * kv_stride (a slice of a longer KV cache:
 * rows of one head contiguous, heads kv_stride >= Lk * D floats apart) */
int rf_attention_f32_strided(float *out, const float *q, const float *k, const float *v,
                             int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D, int64_t kv_stride,
                             float scale, int causal);
/* naive reference: one query row at a time, an Lk score buffer, libm expf */
int rf_attention_f32_ref(float *out, const float *q, const float *k, const float *v,
                         int64_t H, int64_t Hkv, int64_t Lq, int64_t Lk, int64_t D,
                         float scale, int causal);

/* prepared call for timing loops: status receives the return value */
typedef struct {
    float *out;         /* (H,Lq,D) */
    const float *q;     /* (H,Lq,D) */
    const float *k;     /* (Hkv,Lk,D) */
    const float *v;     /* (Hkv,Lk,D) */
    int64_t H;
    int64_t Hkv;
    int64_t Lq;
    int64_t Lk;
    int64_t D;
    int64_t kv_stride;  /* floats between kv heads of k and v (Lk * D when contiguous) */
    float scale;
    int causal;
    int status;
} rf_attention_args;
void rf_attention_thunk(void *ctx);
