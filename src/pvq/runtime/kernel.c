/* pvq runtime kernels: decode packed PVQ / uniform codes straight from the bit stream.
 *
 * Used by QuantLinear in decode="on-the-fly" mode, where only the packed codes stay resident.
 * Two entry points per codec:
 *   *_decode: rows [r0, r1) of the matrix into a float buffer (prompt processing: decode a block
 *             of rows once, then one matrix product serves every token of the batch);
 *   *_gemv:   y[b, r] = sum_c W[r, c] x[b, c] for a few rows of x, decoding each group in registers
 *             and never writing the matrix (generation: one token at a time).
 *
 * PVQ shapes use the split enumeration of pvq/codec/enumeration.py, serialised by
 * pvq/runtime/native.py into one int64 "plan" array (Plan: nodes, offsets, counts); its leaves point
 * by address at tables of points shared by every plan. A node at plan[p]:
 *   leaf:  [0, d, K, Kt, base, lut, u, ustride, mask]  point j of P(d, k) is row base[k] + j of lut for
 *          k <= Kt; beyond, it is decoded from the CWRS table u (the codec's leaf order; a rare case: the
 *          tables are capped at 1 MiB), and base[k] = mask[k] = 0 there (mask[k] = ~0 below). A leaf may also
 *          be a whole sub-pyramid tabulated in the split order (u = 0, Kt = K).
 *   split: [1, n, n1, K, first, second, offs_at, v2_at, rcp_at, bucket_at]
 *          index = O(k, k1) + a * V(n2, k - k1) + b, O(k, .) = plan[offs_at + k * (K + 1) + .],
 *          rcp[j] = floor(2^64 / V(n2, j)) (2^64 - 1 for V = 1) turns the division into a multiply;
 *          bucket_at: shifts [K + 1], then for each k 2^BUCKET_BITS starting values of the k1 search
 *          as bytes (bucket index >> shift[k]: the largest k1 with O(k, k1) <= the bucket's first index)
 * The gemv of the two layouts the picker uses most has its own loop (gemv_row): S1 = one split
 * into two table rows (n = 12 at 2.25 bits: P(6, <= 10) tabulated), S2 = a split into two S1
 * (n = 16 at 3.25 bits: leaves P(4, .)). It decodes a row in passes over chunks of groups (codes, top
 * splits, half splits, then SIMD dot products or stores) and is compiled once per layout (measured on
 * a 2-core EPYC, one core, G weights/s, bench/kernel.py: n = 16 0.7 scalar fused loop -> 1.25 with
 * SSE4.1 widening -> 1.76 in passes -> 1.95 with the exact division by L; n = 12 0.9 -> 1.6 -> 2.15 -> 2.8).
 * Codes are little-endian bit strings of `width` bits, one per group (bitpack.py); a PVQ code is
 * index * L + level. Everything is integer exact until the final float scaling: a group decodes to
 * (scale * level * 1 / ||y||) * y, the torch path (reconstruct()) to (y / ||y||) * (scale * level), equal
 * to within the last bit of a float.
 *
 * Written for pvq; compiled on first use by native.py (cc -O3 -fopenmp).
 */
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE4_1__
#include <immintrin.h>
#endif

#define MAXN 64
#define BUCKET_BITS 10

static inline uint64_t read_code(const uint8_t *buf, int64_t nbytes, int64_t i, int width, uint64_t mask) {
    int64_t bit = i * (int64_t)width;
    int64_t o = bit >> 3;
    int s = (int)(bit & 7);
    uint64_t v;
    if (o + 9 <= nbytes) {
        uint64_t lo;
        memcpy(&lo, buf + o, 8);
        v = lo >> s;
        if (s + width > 64) v |= (uint64_t)buf[o + 8] << (64 - s);
    } else {  /* the last few codes: byte by byte, never past the end of the stream */
        v = 0;
        int need = (s + width + 7) >> 3;
        for (int j = 0; j < need && o + j < nbytes; j++) {
            uint64_t byte = buf[o + j];
            if (8 * j - s >= 0) v |= byte << (8 * j - s); else v |= byte >> s;
        }
    }
    return v & mask;
}

/* q = n / d for the invariant divisor d, with rcp = floor(2^64 / d): the high half of n * rcp is
 * q or q - 1 (rcp underestimates 2^64 / d by less than 1), one correction makes it exact */
static inline uint64_t divide(uint64_t n, uint64_t d, uint64_t rcp, uint64_t *rem) {
    uint64_t q = (uint64_t)(((unsigned __int128)n * rcp) >> 64);
    uint64_t r = n - q * d;
    if (r >= d) { q++; r -= d; }
    *rem = r;
    return q;
}

static inline uint64_t reciprocal(uint64_t d) {
    return d == 1 ? ~0ULL : (uint64_t)(((unsigned __int128)1 << 64) / d);
}

/* A packed code stream: one `width`-bit code per group, index * L + gain level. With m = ceil(2^64 / L) the
 * high half of code * m is exactly code / L whenever code * (L - 1) < 2^64 (so for width + bits(L) <= 64): no
 * correction step. divide() needs one whenever the level is 0, about 1/L of the groups at random, a branch the
 * predictor cannot learn (it cost ~30% of the n = 12 gemv on a 2-core EPYC). */
typedef struct {
    const uint8_t *buf;
    int64_t nbytes;
    int width, exact;
    uint64_t mask, L, m;
} stream_t;

static stream_t stream_of(const uint8_t *buf, int64_t nbytes, int width, int64_t L) {
    stream_t s;
    s.buf = buf;
    s.nbytes = nbytes;
    s.width = width;
    s.mask = width >= 64 ? ~0ULL : ((1ULL << width) - 1);
    s.L = (uint64_t)L;
    s.exact = L >= 2 && width + (64 - __builtin_clzll((uint64_t)L)) <= 64;
    s.m = s.exact ? (uint64_t)((((unsigned __int128)1 << 64) + s.L - 1) / s.L) : reciprocal(s.L);
    return s;
}

