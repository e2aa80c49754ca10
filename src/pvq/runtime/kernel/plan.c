/* The generic plan decoder: any split tree of native.Plan, one group at a time (the layouts fixed.c does not
 * cover, and its groups that need the CWRS recurrence), and the plan's node readers that fixed.c shares. */
#include "pvq.h"

/* 1 / ||y|| for every energy ||y||^2 <= MAXK^2 a shape of k <= MAXK pulses can have (RINV[0] = 0), filled when
 * the library loads (not per call: k = 88 alone is 7745 square roots) */
static float RINV[MAXK * MAXK + 1];
__attribute__((constructor)) static void fill_rinv(void) {
    RINV[0] = 0.0f;
    for (int64_t e = 1; e <= MAXK * MAXK; e++) RINV[e] = 1.0f / sqrtf((float)e);
}

/* A split node's tables as plain pointers, read once per call: the row loops then never reload the
 * plan (int8 stores could alias it as far as the compiler knows). */
typedef struct {
    const int64_t *offs, *v2, *shifts;
    const uint8_t *buckets;
    const uint64_t *rcp;
    int64_t K;
} split_t;

typedef struct {
    const int64_t *base, *mask, *u;
    const int8_t *lut;
    int64_t d, Kt, us;
} leaf_t;

static inline split_t split_of(const int64_t *plan, int64_t p) {
    split_t s;
    s.K = plan[p + SPLIT_K];
    s.offs = plan + plan[p + SPLIT_OFFS_AT];
    s.v2 = plan + plan[p + SPLIT_V2_AT];
    s.rcp = (const uint64_t *)(plan + plan[p + SPLIT_RCP_AT]);
    s.shifts = plan + plan[p + SPLIT_BUCKET_AT];
    s.buckets = (const uint8_t *)(s.shifts + s.K + 1);
    return s;
}

static leaf_t leaf_of(const int64_t *plan, int64_t f) {
    leaf_t l;
    l.d = plan[f + LEAF_D];
    l.Kt = plan[f + LEAF_KT];
    l.base = (const int64_t *)(intptr_t)plan[f + LEAF_BASE];
    l.lut = (const int8_t *)(intptr_t)plan[f + LEAF_LUT];
    l.u = (const int64_t *)(intptr_t)plan[f + LEAF_U];
    l.us = plan[f + LEAF_USTRIDE];
    l.mask = (const int64_t *)(intptr_t)plan[f + LEAF_MASK];
    return l;
}

/* Point i of P(d, k) in CWRS order (codec/pyramid.py decode_cwrs), for the leaves with more pulses than
 * their table holds. u[m * us + j] = U(m, j): codewords of P(m, k) with a first coordinate >= 0 come first
 * (U(m, k + 1) of them), then the negative ones; the pulses left for the rest are the largest k' with
 * U(m, k') <= the index (U(m, .) increases). */
static void cwrs_decode(const leaf_t *l, uint64_t i, int64_t k, int8_t *y) {
    for (int64_t j = 0; j < l->d - 1; j++) {
        const int64_t *row = l->u + (l->d - j) * l->us;
        int neg = i >= (uint64_t)row[k + 1];
        if (neg) i -= (uint64_t)row[k + 1];
        int64_t rest = k;
        while (rest > 0 && (uint64_t)row[rest] > i) rest--;
        i -= (uint64_t)row[rest];
        y[j] = (int8_t)(neg ? rest - k : k - rest);
        k = rest;
    }
    y[l->d - 1] = (int8_t)(i > 0 ? -k : k);
}

/* point j of P(d, k) of leaf l: its table row, or decoded into scratch (d bytes) past the table's cap */
static inline __attribute__((always_inline)) const int8_t *leaf_row(const leaf_t *l, int64_t k, uint64_t j,
                                                                    int8_t *scratch) {
    if (__builtin_expect(k <= l->Kt, 1)) return l->lut + (l->base[k] + (int64_t)j) * l->d;
    cwrs_decode(l, j, k, scratch);
    return scratch;
}

/* idx of P(n, k) -> (k1, a, b): the halves' pulse count and indices. k1 is the largest k1 <= k with
 * O(k, k1) <= idx (offsets increase strictly; they and the indices are below 2^63, so signed
 * compares are exact): the search starts from the bucket's k1, rarely more than one boundary short. */
