/* The compiled kernels of mergesmith's CPU paths, called through ctypes (which releases the GIL) by
   mergesmith/methods/compiled.py. Each computes the bits of a numpy/torch path in methods/, which is its reference
   and runs instead where this extension was not built.

   keep_masks: masks of the random sparsifiers (DARE, DELLA MagPrune) for rows of float32 deltas (or of bfloat16
   inputs as stored, widened where read), one fused pass per row. Element j of a row is kept when u_j < p_j,
   u_j being the SplitMix64 uniform of its stream index (rng.py) and p_j = density (DARE) or steps[rank_j] (DELLA:
   rank of |delta_j| in its row, ascending, ties by index).

   DELLA without a sort: ranks come from a histogram of the magnitudes' bit patterns (which order like the values).
   A bucket holding ranks [first, last] bounds its members' keep probabilities by steps[first] and steps[last]
   (steps never decrease), so a draw below the one keeps and a draw at or above the other drops whatever the rank.
   Only the draws in between, a small share, need the exact rank: by a scan of the row per distinct magnitude among
   them (ties are common), or among their buckets' members when they have many magnitudes. Before any of this, a
   draw below the least keep probability or at or above the greatest settles without its bucket.

   Also: the radix counts of the streaming selections (high_counts, low_counts; of magnitudes |x - base| when given a
   base, from float32 or bfloat16 as stored), the second pass of an L1-rescaled DARE/DELLA sum (masked_add,
   finish_sum; masked_sum16 and, under the TIES consensus, masked_delta16 from bfloat16 inputs as stored: the base
   widened in cache-sized chunks, the models in registers), a block's magnitude trim by its tensor's rank cut
   (cut_keep, float32 or bfloat16 as stored), the TIES disjoint merge (consensus), the base added back to a merged
   sum from bfloat16 as stored (add_base16), the float64 Gram matrices of
   model_stock and karcher and the spherical methods' sums (gram_chunks, float32 or bfloat16 as stored), Model
   Stock's interpolation (stock_merge), sce's variances, selection mask, energies and merge (variances, cut_mask,
   selected_squares, sce_merge; float32 or bfloat16 as stored), RAM and RAM+'s merge and overlap counts (ram_merge,
   ram_counts), the inputs' bfloat16 to float32 conversion with its finiteness check (widen_bf16; the check alone:
   nonfinite_bf16; a model's float32 delta from its base: delta_bf16; the radix keys of signed values: order_keys;
   Arcee Fusion's importance: fusion_importance) and the output's conversion back, checked the same way
   (narrow_bf16), and the weighted sums of karcher (float64) and multislerp (float32) with torch's fused multiply-
   adds (weighted_sum64, weighted_sum32; from float32 or bfloat16 as stored). */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define MIX1 0xBF58476D1CE4E5B9ULL
#define MIX2 0x94D049BB133111EBULL
#define NB 1024           /* histogram buckets per row */
#define MANY_QUERIES 256  /* a bucket asked for more exact ranks than this is sorted once instead of scanned */
#define FEW_KEYS 32       /* band draws of up to this many distinct magnitudes are ranked by scans of the row */
enum { UNKNOWN, ONE_VALUE, MIXED, SORTED };

/* The streaming loops also get AVX-512 and AVX2 builds, picked at load time by what the CPU has (AVX-512 has the
   draws' 64-bit multiplies natively; on a CPU with AVX2 only, the default SSE2 build ran the radix counts 2-4x
   slower). Same results: integer ops, and float ops in the same order (no contraction). */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
#define WIDE __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define WIDE
#endif

typedef uint8_t v8b __attribute__((vector_size(8)));
typedef uint16_t v8h __attribute__((vector_size(16)));
typedef uint32_t v8u __attribute__((vector_size(32)));
typedef float v8f __attribute__((vector_size(32)));
typedef float v4f __attribute__((vector_size(16)));
typedef double v4d __attribute__((vector_size(32)));
typedef uint64_t v8q __attribute__((vector_size(64)));

typedef struct {
    uint32_t *keys;    /* |delta| bit patterns */
    uint16_t *bucket;  /* each element's bucket */
    float *u;          /* uniforms of the row */
    uint8_t *cand;     /* 1 where the draw is within the range of keep probabilities: its rank's decides */
    int32_t *cands;    /* the elements with cand set (room for 8 more) */
    int32_t *band;     /* those whose exact rank decides */
    uint64_t *asked;   /* their (key << 32 | index), ascending */
    int64_t *tallied;  /* for a magnitude's band draws: its equals before each */
    int32_t *order;    /* elements by bucket, by index within a bucket */
    uint32_t *okeys;   /* their keys, in that order: a bucket's keys lie together */
    uint64_t *packed;  /* (key << 32 | index) of the sorted buckets */
    int64_t count[NB], start[NB], pos[NB], queries[NB];
    uint32_t sub[4][NB];
    uint8_t kind[NB];
} Scratch;

int widen_bf16(const uint16_t *restrict src, int64_t n, uint32_t *restrict dst);

/* The uniforms of a row, and the decisions they settle alone: kept below `lo` (the least keep probability), dropped
   at or above `hi` (the greatest); cand[j] = 1 in between, where the probability of j's rank decides. */
WIDE static void draws(uint64_t key, uint64_t first, int64_t n, float lo, float hi, float *restrict u,
                       uint8_t *restrict mask, uint8_t *restrict cand) {
    uint64_t next = first * GOLDEN + key; /* (first + j) * GOLDEN + key, by additions */
    for (int64_t j = 0; j < n; j++) {
        uint64_t z = next;
        next += GOLDEN;
        z ^= z >> 30;
        z *= MIX1;
        z ^= z >> 27;
        z *= MIX2;
        z ^= z >> 31;
        float v = (float)(int32_t)(z >> 40) * (1.0f / 16777216.0f); /* 24 bits: exact */
        u[j] = v;
        mask[j] = v < lo;
        cand[j] = (v >= lo) & (v < hi);
    }
}

/* The float32 bit pattern of x[j]: float32, or (`stored16`) bfloat16 as stored, widened (the same value). */
static inline uint32_t bits_at(const void *x, int stored16, int64_t j) {
    if (stored16) return (uint32_t)((const uint16_t *)x)[j] << 16;
    uint32_t w;
    memcpy(&w, (const float *)x + j, 4);
    return w;
}

/* bits_at of x[j..j+7], into *w. */
static inline void bits8(const void *x, int stored16, int64_t j, v8u *w) {
    if (stored16) {
        v8h h;
        memcpy(&h, (const uint16_t *)x + j, sizeof h);
        *w = __builtin_convertvector(h, v8u) << 16;
    } else {
        memcpy(w, (const float *)x + j, sizeof *w);
    }
}

/* Element j's address in x (float32, or `stored16` bfloat16). */
static inline const void *element(const void *x, int stored16, int64_t j) {
    return x ? (const char *)x + (stored16 ? 2 : 4) * j : NULL;
}

/* Key j of the radix counts: x's bit pattern, or with a base the bit pattern of the magnitude |x - base| in
   float32 (`stored16`: x and base bfloat16 as stored). */
static inline uint32_t radix_key(const void *x, const void *base, int64_t j, int stored16) {
    uint32_t xj = bits_at(x, stored16, j), bj, k;
    if (!base) return xj;
    bj = bits_at(base, stored16, j);
    float v, b;
    memcpy(&v, &xj, 4);
    memcpy(&b, &bj, 4);
    v -= b;
    memcpy(&k, &v, 4);
    return k & 0x7FFFFFFFu;
}

/* The delta x[j] - base[j] in float32 (base NULL: x[j]); `stored16`: x and base bfloat16 as stored. */
static inline float delta_at(const void *x, const void *base, int64_t j, int stored16) {
    uint32_t w = bits_at(x, stored16, j), b = base ? bits_at(base, stored16, j) : 0;
    float v, bv;
    memcpy(&v, &w, 4);
    memcpy(&bv, &b, 4);
    return base ? v - bv : v;
}