/* code -> shape index, *lvl = gain level */
static inline uint64_t split_code(const stream_t *s, uint64_t code, uint64_t *lvl) {
    if (s->exact) {
        uint64_t q = (uint64_t)(((unsigned __int128)code * s->m) >> 64);
        *lvl = code - q * s->L;
        return q;
    }
    return divide(code, s->L, s->m, lvl);
}

static inline uint64_t code_at(const stream_t *s, int64_t i, uint64_t *lvl) {
    return split_code(s, read_code(s->buf, s->nbytes, i, s->width, s->mask), lvl);
}

/* Two layouts cover the settings the picker uses, decoded with the leaf width d known at compile
 * time: S1 = split(leaf d, leaf d) (e.g. n = 12 with tabulated P(6, .)), S2 = split(S1, S1)
 * (n = 16: halves of 8 split into leaves of 4). Returns 0 for anything else (generic decoder). */
static int layout_of(const int64_t *plan, int64_t top, int64_t *d) {
    if (plan[top] != 1 || plan[top + 4] != plan[top + 5]) return 0;
    int64_t c = plan[top + 4];
    if (plan[c] == 0) { *d = plan[c + 1]; return 1; }
    if (plan[c + 4] != plan[c + 5] || plan[plan[c + 4]] != 0) return 0;
    *d = plan[plan[c + 4] + 1];
    return 2;
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
    s.K = plan[p + 3];
    s.offs = plan + plan[p + 6];
    s.v2 = plan + plan[p + 7];
    s.rcp = (const uint64_t *)(plan + plan[p + 8]);
    s.shifts = plan + plan[p + 9];
    s.buckets = (const uint8_t *)(s.shifts + s.K + 1);
    return s;
}

static leaf_t leaf_of(const int64_t *plan, int64_t f) {
    leaf_t l;
    l.d = plan[f + 1];
    l.Kt = plan[f + 3];
    l.base = (const int64_t *)(intptr_t)plan[f + 4];
    l.lut = (const int8_t *)(intptr_t)plan[f + 5];
    l.u = (const int64_t *)(intptr_t)plan[f + 6];
    l.us = plan[f + 7];
    l.mask = (const int64_t *)(intptr_t)plan[f + 8];
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

static void decode_shape(const int64_t *plan, int64_t p, uint64_t idx, int64_t k, int8_t *out) {
    int8_t scratch[MAXN];
    for (;;) {
        if (plan[p] == 0) {
            const leaf_t l = leaf_of(plan, p);
            const int8_t *row = leaf_row(&l, k, idx, scratch);
            for (int64_t j = 0; j < l.d; j++) out[j] = row[j];
            return;
        }
        int64_t n1 = plan[p + 2], k1;
        const split_t sp = split_of(plan, p);
        uint64_t b, a = split_fast(&sp, idx, k, &k1, &b);
        int64_t k2 = k - k1;
        int64_t f = plan[p + 4];
        if (plan[f] == 0) {  /* a leaf first half (the common case): copy its row, no call */
            const leaf_t l = leaf_of(plan, f);
            const int8_t *row = leaf_row(&l, k1, a, scratch);
            for (int64_t j = 0; j < l.d; j++) out[j] = row[j];
        } else {
            decode_shape(plan, f, a, k1, out);
        }
        out += n1;
        p = plan[p + 5];
        idx = b;
        k = k2;
    }
}

/* one group: its integer shape y[n] (returned) and gain level (*lvl) */
static inline void pvq_shape(const int64_t *plan, int64_t top, const stream_t *s, int64_t gi, int64_t k, int8_t *y,
                             uint64_t *lvl) {
    decode_shape(plan, top, code_at(s, gi, lvl), k, y);
}

/* The first group whose shape index (code / L) is not below V, or -1: a code out of range would
 * send the decoders outside their tables, so Decoder checks every code once before using them. */
int64_t pvq_check_codes(const uint8_t *codes, int64_t nbytes, int width, int64_t L, uint64_t V, int64_t groups) {
    const stream_t st = stream_of(codes, nbytes, width, L);
    for (int64_t g = 0; g < groups; g++) {
        uint64_t lvl;
        if (code_at(&st, g, &lvl) >= V) return g;
    }
    return -1;
}

/* 1 / ||y|| for every energy ||y||^2 <= 127^2 a shape of k <= 127 pulses can have (RINV[0] = 0), filled when
 * the library loads (not per call: k = 88 alone is 7745 square roots) */
#define MAXK 127
static float RINV[MAXK * MAXK + 1];
__attribute__((constructor)) static void fill_rinv(void) {
    RINV[0] = 0.0f;
    for (int64_t e = 1; e <= MAXK * MAXK; e++) RINV[e] = 1.0f / sqrtf((float)e);
}


#define SIMD_GROUP(G, D) (((G) == 2 && (D) == 6) || ((G) == 4 && (D) == 4) || ((G) == 4 && (D) == 3))
#ifdef __SSE4_1__
/* Group j's G leaf rows (row numbers R of the table lut, D int8 each) packed into one register of n = G * D
 * <= 16 lanes, the rest zero (a 6-row pair is shuffled together; rows of 4 or 3 are read 4 bytes at a time
 * and of 6, 8: the table is padded). */
static inline __attribute__((always_inline)) __m128i group_bytes(const int8_t *lut, const int32_t *R, int64_t j,
                                                                 const int64_t G, const int64_t D) {
    if (G == 2) {
        __m128i ra = _mm_loadl_epi64((const __m128i *)(lut + (int64_t)R[2 * j] * D));
        __m128i rb = _mm_loadl_epi64((const __m128i *)(lut + (int64_t)R[2 * j + 1] * D));
        return _mm_shuffle_epi8(_mm_unpacklo_epi64(ra, rb),
                                _mm_setr_epi8(0, 1, 2, 3, 4, 5, 8, 9, 10, 11, 12, 13, -1, -1, -1, -1));
    }
    int32_t w[4];
    for (int t = 0; t < 4; t++) memcpy(&w[t], lut + (int64_t)R[4 * j + t] * D, 4);
    __m128i y = _mm_setr_epi32(w[0], w[1], w[2], w[3]);
    if (D == 3) y = _mm_shuffle_epi8(y, _mm_setr_epi8(0, 1, 2, 4, 5, 6, 8, 9, 10, 12, 13, 14, -1, -1, -1, -1));
    return y;
}

/* ||y||^2 of packed int8 lanes: pmaddubsw gives |y|^2 in pairs, every sum <= k^2 < 2^15 */
static inline __attribute__((always_inline)) int32_t group_energy(__m128i y) {
    __m128i ay = _mm_abs_epi8(y);
    __m128i q = _mm_madd_epi16(_mm_maddubs_epi16(ay, ay), _mm_set1_epi16(1));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0x4e));
    q = _mm_add_epi32(q, _mm_shuffle_epi32(q, 0xb1));
    return _mm_cvtsi128_si32(q);
}
#endif

