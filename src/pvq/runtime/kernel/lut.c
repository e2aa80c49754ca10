/* Small pyramids: every point of P(n, k) in one table (lut [V, n] int8, rinv [V] = 1 / ||y||), so a
 * group decodes with one division (the fused code) and one row read. Chosen by Decoder when the table
 * fits LUT_BYTES (runtime/limits.py full_table_fits; the "fast" layouts of config.py). */
#include "pvq.h"

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

/* the group lengths of the fast layouts get loops of constant length */
static void lut_gemv(const pvq_matrix_t *w, const float *x, int64_t ldx, int64_t B, float *out, int64_t ldy) {
    const stream_t st = matrix_stream(w);
#define LUTGEMV(N) lut_gemv_rows(&st, w->lut, w->lut_rinv, N, w->levels, w->scales, (int)w->per_row, w->rows, w->cols, \
                                 x, ldx, B, out, ldy)
    switch (w->n) {
        case 4: LUTGEMV(4); break;
        case 6: LUTGEMV(6); break;
        case 8: LUTGEMV(8); break;
        default: LUTGEMV(w->n);
    }
#undef LUTGEMV
}

static void lut_decode(const pvq_matrix_t *w, int64_t r0, int64_t r1, float *out) {
    const stream_t st = matrix_stream(w);
    const int8_t *lut = w->lut;
    const float *rinv = w->lut_rinv, *levels = w->levels, *scales = w->scales;
    const int per_row = (int)w->per_row;
    const int64_t n = w->n, cols = w->cols, groups = cols / n;
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
