/* Dense 16-bit weights (embeddings / head kept in their stored dtype, runtime/dense.py) times float32
 * x: y[b * ldy + r] = sum_c float(W[r, c]) x[b * ldx + c], kind 0 = float16, 1 = bfloat16. Every weight
 * widens to float32 exactly, so this is the float32 product of the stored matrix, read at half the bytes. */
#include "pvq.h"

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