/* Leaf rows R[G * j + t] (row numbers of the table lut, D int8 each) -> <y, x> of each group j of G leaves, x at
 * stride n = G * D, times that group's factor level * 1 / ||y||, summed over gn groups (pass 3 of gemv_row). */
static inline __attribute__((always_inline)) float rows_dot(const int8_t *lut, const int32_t *R, const float *FL,
                                                            int64_t gn, const float *xg, const int64_t G,
                                                            const int64_t D) {
    const int64_t n = G * D;
#ifdef __AVX512F__
    if (SIMD_GROUP(G, D)) {  /* 16 lanes: the products scaled by the group's factor into one accumulator */
        __m512 acc = _mm512_setzero_ps();
        for (int64_t j = 0; j < gn; j++, xg += n) {
            __m128i y = group_bytes(lut, R, j, G, D);
            int32_t e = group_energy(y);
            __m512 xv = n == 12 ? _mm512_maskz_loadu_ps(0x0fff, xg) : _mm512_loadu_ps(xg);
            __m512 t = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(y)), xv);
            acc = _mm512_fmadd_ps(t, _mm512_set1_ps(FL[j] * RINV[e]), acc);
        }
        return _mm512_reduce_add_ps(acc);
    }
#elif defined(__SSE4_1__)
    if (SIMD_GROUP(G, D)) {  /* the same in 4-lane pieces */
        __m128 acc = _mm_setzero_ps();
        for (int64_t j = 0; j < gn; j++, xg += n) {
            __m128i y = group_bytes(lut, R, j, G, D);
            int32_t e = group_energy(y);
#define LANES4(SHIFT) _mm_mul_ps(_mm_cvtepi32_ps(_mm_cvtepi8_epi32(_mm_srli_si128(y, SHIFT))), _mm_loadu_ps(xg + SHIFT))
            __m128 p = _mm_add_ps(_mm_add_ps(LANES4(0), LANES4(4)), LANES4(8));
            if (n == 16) p = _mm_add_ps(p, LANES4(12));
#undef LANES4
            acc = _mm_add_ps(acc, _mm_mul_ps(p, _mm_set1_ps(FL[j] * RINV[e])));
        }
        acc = _mm_add_ps(acc, _mm_movehl_ps(acc, acc));
        acc = _mm_add_ss(acc, _mm_shuffle_ps(acc, acc, 0x55));
        return _mm_cvtss_f32(acc);
    }
#endif
    float acc = 0.0f;
    for (int64_t j = 0; j < gn; j++, xg += n) {
        float d = 0.0f;
        int32_t e = 0;
        for (int64_t t = 0; t < G; t++) {
            const int8_t *row = lut + (int64_t)R[G * j + t] * D;
            for (int64_t c = 0; c < D; c++) {
                d += (float)row[c] * xg[t * D + c];
                e += (int32_t)row[c] * row[c];
            }
        }
        acc += FL[j] * RINV[e] * d;
    }
    return acc;
}

/* Pass 3 of gemv_row decoding instead: group j's weights (s * level * 1 / ||y||) * y (the float operations of
 * the generic pvq_decode) written to o[j * n ...]. */
static inline __attribute__((always_inline)) void rows_write(const int8_t *lut, const int32_t *R, const float *FL,
                                                             int64_t gn, float *o, float s, const int64_t G,
                                                             const int64_t D) {
    const int64_t n = G * D;
#ifdef __AVX512F__
    if (SIMD_GROUP(G, D)) {
        for (int64_t j = 0; j < gn; j++, o += n) {
            __m128i y = group_bytes(lut, R, j, G, D);
            float f = s * FL[j] * RINV[group_energy(y)];
            __m512 v = _mm512_mul_ps(_mm512_set1_ps(f), _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(y)));
            if (n == 12) _mm512_mask_storeu_ps(o, 0x0fff, v);
            else _mm512_storeu_ps(o, v);
        }
        return;
    }
#elif defined(__SSE4_1__)
    if (SIMD_GROUP(G, D)) {
        for (int64_t j = 0; j < gn; j++, o += n) {
            __m128i y = group_bytes(lut, R, j, G, D);
            __m128 f = _mm_set1_ps(s * FL[j] * RINV[group_energy(y)]);
            for (int64_t c = 0; c < n; c += 4, y = _mm_srli_si128(y, 4))
                _mm_storeu_ps(o + c, _mm_mul_ps(f, _mm_cvtepi32_ps(_mm_cvtepi8_epi32(y))));
        }
        return;
    }
#endif
    for (int64_t j = 0; j < gn; j++, o += n) {
        int32_t e = 0;
        for (int64_t t = 0; t < G; t++) {
            const int8_t *row = lut + (int64_t)R[G * j + t] * D;
            for (int64_t c = 0; c < D; c++) e += (int32_t)row[c] * row[c];
        }
        float f = s * FL[j] * RINV[e];
        for (int64_t t = 0; t < G; t++) {
            const int8_t *row = lut + (int64_t)R[G * j + t] * D;
            for (int64_t c = 0; c < D; c++) o[t * D + c] = f * (float)row[c];
        }
    }
}

