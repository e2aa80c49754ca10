/* Small pyramids: every point of P(n, k) in one table (lut [V, n] int8, rinv [V] = 1 / ||y||), so a
 * group decodes with one division (the fused code) and one row read. Chosen by Decoder when the table
 * fits LUT_BYTES (runtime/limits.py full_table_fits; the "fast" layouts of config.py). */
#include "pvq.h"

/* <row r, x_b> of a full-table matrix for b < B into out[b * ldy + r]; n is a constant in each loop of lut_gemv */
static inline __attribute__((always_inline)) void lut_gemv_row(const stream_t *st, const int8_t *lut, const float *rinv,
                                                               const int64_t n, const float *levels, float s, int64_t r,
                                                               int64_t groups, const float *x, int64_t ldx, int64_t B,
                                                               float *out, int64_t ldy) {
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

/* The group lengths of the fast layouts get loops of constant length. The omp loops stand at the call sites: a
 * pragma inside the always-inline row function would be outlined before it is inlined with its constant. */
#define LUT_CASES(ROWS)             \
    switch (n) {                    \
        case 4: ROWS(4) break;      \
        case 6: ROWS(6) break;      \
        case 8: ROWS(8) break;      \
        default: ROWS(n)            \
    }

static void lut_gemv(const pvq_matrix_t *w, const float *x, int64_t ldx, int64_t B, float *out, int64_t ldy) {
    const stream_t st = matrix_stream(w);
    const int8_t *lut = w->lut;
    const float *rinv = w->lut_rinv, *levels = w->levels, *scales = w->scales;
    const int per_row = (int)w->per_row;
    const int64_t n = w->n, rows = w->rows, groups = w->cols / n;
#define LUT_GEMV_ROWS(N)                                                                                  \
    _Pragma("omp parallel for schedule(static)")                                                          \
    for (int64_t r = 0; r < rows; r++)                                                                    \
        lut_gemv_row(&st, lut, rinv, N, levels, scales[per_row ? r : 0], r, groups, x, ldx, B, out, ldy);
    LUT_CASES(LUT_GEMV_ROWS)
#undef LUT_GEMV_ROWS
}

/* row r of a full-table matrix, decoded into o; n is a constant in each loop of lut_decode */
static inline __attribute__((always_inline)) void lut_decode_row(const stream_t *st, const int8_t *lut, const float *rinv,
                                                                 const int64_t n, const float *levels, float s,
                                                                 int64_t r, int64_t groups, float *o) {
    for (int64_t g = 0; g < groups; g++) {
        uint64_t lvl, idx = code_at(st, r * groups + g, &lvl);
        const int8_t *y = lut + idx * n;
        float f = s * levels[lvl] * rinv[idx];
        for (int64_t j = 0; j < n; j++) o[g * n + j] = f * (float)y[j];
    }
}

static void lut_decode(const pvq_matrix_t *w, int64_t r0, int64_t r1, float *out) {
    const stream_t st = matrix_stream(w);
    const int8_t *lut = w->lut;
    const float *rinv = w->lut_rinv, *levels = w->levels, *scales = w->scales;
    const int per_row = (int)w->per_row;
    const int64_t n = w->n, cols = w->cols, groups = cols / n;
#define LUT_DECODE_ROWS(N)                                                                               \
    _Pragma("omp parallel for schedule(static)")                                                         \
    for (int64_t r = r0; r < r1; r++)                                                                    \
        lut_decode_row(&st, lut, rinv, N, levels, scales[per_row ? r : 0], r, groups, out + (r - r0) * cols);
    LUT_CASES(LUT_DECODE_ROWS)
#undef LUT_DECODE_ROWS
}
#undef LUT_CASES
