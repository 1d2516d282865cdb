/* Keep masks of the random sparsifiers (DARE, DELLA MagPrune) for rows of float32 deltas, one fused pass per row.

   Called through ctypes (which releases the GIL) by mergesmith/methods/fastmask.py; the Python and torch paths in
   sparsify.py compute the same masks and are the reference. Element j of a row is kept when u_j < p_j, u_j being
   the SplitMix64 uniform of its stream index (rng.py) and p_j = density (DARE) or steps[rank_j] (DELLA: rank of
   |delta_j| in its row, ascending, ties by index).

   DELLA without a sort: steps[] is non-decreasing, so u < steps[0] keeps whatever the rank, u >= steps[n-1] drops,
   and otherwise the element is kept iff rank >= k(u) = #{r : steps[r] <= u}. Ranks come from a histogram of the
   magnitudes' bit patterns (which order like the values): an element's bucket bounds its rank, and only when k(u)
   falls inside its bucket's range is the rank resolved exactly among the bucket's members.

   Also here: the second pass of an L1-rescaled DARE/DELLA sum (masked_add) and sce's variances (variances). */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define GOLDEN 0x9E3779B97F4A7C15ULL
#define MIX1 0xBF58476D1CE4E5B9ULL
#define MIX2 0x94D049BB133111EBULL
#define NB 1024           /* histogram buckets per row */
#define LARGE_BUCKET 512  /* beyond this many members of several values, sort a bucket once instead of scanning it */
enum { UNKNOWN, ONE_VALUE, MIXED, SORTED };

/* The streaming loops also get an AVX-512 build, picked at load time where the CPU has it (the 64-bit multiplies
   of the draws need it to vectorize). Same results: integer ops, and float ops in the same order (no contraction). */
#if defined(__x86_64__) && defined(__GLIBC__) && defined(__GNUC__) && !defined(__clang__)
#define WIDE __attribute__((target_clones("arch=x86-64-v4", "default")))
#else
#define WIDE
#endif

typedef struct {
    uint32_t *keys;    /* |delta| bit patterns */
    uint16_t *bucket;  /* each element's bucket */
    float *u;          /* uniforms of the row */
    int32_t *band;     /* elements whose draw is in the band */
    int32_t *order;    /* elements by bucket, by index within a bucket (built on the first exact rank) */
    uint64_t *packed;  /* (key << 32 | index) of buckets sorted for exact ranks */
    int64_t count[NB], start[NB], pos[NB];
    uint8_t kind[NB];
    int built;
} Scratch;

WIDE static void uniforms(uint64_t key, uint64_t first, int64_t n, float *u) {
    for (int64_t j = 0; j < n; j++) {
        uint64_t z = (first + (uint64_t)j) * GOLDEN + key;
        z ^= z >> 30;
        z *= MIX1;
        z ^= z >> 27;
        z *= MIX2;
        z ^= z >> 31;
        u[j] = (float)(int32_t)(z >> 40) * (1.0f / 16777216.0f); /* 24 bits: exact */
    }
}

/* float64 sums of |d| and of |d| where mask, in eight fixed lanes each: the same values whatever the threads. The
   masked value is |d|'s bit pattern ANDed with the widened mask (+0.0 where dropped), as sparsify.kept does. */
WIDE static void abs_sums(const float *d, const uint8_t *mask, int64_t n, double *before, double *after) {
    double lb[8] = {0}, la[8] = {0};
    int64_t j = 0;
    for (; j + 8 <= n; j += 8)
        for (int l = 0; l < 8; l++) {
            uint32_t k, kk;
            memcpy(&k, &d[j + l], 4);
            k &= 0x7FFFFFFFu;
            kk = k & (0u - (uint32_t)mask[j + l]);
            float a, ak;
            memcpy(&a, &k, 4);
            memcpy(&ak, &kk, 4);
            lb[l] += (double)a;
            la[l] += (double)ak;
        }
    for (; j < n; j++) {
        uint32_t k, kk;
        memcpy(&k, &d[j], 4);
        k &= 0x7FFFFFFFu;
        kk = k & (0u - (uint32_t)mask[j]);
        float a, ak;
        memcpy(&a, &k, 4);
        memcpy(&ak, &kk, 4);
        lb[0] += (double)a;
        la[0] += (double)ak;
    }
    *before = ((lb[0] + lb[1]) + (lb[2] + lb[3])) + ((lb[4] + lb[5]) + (lb[6] + lb[7]));
    *after = ((la[0] + la[1]) + (la[2] + la[3])) + ((la[4] + la[5]) + (la[6] + la[7]));
}

static int cmp_u64(const void *a, const void *b) {
    uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;
    return (x > y) - (x < y);
}