/* A group with a leaf past its table's cap, decoded by the generic decoder: its contribution level * <y, x_b> /
 * ||y|| added to acc[b] (gemv), or its weights written to o[j * n ...] (decode, o != NULL); its factor FL[j]
 * is then zeroed so that rows_dot adds nothing for it (rows_write's output for it is overwritten after). */
static void fix_group(const int64_t *plan, int64_t top, uint64_t idx, int64_t k, int64_t n, float *FL, int64_t j,
                      const float *x, int64_t ldx, int64_t B, float *acc, float *o, float s) {
    int8_t y[MAXN];
    decode_shape(plan, top, idx, k, y);
    int32_t e = 0;
    for (int64_t c = 0; c < n; c++) e += (int32_t)y[c] * y[c];
    if (o) {
        float f = s * FL[j] * RINV[e];
        for (int64_t c = 0; c < n; c++) o[j * n + c] = f * (float)y[c];
        return;
    }
    for (int64_t b = 0; b < B; b++) {
        float dot = 0.0f;
        for (int64_t c = 0; c < n; c++) dot += (float)y[c] * x[b * ldx + j * n + c];
        acc[b] += FL[j] * RINV[e] * dot;
    }
    FL[j] = 0.0f;
}

/* Everything a row of gemv_row needs, gathered once per call. */
typedef struct {
    const int64_t *plan;
    int64_t top_at;
    split_t top, half;
    leaf_t leaf;
    stream_t codes;
    int64_t k, groups, ldx, B;
    const float *levels, *x;
} fixed_t;

/* Row r of pvq_gemv for layout S1/S2 with leaf width D, B <= 2. Inlined with constant layout and D into its own
 * parallel loop (pvq_gemv): an omp pragma in here would be outlined before inlining and lose the constants.
 * The row is done in chunks of CHUNK groups, in passes (loop fission): 1. codes -> shape index and gain level
 * (read in sequence: one 8-byte load per code where the stream has 8 bytes to spare);
 * 2. the top split -> the leaf rows (S1) or the two halves (S2), S2: 2b. each half's split -> its leaf rows;
 * 3. rows_dot. A pass keeps few values live, so the independent groups of a pass overlap in the core instead
 * of spilling registers (one fused loop was 20-30% slower on a 2-core EPYC). Adds <row, x_b> to acc[b]; with
 * dst, writes the decoded row (times its scale s) there instead (pvq_decode). */
#define CHUNK 48
static inline __attribute__((always_inline)) void gemv_row(const fixed_t *fp, int64_t r, float *acc, const int layout,
                                                           const int64_t D, const int check, float *dst, float s) {
    const fixed_t f = *fp;
    const int64_t G = layout == 1 ? 2 : 4, n = G * D, k = f.k;
    uint64_t IDX[CHUNK], HI[2 * CHUNK];
    int64_t HK[2 * CHUNK];
    int32_t R[4 * CHUNK];
    float FL[CHUNK];
    /* check (only where the leaves' K exceeds their table's): a leaf past the table (rare) gets row 0 (base =
     * mask = 0 there: the point of P(d, 0), all zeros) and flags its group, which fix_group then computes
     * apart. No branch or call in the pass loops: either cost ~10%, and the check itself ~8% (row numbers
     * relative to one table also load faster than pointers). */
    uint8_t FLG[CHUNK];
#define LEAF_REF(SLOT, KK, J, FLAG)                                                            \
    do {                                                                                       \
        int64_t kk_ = (KK);                                                                    \
        if (check) {                                                                           \
            R[SLOT] = (int32_t)(f.leaf.base[kk_] + ((int64_t)(J) & f.leaf.mask[kk_]));         \
            FLAG |= kk_ > f.leaf.Kt;                                                           \
        } else {                                                                               \
            R[SLOT] = (int32_t)(f.leaf.base[kk_] + (int64_t)(J));                              \
        }                                                                                      \
    } while (0)
    for (int64_t g0 = 0; g0 < f.groups; g0 += CHUNK) {
        int64_t gn = f.groups - g0 < CHUNK ? f.groups - g0 : CHUNK;
        uint64_t bit = (uint64_t)(r * f.groups + g0) * (uint64_t)f.codes.width, lvl;
        if (f.codes.width <= 57 && (int64_t)((bit + (uint64_t)gn * f.codes.width) >> 3) + 8 <= f.codes.nbytes) {
            for (int64_t j = 0; j < gn; j++, bit += (uint64_t)f.codes.width) {
                uint64_t v;
                memcpy(&v, f.codes.buf + (bit >> 3), 8);
                IDX[j] = split_code(&f.codes, (v >> (bit & 7)) & f.codes.mask, &lvl);
                FL[j] = f.levels[lvl];
            }
        } else {
            for (int64_t j = 0; j < gn; j++) {
                IDX[j] = code_at(&f.codes, r * f.groups + g0 + j, &lvl);
                FL[j] = f.levels[lvl];
            }
        }
        uint8_t any = 0;
        if (check && layout == 2) memset(FLG, 0, (size_t)gn);
        for (int64_t j = 0; j < gn; j++) {
            int64_t k1;
            uint64_t b, a = split_fast(&f.top, IDX[j], k, &k1, &b);
            if (layout == 1) {
                uint8_t flag = 0;
                LEAF_REF(2 * j, k1, a, flag);
                LEAF_REF(2 * j + 1, k - k1, b, flag);
                if (check) {
                    FLG[j] = flag;
                    any |= flag;
                }
            } else {
                HI[2 * j] = a;
                HK[2 * j] = k1;
                HI[2 * j + 1] = b;
                HK[2 * j + 1] = k - k1;
            }
        }
        if (layout == 2)
            for (int64_t h = 0; h < 2 * gn; h++) {
                int64_t ka, kh = HK[h];
                uint64_t a2, a1 = split_fast(&f.half, HI[h], kh, &ka, &a2);
                uint8_t flag = 0;
                LEAF_REF(2 * h, ka, a1, flag);
                LEAF_REF(2 * h + 1, kh - ka, a2, flag);
                if (check) {
                    FLG[h >> 1] |= flag;
                    any |= flag;
                }
            }
        if (dst) {  /* decode: write the weights, then overwrite the flagged groups */
            rows_write(f.leaf.lut, R, FL, gn, dst + g0 * n, s, G, D);
            if (check && any)
                for (int64_t j = 0; j < gn; j++)
                    if (FLG[j])
                        fix_group(f.plan, f.top_at, IDX[j], k, n, FL, j, NULL, 0, 0, NULL, dst + g0 * n, s);
            continue;
        }
        if (check && any)
            for (int64_t j = 0; j < gn; j++)
                if (FLG[j])
                    fix_group(f.plan, f.top_at, IDX[j], k, n, FL, j, f.x + g0 * n, f.ldx, f.B, acc, NULL, 0.0f);
        acc[0] += rows_dot(f.leaf.lut, R, FL, gn, f.x + g0 * n, G, D);
        if (f.B > 1) acc[1] += rows_dot(f.leaf.lut, R, FL, gn, f.x + f.ldx + g0 * n, G, D);
    }
#undef LEAF_REF
}

