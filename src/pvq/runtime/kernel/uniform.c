/* The uniform grid: w = offset[r, c / gs] + scale[r, c / gs] * q, q a `width`-bit code per weight. */
#include "pvq.h"

static void uni_decode(const pvq_matrix_t *w, int64_t r0, int64_t r1, float *out) {
    const uint8_t *codes = w->codes;
    const int64_t nbytes = w->nbytes, cols = w->cols, gs = w->group_size;
    const int width = (int)w->width;
    const float *scale = w->uscale, *offset = w->uoffset;
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

static void uni_gemv(const pvq_matrix_t *w, const float *x, int64_t ldx, int64_t B, float *out, int64_t ldy) {
    const uint8_t *codes = w->codes;
    const int64_t nbytes = w->nbytes, rows = w->rows, cols = w->cols, gs = w->group_size;
    const int width = (int)w->width;
    const float *scale = w->uscale, *offset = w->uoffset;
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