static inline __attribute__((always_inline)) uint64_t split_fast(const split_t *s, uint64_t idx, int64_t k, int64_t *k1_out,
                                                                 uint64_t *b) {
    const int64_t *offs = s->offs + k * (s->K + 1);
    int64_t k1 = s->buckets[(k << BUCKET_BITS) + (int64_t)(idx >> s->shifts[k])];
    while (k1 < k && offs[k1 + 1] <= (int64_t)idx) k1++;
    int64_t k2 = k - k1;
    *k1_out = k1;
    return divide(idx - (uint64_t)offs[k1], (uint64_t)s->v2[k2], s->rcp[k2], b);
}

/* shape index idx of P(n, k) under the node at plan[p] -> its n coordinates */
static void decode_shape(const int64_t *plan, int64_t p, uint64_t idx, int64_t k, int8_t *out) {
    int8_t scratch[MAXN];
    for (;;) {
        if (plan[p + NODE_KIND] == NODE_LEAF) {
            const leaf_t l = leaf_of(plan, p);
            const int8_t *row = leaf_row(&l, k, idx, scratch);
            for (int64_t j = 0; j < l.d; j++) out[j] = row[j];
            return;
        }
        int64_t n1 = plan[p + SPLIT_N1], k1;
        const split_t sp = split_of(plan, p);
        uint64_t b, a = split_fast(&sp, idx, k, &k1, &b);
        int64_t k2 = k - k1;
        int64_t f = plan[p + SPLIT_FIRST];
        if (plan[f + NODE_KIND] == NODE_LEAF) {  /* a leaf first half (the common case): copy its row, no call */
            const leaf_t l = leaf_of(plan, f);
            const int8_t *row = leaf_row(&l, k1, a, scratch);
            for (int64_t j = 0; j < l.d; j++) out[j] = row[j];
        } else {
            decode_shape(plan, f, a, k1, out);
        }
        out += n1;
        p = plan[p + SPLIT_SECOND];
        idx = b;
        k = k2;
    }
}

/* one group: its integer shape y[n] (returned) and gain level (*lvl); the plan's top node is its word 0 */
static inline void pvq_shape(const int64_t *plan, const stream_t *s, int64_t gi, int64_t k, int8_t *y,
                             uint64_t *lvl) {
    decode_shape(plan, 0, code_at(s, gi, lvl), k, y);
}

/* y[b * ldy + r] = sum_c W[r, c] * x[b * ldx + c] for b < B, r < rows, eight tokens at a time */
static void plan_gemv(const pvq_matrix_t *w, const float *x, int64_t ldx, int64_t B, float *out, int64_t ldy) {
    const stream_t st = matrix_stream(w);
    const int64_t *plan = w->plan;
    const int64_t n = w->n, k = w->k, rows = w->rows, groups = w->cols / n;
    const float *levels = w->levels, *scales = w->scales;
    const int per_row = (int)w->per_row;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        int8_t y[MAXN];
        uint64_t lvl;
        float acc[8];
        float s = scales[per_row ? r : 0];
        for (int64_t b0 = 0; b0 < B; b0 += 8) {
            int64_t nb = B - b0 < 8 ? B - b0 : 8;
            for (int64_t b = 0; b < nb; b++) acc[b] = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                pvq_shape(plan, &st, r * groups + g, k, y, &lvl);
                int32_t e = 0;
                for (int64_t j = 0; j < n; j++) e += (int32_t)y[j] * y[j];
                float f = levels[lvl] * RINV[e];
                for (int64_t b = 0; b < nb; b++) {
                    const float *xv = x + (b0 + b) * ldx + g * n;
                    float d = 0.0f;
                    for (int64_t j = 0; j < n; j++) d += (float)y[j] * xv[j];
                    acc[b] += f * d;
                }
            }
            for (int64_t b = 0; b < nb; b++) out[(b0 + b) * ldy + r] = s * acc[b];
        }
    }
}

/* rows [r0, r1) of W into out [r1 - r0, cols] */
static void plan_decode(const pvq_matrix_t *w, int64_t r0, int64_t r1, float *out) {
    const stream_t st = matrix_stream(w);
    const int64_t *plan = w->plan;
    const int64_t n = w->n, k = w->k, cols = w->cols, groups = cols / n;
    const float *levels = w->levels, *scales = w->scales;
    const int per_row = (int)w->per_row;
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        int8_t y[MAXN];
        uint64_t lvl;
        float s = scales[per_row ? r : 0];
        float *o = out + (r - r0) * cols;
        for (int64_t g = 0; g < groups; g++) {
            pvq_shape(plan, &st, r * groups + g, k, y, &lvl);
            int32_t e = 0;
            for (int64_t j = 0; j < n; j++) e += (int32_t)y[j] * y[j];
            float f = s * levels[lvl] * RINV[e];
            for (int64_t j = 0; j < n; j++) o[g * n + j] = f * (float)y[j];
        }
    }
}
