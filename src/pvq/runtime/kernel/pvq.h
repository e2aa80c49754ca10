/* pvq runtime kernels: decode packed PVQ / uniform codes straight from the bit stream.
 *
 * Used by QuantLinear in decode="on-the-fly" mode, where only the packed codes stay resident.
 * Two entry points per packed matrix (pvq_matrix_t, one of three kinds):
 *   pvq_decode: rows [r0, r1) of the matrix into a float buffer (prompt processing: decode a block
 *               of rows once, then one matrix product serves every token of the batch);
 *   pvq_gemv:   y[b, r] = sum_c W[r, c] x[b, c] for a few rows of x, decoding each group in registers
 *               and never writing the matrix (generation: one token at a time).
 * Kinds: MATRIX_PLAN, PVQ shapes in the split enumeration of pvq/codec/enumeration.py, serialised by
 * pvq/runtime/native.py into one int64 "plan" (its node layout is documented once, in native.Plan);
 * MATRIX_LUT, a small pyramid whose every point is one table; MATRIX_UNIFORM, a uniform grid.
 * Codes are little-endian bit strings of `width` bits, one per group (bitpack.py); a PVQ code is
 * index * L + level. Everything is integer exact until the final float scaling: a group decodes to
 * (scale * level * 1 / ||y||) * y, the torch path (reconstruct()) to (y / ||y||) * (scale * level), equal
 * to within the last bit of a float.
 *
 * One build: native.py compiles runtime/kernel.c, which includes every family below in this order (a family
 * uses this header and the families before it), as one translation unit, so that the static inline helpers
 * are inlined into every loop that uses them:
 *   plan.c      the generic plan decoder (any split tree) and the plan's node readers
 *   fixed.c     the two layouts the picker uses most, decoded in passes with SIMD dot products
 *   lut.c       full tables of small pyramids
 *   uniform.c   the uniform grid
 *   rotate.c    the randomized Hadamard rotations
 *   dense16.c   16-bit dense weights (embeddings, head)
 *   actsearch.c the activation PVQ search
 *   search.c    the weight PVQ search (codec/search.py, the same points)
 *   linear.c    the matrix entry points and pvq_linear (a whole layer in one call)
 *   checks.c    what native.py checks at load (ABI version, struct sizes), the codes' range, threads
 * The numbers Python shares with the kernel come from Python, as -D flags (native.py _defines): the plan's
 * word offsets LEAF_* / SPLIT_* / NODE_*, MAXN, MAXK, BUCKET_BITS, TABLE_PAD (runtime/limits.py), the
 * matrix kinds MATRIX_* and the struct ids STRUCT_* of pvq_struct_size.
 */
#ifndef PVQ_KERNEL_H
#define PVQ_KERNEL_H

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#ifdef __SSE4_1__
#include <immintrin.h>
#endif

#if !defined(LEAF_LUT) || !defined(SPLIT_BUCKET_AT) || !defined(MAXN) || !defined(MATRIX_PLAN) || \
    !defined(STRUCT_LINEAR)
#error "pvq's kernel is built by pvq/runtime/native.py, which passes the plan layout and limits as -D flags"
#endif
_Static_assert(TABLE_PAD >= 8, "tables of points are read 8 bytes at a time (rows of 6)");

/* Raised with every change to a struct below or an entry point's arguments (native.py ABI_VERSION and its
 * table of entry points change with it): kernel() refuses a library of another version. */
#define PVQ_ABI_VERSION 2

/* One packed matrix [rows, cols] (native.Matrix). */
typedef struct {
    int64_t kind;                  /* MATRIX_PLAN, MATRIX_LUT or MATRIX_UNIFORM */
    int64_t rows, cols;
    const uint8_t *codes;          /* one `width`-bit code per group (PVQ) or per weight (uniform) */
    int64_t nbytes, width;
    int64_t L, n, k, per_row;      /* PVQ: gain levels, group length, pulses; one scale per row or one in all */
    const float *levels, *scales;  /* PVQ: [L], [rows] or [1] */
    const int64_t *plan;           /* MATRIX_PLAN: native.Plan words, its top node first */
    const int8_t *lut;             /* MATRIX_LUT: every point of P(n, k) [V, n] */
    const float *lut_rinv;         /* MATRIX_LUT: 1 / ||y|| [V] */
    const float *uscale, *uoffset; /* MATRIX_UNIFORM: w = offset + scale * q per group of group_size weights */
    int64_t group_size;
} pvq_matrix_t;

/* A seeded randomized Hadamard R = diag(signs) (small (x) H_p / sqrt(p)) of transforms/hadamard.py on vectors
 * of m * p floats, small m x m row-major (native.Rotation); m = 0: no rotation. */
typedef struct {
    int64_t m, p;
    const float *signs, *small;
} pvq_rotation_t;

/* One quantized linear layer (native.Linear): out = r_out^T(w x (r_in x)) + bias. */
typedef struct {
    pvq_matrix_t w;
    pvq_rotation_t r_in, r_out;
    const float *bias;             /* or NULL */
} pvq_linear_t;

/* The entry points (native.py ENTRIES holds their ctypes signatures). */
int64_t pvq_abi_version(void);
int64_t pvq_struct_size(int64_t which);
int64_t pvq_check_codes(const pvq_matrix_t *w, uint64_t V);
void pvq_decode(const pvq_matrix_t *w, int64_t r0, int64_t r1, float *out);
void pvq_gemv(const pvq_matrix_t *w, const float *x, int64_t ldx, int64_t B, float *out, int64_t ldy);
void pvq_linear(const pvq_linear_t *a, const float *x, float *out, int64_t B, float *work);
void rot_apply(const pvq_rotation_t *r, const float *x, float *out, int64_t B, int inverse, float *tmp);
void act_pvq_shapes(const float *x, float *u, float *gain, int64_t groups, int64_t n, int64_t k);
void pvq_search(const float *x, int64_t *out, int64_t groups, int64_t n, int64_t k, int64_t rounds);
void dense16_gemv(const uint16_t *w, int kind, int64_t rows, int64_t cols, const float *x, int64_t ldx, int64_t B,
                  float *out, int64_t ldy);
void pvq_set_threads(int n);

/* The bit stream: code i of `width` bits, read with one unaligned 8-byte load where 9 bytes remain. */
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

/* the code stream of a PVQ matrix (L >= 1) */
static inline stream_t matrix_stream(const pvq_matrix_t *w) {
    return stream_of(w->codes, w->nbytes, (int)w->width, w->L);
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

#endif
