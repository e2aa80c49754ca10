/* The plans of the two layouts the picker uses most, decoded with the leaf width d known at compile time:
 * S1 = split(leaf d, leaf d) (n = 12 at 2.25 bits: two rows of the tabulated P(6, <= 10)), S2 = split(S1, S1)
 * (n = 16 at 3.25 bits: halves of 8 split into leaves of 4). A row is decoded in passes over chunks of groups
 * (codes, top splits, half splits, then SIMD dot products or stores: gemv_row), one compiled loop per layout,
 * leaf width and check (FIXED_DISPATCH): on one core n = 16 runs at 1.95 and n = 12 at 2.8 G weights/s
 * (bench/kernel.py, bench/results/kernel.json). */
#include "pvq.h"

/* 1 = S1, 2 = S2 with its leaf width in *d, 0 for any other plan (the generic decoder's) */
static int layout_of(const int64_t *plan, int64_t *d) {
    if (plan[NODE_KIND] != NODE_SPLIT || plan[SPLIT_FIRST] != plan[SPLIT_SECOND]) return 0;
    int64_t c = plan[SPLIT_FIRST];
    if (plan[c + NODE_KIND] == NODE_LEAF) { *d = plan[c + LEAF_D]; return 1; }
    int64_t l = plan[c + SPLIT_FIRST];
    if (l != plan[c + SPLIT_SECOND] || plan[l + NODE_KIND] != NODE_LEAF) return 0;
    *d = plan[l + LEAF_D];
    return 2;
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
 * the generic plan_decode) written to o[j * n ...]. */
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
static void fix_group(const int64_t *plan, uint64_t idx, int64_t k, int64_t n, float *FL, int64_t j,
                      const float *x, int64_t ldx, int64_t B, float *acc, float *o, float s) {
    int8_t y[MAXN];
    decode_shape(plan, 0, idx, k, y);
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
    split_t top, half;
    leaf_t leaf;
    stream_t codes;
    int64_t k, groups, ldx, B;
    const float *levels, *x;
} fixed_t;

/* Row r of a gemv for layout S1/S2 with leaf width D, B <= 2. Inlined with constant layout and D into its own
 * parallel loop (fixed_rows): an omp pragma in here would be outlined before inlining and lose the constants.
 * The row is done in chunks of CHUNK groups, in passes (loop fission): 1. codes -> shape index and gain level
 * (read in sequence: one 8-byte load per code where the stream has 8 bytes to spare);
 * 2. the top split -> the leaf rows (S1) or the two halves (S2), S2: 2b. each half's split -> its leaf rows;
 * 3. rows_dot. A pass keeps few values live, so the independent groups of a pass overlap in the core instead
 * of spilling registers (one fused loop was 20-30% slower on a 2-core EPYC). Adds <row, x_b> to acc[b]; with
 * dst, writes the decoded row (times its scale s) there instead (a decode). */
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
                        fix_group(f.plan, IDX[j], k, n, FL, j, NULL, 0, 0, NULL, dst + g0 * n, s);
            continue;
        }
        if (check && any)
            for (int64_t j = 0; j < gn; j++)
                if (FLG[j])
                    fix_group(f.plan, IDX[j], k, n, FL, j, f.x + g0 * n, f.ldx, f.B, acc, NULL, 0.0f);
        acc[0] += rows_dot(f.leaf.lut, R, FL, gn, f.x + g0 * n, G, D);
        if (f.B > 1) acc[1] += rows_dot(f.leaf.lut, R, FL, gn, f.x + f.ldx + g0 * n, G, D);
    }
#undef LEAF_REF
}

/* The fixed layout of a plan (returned: 1 = S1 with leaves of 6 or 4, 2 = S2 with leaves of 4 or 3; 0 = none,
 * the generic decoder), its leaf width *d, whether its leaves can exceed their table (*check), and the
 * arguments of its rows in *f. FIXED_DISPATCH(F) then runs F(layout, D, check) with constants: each is its own
 * compiled loop (S1 with leaves of 6 is a tabulated sub-pyramid, never past its table). */
static int fixed_setup(const pvq_matrix_t *w, const float *x, int64_t ldx, int64_t B, fixed_t *f, int64_t *d,
                       int *check) {
    const int64_t *plan = w->plan;
    int layout = layout_of(plan, d);
    if (!((layout == 1 && (*d == 6 || *d == 4)) || (layout == 2 && (*d == 4 || *d == 3)))) return 0;
    int64_t child = plan[SPLIT_FIRST], lf = layout == 2 ? plan[child + SPLIT_FIRST] : child;
    fixed_t v = {plan, split_of(plan, 0), split_of(plan, layout == 2 ? child : 0), leaf_of(plan, lf), matrix_stream(w), w->k,
                 w->cols / w->n, ldx, B, w->levels, x};
    *f = v;
    *check = plan[lf + LEAF_KT] < plan[lf + LEAF_K];
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

/* A plan in a fixed layout: pvq_gemv (x != NULL, B <= 2 tokens) or pvq_decode (x = NULL) of rows [r0, r1); 1 when
 * done, 0 for another plan (nothing done). */
static int fixed_rows(const pvq_matrix_t *w, const float *x, int64_t ldx, int64_t B, int64_t r0, int64_t r1, float *out,
                      int64_t ldy) {
    int64_t d = 0;
    fixed_t f;
    int check, layout = B <= 2 ? fixed_setup(w, x, ldx, B, &f, &d, &check) : 0;
    if (!layout) return 0;
    const int64_t cols = w->cols;
    const float *scales = w->scales;
    const int per_row = (int)w->per_row;
#define GEMV_ROWS(LAYOUT, D, CHECK)                                                  \
    _Pragma("omp parallel for schedule(static)")                                     \
    for (int64_t r = r0; r < r1; r++) {                                              \
        float acc[2] = {0.0f, 0.0f};                                                 \
        gemv_row(&f, r, acc, LAYOUT, D, CHECK, NULL, 0.0f);                          \
        float s = scales[per_row ? r : 0];                                           \
        out[r] = s * acc[0];                                                         \
        if (B > 1) out[ldy + r] = s * acc[1];                                        \
    }
#define DECODE_ROWS(LAYOUT, D, CHECK)                                                \
    _Pragma("omp parallel for schedule(static)")                                     \
    for (int64_t r = r0; r < r1; r++)                                                \
        gemv_row(&f, r, NULL, LAYOUT, D, CHECK, out + (r - r0) * cols, scales[per_row ? r : 0]);
    if (x) {
        FIXED_DISPATCH(GEMV_ROWS)
    } else {
        FIXED_DISPATCH(DECODE_ROWS)
    }
#undef GEMV_ROWS
#undef DECODE_ROWS
    return 1;
}