/* delta_at of elements j..j+7, into *d. */
static inline void deltas8(const void *x, const void *base, int64_t j, int stored16, v8f *d) {
    v8u w;
    bits8(x, stored16, j, &w);
    *d = (v8f)w;
    if (base) {
        bits8(base, stored16, j, &w);
        *d -= (v8f)w;
    }
}

/* Keys j..j+7 of the radix counts. */
static inline void radix_keys(const void *x, const void *base, int64_t j, int stored16, v8u *k) {
    v8f d;
    deltas8(x, base, j, stored16, &d);
    *k = base ? (v8u)d & 0x7FFFFFFFu : (v8u)d;
}

/* Magnitude keys j..j+7: the bit patterns of |x - base| (|x| without a base) in float32. */
static inline void magnitude_keys(const void *x, const void *base, int64_t j, int stored16, v8u *k) {
    radix_keys(x, base, j, stored16, k);
    *k &= 0x7FFFFFFFu;
}

/* Eight fixed float64 lanes (lane l: elements j with j % 8 == l, the tail in lane 0) in two halves: a 64-byte
   vector accumulator went through the stack on every step of the AVX2 build (3x slower than SSE2). */
typedef struct {
    v4d lo, hi;
} Lanes;

/* lanes += a * b, both widened to float64, lane by lane (each product exact, each sum rounded as before). */
static inline void lanes_add_products(Lanes *l, const v8f *pa, const v8f *pb) {
    v8f a = *pa, b = *pb;
    v4f a0 = __builtin_shufflevector(a, a, 0, 1, 2, 3), a1 = __builtin_shufflevector(a, a, 4, 5, 6, 7);
    v4f b0 = __builtin_shufflevector(b, b, 0, 1, 2, 3), b1 = __builtin_shufflevector(b, b, 4, 5, 6, 7);
    l->lo += __builtin_convertvector(a0, v4d) * __builtin_convertvector(b0, v4d);
    l->hi += __builtin_convertvector(a1, v4d) * __builtin_convertvector(b1, v4d);
}

/* lanes += a, widened to float64. */
static inline void lanes_add(Lanes *l, const v8f *pa) {
    v8f a = *pa;
    l->lo += __builtin_convertvector(__builtin_shufflevector(a, a, 0, 1, 2, 3), v4d);
    l->hi += __builtin_convertvector(__builtin_shufflevector(a, a, 4, 5, 6, 7), v4d);
}

/* The eight lanes summed in one order: the same value whatever the threads or the vector width. */
static inline double lanes_total(const Lanes *l) {
    return ((l->lo[0] + l->lo[1]) + (l->lo[2] + l->lo[3])) + ((l->hi[0] + l->hi[1]) + (l->hi[2] + l->hi[3]));
}

/* float64 sums of |d| and of |d| where mask (d = x - base), in eight fixed lanes each (lanes_total). The masked
   value is |d|'s bit pattern ANDed with the widened mask (+0.0 where dropped), as sparsify.kept does. `keys`, where
   given, holds the bit patterns of |d| already (DELLA's): read instead of x and base (bfloat16 as stored with
   `stored16`). */
WIDE static void abs_sums(const void *x, const void *base, int stored16, const uint32_t *keys, const uint8_t *mask,
                          int64_t n, double *before, double *after) {
    /* mask bytes to lanes by shifting one 64-bit word: a byte-vector conversion compiles to scalar inserts */
    static const v8q byte_shifts = {0, 8, 16, 24, 32, 40, 48, 56};
    Lanes lb = {{0}, {0}}, la = {{0}, {0}};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        v8u k;
        uint64_t mw;
        if (keys) memcpy(&k, keys + j, sizeof k);
        else magnitude_keys(x, base, j, stored16, &k);
        memcpy(&mw, mask + j, sizeof mw);
        v8u kk = k & -__builtin_convertvector((mw >> byte_shifts) & 1u, v8u);
        v8f fk = (v8f)k, fkk = (v8f)kk;
        lanes_add(&lb, &fk);
        lanes_add(&la, &fkk);
    }
    for (; j < n; j++) {
        uint32_t k = keys ? keys[j] : radix_key(x, base, j, stored16) & 0x7FFFFFFFu;
        uint32_t kk = k & (0u - (uint32_t)mask[j]);
        float a, ak;
        memcpy(&a, &k, 4);
        memcpy(&ak, &kk, 4);
        lb.lo[0] += (double)a;
        la.lo[0] += (double)ak;
    }
    *before = lanes_total(&lb);
    *after = lanes_total(&la);
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Keys and buckets of a row (bucket 0 holds the zeros, the others ranges of 2^shift nonzero keys); returns the
   number of buckets used. */
WIDE static int bucketize(const void *x, const void *base, int stored16, int64_t n, Scratch *s) {
    v8u hi8 = {0}, lo8 = ~(v8u){0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        v8u k;
        magnitude_keys(x, base, j, stored16, &k);
        memcpy(s->keys + j, &k, sizeof k);
        v8u up = (v8u)(k > hi8), down = (v8u)(k - 1 < lo8); /* 0 - 1 wraps to the largest: not the least */
        hi8 = (k & up) | (hi8 & ~up);
        lo8 = ((k - 1) & down) | (lo8 & ~down);
    }
    uint32_t hi = 0, lo = UINT32_MAX;
    for (int l = 0; l < 8; l++) {
        hi = hi8[l] > hi ? hi8[l] : hi;
        lo = lo8[l] < lo ? lo8[l] : lo;
    }
    for (; j < n; j++) {
        uint32_t k = radix_key(x, base, j, stored16) & 0x7FFFFFFFu;
        s->keys[j] = k;
        hi = k > hi ? k : hi;
        lo = k - 1 < lo ? k - 1 : lo; /* the smallest nonzero key, less one */
    }
    uint32_t lo_nz = lo + 1;
    int shift = 0;
    if (hi != 0)
        while ((hi >> shift) - (lo_nz >> shift) >= NB - 1) shift++;
    uint32_t low = hi != 0 ? lo_nz >> shift : 0;
    for (j = 0; j < n; j++) {
        uint32_t k = s->keys[j];
        s->bucket[j] = k ? (uint16_t)(1 + (k >> shift) - low) : 0;
    }
    return hi != 0 ? (int)((hi >> shift) - low) + 2 : 1;
}

/* Bucket sizes and the first rank of each bucket. */
static void count_buckets(int64_t n, int used, Scratch *s) {
    /* four tables: runs of equal buckets would otherwise wait on each other's increments */
    for (int t = 0; t < 4; t++) memset(s->sub[t], 0, sizeof(uint32_t) * used);
    memset(s->queries, 0, sizeof(int64_t) * used);
    int64_t j = 0;
    for (; j + 4 <= n; j += 4) {
        s->sub[0][s->bucket[j]]++;
        s->sub[1][s->bucket[j + 1]]++;
        s->sub[2][s->bucket[j + 2]]++;
        s->sub[3][s->bucket[j + 3]]++;
    }
    for (; j < n; j++) s->sub[0][s->bucket[j]]++;
    for (int b = 0; b < used; b++) s->count[b] = (int64_t)s->sub[0][b] + s->sub[1][b] + s->sub[2][b] + s->sub[3][b];
    int64_t acc = 0;
    for (int b = 0; b < used; b++) {
        s->start[b] = acc;
        acc += s->count[b];
    }
}

/* List the elements by bucket (index order within one), with their keys beside them. */
static void list_buckets(int64_t n, int used, Scratch *s) {
    memcpy(s->pos, s->start, sizeof(int64_t) * used);
    memset(s->kind, UNKNOWN, used);
    for (int64_t i = 0; i < n; i++) {
        int64_t p = s->pos[s->bucket[i]]++;
        s->order[p] = (int32_t)i;
        s->okeys[p] = s->keys[i];
    }
}

/* Members of a bucket before element j (key, index) in (key, index) order. */
WIDE static int64_t count_before(const uint32_t *k, const int32_t *m, int64_t c, uint32_t kj, int32_t j) {
    uint32_t r = 0;
    for (int64_t t = 0; t < c; t++) r += (k[t] < kj) | ((k[t] == kj) & (m[t] < j));
    return r;
}

