"""The pyramid codebook P(n, k) = {y in Z^n : sum |y| = k}, without a stored codebook.

Fischer, "A Pyramid Vector Quantizer", IEEE Trans. Inf. Theory 32(4), 1986: the points are counted by
V(n, k) = V(n-1, k) + V(n, k-1) + V(n-1, k-1) and enumerated to integers in [0, V(n, k)).
The enumeration follows the U-table form used by the Opus/CELT codec (RFC 6716; see
docs/pvq.md): U(n, k) = (V(n-1, k-1) + V(n, k-1)) / 2 is symmetric and V(n, k) = U(n, k) + U(n, k+1).

Everything here is vectorised over groups: `encode_cwrs` and `decode_cwrs` take tensors of shape
[..., n] (or [...] for indices) and treat every leading index as one independent group. They are
the reference enumeration, and the leaves of the faster split enumeration in `enumeration.py`.
Indices are int64, so a configuration is usable only while V(n, k) <= 2**63 - 1; larger ones are
refused with a ValueError that names the limit (`check_index_fits`).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

INDEX_LIMIT = 2**63 - 1  # largest index value an int64 holds
_CHUNK = 1 << 16  # groups processed at once: bounds temporaries to a few MB


# --------------------------------------------------------------------------------------------
# Counting
# --------------------------------------------------------------------------------------------
def _check_nk(n: int, k: int) -> None:
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise ValueError(f"group dimension n must be an integer >= 1, got {n!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"pulse count k must be an integer >= 0, got {k!r}")


@lru_cache(maxsize=None)
def _v_rows(n: int, k: int) -> tuple[tuple[int, ...], ...]:
    """Exact V(i, j) for 0 <= i <= n, 0 <= j <= k as Python ints (arbitrary precision)."""
    prev = [1] + [0] * k  # V(0, .)
    rows = [tuple(prev)]
    for _ in range(1, n + 1):
        cur = [1] + [0] * k
        for j in range(1, k + 1):
            cur[j] = prev[j] + cur[j - 1] + prev[j - 1]
        rows.append(tuple(cur))
        prev = cur
    return tuple(rows)


def count(n: int, k: int) -> int:
    """V(n, k): the exact number of integer points y in Z^n with sum |y| = k (a Python int)."""
    _check_nk(n, k)
    return _v_rows(n, k)[n][k]


def index_bits(n: int, k: int) -> float:
    """log2 V(n, k): the information content of one shape index, in bits."""
    v = count(n, k)
    # math.log2 of a huge int is exact enough (it works on the int's float conversion safely)
    return math.log2(v)


def check_index_fits(n: int, k: int) -> None:
    """Raise ValueError if indices of P(n, k) do not fit the int64 codec (V(n, k) > 2**63 - 1)."""
    v = count(n, k)
    if v > INDEX_LIMIT:
        raise ValueError(
            f"PVQ(n={n}, k={k}) has V = 2^{math.log2(v):.2f} codewords; the codec stores indices in "
            f"63 bits (V <= 2^63 - 1). Use a smaller n or k."
        )


@lru_cache(maxsize=64)
def u_table(n: int, k: int) -> torch.Tensor:
    """int64 tensor U[i, j] for 0 <= i <= n, 0 <= j <= k + 1 (the enumeration table).

    U(0, 0) = 1, U(0, j > 0) = 0, U(i >= 1, 0) = 0, U(i, j) = (V(i-1, j-1) + V(i, j-1)) / 2.
    Every entry is at most U(n, k + 1) <= V(n, k), so it fits once V(n, k) fits.
    """
    check_index_fits(n, k)
    v = _v_rows(n, k)
    u = [[0] * (k + 2) for _ in range(n + 1)]
    u[0][0] = 1
    for i in range(1, n + 1):
        for j in range(1, k + 2):
            u[i][j] = (v[i - 1][j - 1] + v[i][j - 1]) // 2
    t = torch.tensor(u, dtype=torch.int64)
    t.requires_grad_(False)
    return t


# --------------------------------------------------------------------------------------------
# Enumeration: y <-> index
# --------------------------------------------------------------------------------------------
def check_codewords(y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Size]:
    """Validate integer codewords y[..., n] of P(n, k); returns (int64 y[G, n], leading shape)."""
    if not isinstance(y, torch.Tensor) or y.dtype not in (torch.int8, torch.int16, torch.int32, torch.int64):
        raise ValueError(f"encode expects an integer tensor y[..., n], got {getattr(y, 'dtype', type(y))}")
    if y.dim() < 1 or y.shape[-1] < 1:
        raise ValueError(f"encode expects y of shape [..., n] with n >= 1, got {tuple(y.shape)}")
    n = y.shape[-1]
    _check_nk(n, k)
    check_index_fits(n, k)
    lead = y.shape[:-1]
    y = y.reshape(-1, n).to(torch.int64)
    norms = y.abs().sum(dim=1)
    if y.numel() and not bool((norms == k).all()):
        bad = int((norms != k).nonzero()[0, 0])
        raise ValueError(f"encode: group {bad} has sum|y| = {int(norms[bad])}, expected k = {k}")
    return y, lead


def check_indices(idx: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Validate indices in [0, V(n, k)); returns them flat as int64."""
    _check_nk(n, k)
    check_index_fits(n, k)
    if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"decode expects an int64 index tensor, got {getattr(idx, 'dtype', type(idx))}")
    flat = idx.reshape(-1).to(torch.int64)
    v = count(n, k)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= v):
        raise ValueError(f"decode: index outside [0, V({n},{k}) = {v})")
    return flat


