/* Sampling a token from logits by the rule of refimpl.oracle.sampling, in float64.
 *
 * V = vocabulary size.  The NumPy oracle sorts all V ids by (p descending, id ascending)
 * with np.lexsort (~3 ms at V = 32000, more than a stories15M forward on the C backend).
 * Here the ids are first split by the binade of p (a stable counting sort on its exponent:
 * every id of a binade comes before every id of a lower one), and a binade is sorted fully
 * only when the rule walks into it: top-p and the draw usually stop after a small head of
 * the order.
 *
 * Sums: over a sorted prefix, front to back in the order; over all V ids (no top-k), in id
 * order, which needs no sort.  NumPy's sums are pairwise and its exp is its own, so the
 * probabilities can differ from the oracle's in the last bits, and the token can differ
 * only when the draw (or top_p) lies within that rounding of a running-sum boundary
 * (tests/test_kernels_c_sample.py).
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

/* buckets: NB binades of p, [1, 2) first (p >= 2 joins it: rf_sample_order takes any p >= 0),
 * then [1/2, 1), ... down to [2^-(NB-2), 2^-(NB-3)); every smaller p, 0 included, in the
 * last.  A bucket is sorted by insertion up to SMALL ids. */
enum { NB = 64, SMALL = 48 };

/* the bucket of a key: monotone in the key, so buckets come in sampling order */
static inline int bucket_of(uint64_t key) {
    int64_t b = (int64_t)(key >> 52) - 0xC00;   /* key >> 52 = 0xFFF - the exponent field of p */
    return b < 0 ? 0 : b >= NB ? NB - 1 : (int)b;
}

typedef struct {
    uint64_t key;
    int64_t id;
} rank;

/* the ids in sampling order, made lazily: a[0..done) is final, the rest still bucketed */
typedef struct {
    rank *a, *tmp;          /* V pairs each */
    int64_t *start;         /* NB + 1 bucket bounds into a */
    int64_t done;
    int next;               /* the next bucket to sort */
} order_t;

/* a[0..n) by key, by insertion: stable (ties keep their order) */
static void insertion(rank *a, int64_t n) {
    for (int64_t i = 1; i < n; i++) {
        rank x = a[i];
        int64_t j = i;
        for (; j > 0 && a[j - 1].key > x.key; j--) a[j] = a[j - 1];
        a[j] = x;
    }
}

/* a[lo..hi) by key, stably (ids arrive ascending, ties keep that order) */
static void sort_run(rank *a, rank *tmp, int64_t lo, int64_t hi) {
    int64_t n = hi - lo;
    a += lo;
    if (n <= SMALL) {
        insertion(a, n);
        return;
    }
    rank *src = a, *dst = tmp;   /* LSD radix, a byte a pass (in one binade the top ones are equal) */
    for (int shift = 0; shift < 64; shift += 8) {
        int64_t count[256] = {0};
        for (int64_t i = 0; i < n; i++) count[(src[i].key >> shift) & 0xff]++;
        if (count[(src[0].key >> shift) & 0xff] == n) continue;
        int64_t at = 0;
        for (int d = 0; d < 256; d++) {
            int64_t c = count[d];
            count[d] = at;
            at += c;
        }
        for (int64_t i = 0; i < n; i++) dst[count[(src[i].key >> shift) & 0xff]++] = src[i];
        rank *t = src;
        src = dst;
        dst = t;
    }
    if (src != a) memcpy(a, src, (size_t)n * sizeof *a);
}

/* bucket the ids by binade (a stable counting sort); work holds the two pair arrays, then
 * the NB + 1 bucket bounds and NB fill cursors */