/* How bucket b answers rank queries: one value (ranks are index order), scanned, or sorted once when asked often. */
static uint8_t classify(int b, Scratch *s) {
    int64_t first = s->start[b], c = s->count[b], t = 1;
    const uint32_t *k = s->okeys + first;
    while (t < c && k[t] == k[0]) t++;
    if (t == c) return ONE_VALUE;
    if (s->queries[b] <= MANY_QUERIES) return MIXED;
    uint64_t *p = s->packed + first;
    for (t = 0; t < c; t++) p[t] = (uint64_t)k[t] << 32 | (uint32_t)s->order[first + t];
    qsort(p, (size_t)c, sizeof(uint64_t), cmp_u64);
    return SORTED;
}

/* Exact rank of element j within its bucket. */
static int64_t rank_in_bucket(int64_t j, Scratch *s) {
    int b = s->bucket[j];
    int64_t first = s->start[b], c = s->count[b];
    if (s->kind[b] == UNKNOWN) s->kind[b] = classify(b, s);
    if (s->kind[b] == MIXED) return count_before(s->okeys + first, s->order + first, c, s->keys[j], (int32_t)j);
    int64_t a = 0, z = c; /* the first place holding j (or its packed key): j's own */
    if (s->kind[b] == ONE_VALUE) {
        const int32_t *m = s->order + first;
        while (a < z) {
            int64_t mid = (a + z) / 2;
            if (m[mid] < j) a = mid + 1; else z = mid;
        }
        return a;
    }
    const uint64_t *p = s->packed + first;
    uint64_t want = (uint64_t)s->keys[j] << 32 | (uint32_t)j;
    while (a < z) {
        int64_t mid = (a + z) / 2;
        if (p[mid] < want) a = mid + 1; else z = mid;
    }
    return a;
}

/* Keys of [a, z) below v and equal to v, added to *below and *equal. */
WIDE static void tally(const uint32_t *restrict k, int64_t a, int64_t z, uint32_t v, int64_t *below, int64_t *equal) {
    uint32_t lt = 0, eq = 0;
    for (int64_t i = a; i < z; i++) {
        lt += k[i] < v;
        eq += k[i] == v;
    }
    *below += lt;
    *equal += eq;
}

/* The band draws as (key << 32 | index) in s->asked, ascending; returns how many distinct keys they have. */
static int64_t sort_band(int64_t m, Scratch *s) {
    uint64_t *q = s->asked;
    for (int64_t t = 0; t < m; t++) q[t] = (uint64_t)s->keys[s->band[t]] << 32 | (uint32_t)s->band[t];
    if (m > 64) qsort(q, (size_t)m, sizeof(uint64_t), cmp_u64);
    else
        for (int64_t t = 1; t < m; t++) { /* few: an insertion sort */
            uint64_t v = q[t];
            int64_t i = t;
            for (; i > 0 && q[i - 1] > v; i--) q[i] = q[i - 1];
            q[i] = v;
        }
    int64_t distinct = m > 0;
    for (int64_t t = 1; t < m; t++) distinct += (q[t] >> 32) != (q[t - 1] >> 32);
    return distinct;
}

/* Decide the sorted band draws by their exact row ranks (keys below their own, and their equals before them), one
   scan of the row for the draws of each magnitude: ties are common (deltas of bfloat16 weights), so a few scans
   serve many draws. */
static void rank_by_scans(int64_t n, int64_t m, const float *steps, Scratch *s, uint8_t *mask) {
    const uint64_t *q = s->asked;
    for (int64_t t = 0, next; t < m; t = next) {
        uint32_t v = (uint32_t)(q[t] >> 32);
        int64_t below = 0, equal = 0, from = 0;
        for (next = t; next < m && (uint32_t)(q[next] >> 32) == v; next++) { /* its draws, by index */
            int64_t j = (uint32_t)q[next];
            tally(s->keys, from, j, v, &below, &equal);
            s->tallied[next - t] = equal;
            from = j;
        }
        tally(s->keys, from, n, v, &below, &equal);
        for (int64_t i = t; i < next; i++) {
            int64_t j = (uint32_t)q[i];
            mask[j] = s->u[j] < steps[below + s->tallied[i - t]];
        }
    }
}

/* Candidate j's draw against the keep probabilities of its bucket's first and last ranks: kept below the one,
   dropped at or above the other whatever the rank; in between it joins the band (returns the band's new size). */
static inline int64_t settle(int64_t j, const float *steps, Scratch *s, uint8_t *mask, int64_t m) {
    int b = s->bucket[j];
    float u = s->u[j], first = steps[s->start[b]], last = steps[s->start[b] + s->count[b] - 1];
    mask[j] = u < first;
    s->band[m] = (int32_t)j;
    return m + ((u >= first) & (u < last));
}

static uint8_t set_bits[256][8]; /* positions of each byte value's set bits, lowest first */

__attribute__((constructor)) static void fill_set_bits(void) {
    for (int v = 0; v < 256; v++)
        for (int b = 0, c = 0; b < 8; b++)
            if (v >> b & 1) set_bits[v][c++] = (uint8_t)b;
}

/* Indices of the set flags (0/1 bytes) of [0, n), in order, into list (room for n + 8); returns how many. Without
   branches: a sparse share of flags set at random would make every branch on them a guess. */
static int64_t flagged(const uint8_t *flag, int64_t n, int32_t *list) {
    int64_t c = 0, j = 0;
    for (; j + 8 <= n; j += 8) {
        uint64_t w;
        memcpy(&w, flag + j, 8);
        unsigned bits = (unsigned)((w * 0x0102040810204080ULL) >> 56); /* bit l: byte l's flag */
        for (int t = 0; t < 8; t++) list[c + t] = (int32_t)j + set_bits[bits][t];
        c += (int64_t)((w * 0x0101010101010101ULL) >> 56); /* the flags' sum */
    }
    for (; j < n; j++) {
        list[c] = (int32_t)j;
        c += flag[j];
    }
    return c;
}

/* Settle the candidates; list in s->band those whose exact rank decides (a small share) and return how many. */
static int64_t decide(int64_t n, const float *steps, Scratch *s, uint8_t *mask) {
    int64_t c = flagged(s->cand, n, s->cands), m = 0;
    for (int64_t t = 0; t < c; t++) m = settle(s->cands[t], steps, s, mask, m);
    return m;
}

static void della_row(const void *x, const void *base, int stored16, int64_t n, const float *steps, Scratch *s,
                      uint8_t *mask) {
    int used = bucketize(x, base, stored16, n, s);
    count_buckets(n, used, s);
    int64_t m = decide(n, steps, s, mask);
    if (m == 0) return;
    /* a scan of the row a magnitude costs less than listing the buckets (a band of a quarter of the row or more
       is listed without sorting it first) */
    if (4 * m <= n && sort_band(m, s) <= FEW_KEYS) {
        rank_by_scans(n, m, steps, s, mask);
        return;
    }
    for (int64_t t = 0; t < m; t++) s->queries[s->bucket[s->band[t]]]++;
    list_buckets(n, used, s);
    for (int64_t t = 0; t < m; t++) {
        int64_t j = s->band[t];
        mask[j] = s->u[j] < steps[s->start[s->bucket[j]] + rank_in_bucket(j, s)];
    }
}

static void free_scratch(Scratch *s) {
    free(s->u);
    free(s->keys);
    free(s->bucket);
    free(s->order);
    free(s->okeys);
    free(s->band);
    free(s->cands);
    free(s->asked);
    free(s->tallied);
    free(s->cand);
    free(s->packed);
    free(s);
}

/* Masks (0/1 bytes) of the deltas x - base (base NULL: x is the delta) of rows [0, rows) of a block whose first row
   is row `row0` of its tensor (`cols` elements a row). steps == NULL: DARE, keep when u < density; else DELLA with
   steps[0..cols-1]. sums[2r], sums[2r+1]: row r's float64 sum of |delta| and of the kept |delta|. With `stored16`
   x and base are bfloat16 as stored, widened where read (the same float32 values). Returns 0, or -1 when memory
   runs out. */