/* The fixed layout of a plan (returned: 1 = S1 with leaves of 6 or 4, 2 = S2 with leaves of 4 or 3; 0 = none,
 * the generic decoder), its leaf width *d, whether its leaves can exceed their table (*check), and the
 * arguments of its rows in *f. FIXED_DISPATCH(F) then runs F(layout, D, check) with constants: each is its own
 * compiled loop (S1 with leaves of 6 is a tabulated sub-pyramid, never past its table). */
static int fixed_setup(const int64_t *plan, int64_t top, const stream_t *st, int64_t k, int64_t groups,
                       const float *levels, const float *x, int64_t ldx, int64_t B, fixed_t *f, int64_t *d,
                       int *check) {
    int layout = layout_of(plan, top, d);
    if (!((layout == 1 && (*d == 6 || *d == 4)) || (layout == 2 && (*d == 4 || *d == 3)))) return 0;
    int64_t child = plan[top + 4], lf = layout == 2 ? plan[child + 4] : child;
    fixed_t v = {plan, top, split_of(plan, top), split_of(plan, layout == 2 ? child : top), leaf_of(plan, lf), *st, k,
                 groups, ldx, B, levels, x};
    *f = v;
    *check = plan[lf + 3] < plan[lf + 2];
    return layout;
}

#define FIXED_DISPATCH(F)                                   \
    if (layout == 1 && d == 6) { F(1, 6, 0) }               \
    else if (layout == 1 && !check) { F(1, 4, 0) }          \
    else if (layout == 1) { F(1, 4, 1) }                    \
    else if (d == 4 && !check) { F(2, 4, 0) }               \
    else if (d == 4) { F(2, 4, 1) }                         \
    else if (!check) { F(2, 3, 0) }                         \
    else { F(2, 3, 1) }

/* y[b * ldy + r] = sum_c W[r, c] * x[b * ldx + c] for b < B, r < rows */
void pvq_gemv(const int64_t *plan, int64_t top, const uint8_t *codes, int64_t nbytes, int width,
              int64_t L, int64_t n, int64_t k, const float *levels, const float *scales, int per_row, int64_t rows,
              int64_t cols, const float *x, int64_t ldx, int64_t B, float *out, int64_t ldy) {
    const stream_t st = stream_of(codes, nbytes, width, L);
    int64_t groups = cols / n;
    int64_t d = 0;
    fixed_t f;
    int check, layout = B <= 2 ? fixed_setup(plan, top, &st, k, groups, levels, x, ldx, B, &f, &d, &check) : 0;
    if (layout) {
#define GEMV_ROWS(LAYOUT, D, CHECK)                                                  \
        _Pragma("omp parallel for schedule(static)")                                 \
        for (int64_t r = 0; r < rows; r++) {                                         \
            float acc[2] = {0.0f, 0.0f};                                             \
            gemv_row(&f, r, acc, LAYOUT, D, CHECK, NULL, 0.0f);                      \
            float s = scales[per_row ? r : 0];                                       \
            out[r] = s * acc[0];                                                     \
            if (B > 1) out[ldy + r] = s * acc[1];                                    \
        }
        FIXED_DISPATCH(GEMV_ROWS)
#undef GEMV_ROWS
        return;
    }
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
                pvq_shape(plan, top, &st, r * groups + g, k, y, &lvl);
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

/* rows [r0, r1) of W into out [r1 - r0, cols] (prompt processing) */
void pvq_decode(const int64_t *plan, int64_t top, const uint8_t *codes, int64_t nbytes, int width,
                int64_t L, int64_t n, int64_t k, const float *levels, const float *scales, int per_row, int64_t cols,
                int64_t r0, int64_t r1, float *out) {
    const stream_t st = stream_of(codes, nbytes, width, L);
    int64_t groups = cols / n, d = 0;
    fixed_t f;
    int check, layout = fixed_setup(plan, top, &st, k, groups, levels, NULL, 0, 0, &f, &d, &check);
    if (layout) {
#define DECODE_ROWS(LAYOUT, D, CHECK)                                                \
        _Pragma("omp parallel for schedule(static)")                                 \
        for (int64_t r = r0; r < r1; r++)                                            \
            gemv_row(&f, r, NULL, LAYOUT, D, CHECK, out + (r - r0) * cols, scales[per_row ? r : 0]);
        FIXED_DISPATCH(DECODE_ROWS)
#undef DECODE_ROWS
        return;
    }
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        int8_t y[MAXN];
        uint64_t lvl;
        float s = scales[per_row ? r : 0];
        float *o = out + (r - r0) * cols;
        for (int64_t g = 0; g < groups; g++) {
            pvq_shape(plan, top, &st, r * groups + g, k, y, &lvl);
            int32_t e = 0;
            for (int64_t j = 0; j < n; j++) e += (int32_t)y[j] * y[j];
            float f = s * levels[lvl] * RINV[e];
            for (int64_t j = 0; j < n; j++) o[g * n + j] = f * (float)y[j];
        }
    }
}

