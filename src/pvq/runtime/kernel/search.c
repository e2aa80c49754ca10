/* Weight PVQ search (codec/search.py search(), float32): for each of `groups` runs of n floats of x, the
 * nearest point y of P(n, k) in direction, as signed integer pulses. The same steps as the torch code, float
 * operation for float operation, so both give the same points: Opus' projection (k > n/2) and greedy, then up
 * to `rounds` rounds of single pulse moves among the top x top candidates (removals outer, additions inner;
 * candidates ranked like a stable descending sort, the first of equal scores winning everywhere), with
 * <|x|, y> and <y, y> added left to right and then carried from pulse to pulse. Contraction of a * b + c into
 * one fused multiply-add would round differently from torch's separate operations: it is switched off here. */
#include "pvq.h"

#define SEARCH_TOP 4

/* idx[0..top) = the `top` largest of s[0..n), largest first, equal values by lowest index. */
static inline void search_top(const float *s, int64_t n, int64_t top, int64_t *idx) {
    uint64_t taken = 0;
    for (int64_t t = 0; t < top; t++) {
        int64_t best = -1;
        for (int64_t j = 0; j < n; j++) {
            if (taken >> j & 1) continue;
            if (best < 0 || s[j] > s[best]) best = j;
        }
        idx[t] = best;
        taken |= (uint64_t)1 << best;
    }
}

__attribute__((optimize("fp-contract=off")))
void pvq_search(const float *x, int64_t *out, int64_t groups, int64_t n, int64_t k, int64_t rounds) {
    const float tiny = 1.17549435e-38f, eps = 1.1920929e-07f;
    const float margin = (float)(1.0 + 8.0 * (double)eps);
    const int64_t top = n < SEARCH_TOP ? n : SEARCH_TOP;
#pragma omp parallel for schedule(static)
    for (int64_t g = 0; g < groups; g++) {
        const float *xg = x + g * n;
        int64_t *yg = out + g * n;
        float a[MAXN], y[MAXN], add[MAXN], rem[MAXN];
        for (int64_t j = 0; j < n; j++) a[j] = fabsf(xg[j]);
        float s = a[0];
        for (int64_t j = 1; j < n; j++) s += a[j];
        if (k == 0) {
            for (int64_t j = 0; j < n; j++) yg[j] = 0;
            continue;
        }
        if (!(s > 0.f)) {  /* every pulse on the first coordinate */
            for (int64_t j = 0; j < n; j++) y[j] = 0.f;
            y[0] = (float)k;
        } else if (2 * k > n) {
            float f = (1.f / (s < tiny ? tiny : s)) * (float)(k + 0.8);
            for (int64_t j = 0; j < n; j++) y[j] = floorf(a[j] * f);
        } else {
            for (int64_t j = 0; j < n; j++) y[j] = 0.f;
        }
        float xy = a[0] * y[0], yy = y[0] * y[0], used = y[0];
        for (int64_t j = 1; j < n; j++) { xy += a[j] * y[j]; yy += y[j] * y[j]; used += y[j]; }
        for (int64_t left = k - (int64_t)used; left > 0; left--) {
            int64_t best = 0;
            float bs = 0.f;
            for (int64_t j = 0; j < n; j++) {
                float t = xy + a[j], sc = t * t / (yy + 2.f * y[j] + 1.f);
                if (j == 0 || sc > bs) { bs = sc; best = j; }
            }
            xy = xy + a[best];
            yy = yy + (2.f * y[best] + 1.f);
            y[best] += 1.f;
        }
        for (int64_t r = 0; n > 1 && r < rounds; r++) {
            for (int64_t j = 0; j < n; j++) {
                float t = xy + a[j];
                add[j] = t * t / (yy + 2.f * y[j] + 1.f);
                float u = xy - a[j], v = yy - 2.f * y[j] + 1.f;
                u = u < 0.f ? 0.f : u;
                v = v < 1.f ? 1.f : v;
                rem[j] = y[j] <= 0.f ? -1.f : u * u / v;
            }
            int64_t ii[SEARCH_TOP], jj[SEARCH_TOP];
            search_top(add, n, top, jj);
            search_top(rem, n, top, ii);
            float best = 0.f, bxy = 0.f, byy = 0.f;
            int64_t bi = -1, bj = -1;
            for (int64_t p = 0; p < top; p++) {
                for (int64_t q = 0; q < top; q++) {
                    int64_t i = ii[p], j = jj[q];
                    float nxy = xy - a[i] + a[j];
                    float nyy = yy + 2.f * (y[j] - y[i]) + 2.f;
                    float c = nxy < 0.f ? 0.f : nxy;
                    c = c * c / nyy;
                    if (i == j || y[i] <= 0.f) c = -1.f;
                    if (bi < 0 || c > best) { best = c; bi = i; bj = j; bxy = nxy; byy = nyy; }
                }
            }
            if (!(best > (xy * xy / yy) * margin)) break;
            y[bi] -= 1.f;
            y[bj] += 1.f;
            xy = bxy;
            yy = byy;
        }
        for (int64_t j = 0; j < n; j++) yg[j] = xg[j] < 0.f ? -(int64_t)y[j] : (int64_t)y[j];
    }
}