int keep_masks(const void *x, const void *base, int64_t rows, int64_t cols, int64_t row0, uint64_t key,
               const float *steps, float density, uint8_t *mask, double *sums, int stored16) {
    Scratch *s = calloc(1, sizeof(Scratch));
    if (s == NULL) return -1;
    s->u = malloc(sizeof(float) * cols);
    s->cand = malloc(cols);
    if (steps != NULL) {
        s->keys = malloc(sizeof(uint32_t) * cols);
        s->bucket = malloc(sizeof(uint16_t) * cols);
        s->order = malloc(sizeof(int32_t) * cols);
        s->okeys = malloc(sizeof(uint32_t) * cols);
        s->band = malloc(sizeof(int32_t) * cols);
        s->cands = malloc(sizeof(int32_t) * (cols + 8));
        s->asked = malloc(sizeof(uint64_t) * cols);
        s->tallied = malloc(sizeof(int64_t) * cols);
        s->packed = malloc(sizeof(uint64_t) * cols);
    }
    int della = steps == NULL || (s->keys && s->bucket && s->order && s->okeys && s->band && s->cands && s->asked &&
                                  s->tallied && s->packed);
    int ok = s->u && s->cand && della;
    size_t row_bytes = (size_t)cols * (stored16 ? 2 : 4);
    for (int64_t r = 0; ok && r < rows && cols > 0; r++) {
        const char *xr = (const char *)x + r * row_bytes, *br = base ? (const char *)base + r * row_bytes : NULL;
        uint8_t *m = mask + r * cols;
        /* DARE: every draw settles against the density */
        float lo = steps ? steps[0] : density, hi = steps ? steps[cols - 1] : density;
        draws(key, (uint64_t)(row0 + r) * (uint64_t)cols, cols, lo, hi, s->u, m, s->cand);
        if (steps != NULL) della_row(xr, br, stored16, cols, steps, s, m);
        abs_sums(xr, br, stored16, steps ? s->keys : NULL, m, cols, &sums[2 * r], &sums[2 * r + 1]);
    }
    free_scratch(s);
    return ok ? 0 : -1;
}

/* The lanes set in a v8u of all-ones/zero lanes, as bits 0..7. */
static inline uint32_t lane_bits(const v8u *on) {
    static const v8u lanes = {1, 2, 4, 8, 16, 32, 64, 128};
    v8u b = *on & lanes;
    return b[0] | b[1] | b[2] | b[3] | b[4] | b[5] | b[6] | b[7];
}

#define SMALL_COUNT (1 << 16) /* fewer keys are counted straight into the caller's table: no tables to clear */

/* Read 1 of a radix selection (sparsify.RadixSelect): counts[k >> 16] += 1 for each of n 32-bit keys. Four count
   tables: runs of keys in one bucket (ties are common) would otherwise wait on each other's increments. */
WIDE void high_counts(const void *x, const void *base, int64_t n, int64_t *counts, int stored16) {
    uint32_t *sub = n >= SMALL_COUNT ? calloc((size_t)4 << 16, sizeof(uint32_t)) : NULL;
    if (!sub) {
        for (int64_t j = 0; j < n; j++) counts[radix_key(x, base, j, stored16) >> 16]++;
        return;
    }
    for (int64_t a = 0; a < n; a += (int64_t)1 << 30) { /* a table's count stays below 2^32 */
        int64_t z = n - a < ((int64_t)1 << 30) ? n : a + ((int64_t)1 << 30), j = a;
        for (; j + 8 <= z; j += 8) {
            v8u t;
            radix_keys(x, base, j, stored16, &t);
            t >>= 16;
            for (int l = 0; l < 8; l++) sub[(l & 3) << 16 | t[l]]++;
        }
        for (; j < z; j++) sub[radix_key(x, base, j, stored16) >> 16]++;
        for (int64_t b = 0; b < (1 << 16); b++) {
            counts[b] += (int64_t)sub[b] + sub[1 << 16 | b] + sub[2 << 16 | b] + sub[3 << 16 | b];
            sub[b] = sub[1 << 16 | b] = sub[2 << 16 | b] = sub[3 << 16 | b] = 0;
        }
    }
    free(sub);
}

/* Read 2: low[k & 0xFFFF] += 1 for the keys whose high half is b0 (into low0) or b1 (into low1). Without branches
   (which half of the keys takes is data, so a branch would often be mispredicted): every key adds to a slot, its
   bucket's or a spare, in four tables as in high_counts. */
#define LOW_SLOTS (2 * 65536 + 1)
WIDE void low_counts(const void *x, const void *base, int64_t n, uint32_t b0, uint32_t b1, int64_t *low0,
                     int64_t *low1, int stored16) {
    uint32_t *sub = n >= SMALL_COUNT ? calloc((size_t)4 * LOW_SLOTS, sizeof(uint32_t)) : NULL;
    for (int64_t a = 0; a < n; a += (int64_t)1 << 30) { /* a table's count stays below 2^32 */
        int64_t z = n - a < ((int64_t)1 << 30) ? n : a + ((int64_t)1 << 30), j = a;
        if (sub) {
            for (; j + 8 <= z; j += 8) {
                v8u k;
                radix_keys(x, base, j, stored16, &k);
                v8u t = k >> 16, low = k & 0xFFFFu;
                v8u slot = (v8u)(t == b0) & low;
                slot |= (v8u)(t == b1) & (low + 65536u);
                slot |= (v8u)((t != b0) & (t != b1)) & (2u * 65536u);
                for (int l = 0; l < 8; l++) sub[(int64_t)(l & 3) * LOW_SLOTS + slot[l]]++;
            }
        }
        for (; j < z; j++) {
            uint32_t k = radix_key(x, base, j, stored16), t = k >> 16;
            if (t == b0) low0[k & 0xFFFFu]++;
            else if (t == b1) low1[k & 0xFFFFu]++;
        }
        for (int64_t b = 0; sub && b < 2 * 65536; b++) {
            uint32_t *c = sub + b;
            int64_t total = (int64_t)c[0] + c[LOW_SLOTS] + c[2 * LOW_SLOTS] + c[3 * LOW_SLOTS];
            c[0] = c[LOW_SLOTS] = c[2 * LOW_SLOTS] = c[3 * LOW_SLOTS] = 0;
            if (b < 65536) low0[b] += total;
            else low1[b - 65536] += total;
        }
    }
    free(sub);
}

/* Element j of masked_add, one float32 rounding an operation. */
static inline void masked_add_one(float *acc, const void *x, int x16, const float *base, const uint8_t *packed,
                                  int64_t offset, int64_t j, float f, float num, int first) {
    int64_t e = offset + j;
    uint32_t k, keep = 0u - (uint32_t)((packed[e >> 3] >> (7 - (e & 7))) & 1u);
    uint32_t w = bits_at(x, x16, j);
    float d;
    memcpy(&d, &w, 4);
    d = d - base[j];
    memcpy(&k, &d, 4);
    k &= keep;
    memcpy(&d, &k, 4);
    if (f != 1.0f) d = d * f;
    if (num != 1.0f) d = d * num;
    acc[j] = first ? d : acc[j] + d;
}

/* masked_add's loops, x float32 or (`x16`) bfloat16 as stored, widened in registers. */
static inline void masked_add_any(float *acc, const void *x, int x16, const float *base, const uint8_t *packed,
                                  int64_t offset, int64_t n, float f, float num, int first) {
    static const v8u shifts = {7, 6, 5, 4, 3, 2, 1, 0};
    int64_t j = 0;
    for (; j < n && ((offset + j) & 7); j++) masked_add_one(acc, x, x16, base, packed, offset, j, f, num, first);
    for (; j + 8 <= n; j += 8) {
        v8u xw;
        v8f bv, av;
        bits8(x, x16, j, &xw);
        v8f xv = (v8f)xw;
        memcpy(&bv, base + j, sizeof bv);
        v8u keep = -((packed[(offset + j) >> 3] >> shifts) & 1u);
        v8f d = (v8f)((v8u)(xv - bv) & keep);
        if (f != 1.0f) d = d * f;
        if (num != 1.0f) d = d * num;
        if (!first) {
            memcpy(&av, acc + j, sizeof av);
            d = av + d;
        }
        memcpy(acc + j, &d, sizeof d);
    }
    for (; j < n; j++) masked_add_one(acc, x, x16, base, packed, offset, j, f, num, first);
}