static void order_init(order_t *o, const double *p, int64_t V, uint64_t *work) {
    o->a = (rank *)work;
    o->tmp = o->a + V;
    o->start = (int64_t *)(o->tmp + V);
    int64_t *start = o->start, *fill = start + NB + 1;
    memset(start, 0, (NB + 1) * sizeof *start);
    for (int64_t i = 0; i < V; i++) start[bucket_of(desc_key(p[i])) + 1]++;
    for (int b = 0; b < NB; b++) start[b + 1] += start[b];
    memcpy(fill, start, NB * sizeof *fill);
    for (int64_t i = 0; i < V; i++) {
        uint64_t k = desc_key(p[i]);
        rank *r = &o->a[fill[bucket_of(k)]++];
        r->key = k;
        r->id = i;
    }
    o->done = 0;
    o->next = 0;
}

/* the id at place i of the sampling order (sorting the buckets up to its own) */
static inline int64_t order_at(order_t *o, int64_t i) {
    while (o->done <= i) {
        int b = o->next++;
        sort_run(o->a, o->tmp, o->start[b], o->start[b + 1]);
        o->done = o->start[b + 1];
    }
    return o->a[i].id;
}

/* the sum of p over the first n ids of the order: in the order (sorting them), or, for all
 * V ids, in id order */
static double mass(const double *p, int64_t V, order_t *o, int64_t n) {
    double s = 0.0;
    if (n == V) {
        for (int64_t i = 0; i < V; i++) s += p[i];
    } else {
        for (int64_t i = 0; i < n; i++) s += p[order_at(o, i)];
    }
    return s;
}

/* steps 4-6 of the rule on the ordered ids: top-k, top-p, the draw */
static int64_t draw(const double *p, order_t *o, int64_t V, int64_t top_k, double top_p, double r) {
    int64_t n = top_k > 0 && top_k < V ? top_k : V;
    if (top_p > 0.0) {   /* renormalise the kept; keep the shortest prefix reaching top_p */
        double s = mass(p, V, o, n), c = 0.0;
        for (int64_t i = 0; i < n; i++) {
            c += p[order_at(o, i)] / s;
            if (c >= top_p) {
                n = i + 1;
                break;
            }
        }
    }
    double s = mass(p, V, o, n), c = 0.0;
    for (int64_t i = 0; i < n; i++) {
        int64_t id = order_at(o, i);
        c += p[id] / s;
        if (c > r) return id;
    }
    return order_at(o, n - 1);
}

/* the sampling order of all V ids at once, sorted naively (by insertion, ids ascending:
 * O(V^2)) as one bucket */
static void order_ref(order_t *o, const double *p, int64_t V, uint64_t *work) {
    o->a = (rank *)work;
    for (int64_t i = 0; i < V; i++) {
        o->a[i].key = desc_key(p[i]);
        o->a[i].id = i;
    }
    insertion(o->a, V);
    o->done = V;
}

/* the rule, with the order made lazily (order_init) or naively (order_ref) */
static int64_t sample_by(const double *z, int64_t V, double temperature, int64_t top_k, double top_p,
                         double r, double *p, uint64_t *work,
                         void (*make_order)(order_t *, const double *, int64_t, uint64_t *)) {
    order_t o;
    softmax_t(p, z, V, temperature);
    make_order(&o, p, V, work);
    return draw(p, &o, V, top_k, top_p, r);
}

int64_t rf_sample_f64(const double *z, int64_t V, double temperature, int64_t top_k, double top_p,
                      double r, double *p, uint64_t *work) {
    return sample_by(z, V, temperature, top_k, top_p, r, p, work, order_init);
}

int64_t rf_sample_f64_ref(const double *z, int64_t V, double temperature, int64_t top_k, double top_p,
                          double r, double *p, uint64_t *work) {
    return sample_by(z, V, temperature, top_k, top_p, r, p, work, order_ref);
}

int64_t rf_sample_work_words(int64_t V) {
    return 4 * V + 2 * NB + 1;
}

void rf_sample_order(const double *p, int64_t V, uint64_t *work, int64_t *order) {
    order_t o;
    order_init(&o, p, V, work);
    for (int64_t i = 0; i < V; i++) order[i] = order_at(&o, i);
}
