/* refimpl._kernels: the sampling rule of refimpl.oracle.sampling, in float64.
 * V = vocabulary size.  For temperature > 0 (greedy is an argmax the caller does), given the
 * draw r in [0, 1) (xorshift64* next_f64, drawn by the caller), returns the token id:
 *   p = softmax(z / temperature); order ids by (p descending, id ascending); keep the first
 *   top_k (top_k <= 0: all); with 0 < top_p <= 1, renormalise the kept and keep the shortest
 *   prefix whose running sum is >= top_p (top_p <= 0: no cut); renormalise the kept again and
 *   return the first whose running sum is > r (rounding leaving none: the last kept).
 * The caller checks that max(z) / temperature is finite (no NaN, no +inf, not every entry
 * -inf, no overflow).  p (V) is left holding the probabilities; work is
 * rf_sample_work_words(V) words of scratch. */
#include <stdint.h>

int64_t rf_sample_f64(const double *z, int64_t V, double temperature, int64_t top_k, double top_p,
                      double r, double *p, uint64_t *work);
/* naive reference: the same rule with all V ids sorted by insertion (O(V^2): for tests) */
int64_t rf_sample_f64_ref(const double *z, int64_t V, double temperature, int64_t top_k, double top_p,
                          double r, double *p, uint64_t *work);
int64_t rf_sample_work_words(int64_t V);
/* order (V) <- all V ids by (p descending, id ascending), as the sampler orders them (p: V
 * probabilities, >= 0, no NaN); for tests */
void rf_sample_order(const double *p, int64_t V, uint64_t *work, int64_t *order);
/* y (n) <- e^x (n) for -inf <= x <= 0 by the sampler's float64 vector exp (for tests) */
void rf_exp_f64(double *y, const double *x, int64_t n);
