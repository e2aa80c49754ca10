"""Seeded randomized Hadamard rotations for any dimension.

Incoherence processing (QuIP#, Tseng et al. 2024) and rotation-based outlier
removal (QuaRot, Ashkboos et al. 2024) multiply weights by a random orthogonal
matrix R = diag(s) H / sqrt(d): random signs s followed by a Hadamard matrix H.
This spreads outlier coordinates over the whole vector, so the rotated weights
look Gaussian, which is what a PVQ codebook wants.  Only (dim, seed) is stored;
the matrix is rebuilt on demand and applied with a fast Walsh-Hadamard
transform in O(d log d).

Hadamard orders built here:
  * 2^k by Sylvester's doubling H_2n = [[H, H], [H, -H]];
  * Paley I  (Paley 1933): n = q + 1, q prime, q = 3 (mod 4);
  * Paley II (Paley 1933): n = 2(q + 1), q prime, q = 1 (mod 4);
  * Kronecker products of a Paley matrix with a Sylvester matrix.
Prime powers q (Paley over GF(p^k)) are not built.

A dimension d = q * 2^a (q odd) is rotated with K = small (x) H_pow2, where:
  * q == 1: pure Sylvester, plan ("hadamard", 1, d);
  * the order 4q has a Paley construction and 4 | d: ("hadamard", 4q, d / 4q);
  * otherwise ("random_orthogonal", q, 2^a): a seeded Haar-random orthogonal
    q x q matrix (Kronecker) Sylvester H_{2^a}.
Hadamard orders > 2 are multiples of 4, so 4q is the smallest candidate.  We
deliberately do not try 8q, 16q, ...: that only grows the dense factor, e.g.
11008 = 5504 * 2 (5503 is prime) would cost 128x the work of the 43 x 43
orthogonal fallback (43 * 256).
"""

from __future__ import annotations

import functools
import math
from numbers import Integral

import torch

__all__ = ["hadamard_matrix", "has_hadamard", "rotation_plan", "RandomHadamard"]


def _is_int(v) -> bool:
    return isinstance(v, Integral) and not isinstance(v, bool)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    return all(n % k for k in range(2, math.isqrt(n) + 1))


def _split_pow2(n: int) -> tuple[int, int]:
    """n = odd * 2^a -> (odd, 2^a)."""
    p = n & -n
    return n // p, p