/* One model's share of the weighted sum over elements [0, n) of a block, from pass 1's packed mask (numpy's bit
   order: element j is bit 7 - j % 8 of byte j / 8): acc = (first ? 0 : acc) + (kept(x - base) * f) * num, each
   operation rounded in float32 in the order sparsify and task_arithmetic apply them (f == 1 or num == 1: skipped,
   as there), eight lanes a mask byte. Built with -ffp-contract=off: a fused multiply-add would round once instead
   of twice. */
WIDE void masked_add(float *acc, const float *x, const float *base, const uint8_t *packed, int64_t offset, int64_t n,
                     float f, float num, int first) {
    masked_add_any(acc, x, 0, base, packed, offset, n, f, num, first);
}

/* masked_add of bfloat16 x as stored. */
WIDE static void masked_add16(float *acc, const uint16_t *x, const float *base, const uint8_t *packed, int64_t offset,
                              int64_t n, float f, float num, int first) {
    masked_add_any(acc, x, 1, base, packed, offset, n, f, num, first);
}

/* acc = base + acc over elements [0, n), in place, base bfloat16 as stored (widened exactly): torch's
   base.float() + acc without a float32 copy of the base. */
WIDE void add_base16(float *restrict acc, const uint16_t *restrict base, int64_t n) {
    for (int64_t j = 0; j < n; j++) {
        uint32_t w = bits_at(base, 1, j);
        float b;
        memcpy(&b, &w, 4);
        acc[j] = b + acc[j];
    }
}

/* The end of the weighted sum over elements [0, n): acc = base + (acc / div) * lam, in place, each operation rounded
   in float32 as task_arithmetic applies them (div == 1 or lam == 1: skipped, as there). */
WIDE void finish_sum(float *restrict acc, const float *restrict base, int64_t n, float div, float lam) {
    for (int64_t j = 0; j < n; j++) {
        float v = acc[j];
        if (div != 1.0f) v = v / div;
        if (lam != 1.0f) v = v * lam;
        acc[j] = base[j] + v;
    }
}

/* masked_sum's elements [0, n) of a block from bfloat16 inputs x[0..k-1] and base: a chunk of the base widened into
   a buffer that stays in cache, then masked_add of every model in recipe order (packed[i], factor f[i], numerator
   num[i], x widened in registers) and finish_sum; each element takes the same float32 operations as on float32
   inputs. */
void masked_sum16(float *acc, const uint16_t *const *x, int64_t k, const uint16_t *base, const uint8_t *const *packed,
                  int64_t offset, int64_t n, const float *f, const float *num, float div, float lam) {
    enum { CHUNK = 2048 };
    float bs[CHUNK];
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t c = n - a < CHUNK ? n - a : CHUNK;
        widen_bf16(base + a, c, (uint32_t *)bs);
        for (int64_t i = 0; i < k; i++)
            masked_add16(acc + a, x[i] + a, bs, packed[i], offset + a, c, f[i], num[i], i == 0);
        finish_sum(acc + a, bs, c, div, lam);
    }
}

/* masked_delta of bfloat16 x and base as stored: out = kept(x - base) * f over elements [0, n) (mask bit offset + j),
   the base widened a chunk at a time in cache, x in registers; each element masked_add's float32 operations with
   num 1. */
void masked_delta16(float *out, const uint16_t *x, const uint16_t *base, const uint8_t *packed, int64_t offset,
                    int64_t n, float f) {
    enum { CHUNK = 2048 };
    float bs[CHUNK];
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t c = n - a < CHUNK ? n - a : CHUNK;
        widen_bf16(base + a, c, (uint32_t *)bs);
        masked_add16(out + a, x + a, bs, packed, offset + a, c, f, 1.0f, 1);
    }
}

static inline float magnitude(float x) {
    uint32_t k;
    memcpy(&k, &x, 4);
    k &= 0x7FFFFFFFu;
    memcpy(&x, &k, 4);
    return x;
}

/* Lanes of d (their magnitudes when `absolute`) equal to v: all ones there, zero elsewhere. */
static inline void equal_lanes(const v8f *d, float v, int absolute, v8u *on) {
    *on = (v8u)((v8f)((v8u)*d & (absolute ? 0x7FFFFFFFu : 0xFFFFFFFFu)) == v);
}

/* Element j of group_members' loops: whether it is a member (value v), and its value into *d. */
static inline int member(const void *a, const void *base, int64_t j, int stored16, float v, int absolute, float *d) {
    *d = delta_at(a, base, j, stored16);
    return (absolute ? magnitude(*d) : *d) == v;
}

/* Every member of [0, n) (a block wholly inside the kept part of its group): one branch-free pass. */
WIDE static void all_members(const void *restrict a, const void *restrict base, int64_t n, int stored16, float v,
                             int absolute, float *restrict out, uint8_t *restrict mask) {
    for (int64_t j = 0; j < n; j++) {
        float d;
        int on = member(a, base, j, stored16, v, absolute, &d);
        if (out) out[j] = on ? d : out[j];
        else mask[j] |= (uint8_t)on;
    }
}

/* Marks the members [skip, take) in index order of the elements whose value (magnitude when `absolute`) is v, the
   values being a - base where a base is given (`stored16`: a and base bfloat16 as stored): out[j] = that value
   where out is given, else mask[j] = 1. Eight
   elements a step: steps before `skip` only count, steps wholly inside the range mark their members at once (a
   boundary group can hold most of a block). */
WIDE static void group_members(const void *a, const void *base, int64_t n, int stored16, float v, int absolute,
                               int64_t skip, int64_t take, float *out, uint8_t *mask) {
    if (skip <= 0 && take >= n) {
        all_members(a, base, n, stored16, v, absolute, out, mask);
        return;
    }
    int64_t c = 0, j = 0;
    for (; j + 8 <= n && c < take; j += 8) {
        v8f d;
        v8u on;
        deltas8(a, base, j, stored16, &d);
        equal_lanes(&d, v, absolute, &on);
        uint32_t bits = lane_bits(&on);
        int64_t hits = __builtin_popcount(bits);
        if (c + hits <= skip) {
            c += hits;
        } else if (c >= skip && c + hits <= take) {
            if (out) {
                v8u o;
                memcpy(&o, out + j, sizeof o);
                o = (o & ~on) | ((v8u)d & on);
                memcpy(out + j, &o, sizeof o);
            } else {
                v8b m;
                memcpy(&m, mask + j, sizeof m);
                m |= __builtin_convertvector(on & 1u, v8b);
                memcpy(mask + j, &m, sizeof m);
            }
            c += hits;
        } else {
            for (; bits && c < take; bits &= bits - 1, c++) {
                int64_t at = j + __builtin_ctz(bits);
                if (c < skip) continue;
                if (out) out[at] = d[at - j];
                else mask[at] = 1;
            }
        }
    }
    for (; j < n && c < take; j++) {
        float d;
        if (!member(a, base, j, stored16, v, absolute, &d)) continue;
        if (c >= skip) {
            if (out) out[j] = d;
            else mask[j] = 1;
        }
        c++;
    }
}

/* The values of the first two groups kept whole in a block of n (a cut's two ends: every member kept), to join a
   block's main pass instead of a pass each (group_members would take all_members for them); NaN where none, which
   equals nothing. joined[g]: group g is one of them. */
static void whole_groups(int64_t n, const float *values, const int64_t *skip, const int64_t *take, int64_t groups,
                         float whole[2], uint8_t joined[2]) {
    int w = 0;
    whole[0] = whole[1] = NAN;
    for (int64_t g = 0; g < 2; g++) {
        joined[g] = g < groups && skip[g] <= 0 && take[g] >= n;
        if (joined[g]) whole[w++] = values[g];
    }
}