/* Fill keys and buckets of a row; returns the number of buckets used. */
WIDE static int histogram(const float *d, int64_t n, Scratch *s) {
    uint32_t hi = 0, lo = UINT32_MAX;
    for (int64_t j = 0; j < n; j++) {
        uint32_t k;
        memcpy(&k, &d[j], 4);
        k &= 0x7FFFFFFFu;
        s->keys[j] = k;
        hi = k > hi ? k : hi;
        lo = k - 1 < lo ? k - 1 : lo; /* 0 wraps to the largest: the smallest nonzero key, less one */
    }
    uint32_t lo_nz = lo + 1;
    int shift = 0;
    if (hi != 0)
        while ((hi >> shift) - (lo_nz >> shift) >= NB - 1) shift++;
    uint32_t base = hi != 0 ? lo_nz >> shift : 0;
    int used = hi != 0 ? (int)((hi >> shift) - base) + 2 : 1; /* bucket 0 holds the zeros */
    memset(s->count, 0, sizeof(int64_t) * used);
    for (int64_t j = 0; j < n; j++) {
        uint32_t k = s->keys[j];
        uint16_t b = k ? (uint16_t)(1 + (k >> shift) - base) : 0;
        s->bucket[j] = b;
        s->count[b]++;
    }
    int64_t acc = 0;
    for (int b = 0; b < used; b++) {
        s->start[b] = acc;
        acc += s->count[b];
    }
    s->built = 0;
    return used;
}

/* Exact rank of element j: the elements of lower buckets, plus those of its bucket before it in (key, index).
   A bucket's members are listed in index order, so in a bucket of one value (zeros, a row of equal deltas) the
   rank is j's place in the list; a mixed bucket is scanned, or sorted once when large. */
static int64_t exact_rank(int64_t j, int64_t n, int used, Scratch *s) {
    if (!s->built) {
        memcpy(s->pos, s->start, sizeof(int64_t) * used);
        memset(s->kind, UNKNOWN, used);
        for (int64_t i = 0; i < n; i++) s->order[s->pos[s->bucket[i]]++] = (int32_t)i;
        s->built = 1;
    }
    int b = s->bucket[j];
    int64_t first = s->start[b], c = s->count[b];
    const int32_t *m = s->order + first;
    uint32_t kj = s->keys[j];
    if (s->kind[b] == UNKNOWN) {
        int64_t t = 1;
        while (t < c && s->keys[m[t]] == s->keys[m[0]]) t++;
        s->kind[b] = t == c ? ONE_VALUE : (c <= LARGE_BUCKET ? MIXED : SORTED);
        if (s->kind[b] == SORTED) {
            uint64_t *p = s->packed + first;
            for (t = 0; t < c; t++) p[t] = (uint64_t)s->keys[m[t]] << 32 | (uint32_t)m[t];
            qsort(p, (size_t)c, sizeof(uint64_t), cmp_u64);
        }
    }
    if (s->kind[b] == MIXED) {
        int64_t r = 0;
        for (int64_t t = 0; t < c; t++) {
            uint32_t ki = s->keys[m[t]];
            r += ki < kj || (ki == kj && m[t] < j);
        }
        return first + r;
    }
    int64_t a = 0, z = c; /* the first place holding j (or its packed key): j's own */
    if (s->kind[b] == ONE_VALUE) {
        while (a < z) {
            int64_t mid = (a + z) / 2;
            if (m[mid] < j) a = mid + 1; else z = mid;
        }
        return first + a;
    }
    const uint64_t *p = s->packed + first;
    uint64_t want = (uint64_t)kj << 32 | (uint32_t)j;
    while (a < z) {
        int64_t mid = (a + z) / 2;
        if (p[mid] < want) a = mid + 1; else z = mid;
    }
    return first + a;
}

/* k(u) = #{r : steps[r] <= u} for steps[0] <= u < steps[n-1]: a guess from the line steps lie on, then a walk
   (or a bisection when the guess is far). */
static int64_t threshold(const float *steps, int64_t n, float u, double a, double per_step) {
    int64_t k = (int64_t)((u - a) * per_step);
    k = k < 1 ? 1 : (k > n - 1 ? n - 1 : k);
    for (int walk = 0; walk < 8; walk++) {
        if (steps[k - 1] > u) k--;
        else if (steps[k] <= u) k++;
        else return k;
    }
    int64_t lo = 1, hi = n - 1; /* steps[lo-1] <= u < steps[hi] */
    while (lo < hi) {
        int64_t mid = (lo + hi) / 2;
        if (steps[mid] <= u) lo = mid + 1; else hi = mid;
    }
    return lo;
}