/* uniform grid: w = offset[r, c / gs] + scale[r, c / gs] * q, q a `width`-bit code per weight */
void uni_decode(const uint8_t *codes, int64_t nbytes, int width, const float *scale, const float *offset, int64_t gs,
                int64_t cols, int64_t r0, int64_t r1, float *out) {
    uint64_t mask = (1ULL << width) - 1;
    int64_t ng = (cols + gs - 1) / gs;
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        float *o = out + (r - r0) * cols;
        for (int64_t c = 0; c < cols; c++) {
            float q = (float)read_code(codes, nbytes, r * cols + c, width, mask);
            o[c] = offset[r * ng + c / gs] + scale[r * ng + c / gs] * q;
        }
    }
}

void uni_gemv(const uint8_t *codes, int64_t nbytes, int width, const float *scale, const float *offset, int64_t gs,
              int64_t rows, int64_t cols, const float *x, int64_t ldx, int64_t B, float *out, int64_t ldy) {
    uint64_t mask = (1ULL << width) - 1;
    int64_t ng = (cols + gs - 1) / gs;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        for (int64_t b = 0; b < B; b++) {
            const float *xv = x + b * ldx;
            float acc = 0.0f;
            for (int64_t g = 0; g < ng; g++) {
                int64_t c1 = (g + 1) * gs < cols ? (g + 1) * gs : cols;
                float qx = 0.0f, sx = 0.0f;
                for (int64_t c = g * gs; c < c1; c++) {
                    qx += (float)read_code(codes, nbytes, r * cols + c, width, mask) * xv[c];
                    sx += xv[c];
                }
                acc += scale[r * ng + g] * qx + offset[r * ng + g] * sx;
            }
            out[b * ldy + r] = acc;
        }
    }
}

/* Dense 16-bit weights (embeddings / head kept in their stored dtype, runtime/dense.py) times float32
 * x: y[b * ldy + r] = sum_c float(W[r, c]) x[b * ldx + c], kind 0 = float16, 1 = bfloat16. Every weight
 * widens to float32 exactly, so this is the float32 product of the stored matrix, read at half the bytes. */
static inline float half_to_float(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, m = h & 0x3ff, bits;
    if (e == 0x1f) bits = sign | 0x7f800000u | (m << 13);  /* inf / nan */
    else if (e) bits = sign | ((e + 112) << 23) | (m << 13);
    else if (!m) bits = sign;
    else {  /* subnormal: normalise */
        e = 113;
        while (!(m & 0x400)) { m <<= 1; e--; }
        bits = sign | (e << 23) | ((m & 0x3ff) << 13);
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

static inline float wide16(uint16_t v, int kind) {
    if (kind) {
        uint32_t bits = (uint32_t)v << 16;
        float f;
        memcpy(&f, &bits, 4);
        return f;
    }
    return half_to_float(v);
}

void dense16_gemv(const uint16_t *w, int kind, int64_t rows, int64_t cols, const float *x, int64_t ldx, int64_t B,
                  float *out, int64_t ldy) {
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        const uint16_t *wr = w + r * cols;
        for (int64_t b = 0; b < B; b++) {
            const float *xv = x + b * ldx;
            int64_t c = 0;
            float acc = 0.0f;
#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
            __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
            for (; c + 16 <= cols; c += 16) {
                __m128i h0 = _mm_loadu_si128((const __m128i *)(wr + c));
                __m128i h1 = _mm_loadu_si128((const __m128i *)(wr + c + 8));
                __m256 f0, f1;
                if (kind) {
                    f0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h0), 16));
                    f1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h1), 16));
                } else {
                    f0 = _mm256_cvtph_ps(h0);
                    f1 = _mm256_cvtph_ps(h1);
                }
                a0 = _mm256_fmadd_ps(f0, _mm256_loadu_ps(xv + c), a0);
                a1 = _mm256_fmadd_ps(f1, _mm256_loadu_ps(xv + c + 8), a1);
            }
            __m256 a = _mm256_add_ps(a0, a1);
            __m128 q = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
            q = _mm_add_ps(q, _mm_movehl_ps(q, q));
            q = _mm_add_ss(q, _mm_shuffle_ps(q, q, 0x55));
            acc = _mm_cvtss_f32(q);
#endif
            for (; c < cols; c++) acc += wide16(wr[c], kind) * xv[c];
            out[b * ldy + r] = acc;
        }
    }
}

/* Seeded randomized Hadamard R = diag(s) (small (x) H_p / sqrt(p)) of transforms/hadamard.py on the
 * rows of x [B, m * p] (a few tokens; longer inputs use the torch GEMM path):
 *   inverse = 0: out = x R   = small^T (X * s) H_p / sqrt(p)   with X the [m, p] view of a row
 *   inverse = 1: out = x R^T = (small X H_p / sqrt(p)) * s
 * small is m x m row-major; tmp holds m * p floats. */
