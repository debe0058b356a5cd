/* Sampling a token from logits by the rule of refimpl.oracle.sampling, in float64.
 *
 * V = vocabulary size.  The NumPy oracle sorts all V ids by (p descending, id ascending)
 * with np.lexsort (~3 ms at V = 32000, more than a stories15M forward on the C backend).
 * Here the ids are first split by the binade of p (a stable counting sort on its exponent:
 * every id of a binade comes before every id of a lower one), and a binade is sorted fully
 * (sort_msd) only when the rule walks into it: top-p and the draw usually stop after a
 * small head of the order.
 *
 * The softmax runs on the SIMD path in force (_vmath.h), in float64: z / temperature and
 * its max, then e^(x - max) by V(vexp64) below (< 1 ulp) and their sum, then p = e / sum.
 * Sums: over a sorted prefix, front to back in the order (the rule's running sums); over all
 * V ids (the softmax's and the no-top-k total), in id order split into lanes.  NumPy's sums
 * are pairwise and its exp is its own, so the probabilities can differ from the oracle's in
 * the last bits, and the token can differ only when the draw (or top_p) lies within that
 * rounding of a running-sum boundary (tests/test_kernels_c_sample.py).
 */
#ifdef RF_VW
/* ======== SIMD body, compiled once per path (see _vmath.h): RF_VW / 2 doubles a vector ======== */
#define RF_DW (RF_VW / 2)
typedef double V(vd) __attribute__((vector_size(RF_VW * 4)));
typedef int64_t V(vl) __attribute__((vector_size(RF_VW * 4)));

RF_INL V(vd) V(vd1)(double a) {   /* every lane = a */
    V(vd) v;
    for (int i = 0; i < RF_DW; i++) v[i] = a;
    return v;
}
RF_INL V(vd) V(vdsel)(V(vl) m, V(vd) a, V(vd) b) { return (V(vd))((m & (V(vl))a) | (~m & (V(vl))b)); }

/* e^x for -inf <= x <= 0, float64.  Cody-Waite: x = n ln2 + r, |r| <= ln2/2, ln2 = HI + LO
 * with HI's low 21 bits zero (n HI exact); e^r by its Taylor series to r^13 / 13! (the rest
 * < 5e-18 relative), Horner with FMA where the path has it: < 1 ulp (measured by
 * tests/test_kernels_c_sample.py against libm).  2^n as two normal powers of two, 2^n1 2^n2,
 * so a subnormal result rounds once (gradual underflow); x < -746 (e^x < half the least
 * subnormal) and -inf give +0. */
RF_INL V(vd) V(vexp64)(V(vd) x) {
    const double shifter = 6755399441055744.0;                  /* 1.5 * 2^52: + it rounds to an integer */
    x = V(vdsel)((V(vl))(x < V(vd1)(-746.0)), V(vd1)(-746.0), x);
    V(vd) t = x * 1.4426950408889634 + shifter;
    V(vd) n = t - shifter;                                      /* round(x / ln2), in [-1077, 0] */
    V(vd) r = x - n * 6.93147180369123816490e-01;
    r = r - n * 1.90821492927058770002e-10;
    V(vd) p = V(vd1)(1.0 / 6227020800.0);                       /* 1 / 13! */
    p = p * r + 1.0 / 479001600.0;
    p = p * r + 1.0 / 39916800.0;
    p = p * r + 1.0 / 3628800.0;
    p = p * r + 1.0 / 362880.0;
    p = p * r + 1.0 / 40320.0;
    p = p * r + 1.0 / 5040.0;
    p = p * r + 1.0 / 720.0;
    p = p * r + 1.0 / 120.0;
    p = p * r + 1.0 / 24.0;
    p = p * r + 1.0 / 6.0;
    p = p * r + 0.5;
    p = p * r + 1.0;
    p = p * r + 1.0;
    V(vl) ni = (V(vl))t - (V(vl))V(vd1)(shifter);             /* n as an integer: t's low bits */
    V(vl) n1 = ni >> 1, n2 = ni - n1;                           /* both >= -539: normal */
    return p * (V(vd))((n1 + 1023) << 52) * (V(vd))((n2 + 1023) << 52);
}