/* A block's trim by its tensor's rank cut (sparsify.apply_cut, then kept) of d = x - base (base NULL: x is d;
   `stored16`: x and base bfloat16 as stored): out = d where low < |d| < high, or where |d| is group g's value and the
   element is one of the group's members [skip[g], take[g]) of this block in index order; +0.0 elsewhere. */
WIDE void cut_keep(const void *restrict x, const void *restrict base, int64_t n, int stored16, float low, float high,
                   const float *values, const int64_t *skip, const int64_t *take, int64_t groups, float *restrict out) {
    float whole[2];
    uint8_t joined[2];
    whole_groups(n, values, skip, take, groups, whole, joined);
    for (int64_t j = 0; j < n; j++) {
        float d = delta_at(x, base, j, stored16), a = magnitude(d);
        uint32_t k;
        memcpy(&k, &d, 4);
        k &= 0u - (uint32_t)(((a > low) & (a < high)) | (a == whole[0]) | (a == whole[1]));
        memcpy(&out[j], &k, 4);
    }
    for (int64_t g = 0; g < groups; g++)
        if (g >= 2 || !joined[g]) group_members(x, base, n, stored16, values[g], 1, skip[g], take[g], out, NULL);
}

/* Model i's share of the TIES merge of a chunk: its vote (w or sign(w), w = x * num unless num == 1) into votes. */
WIDE static void add_votes(int64_t c, const float *restrict x, float num, int count, int first, float *restrict votes) {
    for (int64_t j = 0; j < c; j++) {
        float v = num != 1.0f ? x[j] * num : x[j];
        if (count) v = (float)((v > 0.0f) - (v < 0.0f));
        votes[j] = first ? v : votes[j] + v;
    }
}

/* Its part where it agrees with the elected sign (+0.0 elsewhere) into sum, its weight where it agrees into div. */
WIDE static void add_agreeing(int64_t c, const float *restrict x, float num, int first, const float *restrict votes,
                              float *restrict sum, float *restrict div) {
    for (int64_t j = 0; j < c; j++) {
        float w = num != 1.0f ? x[j] * num : x[j], term;
        int32_t pos = votes[j] >= 0.0f; /* NaN votes: negative */
        int32_t agree = (pos & (w > 0.0f)) | (!pos & (w < 0.0f));
        float cnt = (float)agree * num;
        uint32_t bits;
        memcpy(&bits, &w, 4);
        bits &= (uint32_t)-agree;
        memcpy(&term, &bits, 4);
        sum[j] = first ? term : sum[j] + term;
        div[j] = first ? cnt : div[j] + cnt;
    }
}

/* The TIES disjoint merge of k sparsified deltas d[i] over elements [0, n), as task_arithmetic._consensus runs it in
   float32: w_i = d_i * nums[i] (skipped where nums[i] == 1); votes = sum_i w_i (count: sum_i sign(w_i), NaN's sign
   0); an element agrees where w_i > 0 and votes >= 0, or w_i < 0 and votes are not; out = sum_i of the agreeing
   w_i (+0.0 elsewhere), divided when `normalize` by sum_i agree_i * nums[i] (1 where that is 0). Sums in model
   order; chunks keep the running sums in cache. */
#define CHUNK 512
WIDE void consensus(const float *const *d, int64_t k, int64_t n, const float *nums, int count, int normalize,
                    float *restrict out) {
    float votes[CHUNK], sum[CHUNK], div[CHUNK];
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t c = n - a < CHUNK ? n - a : CHUNK;
        for (int64_t i = 0; i < k; i++) add_votes(c, d[i] + a, nums[i], count, i == 0, votes);
        for (int64_t i = 0; i < k; i++) add_agreeing(c, d[i] + a, nums[i], i == 0, votes, sum, div);
        if (!normalize) {
            memcpy(out + a, sum, sizeof(float) * c);
            continue;
        }
        /* without branches: whether a weight agrees is data, and a vector division rounds as a scalar one */
        for (int64_t j = 0; j < c; j++) {
            float dv = div[j];
            uint32_t zero = 0u - (uint32_t)(dv == 0.0f), bits, one = 0x3F800000u;
            memcpy(&bits, &dv, 4);
            bits = (bits & ~zero) | (one & zero);
            memcpy(&dv, &bits, 4);
            out[a + j] = sum[j] / dv;
        }
    }
}

/* Chunk sums of the float64 products x_i * x_j of k float32 arrays (of x_i - base, each difference rounded to
   float32, where a base is given; `stored16`: x and base bfloat16 as stored) over elements [0, n), for every pair
   i <= j in row order ((0,0), (0,1), ..., (1,1), ...): out[c * pairs + p] for chunk c of `chunk` elements (a
   multiple of 8; the last may be shorter), each summed in eight fixed lanes (lane l: elements j % 8 == l, the tail in
   lane 0) added in a fixed tree: the same values whatever the threads or the vector width. Each chunk's k values are
   taken once into `rows` (k * chunk floats), then multiplied pair by pair. */
static inline __attribute__((always_inline)) void gram_of(const void *const *x, const void *base, int64_t k,
                                                         int64_t n, int64_t chunk, int stored16, float *rows,
                                                         double *out) {
    for (int64_t a = 0, c = 0; a < n; a += chunk, c++) {
        int64_t len = n - a < chunk ? n - a : chunk;
        double *o = out + c * (k * (k + 1) / 2);
        const void *b = element(base, stored16, a);
        for (int64_t i = 0; i < k; i++) {
            const void *xi = element(x[i], stored16, a);
            for (int64_t t = 0; t < len; t++) rows[i * chunk + t] = delta_at(xi, b, t, stored16);
        }
        for (int64_t i = 0; i < k; i++) {
            for (int64_t j = i; j < k; j++) {
                const float *u = rows + i * chunk, *v = rows + j * chunk;
                Lanes lanes = {{0}, {0}};
                int64_t t = 0;
                for (; t + 8 <= len; t += 8) {
                    v8f fu, fv;
                    memcpy(&fu, u + t, sizeof fu);
                    memcpy(&fv, v + t, sizeof fv);
                    lanes_add_products(&lanes, &fu, &fv);
                }
                for (; t < len; t++) lanes.lo[0] += (double)u[t] * (double)v[t];
                *o++ = lanes_total(&lanes);
            }
        }
    }
}

/* gram_of with the element width a constant (so that its loops vectorize). */
WIDE void gram_chunks(const void *const *x, const void *base, int64_t k, int64_t n, int64_t chunk, int stored16,
                      float *rows, double *out) {
    if (stored16) gram_of(x, base, k, n, chunk, 1, rows, out);
    else gram_of(x, base, k, n, chunk, 0, rows, out);
}

/* Model Stock's t * mean(x_i) + (1 - t) * base over elements [0, n) of k float32 arrays (`stored16`: bfloat16 as
   stored), as torch computes it: the models added in order from +0.0, divided by k, each product and the sum
   rounded to float32 (no contraction). */
WIDE void stock_merge(const void *const *x, const void *base, int64_t k, int64_t n, int stored16, float t,
                      float *out) {
    float kf = (float)k, u = 1.0f - t;
    int64_t j = 0;
    for (; j + 8 <= n; j += 8) {
        v8f sum = {0}, d, b;
        for (int64_t i = 0; i < k; i++) {
            deltas8(x[i], NULL, j, stored16, &d);
            sum += d;
        }
        deltas8(base, NULL, j, stored16, &b);
        d = t * (sum / kf) + u * b;
        memcpy(out + j, &d, sizeof d);
    }
    for (; j < n; j++) {
        float sum = 0.0f;
        for (int64_t i = 0; i < k; i++) sum += delta_at(x[i], NULL, j, stored16);
        out[j] = t * (sum / kf) + u * delta_at(base, NULL, j, stored16);
    }
}

/* One model's step of Welford's update over a chunk. A division by a power of two is the multiplication by its
   inverse (the same bits, several times faster). */