static void fwht_rows(float *t, int64_t m, int64_t p) {
    float norm = 1.0f / sqrtf((float)p);
#ifdef __AVX512F__
    if (p % 16 == 0) {  /* butterflies of span < 16 inside a register (lane l pairs with l ^ h), wider ones across */
        const __m512i perm[4] = {_mm512_setr_epi32(1, 0, 3, 2, 5, 4, 7, 6, 9, 8, 11, 10, 13, 12, 15, 14),
                                 _mm512_setr_epi32(2, 3, 0, 1, 6, 7, 4, 5, 10, 11, 8, 9, 14, 15, 12, 13),
                                 _mm512_setr_epi32(4, 5, 6, 7, 0, 1, 2, 3, 12, 13, 14, 15, 8, 9, 10, 11),
                                 _mm512_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15, 0, 1, 2, 3, 4, 5, 6, 7)};
        const __mmask16 high[4] = {0xaaaa, 0xcccc, 0xf0f0, 0xff00};
        const __m512 nv = _mm512_set1_ps(norm);
        for (int64_t i = 0; i < m; i++) {
            float *v = t + i * p;
            for (int64_t c = 0; c < p; c += 16) {
                __m512 r = _mm512_loadu_ps(v + c);
                for (int s = 0; s < 4; s++) {
                    __m512 q = _mm512_permutexvar_ps(perm[s], r);
                    /* low lanes: r + q (a + b); high lanes: q - r (a - b, a the low partner) */
                    r = _mm512_mask_sub_ps(_mm512_add_ps(r, q), high[s], q, r);
                }
                _mm512_storeu_ps(v + c, r);
            }
            for (int64_t h = 16; h < p; h *= 2)
                for (int64_t blk = 0; blk < p; blk += 2 * h)
                    for (int64_t j = blk; j < blk + h; j += 16) {
                        __m512 a = _mm512_loadu_ps(v + j), b = _mm512_loadu_ps(v + j + h);
                        _mm512_storeu_ps(v + j, _mm512_add_ps(a, b));
                        _mm512_storeu_ps(v + j + h, _mm512_sub_ps(a, b));
                    }
            for (int64_t c = 0; c < p; c += 16) _mm512_storeu_ps(v + c, _mm512_mul_ps(_mm512_loadu_ps(v + c), nv));
        }
        return;
    }
#endif
    for (int64_t i = 0; i < m; i++) {
        float *v = t + i * p;
        for (int64_t h = 1; h < p; h *= 2)
            for (int64_t blk = 0; blk < p; blk += 2 * h)
                for (int64_t j = blk; j < blk + h; j++) {
                    float a = v[j], b = v[j + h];
                    v[j] = a + b;
                    v[j + h] = a - b;
                }
        for (int64_t j = 0; j < p; j++) v[j] *= norm;
    }
}

/* o[i] = sum_j w(i, j) t[j] over the m rows of p floats, w(i, j) = small[i * m + j] (or small[j * m + i] with
 * transpose): 16 columns at a time in a register accumulator (accumulating in o itself chained every step
 * through memory: ~2.5x slower). */
static void mix_rows(const float *t, float *o, int64_t m, int64_t p, const float *small, int transpose) {
    for (int64_t i = 0; i < m; i++) {
        int64_t c0 = 0;
        for (; c0 + 16 <= p; c0 += 16) {
            float acc[16] = {0.0f};
            for (int64_t j = 0; j < m; j++) {
                float w = transpose ? small[j * m + i] : small[i * m + j];
                const float *tj = t + j * p + c0;
                for (int c = 0; c < 16; c++) acc[c] += w * tj[c];
            }
            memcpy(o + i * p + c0, acc, sizeof(acc));
        }
        for (int64_t c = c0; c < p; c++) {
            float acc = 0.0f;
            for (int64_t j = 0; j < m; j++) acc += (transpose ? small[j * m + i] : small[i * m + j]) * t[j * p + c];
            o[i * p + c] = acc;
        }
    }
}

void rot_apply(const float *x, float *out, int64_t B, int64_t m, int64_t p, const float *signs, const float *small,
               int inverse, float *tmp) {
    int64_t d = m * p;
    for (int64_t b = 0; b < B; b++) {
        const float *xv = x + b * d;
        float *o = out + b * d;
        /* the mixing across rows and the FWHT along them commute (they act on different axes of X) */
        if (inverse) {
            if (m > 1) mix_rows(xv, o, m, p, small, 0);
            else memcpy(o, xv, sizeof(float) * (size_t)d);
        } else {
            float *t = m > 1 ? tmp : o;
            for (int64_t c = 0; c < d; c++) t[c] = xv[c] * signs[c];
            if (m > 1) mix_rows(t, o, m, p, small, 1);
        }
        fwht_rows(o, m, p);
        if (inverse)
            for (int64_t c = 0; c < d; c++) o[c] *= signs[c];
    }
}

/* Small pyramids: every point of P(n, k) in one table (lut [V, n] int8, rinv [V] = 1 / ||y||), so a
 * group decodes with one division (the fused code) and one row read. Chosen by native.py when the
 * table is small enough to stay in cache ("fast" layouts, config.py). */
static inline __attribute__((always_inline)) void lut_gemv_rows(
        const stream_t *st, const int8_t *lut, const float *rinv, const int64_t n, const float *levels,
        const float *scales, int per_row, int64_t rows, int64_t cols, const float *x, int64_t ldx, int64_t B, float *out,
        int64_t ldy) {
    int64_t groups = cols / n;
#pragma omp parallel for schedule(static)
    for (int64_t r = 0; r < rows; r++) {
        float s = scales[per_row ? r : 0];
        for (int64_t b = 0; b < B; b++) {
            const float *xv = x + b * ldx;
            float acc = 0.0f;
            for (int64_t g = 0; g < groups; g++) {
                uint64_t lvl, idx = code_at(st, r * groups + g, &lvl);
                const int8_t *y = lut + idx * n;
                const float *xg = xv + g * n;
                float d = 0.0f;
                for (int64_t j = 0; j < n; j++) d += (float)y[j] * xg[j];
                acc += levels[lvl] * rinv[idx] * d;
            }
            out[b * ldy + r] = s * acc;
        }
    }
}

void lut_gemv(const uint8_t *codes, int64_t nbytes, int width, int64_t L, const int8_t *lut, const float *rinv, int64_t n,
              const float *levels, const float *scales, int per_row, int64_t rows, int64_t cols, const float *x,
              int64_t ldx, int64_t B, float *out, int64_t ldy) {
    const stream_t st = stream_of(codes, nbytes, width, L);
#define LUTGEMV(N) lut_gemv_rows(&st, lut, rinv, N, levels, scales, per_row, rows, cols, x, ldx, B, out, ldy)
    switch (n) {
        case 4: LUTGEMV(4); break;
        case 6: LUTGEMV(6); break;
        case 8: LUTGEMV(8); break;
        default: LUTGEMV(n);
    }
#undef LUTGEMV
}

