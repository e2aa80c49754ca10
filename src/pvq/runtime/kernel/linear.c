/* The entry points of a packed matrix, whichever its kind, and pvq_linear: one quantized linear layer for a
 * few tokens in one call (runtime/decode.py FusedLinear, from QuantLinear.forward), which saves the Python and
 * ctypes overhead of three calls (~10 us a layer, ~2 ms a token for SmolLM2's 210 linears). */
#include "pvq.h"

/* y[b * ldy + r] = sum_c W[r, c] * x[b * ldx + c] for b < B, r < rows */
void pvq_gemv(const pvq_matrix_t *w, const float *x, int64_t ldx, int64_t B, float *out, int64_t ldy) {
    if (w->kind == MATRIX_PLAN) {
        if (!fixed_rows(w, x, ldx, B, 0, w->rows, out, ldy)) plan_gemv(w, x, ldx, B, out, ldy);
    } else if (w->kind == MATRIX_LUT) {
        lut_gemv(w, x, ldx, B, out, ldy);
    } else {
        uni_gemv(w, x, ldx, B, out, ldy);
    }
}

/* rows [r0, r1) of W into out [r1 - r0, cols] (prompt processing) */
void pvq_decode(const pvq_matrix_t *w, int64_t r0, int64_t r1, float *out) {
    if (w->kind == MATRIX_PLAN) {
        if (!fixed_rows(w, NULL, 0, 0, r0, r1, out, 0)) plan_decode(w, r0, r1, out);
    } else if (w->kind == MATRIX_LUT) {
        lut_decode(w, r0, r1, out);
    } else {
        uni_decode(w, r0, r1, out);
    }
}

/* out [B, rows] = r_out^T(gemv(r_in(x))) + bias, the rotations as in rot_apply; work holds
 * B * (cols + rows) + cols + rows floats */
void pvq_linear(const pvq_linear_t *a, const float *x, float *out, int64_t B, float *work) {
    const int64_t rows = a->w.rows, cols = a->w.cols;
    float *h = work, *y = work + B * cols, *tmp = y + B * rows;
    const float *in = x;
    if (a->r_in.m) {
        rot_apply(&a->r_in, x, h, B, 0, tmp);
        in = h;
    }
    float *dst = a->r_out.m ? y : out;
    pvq_gemv(&a->w, in, cols, B, dst, rows);
    if (a->r_out.m) rot_apply(&a->r_out, y, out, B, 1, tmp);
    if (a->bias)
        for (int64_t b = 0; b < B; b++)
            for (int64_t r = 0; r < rows; r++) out[b * rows + r] += a->bias[r];
}