/* y[i] = e^x[i] (for tests: the exp the softmax uses) */
static void V(exp_f64)(double *y, const double *x, int64_t n) {
    int64_t i = 0;
    for (; i + RF_DW <= n; i += RF_DW) {
        V(vd) v;
        memcpy(&v, x + i, sizeof v);
        v = V(vexp64)(v);
        memcpy(y + i, &v, sizeof v);
    }
    if (i < n) {
        V(vd) v = V(vd1)(-INFINITY);
        for (int64_t j = i; j < n; j++) v[j - i] = x[j];
        v = V(vexp64)(v);
        for (int64_t j = i; j < n; j++) y[j] = v[j - i];
    }
}

/* p = softmax(z / temperature), max-shifted as oracle.layers.softmax; sums in 2 x RF_DW lanes */
static void V(softmax_t)(double *p, const double *z, int64_t n, double temperature) {
    const V(vd) ninf = V(vd1)(-INFINITY);
    V(vd) m0 = ninf, m1 = ninf;
    int64_t i = 0;
    for (; i + 2 * RF_DW <= n; i += 2 * RF_DW) {
        V(vd) a, b;
        memcpy(&a, z + i, sizeof a);
        memcpy(&b, z + i + RF_DW, sizeof b);
        a = a / temperature;
        b = b / temperature;
        memcpy(p + i, &a, sizeof a);
        memcpy(p + i + RF_DW, &b, sizeof b);
        m0 = V(vdsel)((V(vl))(a > m0), a, m0);
        m1 = V(vdsel)((V(vl))(b > m1), b, m1);
    }
    double m = -INFINITY;
    for (; i < n; i++) {
        p[i] = z[i] / temperature;
        if (p[i] > m) m = p[i];
    }
    for (int k = 0; k < RF_DW; k++) {
        if (m0[k] > m) m = m0[k];
        if (m1[k] > m) m = m1[k];
    }
    V(vd) s0 = V(vd1)(0.0), s1 = s0;
    for (i = 0; i + 2 * RF_DW <= n; i += 2 * RF_DW) {
        V(vd) a, b;
        memcpy(&a, p + i, sizeof a);
        memcpy(&b, p + i + RF_DW, sizeof b);
        a = V(vexp64)(a - m);
        b = V(vexp64)(b - m);
        memcpy(p + i, &a, sizeof a);
        memcpy(p + i + RF_DW, &b, sizeof b);
        s0 += a;
        s1 += b;
    }
    double s = 0.0;
    for (int64_t j = i; j < n; j++) p[j] -= m;
    V(exp_f64)(p + i, p + i, n - i);                            /* the tail, through the same exp */
    for (int64_t j = i; j < n; j++) s += p[j];
    for (int k = 0; k < RF_DW; k++) s += s0[k] + s1[k];
    for (int64_t j = 0; j < n; j++) p[j] /= s;
}
#undef RF_DW
#else
/* ======== common part: the order, the rule, dispatch ======== */
#include "sample.h"

#include <math.h>
#include <string.h>
#include "_dispatch.h"
#define RF_SELF "sample.c"
#include "_vmath.h"

static void softmax_t(double *p, const double *z, int64_t V, double temperature) {
    RF_DISPATCH(softmax_t, p, z, V, temperature);
}