static inline __attribute__((always_inline)) void welford(int64_t c, const void *restrict x, const void *restrict b,
                                                         int stored16, double count, double *restrict mean,
                                                         double *restrict m2) {
    if (((int64_t)count & ((int64_t)count - 1)) == 0) {
        double inv = 1.0 / count;
        for (int64_t j = 0; j < c; j++) {
            double v = delta_at(x, b, j, stored16), delta = v - mean[j];
            mean[j] += delta * inv;
            m2[j] += delta * (v - mean[j]);
        }
        return;
    }
    for (int64_t j = 0; j < c; j++) {
        double v = delta_at(x, b, j, stored16), delta = v - mean[j];
        mean[j] += delta / count;
        m2[j] += delta * (v - mean[j]);
    }
}

/* sce's selection key: the population variance over n models of `len` elements, model i's at x[i] less base (in
   float32, as the stacked deltas are taken; base NULL: x[i] as it is), Welford's update in float64 in model order as
   ATen's CPU torch.var(dim=0, unbiased=False) runs it (first step 0 + x / 1, which turns -0.0 into +0.0), rounded
   once to float32 (`stored16`: x and base bfloat16 as stored). Chunks keep the float64 state in cache. */
static inline __attribute__((always_inline)) void variances_of(const void *const *x, int64_t n, const void *base,
                                                              int64_t len, int stored16, float *out) {
    double mean[1024], m2[1024];
    for (int64_t a = 0; a < len; a += 1024) {
        int64_t c = len - a < 1024 ? len - a : 1024;
        const void *b = element(base, stored16, a);
        for (int64_t j = 0; j < c; j++) {
            mean[j] = (double)delta_at(element(x[0], stored16, a), b, j, stored16) + 0.0;
            m2[j] = 0.0;
        }
        for (int64_t i = 1; i < n; i++) welford(c, element(x[i], stored16, a), b, stored16, (double)(i + 1), mean, m2);
        for (int64_t j = 0; j < c; j++) out[a + j] = (float)(m2[j] / (double)n);
    }
}

/* variances_of with the element width a constant (so that its loops vectorize). */
WIDE void variances(const void *const *x, int64_t n, const void *base, int64_t len, int stored16, float *out) {
    if (stored16) variances_of(x, n, base, len, 1, out);
    else variances_of(x, n, base, len, 0, out);
}

/* sparsify.apply_cut of a block: mask[j] = 1 where low < a[j] < high, or where a[j] is group g's value and the
   element is one of the group's members [skip[g], take[g]) of this block in index order. */
WIDE void cut_mask(const float *restrict a, int64_t n, float low, float high, const float *values,
                   const int64_t *skip, const int64_t *take, int64_t groups, uint8_t *restrict mask) {
    float whole[2];
    uint8_t joined[2];
    whole_groups(n, values, skip, take, groups, whole, joined);
    for (int64_t j = 0; j < n; j++) mask[j] = ((a[j] > low) & (a[j] < high)) | (a[j] == whole[0]) | (a[j] == whole[1]);
    for (int64_t g = 0; g < groups; g++)
        if (g >= 2 || !joined[g]) group_members(a, NULL, n, 0, values[g], 0, skip[g], take[g], NULL, mask);
}

/* sce's selected delta of one element: (x - base) times the mask as a float (no mask: all kept). */
static inline float selected(const void *x, const void *base, int stored16, const uint8_t *mask, int64_t j) {
    float d = delta_at(x, base, j, stored16);
    return mask ? d * (float)mask[j] : d;
}

/* numpy's pairwise float64 sum (np.add.reduce of a contiguous array, less its first 0.0 +) of the squared selected
   deltas of elements [0, n) (`stored16`: x and base bfloat16 as stored): eight accumulators up to 128 elements,
   halves at multiples of 8 above. */
WIDE double selected_squares(const void *x, const void *base, const uint8_t *mask, int64_t n, int stored16) {
    if (n < 8) {
        double r = 0.0;
        for (int64_t j = 0; j < n; j++) {
            double s = selected(x, base, stored16, mask, j);
            r += s * s;
        }
        return r;
    }
    if (n <= 128) {
        double r[8];
        int64_t j = 0;
        for (int t = 0; t < 8; t++) {
            double s = selected(x, base, stored16, mask, t);
            r[t] = s * s;
        }
        for (j = 8; j < n - n % 8; j += 8) {
            for (int t = 0; t < 8; t++) {
                double s = selected(x, base, stored16, mask, j + t);
                r[t] += s * s;
            }
        }
        double res = ((r[0] + r[1]) + (r[2] + r[3])) + ((r[4] + r[5]) + (r[6] + r[7]));
        for (; j < n; j++) {
            double s = selected(x, base, stored16, mask, j);
            res += s * s;
        }
        return res;
    }
    int64_t half = n / 2 - (n / 2) % 8;
    return selected_squares(x, base, mask, half, stored16) +
           selected_squares(element(x, stored16, half), element(base, stored16, half), mask ? mask + half : NULL,
                            n - half, stored16);
}

/* Model i's share of sce's sign election over a chunk: votes = (first ? +0.0 : votes) + its selected delta. */
static inline __attribute__((always_inline)) void votes_of(int64_t c, const void *restrict x,
                                                          const void *restrict base, int stored16,
                                                          const uint8_t *mask, int first, float *restrict votes) {
    for (int64_t j = 0; j < c; j++) votes[j] = (first ? 0.0f : votes[j]) + selected(x, base, stored16, mask, j);
}

/* Its weight where its selected delta takes the elected sign (e = w * agree), into den, and delta * e into num. */
static inline __attribute__((always_inline)) void agreeing(int64_t c, const void *restrict x,
                                                          const void *restrict base, int stored16,
                                                          const uint8_t *mask, float w, int first,
                                                          const float *restrict votes, float *restrict num,
                                                          float *restrict den) {
    for (int64_t j = 0; j < c; j++) {
        float s = selected(x, base, stored16, mask, j);
        int32_t pos = votes[j] >= 0.0f; /* NaN votes: negative */
        float e = w * (float)((pos & (s > 0.0f)) | (!pos & (s < 0.0f)));
        num[j] = (first ? 0.0f : num[j]) + s * e;
        den[j] = (first ? 0.0f : den[j]) + e;
    }
}

/* votes_of and agreeing with the element width a constant in each loop (so that each vectorizes). */
WIDE static void sce_votes(int64_t c, const void *x, const void *base, int stored16, const uint8_t *mask, int first,
                           float *votes) {
    if (stored16) votes_of(c, x, base, 1, mask, first, votes);
    else votes_of(c, x, base, 0, mask, first, votes);
}

WIDE static void sce_agreeing(int64_t c, const void *x, const void *base, int stored16, const uint8_t *mask, float w,
                              int first, const float *votes, float *num, float *den) {
    if (stored16) agreeing(c, x, base, 1, mask, w, first, votes, num, den);
    else agreeing(c, x, base, 0, mask, w, first, votes, num, den);
}

/* sce's merge of elements [0, n) of k models, as methods/sce.py runs it in float32 on the stacked deltas d_i (x_i
   - base, times the selection mask): votes = sum_i d_i; e_i = w_i where d_i takes the sign of the votes (>= 0:
   positive), else w_i * 0; out = base + (sum_i d_i * e_i) / max(sum_i e_i, 1e-6), every sum from +0.0 in model
   order (`stored16`: x and base bfloat16 as stored). */
WIDE void sce_merge(const void *const *x, int64_t k, const void *base, const uint8_t *mask, const float *w, int64_t n,
                    int stored16, float *restrict out) {
    float votes[CHUNK], num[CHUNK], den[CHUNK];
    const float least = (float)1e-6;
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t c = n - a < CHUNK ? n - a : CHUNK;
        const uint8_t *m = mask ? mask + a : NULL;
        const void *b = element(base, stored16, a);
        for (int64_t i = 0; i < k; i++) sce_votes(c, element(x[i], stored16, a), b, stored16, m, i == 0, votes);
        for (int64_t i = 0; i < k; i++)
            sce_agreeing(c, element(x[i], stored16, a), b, stored16, m, w[i], i == 0, votes, num, den);
        for (int64_t j = 0; j < c; j++)
            out[a + j] = delta_at(b, NULL, j, stored16) + num[j] / (den[j] < least ? least : den[j]);
    }
}

