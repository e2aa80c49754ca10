/* Activation PVQ (pvq/actquant.py): for each of `groups` runs of n floats of x, the Opus greedy search
 * on P(n, k) (projection y_j = floor((k + 0.8)|x_j| / sum|x|) when k > n/2, then one pulse at a time
 * where (xy + |x_j|)^2 / (yy + 2 y_j + 1) is largest; codec/search.py with refine=0), written as the
 * unit shape u = sign(x) y / ||y|| and the optimal gain <x, u>. An all-zero group gets every pulse on
 * its first coordinate and gain 0. The gain quantizer runs in torch on these gains. */
#include "pvq.h"

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