void rf_exp_f64(double *y, const double *x, int64_t n) {
    RF_DISPATCH(exp_f64, y, x, n);
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
 * last.  A bucket, or a part of one, is sorted by insertion up to SMALL ids (sort_msd). */
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

/* a[0..n) by key, stably (ids arrive ascending, ties keep that order): a most-significant-
 * digit-first radix sort.  The digit is the b highest bits that vary across the run (b =
 * ceil(log2 n), at most 8: about one id per digit, and no pass over 256 counters for a few
 * dozen ids), each digit's part is sorted the same way on the bits below, and parts of
 * SMALL ids or fewer by insertion.  In one binade p's first 12 bits are equal and the next
 * ones split the run at once: about one scatter pass over the data, where a least-
 * significant-byte-first sort makes one per varying byte (6-7 on mantissas, each over 256
 * counters: with it the whole call took 13 us at V = 512, top-p 0.9; about 6 us now). */
static void sort_msd(rank *a, rank *tmp, int64_t n) {
    if (n <= SMALL) {
        insertion(a, n);
        return;
    }
    uint64_t diff = 0;                                  /* the bits that vary across the run */
    for (int64_t i = 1; i < n; i++) diff |= a[i].key ^ a[0].key;
    if (!diff) return;                                  /* every key equal: in id order already */
    int top = 63 - __builtin_clzll(diff);               /* the highest of them */
    int b = 64 - __builtin_clzll((uint64_t)n - 1);      /* ceil(log2 n) */
    if (b > 8) b = 8;
    if (b > top + 1) b = top + 1;
    const int shift = top + 1 - b;                      /* digit: bits shift .. top */
    const int64_t w = (int64_t)1 << b;
    const uint64_t mask = (uint64_t)w - 1;
    int64_t at[257];
    memset(at, 0, (size_t)(w + 1) * sizeof *at);
    for (int64_t i = 0; i < n; i++) at[((a[i].key >> shift) & mask) + 1]++;
    for (int64_t d = 0; d < w; d++) at[d + 1] += at[d];    /* at[d]: where digit d starts */
    int64_t fill[256];
    memcpy(fill, at, (size_t)w * sizeof *fill);
    for (int64_t i = 0; i < n; i++) tmp[fill[(a[i].key >> shift) & mask]++] = a[i];
    memcpy(a, tmp, (size_t)n * sizeof *a);
    for (int64_t d = 0; d < w; d++)                    /* the parts agree on every bit from shift up */
        if (at[d + 1] - at[d] > 1) sort_msd(a + at[d], tmp + at[d], at[d + 1] - at[d]);
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

/* sorts the buckets up to place i's own; returns how many places are final (> i) */
static int64_t final_past(order_t *o, int64_t i) {
    while (o->done <= i) {
        int64_t lo = o->start[o->next], hi = o->start[++o->next];
        sort_msd(o->a + lo, o->tmp + lo, hi - lo);
        o->done = hi;
    }
    return o->done;
}

/* the id at place i of the sampling order */
static inline int64_t order_at(order_t *o, int64_t i) {
    final_past(o, i);
    return o->a[i].id;
}

/* p of a ranked id, from its key (the complement of p's bits): read in order, not p[id] */
static inline double p_of(const rank *r) {
    uint64_t u = ~r->key;
    double x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* the sum of p over the first n ids of the order: in the order (sorting them), or, for all
 * V ids, in id order by lanes */
static double mass(const double *p, int64_t V, order_t *o, int64_t n) {
    double s = 0.0;
    if (n == V) {   /* four running sums (independent chains), then theirs */
        double s1 = 0.0, s2 = 0.0, s3 = 0.0;
        int64_t i = 0;
        for (; i + 4 <= V; i += 4) {
            s += p[i];
            s1 += p[i + 1];
            s2 += p[i + 2];
            s3 += p[i + 3];
        }
        for (; i < V; i++) s += p[i];
        return s + (s1 + s2 + s3);
    }
    for (int64_t i = 0; i < n;) {   /* a sorted stretch at a time: s stays in a register */
        int64_t end = final_past(o, i);
        for (; i < end && i < n; i++) s += p_of(&o->a[i]);
    }
    return s;
}

/* the first place i < n at which the running sum of p / s, front to back in the order,
 * reaches `level` (c >= level when `reach`, else passes it: c > level); n when none does */
static int64_t first_at(order_t *o, int64_t n, double s, double level, int reach) {
    double c = 0.0;
    for (int64_t i = 0; i < n;) {
        int64_t end = final_past(o, i);
        for (; i < end && i < n; i++) {
            c += p_of(&o->a[i]) / s;
            if (reach ? c >= level : c > level) return i;
        }
    }
    return n;
}

/* steps 4-6 of the rule on the ordered ids: top-k, top-p (renormalise the kept; keep the
 * shortest prefix reaching top_p), the draw (the first whose running sum passes r; rounding
 * leaving none: the last kept) */
static int64_t draw(const double *p, order_t *o, int64_t V, int64_t top_k, double top_p, double r) {
    int64_t n = top_k > 0 && top_k < V ? top_k : V;
    if (top_p > 0.0) {
        int64_t i = first_at(o, n, mass(p, V, o, n), top_p, 1);
        if (i < n) n = i + 1;
    }
    int64_t i = first_at(o, n, mass(p, V, o, n), r, 0);
    return order_at(o, i < n ? i : n - 1);
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
#endif