def _paley_kind(m: int) -> str | None:
    """Which Paley construction (if any) gives order m directly."""
    if m >= 4 and _is_prime(m - 1) and (m - 1) % 4 == 3:
        return "paley1"
    if m >= 12 and m % 2 == 0 and _is_prime(m // 2 - 1) and (m // 2 - 1) % 4 == 1:
        return "paley2"
    return None


def _core_of(n: int) -> tuple[int, int] | None:
    """n = core * 2^k with core 1 or a Paley order; smallest core wins."""
    if n < 1:
        return None
    _, p = _split_pow2(n)
    while p >= 1:  # largest power-of-two factor first -> smallest core
        m = n // p
        if m == 1 or _paley_kind(m) is not None:
            return m, p
        p //= 2
    return None


def has_hadamard(n: int) -> bool:
    """True if hadamard_matrix(n) has a construction in this module."""
    return _is_int(n) and _core_of(int(n)) is not None


def _sylvester(p: int) -> torch.Tensor:
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < p:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


def _jacobsthal(q: int) -> torch.Tensor:
    """Q[i, j] = legendre(j - i mod q); skew for q=3 (4), symmetric for q=1 (4)."""
    chi = torch.full((q,), -1.0, dtype=torch.float64)
    chi[0] = 0.0
    chi[[(k * k) % q for k in range(1, q)]] = 1.0
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def _paley(m: int, kind: str) -> torch.Tensor:
    q = m - 1 if kind == "paley1" else m // 2 - 1
    c = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    c[1:, 1:] = _jacobsthal(q)
    c[0, 1:] = 1.0
    if kind == "paley1":  # skew conference matrix S; H = I + S
        c[1:, 0] = -1.0
        return c + torch.eye(q + 1, dtype=torch.float64)
    c[1:, 0] = 1.0  # symmetric conference matrix C; zeros -> [[1,-1],[-1,-1]]
    a = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    b = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(c, a) + torch.kron(torch.eye(q + 1, dtype=torch.float64), b)


@functools.lru_cache(maxsize=64)
def _hadamard_cached(n: int) -> torch.Tensor:
    core = _core_of(n)
    if core is None:
        raise ValueError(f"no Hadamard construction for order n={n} "
                         "(supported: 2^k, Paley I/II with prime q, times 2^k)")
    m, p = core
    h = _sylvester(p)
    return h if m == 1 else torch.kron(_paley(m, _paley_kind(m)), h)


def hadamard_matrix(n: int) -> torch.Tensor:
    """Unnormalised +-1 Hadamard matrix of order n (float64, H H^T = n I)."""
    if not _is_int(n) or n < 1:
        raise ValueError(f"Hadamard order must be a positive integer, got n={n!r}")
    return _hadamard_cached(int(n)).clone()  # the cache must stay untouched


def rotation_plan(d: int) -> tuple[str, int, int]:
    """(kind, small_order, pow2) with small_order * pow2 == d; see module doc."""
    if not _is_int(d) or d < 1:
        raise ValueError(f"dimension must be a positive integer, got {d!r}")
    d = int(d)
    q, p = _split_pow2(d)
    if q == 1:
        return "hadamard", 1, d
    if p >= 4 and _paley_kind(4 * q) is not None:
        return "hadamard", 4 * q, d // (4 * q)
    return "random_orthogonal", q, p


_RADIX = 16  # first log2(16) butterfly levels as one small GEMM (see _fwht)
_DENSE_POW2 = 256  # H_p up to this order is applied as one dense GEMM (at most 256 KiB in float32)


def _fwht(x: torch.Tensor, h_radix: torch.Tensor) -> torch.Tensor:
    """x @ H_p (Sylvester, scaled like h_radix) over the last dim; a new tensor.

    Sylvester ordering means H_p = H_{p/r} (x) H_r, so the lowest log2(r)
    levels are one GEMM with the r x r block (h_radix) -- BLAS does this far
    faster than per-level torch calls.  The remaining levels are butterflies
    (a, b) -> (a + b, a - b) written with out= into a ping-pong buffer, so each
    level is two vectorised kernels and no allocation: O(d log d) overall.
    """
    p = x.shape[-1]
    n = x.numel() // p
    r = h_radix.shape[0]
    src = (x.reshape(n * (p // r), r) @ h_radix).view(n, p)
    if src.requires_grad and torch.is_grad_enabled():
        # out= kernels are not differentiable: the same butterflies, allocating, for autograd
        h = r
        while h < p:
            a = src.view(n, p // (2 * h), 2, h)
            src = torch.stack([a[:, :, 0] + a[:, :, 1], a[:, :, 0] - a[:, :, 1]], dim=2).reshape(n, p)
            h *= 2
        return src.view(x.shape)
    dst = torch.empty_like(src)
    h = r
    while h < p:
        a = src.view(n, p // (2 * h), 2, h)
        b = dst.view(n, p // (2 * h), 2, h)
        torch.add(a[:, :, 0], a[:, :, 1], out=b[:, :, 0])
        torch.sub(a[:, :, 0], a[:, :, 1], out=b[:, :, 1])
        src, dst = dst, src
        h *= 2
    return src.view(x.shape)


class RandomHadamard:
    """Orthogonal R = diag(s) (small (x) H_pow2) / norm, defined by (dim, seed).

    apply(x) = x @ R and apply_inverse(x) = x @ R.T over the last dim of x.
    """

    __slots__ = ("_dim", "_seed", "_plan", "_signs", "_small", "_cast")

    def __init__(self, dim: int, seed: int):
        if not _is_int(dim) or dim < 1:
            raise ValueError(f"dim must be a positive integer, got {dim!r}")
        if not _is_int(seed) or not 0 <= seed < 2**64:
            raise ValueError(f"seed must be an integer in [0, 2**64), got {seed!r}")
        self._dim, self._seed = int(dim), int(seed)
        self._plan = rotation_plan(self._dim)
        self._signs = self._small = None  # built lazily: construction stays cheap
        self._cast = {}

    dim = property(lambda self: self._dim)
    seed = property(lambda self: self._seed)
    plan = property(lambda self: self._plan)

    def __repr__(self) -> str:
        kind, m, p = self._plan
        return f"RandomHadamard(dim={self._dim}, seed={self._seed}, plan={kind}:{m}x{p})"

    def __eq__(self, other) -> bool:
        if not isinstance(other, RandomHadamard):
            return NotImplemented
        return (self._dim, self._seed) == (other._dim, other._seed)

    def __hash__(self) -> int:
        return hash((RandomHadamard, self._dim, self._seed))

    def _build(self) -> None:
        # One generator, fixed draw order (signs, then the fallback Gaussian),
        # so the same seed always yields the same rotation.
        g = torch.Generator().manual_seed(self._seed)
        signs = torch.randint(0, 2, (self._dim,), generator=g).to(torch.float64) * 2 - 1
        kind, m, _ = self._plan
        if kind == "hadamard":
            small = _hadamard_cached(m) / math.sqrt(m)
        else:
            qm, r = torch.linalg.qr(torch.randn(m, m, generator=g, dtype=torch.float64))
            small = qm * torch.sign(torch.diagonal(r))  # sign fix -> Haar, unique
        self._signs, self._small = signs, small

    def _factors(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, ...]:
        """(signs, small factor, radix block / sqrt(pow2)) in the caller's dtype/device."""
        key = (dtype, device)
        if key not in self._cast:
            if self._signs is None:
                self._build()
            p = self._plan[2]
            # fold the 1/sqrt(p) normalisation into the radix GEMM: saves a pass. Up to _DENSE_POW2
            # the whole H_p is that one GEMM (no butterfly levels): fewer calls, which is what
            # costs most when x is one token
            radix = _hadamard_cached(p if p <= _DENSE_POW2 else _RADIX) / math.sqrt(p)
            self._cast[key] = tuple(t.to(device, dtype) for t in (self._signs, self._small, radix))
        return self._cast[key]

    def factors(self, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor, int, int]:
        """(signs [dim], small factor [m, m], m, p) with R = diag(signs) (small (x) H_p) / sqrt(p) (CPU)."""
        s, small, _ = self._factors(dtype, torch.device("cpu"))
        _, m, p = self._plan
        return s, small, m, p

    def matrix(self, dtype: torch.dtype = torch.float64) -> torch.Tensor:
        """Dense R (dim x dim); O(dim^2) memory, meant for tests and small dims."""
        s, small, _ = self._factors(torch.float64, torch.device("cpu"))
        p = self._plan[2]
        k = torch.kron(small, _sylvester(p)) / math.sqrt(p)  # not cached: may be big
        return (s[:, None] * k).to(dtype)

    def _check(self, x) -> None:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"expected a torch.Tensor, got {type(x).__name__}")
        if x.dim() == 0 or x.shape[-1] != self._dim:
            got = ("a scalar" if x.dim() == 0
                   else f"last dim {x.shape[-1]} (shape {tuple(x.shape)})")
            raise ValueError(f"RandomHadamard expects last dim {self._dim}, got {got}")
        if not x.is_floating_point():
            raise ValueError(f"RandomHadamard needs a floating-point tensor, got dtype {x.dtype}")

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R over the last dim: (x * s) reshaped (m, p) -> small^T X H_p / sqrt(p)."""
        self._check(x)
        s, small, radix = self._factors(x.dtype, x.device)
        _, m, p = self._plan
        y = _fwht((x * s).reshape(*x.shape[:-1], m, p), radix)
        if m > 1:
            y = torch.matmul(small.T, y)
        return y.reshape(x.shape)

    def apply_inverse(self, x: torch.Tensor) -> torch.Tensor:
        """x @ R.T = ((small X H_p) / sqrt(p)) * s; undoes apply()."""
        self._check(x)
        s, small, radix = self._factors(x.dtype, x.device)
        _, m, p = self._plan
        y = _fwht(x.reshape(*x.shape[:-1], m, p), radix)
        if m > 1:
            y = torch.matmul(small, y)
        return y.reshape(x.shape) * s