def encode_cwrs(y: torch.Tensor, k: int) -> torch.Tensor:
    """Opus (CWRS) index in [0, V(n, k)) of each integer vector y[..., n] with sum |y| = k (int64 [...])."""
    y, lead = check_codewords(y, k)
    n = y.shape[1]
    u = u_table(n, k)
    out = torch.empty(y.shape[0], dtype=torch.int64)
    for s in range(0, y.shape[0], _CHUNK):
        out[s : s + _CHUNK] = _encode_chunk(y[s : s + _CHUNK], u, n)
    return out.reshape(lead)


def _encode_chunk(y: torch.Tensor, u: torch.Tensor, n: int) -> torch.Tensor:
    # Walk from the last coordinate back (PVQ.md): i counts the codewords that precede y.
    last = y[:, n - 1]
    idx = (last < 0).to(torch.int64)
    kk = last.abs()
    for j in range(n - 2, -1, -1):
        row = u[n - j]
        yj = y[:, j]
        idx += row[kk]
        kk = kk + yj.abs()
        idx += torch.where(yj < 0, row[kk + 1], 0)
    return idx


def decode_cwrs(idx: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `encode_cwrs`: integer vectors y[..., n] (int64) for indices idx[...] in [0, V(n, k))."""
    flat = check_indices(idx, n, k)
    u = u_table(n, k)
    out = torch.empty(flat.shape[0], n, dtype=torch.int64)
    for s in range(0, flat.shape[0], _CHUNK):
        out[s : s + _CHUNK] = _decode_chunk(flat[s : s + _CHUNK], u, n, k)
    return out.reshape(*idx.shape, n)


def _decode_chunk(i: torch.Tensor, u: torch.Tensor, n: int, k: int) -> torch.Tensor:
    g = i.shape[0]
    y = torch.empty(g, n, dtype=torch.int64)
    i = i.clone()
    kk = torch.full((g,), k, dtype=torch.int64)
    for j in range(n - 1):
        row = u[n - j]
        # U(m, k+1) codewords start with a coordinate >= 0; the rest are negative.
        p = row[kk + 1]
        neg = i >= p
        i -= torch.where(neg, p, 0)
        # pulses left for the remaining coordinates: the largest k' <= k with U(m, k') <= i
        # (U(m, .) is increasing for m >= 2, so a binary search finds it).
        k_rest = torch.searchsorted(row, i, right=True) - 1
        i -= row[k_rest]
        mag = kk - k_rest
        y[:, j] = torch.where(neg, -mag, mag)
        kk = k_rest
    # the last coordinate takes every remaining pulse; i is 0 (positive) or 1 (negative)
    y[:, n - 1] = torch.where(i > 0, -kk, kk)
    return y


def shapes(y: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Unit-norm directions y / ||y||_2 of integer codewords (rows with k = 0 stay zero)."""
    yf = y.to(dtype)
    norm = yf.norm(dim=-1, keepdim=True)
    return yf / norm.clamp_min(1e-30)
