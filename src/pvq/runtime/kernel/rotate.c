/* The seeded randomized Hadamard R = diag(s) (small (x) H_p / sqrt(p)) of transforms/hadamard.py on the
 * rows of x [B, m * p] (a few tokens; longer inputs use the torch GEMM path):
 *   inverse = 0: out = x R   = small^T (X * s) H_p / sqrt(p)   with X the [m, p] view of a row
 *   inverse = 1: out = x R^T = (small X H_p / sqrt(p)) * s
 * small is m x m row-major; tmp holds m * p floats. */
#include "pvq.h"

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

void rot_apply(const pvq_rotation_t *r, const float *x, float *out, int64_t B, int inverse, float *tmp) {
    const int64_t m = r->m, p = r->p, d = m * p;
    const float *signs = r->signs, *small = r->small;
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