/* Model i's share of RAM over a chunk: whether |x - base| > eps into count, the kept delta (+0.0 where not) into
   total, and the kept delta times its boost into unique (used where one model alone changed the element: one
   nonzero term, so a fused multiply-add, as torch's add_ with alpha runs it, rounds it the same). */
WIDE static void ram_add(int64_t c, const float *restrict x, const float *restrict base, float eps, float boost,
                         int first, int32_t *restrict count, float *restrict total, float *restrict unique) {
    for (int64_t j = 0; j < c; j++) {
        float d = x[j] - base[j];
        int32_t on = magnitude(d) > eps;
        float kept = on ? d : 0.0f;
        count[j] = (first ? 0 : count[j]) + on;
        total[j] = (first ? 0.0f : total[j]) + kept;
        if (unique) unique[j] = (first ? 0.0f : unique[j]) + kept * boost;
    }
}

/* RAM (boosts NULL) and RAM+ tensor-local over elements [0, n) of k models, as methods/ram.py runs them in
   float32: c = how many models changed the element by more than eps; mean = (sum of the kept deltas, from +0.0 in
   model order) / max(c, 1); out = base + mean, or with boosts base + kept_i * boost_i where model i alone changed
   it (c == 1). */
void ram_merge(const float *const *x, int64_t k, const float *base, float eps, const float *boosts, int64_t n,
               float *out) {
    int32_t count[CHUNK];
    float total[CHUNK], unique[CHUNK];
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t c = n - a < CHUNK ? n - a : CHUNK;
        for (int64_t i = 0; i < k; i++) {
            float boost = boosts ? boosts[i] : 1.0f;
            ram_add(c, x[i] + a, base + a, eps, boost, i == 0, count, total, boosts ? unique : NULL);
        }
        for (int64_t j = 0; j < c; j++) {
            float mean = total[j] / (float)(count[j] > 1 ? count[j] : 1);
            out[a + j] = base[a + j] + (boosts && count[j] == 1 ? unique[j] : mean);
        }
    }
}

/* RAM+'s overlap counts over elements [0, n): per model i, counts[2i] += its changed elements (|x_i - base| > eps)
   that other models changed too, counts[2i + 1] += those it alone changed. */
WIDE void ram_counts(const float *const *x, int64_t k, const float *base, float eps, int64_t n, int64_t *counts) {
    int32_t count[CHUNK];
    float total[CHUNK];
    for (int64_t a = 0; a < n; a += CHUNK) {
        int64_t c = n - a < CHUNK ? n - a : CHUNK;
        for (int64_t i = 0; i < k; i++) ram_add(c, x[i] + a, base + a, eps, 1.0f, i == 0, count, total, NULL);
        for (int64_t i = 0; i < k; i++) {
            int64_t shared = 0, alone = 0;
            for (int64_t j = 0; j < c; j++) {
                int32_t on = magnitude(x[i][a + j] - base[a + j]) > eps;
                shared += on & (count[j] > 1);
                alone += on & (count[j] == 1);
            }
            counts[2 * i] += shared;
            counts[2 * i + 1] += alone;
        }
    }
}

/* bfloat16 to float32 of n values (the bits shifted up: exact, as torch converts them); returns whether any is NaN
   or infinite (all exponent bits set), found in the same pass. */
WIDE int widen_bf16(const uint16_t *restrict src, int64_t n, uint32_t *restrict dst) {
    uint32_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t h = src[j];
        dst[j] = h << 16;
        bad |= (h & 0x7F80u) == 0x7F80u;
    }
    return (int)bad;
}

/* The float32 deltas x - base of n bfloat16 values as stored (each widened exactly, then subtracted: torch's
   x.float() - base.float()). */
WIDE void delta_bf16(const uint16_t *restrict x, const uint16_t *restrict base, int64_t n, float *restrict out) {
    for (int64_t j = 0; j < n; j++) out[j] = delta_at(x, base, j, 1);
}

/* Arcee Fusion's importance of rows [0, rows) of `cols` float32 elements: |other - base| * kl[row], each step
   rounded to float32 as torch's (other - base).abs() * kl takes it. */
WIDE void fusion_importance(const float *restrict base, const float *restrict other, const float *restrict kl,
                            int64_t rows, int64_t cols, float *restrict out) {
    for (int64_t r = 0; r < rows; r++) {
        const float *b = base + r * cols, *o = other + r * cols;
        float *y = out + r * cols, w = kl[r];
        for (int64_t j = 0; j < cols; j++) y[j] = magnitude(o[j] - b[j]) * w;
    }
}

/* Order-preserving keys of n float32 values (sparsify.RadixRanks.keys): the sign bit set on non-negative floats,
   every bit flipped on negative ones, every NaN the largest key. */
WIDE void order_keys(const uint32_t *restrict a, int64_t n, uint32_t *restrict out) {
    for (int64_t j = 0; j < n; j++) {
        uint32_t u = a[j], k = u >= 0x80000000u ? ~u : u | 0x80000000u;
        out[j] = (u & 0x7FFFFFFFu) > 0x7F800000u ? 0xFFFFFFFFu : k;
    }
}

/* Whether any of n bfloat16 values is NaN or infinite (all exponent bits set): widen_bf16's check alone. */
WIDE int nonfinite_bf16(const uint16_t *restrict src, int64_t n) {
    uint32_t bad = 0;
    for (int64_t j = 0; j < n; j++) bad |= (src[j] & 0x7F80u) == 0x7F80u;
    return (int)bad;
}

/* The output's float32 to bfloat16 conversion: dst = src rounded to nearest, ties to even (torch's conversion of
   finite values); returns 1 where some value is NaN or Inf (dst is then not to be used: the caller refuses it). */
WIDE int narrow_bf16(const uint32_t *restrict src, int64_t n, uint16_t *restrict dst) {
    uint32_t bad = 0;
    for (int64_t j = 0; j < n; j++) {
        uint32_t b = src[j];
        bad |= (b & 0x7F800000u) == 0x7F800000u;
        dst[j] = (uint16_t)((b + 0x7FFFu + ((b >> 16) & 1u)) >> 16);
    }
    return bad != 0;
}

/* out = sum_i w[i] * x_i over elements [0, n) of k float32 arrays (`stored16`: bfloat16 as stored), summed in
   float64 in model order from +0.0, each step one fused multiply-add (torch's add_ with alpha on float64 is one),
   models with w[i] == 0 skipped, rounded once to float32: karcher's combination of a block. */
WIDE void weighted_sum64(const void *const *x, const double *w, int64_t k, int64_t n, int stored16,
                         float *restrict out) {
    for (int64_t a = 0; a < n; a += 1024) { /* a range at a time: the running sums stay in cache */
        int64_t len = n - a < 1024 ? n - a : 1024;
        double acc[1024];
        for (int64_t j = 0; j < len; j++) acc[j] = 0.0;
        for (int64_t i = 0; i < k; i++) {
            if (w[i] == 0.0) continue;
            for (int64_t j = 0; j < len; j++) acc[j] = fma((double)delta_at(x[i], NULL, a + j, stored16), w[i], acc[j]);
        }
        for (int64_t j = 0; j < len; j++) out[a + j] = (float)acc[j];
    }
}

/* out = sum_i w[i] * x_i over elements [0, n) of k float32 arrays (`stored16`: bfloat16 as stored) in float32, in
   model order from +0.0, each step one fused multiply-add (torch's add_ with alpha on float32 is one): multislerp's
   weighted sum of unit vectors. */
WIDE void weighted_sum32(const void *const *x, const float *w, int64_t k, int64_t n, int stored16,
                         float *restrict out) {
    for (int64_t a = 0; a < n; a += 1024) { /* a range at a time: the running sums stay in cache */
        int64_t len = n - a < 1024 ? n - a : 1024;
        float *o = out + a;
        for (int64_t j = 0; j < len; j++) o[j] = 0.0f;
        for (int64_t i = 0; i < k; i++) {
            for (int64_t j = 0; j < len; j++) o[j] = fmaf(delta_at(x[i], NULL, a + j, stored16), w[i], o[j]);
        }
    }
}