void lut_decode(const uint8_t *codes, int64_t nbytes, int width, int64_t L, const int8_t *lut, const float *rinv, int64_t n,
                const float *levels, const float *scales, int per_row, int64_t cols, int64_t r0, int64_t r1, float *out) {
    const stream_t st = stream_of(codes, nbytes, width, L);
    int64_t groups = cols / n;
#pragma omp parallel for schedule(static)
    for (int64_t r = r0; r < r1; r++) {
        float s = scales[per_row ? r : 0];
        float *o = out + (r - r0) * cols;
        for (int64_t g = 0; g < groups; g++) {
            uint64_t lvl, idx = code_at(&st, r * groups + g, &lvl);
            const int8_t *y = lut + idx * n;
            float f = s * levels[lvl] * rinv[idx];
            for (int64_t j = 0; j < n; j++) o[g * n + j] = f * (float)y[j];
        }
    }
}

/* Activation PVQ (pvq/actquant.py): for each of `groups` runs of n floats of x, the Opus greedy search
 * on P(n, k) (projection y_j = floor((k + 0.8)|x_j| / sum|x|) when k > n/2, then one pulse at a time
 * where (xy + |x_j|)^2 / (yy + 2 y_j + 1) is largest; codec/search.py with refine=0), written as the
 * unit shape u = sign(x) y / ||y|| and the optimal gain <x, u>. An all-zero group gets every pulse on
 * its first coordinate and gain 0. The gain quantizer runs in torch on these gains. */
void act_pvq_shapes(const float *x, float *u, float *gain, int64_t groups, int64_t n, int64_t k) {
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const float *xg = x + g * n;
        float *ug = u + g * n;
        float a[MAXN], y[MAXN];
        float s = 0.f;
        for (int64_t j = 0; j < n; j++) { a[j] = fabsf(xg[j]); s += a[j]; }
        if (!(s > 0.f)) {
            for (int64_t j = 0; j < n; j++) ug[j] = 0.f;
            ug[0] = 1.f;
            gain[g] = 0.f;
            continue;
        }
        int64_t left = k;
        float xy = 0.f, yy = 0.f;
        if (2 * k > n) {
            float f = (float)(k + 0.8) * (1.f / s);
            for (int64_t j = 0; j < n; j++) {
                y[j] = floorf(a[j] * f);
                left -= (int64_t)y[j];
                xy += a[j] * y[j];
                yy += y[j] * y[j];
            }
        } else {
            for (int64_t j = 0; j < n; j++) y[j] = 0.f;
        }
        for (; left > 0; left--) {
            int64_t best = 0;
            float bs = -1.f;
            for (int64_t j = 0; j < n; j++) {
                float t = xy + a[j], sc = t * t / (yy + 2.f * y[j] + 1.f);
                if (sc > bs) { bs = sc; best = j; }
            }
            xy += a[best];
            yy += 2.f * y[best] + 1.f;
            y[best] += 1.f;
        }
        float inv = 1.f / sqrtf(yy), gg = 0.f;
        for (int64_t j = 0; j < n; j++) {
            float v = (xg[j] < 0.f ? -y[j] : y[j]) * inv;
            ug[j] = v;
            gg += xg[j] * v;
        }
        gain[g] = gg;
    }
}

/* One quantized linear layer for a few tokens in one call (QuantLinear.forward, arguments from
 * runtime/decode.py linear_args):
 * out = rotate_out^T(gemv(rotate_in(x))) + bias, the rotations as in rot_apply. Saves the per-layer Python
 * and ctypes overhead of three calls (~10 us a layer, ~2 ms a token for SmolLM2's 210 linears). */
typedef struct {
    int64_t kind, rows, cols;                    /* kind 0: plan, 1: full table (lut_*), 2: uniform grid */
    const int64_t *plan;
    const uint8_t *codes;
    int64_t nbytes, width, L, n, k, per_row;
    const float *levels, *scales;
    const int8_t *lut;
    const float *lut_rinv;
    const float *uscale, *uoffset;
    int64_t group_size;
    int64_t in_m, in_p, out_m, out_p;            /* m = 0: that side is not rotated */
    const float *in_signs, *in_small, *out_signs, *out_small;
    const float *bias;                           /* or NULL */
} linear_t;

/* work: B * (cols + rows) + cols + rows floats */
void pvq_linear(const linear_t *a, const float *x, float *out, int64_t B, float *work) {
    float *h = work, *y = work + B * a->cols, *tmp = y + B * a->rows;
    const float *in = x;
    if (a->in_m) {
        rot_apply(x, h, B, a->in_m, a->in_p, a->in_signs, a->in_small, 0, tmp);
        in = h;
    }
    float *dst = a->out_m ? y : out;
    if (a->kind == 0)
        pvq_gemv(a->plan, 0, a->codes, a->nbytes, (int)a->width, a->L, a->n, a->k, a->levels, a->scales,
                 (int)a->per_row, a->rows, a->cols, in, a->cols, B, dst, a->rows);
    else if (a->kind == 1)
        lut_gemv(a->codes, a->nbytes, (int)a->width, a->L, a->lut, a->lut_rinv, a->n, a->levels, a->scales,
                 (int)a->per_row, a->rows, a->cols, in, a->cols, B, dst, a->rows);
    else
        uni_gemv(a->codes, a->nbytes, (int)a->width, a->uscale, a->uoffset, a->group_size, a->rows, a->cols, in,
                 a->cols, B, dst, a->rows);
    if (a->out_m) rot_apply(y, out, B, a->out_m, a->out_p, a->out_signs, a->out_small, 1, tmp);
    if (a->bias)
        for (int64_t b = 0; b < B; b++)
            for (int64_t r = 0; r < a->rows; r++) out[b * a->rows + r] += a->bias[r];
}

/* OpenMP threads of the kernels called from this thread from now on (torch.set_num_threads does not
 * reach them; OMP_NUM_THREADS reaches both) */
#ifdef _OPENMP
#include <omp.h>
void pvq_set_threads(int n) { omp_set_num_threads(n); }
#else
void pvq_set_threads(int n) { (void)n; }
#endif
