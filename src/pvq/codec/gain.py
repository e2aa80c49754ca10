"""Gain (group norm) quantizers for gain-shape PVQ.

Why a Beta law: after a random orthogonal rotation a weight row of length m is (close to) uniform
on a sphere of radius ||w||. The energy fraction that one group of n coordinates holds,
t = ||w_g||^2 / ||w||^2, then follows Beta(n/2, (m - n)/2) (a classical property of the uniform
distribution on the sphere; see docs/pvq.md). With the gain normalised by the row's RMS group
gain, r = g / sqrt(mean g^2), we have r^2 = t * m / n, so the density of r is known in closed form
and the same for every row: one Lloyd-Max codebook, designed once for (n, m, L), serves every row
and costs no stored bits. The Lloyd-Max conditions (Lloyd 1957/1982, Max 1960) are solved
numerically on a fine grid of that density.

Quantizers here work on normalised gains r >= 0 and return level indices in [0, L).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch


def beta_gain_density(n: int, m: int, points: int = 1 << 14) -> tuple[torch.Tensor, torch.Tensor]:
    """Grid r[points] and probability masses p[points] of the normalised gain r = sqrt(t m / n).

    t ~ Beta(n/2, (m-n)/2); for m <= n the group is the whole row and r = 1 always.
    """
    if n < 1 or m < 1:
        raise ValueError(f"beta_gain_density needs n >= 1 and m >= 1, got n={n}, m={m}")
    if m <= n:
        return torch.ones(1, dtype=torch.float64), torch.ones(1, dtype=torch.float64)
    a, b = n / 2.0, (m - n) / 2.0
    r_max = min(math.sqrt(m / n), 8.0)
    r = (torch.arange(points, dtype=torch.float64) + 0.5) * (r_max / points)
    t = (r * r * (n / m)).clamp(max=1 - 1e-16)
    log_beta = math.lgamma(a) + math.lgamma(b) - math.lgamma(a + b)
    log_pdf_t = (a - 1) * torch.log(t) + (b - 1) * torch.log1p(-t) - log_beta
    # change of variables: dt/dr = 2 r n / m
    p = torch.exp(log_pdf_t) * (2 * r * n / m) * (r_max / points)
    return r, p / p.sum()


def lloyd_max(x: torch.Tensor, p: torch.Tensor, levels: int, iters: int = 300) -> torch.Tensor:
    """MSE-optimal scalar codebook (float64, ascending) with `levels` points for masses p at sorted x.

    Initialised from the high-resolution optimum (levels spaced by the density^(1/3) law), then
    refined by alternating the two Lloyd-Max conditions (cells = nearest-neighbour regions,
    levels = cell centroids). Prefix sums make each iteration O(levels log len(x)).
    """
    if levels < 1:
        raise ValueError(f"a gain quantizer needs at least 1 level, got {levels}")
    x = x.to(torch.float64)
    p = p.to(torch.float64)
    cp = torch.cat([torch.zeros(1, dtype=torch.float64), p.cumsum(0)])
    cxp = torch.cat([torch.zeros(1, dtype=torch.float64), (x * p).cumsum(0)])
    # companding start: equal steps in the CDF of p^(1/3)
    w = p.clamp_min(0) ** (1.0 / 3.0)
    cw = w.cumsum(0) / w.sum()
    target = (torch.arange(levels, dtype=torch.float64) + 0.5) / levels
    c = x[torch.searchsorted(cw, target).clamp(max=x.numel() - 1)]
    for _ in range(iters):
        mid = (c[1:] + c[:-1]) / 2
        cut = torch.cat([torch.zeros(1, dtype=torch.long), torch.searchsorted(x, mid), torch.tensor([x.numel()])])
        mass = cp[cut[1:]] - cp[cut[:-1]]
        new = torch.where(mass > 0, (cxp[cut[1:]] - cxp[cut[:-1]]) / mass.clamp_min(1e-300), c)
        new, _ = new.sort()
        if torch.allclose(new, c, rtol=0, atol=1e-12):
            c = new
            break
        c = new
    return c


@lru_cache(maxsize=256)
def beta_codebook(n: int, m: int, levels: int) -> torch.Tensor:
    """The Lloyd-Max codebook for normalised gains of n-groups in rotated rows of length m."""
    r, p = beta_gain_density(n, m, points=max(1 << 14, 16 * levels))
    return lloyd_max(r, p, levels)


def nearest(values: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """Index of the nearest codebook entry (codebook ascending) for each value."""
    mid = (codebook[1:] + codebook[:-1]) / 2
    return torch.bucketize(values.to(codebook.dtype).contiguous(), mid.contiguous())


@dataclass(frozen=True)
class GainCodebook:
    """A scalar codebook for normalised gains, and what it costs to store.

    kind: "beta" (derived from the Beta law: nothing stored), "empirical" (Lloyd-Max on the data:
    the L levels are stored as fp16), "uniform" (min..max of the data in L equal steps: the two
    ends are stored as fp16).
    """

    kind: str
    levels: torch.Tensor  # [L] float64, ascending

    @property
    def stored_bits(self) -> int:
        return {"beta": 0, "empirical": 16 * self.levels.numel(), "uniform": 32}[self.kind]

    def quantize(self, r: torch.Tensor) -> torch.Tensor:
        return nearest(r, self.levels)

    def dequantize(self, idx: torch.Tensor) -> torch.Tensor:
        return self.levels[idx]


GAIN_KINDS = ("beta", "empirical", "uniform")


def fit_gain_codebook(kind: str, r: torch.Tensor, n: int, m: int, levels: int) -> GainCodebook:
    """Build the codebook of a given kind for normalised gains r (data used only by data-fitted kinds)."""
    if kind == "beta":
        return GainCodebook("beta", beta_codebook(n, m, levels))
    r = r.reshape(-1).to("cpu", torch.float64)  # a few values per group: a codebook is fitted and kept on the CPU
    if kind == "uniform":
        lo = torch.tensor(float(r.min()), dtype=torch.float16).double()
        hi = torch.tensor(float(r.max()), dtype=torch.float16).double()
        if levels == 1:
            return GainCodebook("uniform", ((lo + hi) / 2).reshape(1))
        return GainCodebook("uniform", lo + (hi - lo) * torch.arange(levels, dtype=torch.float64) / (levels - 1))
    if kind == "empirical":
        xs, _ = r.sort()
        c = lloyd_max(xs, torch.full_like(xs, 1.0 / xs.numel()), levels)
        return GainCodebook("empirical", c.half().double().sort().values)
    raise ValueError(f"unknown gain quantizer {kind!r}; choose one of {GAIN_KINDS}")
