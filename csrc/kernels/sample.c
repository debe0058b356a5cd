/* Sampling a token from logits by the rule of refimpl.oracle.sampling, in float64.
 *
 * V = vocabulary size.  The NumPy oracle sorts all V ids by (p descending, id ascending)
 * with np.lexsort (~3 ms at V = 32000, more than a stories15M forward on the C backend);
 * here a stable LSD radix sort of (bits of p, id) pairs does it in 8 passes, a byte a pass.
 * Sums run front to back (NumPy's np.sum is pairwise), and exp is libm's: the probabilities
 * can differ from the oracle's in the last bits, so the token can differ only when r lies
 * within that rounding of a running-sum boundary (tests/test_kernels_c_sample.py).
 */
#include "sample.h"

#include <math.h>
#include <string.h>

/* p = softmax(z / temperature), max-shifted as oracle.layers.softmax */
static void softmax_t(double *p, const double *z, int64_t V, double temperature) {
    double m = -INFINITY;
    for (int64_t i = 0; i < V; i++) {
        p[i] = z[i] / temperature;
        if (p[i] > m) m = p[i];
    }
    double s = 0.0;
    for (int64_t i = 0; i < V; i++) {
        p[i] = exp(p[i] - m);
        s += p[i];
    }
    for (int64_t i = 0; i < V; i++) p[i] /= s;
}

/* the sort key: p >= 0, so its bits order as its values; complemented, ascending keys are
 * descending probabilities */
static inline uint64_t desc_key(double x) {
    uint64_t u;
    memcpy(&u, &x, sizeof u);
    return ~u;
}

typedef struct {
    uint64_t key;
    int64_t id;
} rank;

/* order <- ids 0..V-1 by (p descending, id ascending): LSD radix sort of (key, id) pairs, a
 * byte a pass, all eight histograms from one read; each pass is stable, so ids tied in p keep
 * their ascending order, and a pass whose byte is the same for every id is skipped.
 * work: 4 V words of scratch (two arrays of V pairs). */
static void sort_desc(const double *p, int64_t V, int64_t *order, uint64_t *work) {
    rank *src = (rank *)work, *dst = src + V;
    static const int B = 8;
    int64_t count[8][256];
    memset(count, 0, sizeof count);
    for (int64_t i = 0; i < V; i++) {
        uint64_t k = desc_key(p[i]);
        src[i].key = k;
        src[i].id = i;
        for (int b = 0; b < B; b++) count[b][(k >> (8 * b)) & 0xff]++;
    }
    for (int b = 0; b < B; b++) {
        int64_t *c = count[b];
        if (c[(src[0].key >> (8 * b)) & 0xff] == V) continue;
        int64_t at = 0;
        for (int d = 0; d < 256; d++) {
            int64_t n = c[d];
            c[d] = at;
            at += n;
        }
        for (int64_t i = 0; i < V; i++) dst[c[(src[i].key >> (8 * b)) & 0xff]++] = src[i];
        rank *t = src;
        src = dst;
        dst = t;
    }
    for (int64_t i = 0; i < V; i++) order[i] = src[i].id;
}

/* the naive sort: insertion by (p descending, id ascending) */
static void sort_desc_ref(const double *p, int64_t V, int64_t *order) {
    for (int64_t i = 0; i < V; i++) {
        int64_t j = i;
        while (j > 0 && (p[order[j - 1]] < p[i] || (p[order[j - 1]] == p[i] && order[j - 1] > i))) {
            order[j] = order[j - 1];
            j--;
        }
        order[j] = i;
    }
}

/* steps 4-6 of the rule on the ordered ids: top-k, top-p, the draw */
static int64_t draw(const double *p, const int64_t *order, int64_t V, int64_t top_k, double top_p, double r,
                    int64_t *kept) {
    int64_t n = top_k > 0 && top_k < V ? top_k : V;
    if (top_p > 0.0) {   /* renormalise the kept; keep the shortest prefix reaching top_p */
        double s = 0.0, c = 0.0;
        for (int64_t i = 0; i < n; i++) s += p[order[i]];
        for (int64_t i = 0; i < n; i++) {
            c += p[order[i]] / s;
            if (c >= top_p) {
                n = i + 1;
                break;
            }
        }
    }
    *kept = n;
    double s = 0.0, c = 0.0;
    for (int64_t i = 0; i < n; i++) s += p[order[i]];
    for (int64_t i = 0; i < n; i++) {
        c += p[order[i]] / s;
        if (c > r) return order[i];
    }
    return order[n - 1];
}

int64_t rf_sample_f64(const double *z, int64_t V, double temperature, int64_t top_k, double top_p,
                      double r, double *p, int64_t *order, uint64_t *work, int64_t *kept) {
    softmax_t(p, z, V, temperature);
    sort_desc(p, V, order, work);
    return draw(p, order, V, top_k, top_p, r, kept);
}

int64_t rf_sample_f64_ref(const double *z, int64_t V, double temperature, int64_t top_k, double top_p,
                          double r, double *p, int64_t *order, uint64_t *work, int64_t *kept) {
    (void)work;
    softmax_t(p, z, V, temperature);
    sort_desc_ref(p, V, order);
    return draw(p, order, V, top_k, top_p, r, kept);
}