static void della_row(const float *d, int64_t n, const float *steps, Scratch *s, uint8_t *mask) {
    int used = histogram(d, n, s);
    float p_lo = steps[0], p_hi = steps[n - 1];
    /* 1 / the slope of the line the steps lie on (used for draws inside the band, empty unless p_hi > p_lo) */
    double a = steps[0], per_step = p_hi > p_lo ? (double)(n - 1) / ((double)p_hi - p_lo) : 0.0;
    int64_t m = 0; /* elements whose draw falls in the band: the only ones whose rank matters */
    for (int64_t j = 0; j < n; j++) {
        float u = s->u[j];
        mask[j] = u < p_lo;
        s->band[m] = (int32_t)j;
        m += (u >= p_lo) & (u < p_hi);
    }
    for (int64_t t = 0; t < m; t++) {
        int64_t j = s->band[t];
        int64_t k = threshold(steps, n, s->u[j], a, per_step);
        int b = s->bucket[j];
        if (s->start[b] >= k) mask[j] = 1;
        else if (s->start[b] + s->count[b] > k) mask[j] = exact_rank(j, n, used, s) >= k;
    }
}

/* Masks (0/1 bytes) of rows [0, rows) of a block whose first row is row `row0` of its tensor (`cols` elements a
   row). steps == NULL: DARE, keep when u < density; else DELLA with steps[0..cols-1]. sums[2r], sums[2r+1]: row
   r's float64 sum of |delta| and of the kept |delta|. Returns 0, or -1 when memory runs out. */
int keep_masks(const float *delta, int64_t rows, int64_t cols, int64_t row0, uint64_t key, const float *steps,
               float density, uint8_t *mask, double *sums) {
    Scratch *s = calloc(1, sizeof(Scratch));
    if (s == NULL) return -1;
    s->u = malloc(sizeof(float) * cols);
    if (steps != NULL) {
        s->keys = malloc(sizeof(uint32_t) * cols);
        s->bucket = malloc(sizeof(uint16_t) * cols);
        s->order = malloc(sizeof(int32_t) * cols);
        s->band = malloc(sizeof(int32_t) * cols);
        s->packed = malloc(sizeof(uint64_t) * cols);
    }
    int ok = s->u != NULL && (steps == NULL || (s->keys && s->bucket && s->order && s->band && s->packed));
    for (int64_t r = 0; ok && r < rows; r++) {
        const float *d = delta + r * cols;
        uint8_t *m = mask + r * cols;
        uniforms(key, (uint64_t)(row0 + r) * (uint64_t)cols, cols, s->u);
        if (steps == NULL)
            for (int64_t j = 0; j < cols; j++) m[j] = s->u[j] < density;
        else if (cols > 0)
            della_row(d, cols, steps, s, m);
        abs_sums(d, m, cols, &sums[2 * r], &sums[2 * r + 1]);
    }
    free(s->u);
    free(s->keys);
    free(s->bucket);
    free(s->order);
    free(s->band);
    free(s->packed);
    free(s);
    return ok ? 0 : -1;
}

/* One model's share of the weighted sum over elements [0, n) of a block, from pass 1's packed mask (numpy's bit
   order: element j is bit 7 - j % 8 of byte j / 8): acc = (first ? 0 : acc) + (kept(x - base) * f) * num, each
   operation rounded in float32 in the order sparsify and task_arithmetic apply them (f == 1 or num == 1: skipped,
   as there). Built with -ffp-contract=off: a fused multiply-add would round once instead of twice. */
WIDE void masked_add(float *acc, const float *x, const float *base, const uint8_t *packed, int64_t offset, int64_t n,
                float f, float num, int first) {
    for (int64_t j = 0; j < n; j++) {
        int64_t e = offset + j;
        uint32_t k, keep = 0u - (uint32_t)((packed[e >> 3] >> (7 - (e & 7))) & 1u);
        float d = x[j] - base[j];
        memcpy(&k, &d, 4);
        k &= keep;
        memcpy(&d, &k, 4);
        if (f != 1.0f) d = d * f;
        if (num != 1.0f) d = d * num;
        acc[j] = first ? d : acc[j] + d;
    }
}

/* sce's selection key: the population variance over n models of `len` elements (model i's at x + i * stride),
   Welford's update in float64 in model order as ATen's CPU torch.var(dim=0, unbiased=False) runs it (first step
   0 + x / 1, which turns -0.0 into +0.0), rounded once to float32. Chunks keep the float64 state in cache. */
WIDE void variances(const float *x, int64_t n, int64_t stride, int64_t len, float *out) {
    double mean[1024], m2[1024];
    for (int64_t a = 0; a < len; a += 1024) {
        int64_t c = len - a < 1024 ? len - a : 1024;
        for (int64_t j = 0; j < c; j++) {
            mean[j] = (double)x[a + j] + 0.0;
            m2[j] = 0.0;
        }
        for (int64_t i = 1; i < n; i++) {
            const float *xi = x + i * stride + a;
            double count = (double)(i + 1);
            for (int64_t j = 0; j < c; j++) {
                double v = xi[j], delta = v - mean[j];
                mean[j] += delta / count;
                m2[j] += delta * (v - mean[j]);
            }
        }
        for (int64_t j = 0; j < c; j++) out[a + j] = (float)(m2[j] / (double)n);
    }
}
