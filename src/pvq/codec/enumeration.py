"""Fast bijection P(n, k) <-> [0, V(n, k)) by recursive splitting, with table lookups at the leaves.

The Opus (CWRS) enumeration in `pyramid.py` decodes one coordinate at a time, each step a
data-dependent binary search: n dependent steps per group. Here a group is split in two halves
y = (y1, y2) of n1 = n // 2 and n2 = n - n1 coordinates (CELT splits large bands the same way).
With k1 = sum |y1| and k2 = k - k1:

    index(y) = O(k, k1) + index(y1; n1, k1) * V(n2, k2) + index(y2; n2, k2),
    O(k, k1) = sum_{j < k1} V(n1, j) * V(n2, k - j),

so the codewords are ordered by k1 first, then by the two halves in mixed radix. Halves recurse
until they are small enough (n <= 4, at most 2^23 points of P(n, k') for all k' <= k) that every
point of every P(d, k') fits in one lookup table, built once from the CWRS decoder. Decoding a
group of 16 then costs one search per level (log2(n/4) levels) and one table read per leaf,
instead of 16 searches, and all groups of one level are decoded together.

`tree(n, K)` is that plan (public `Leaf` and `Split` nodes) and `decode_node` decodes under any of its
nodes: runtime/native.py serialises the tree for the native kernel and tabulates sub-pyramids with them.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import torch

from .pyramid import _CHUNK, _v_rows, _encode_chunk, check_codewords, check_indices, decode_cwrs, u_table

LEAF_ROWS = 1 << 23  # largest lookup table (points of P(d, k') for all k' <= k) a leaf may hold


@dataclass(frozen=True, eq=False)
class Leaf:
    """A node of `tree`: every point of P(d, k') for k' <= K in one table, in CWRS order."""

    d: int
    u: torch.Tensor  # CWRS table u_table(d, K), to encode
    lut: torch.Tensor  # [rows, d] every point of P(d, 0), P(d, 1), ..., P(d, K) in CWRS order
    base: torch.Tensor  # [K + 1] first row of P(d, k') in lut

    @property
    def K(self) -> int:
        """The most pulses the table holds."""
        return self.base.numel() - 1


@dataclass(frozen=True, eq=False)
class Split:
    """A node of `tree`: P(n, k) for k <= K as the halves `first` (n1 coordinates) and `second` (n - n1),
    index = O(k, k1) + a * V(n - n1, k - k1) + b (module docstring). `first is second` when n1 = n - n1."""

    n: int
    n1: int
    first: "Leaf | Split"
    second: "Leaf | Split"
    K: int
    offs: torch.Tensor  # [(K + 1) * (K + 1)] O(k, k1), flattened row-major
    v2: torch.Tensor  # [K + 1] V(n2, j)
    base: torch.Tensor | None  # [K + 1] sum_{k' < k} V(n, k'); None where it would overflow int64
    keys: torch.Tensor | None  # sorted base[k] + O(k, k1) over all k1 <= k <= K
    key_k1: torch.Tensor | None  # k1 of each key


def _leaf_rows(d: int, K: int) -> int:
    v = _v_rows(d, K)[d]
    return sum(v[: K + 1])


@lru_cache(maxsize=64)
def tree(n: int, K: int) -> Leaf | Split:
    """The recursive coding plan of P(n, k) for every k <= K: the nodes `encode` and `decode` walk (and
    runtime/native.py serialises for the kernel). Cached and shared: treat its tensors as read-only."""
    if n <= 4 and _leaf_rows(n, K) <= LEAF_ROWS or n == 1:
        v = _v_rows(n, K)[n]
        pts = [decode_cwrs(torch.arange(v[kk]), n, kk) for kk in range(K + 1)]
        base = torch.tensor([0] + [sum(v[:j]) for j in range(1, K + 1)], dtype=torch.int64)
        lut_dtype = torch.int8 if K < 128 else torch.int16 if K < 32768 else torch.int32
        return Leaf(n, u_table(n, K), torch.cat(pts).to(lut_dtype), base)
    n1 = n // 2
    n2 = n - n1
    v1, v2, vn = _v_rows(n1, K)[n1], _v_rows(n2, K)[n2], _v_rows(n, K)[n]
    offs = [[0] * (K + 1) for _ in range(K + 1)]
    for kk in range(K + 1):
        acc = 0
        for k1 in range(kk + 1):
            offs[kk][k1] = acc
            acc += v1[k1] * v2[kk - k1]
    offs_t = torch.tensor(offs, dtype=torch.int64).reshape(-1)
    total = sum(vn[: K + 1])
    if total < 2**63:  # a sub-problem: several k share one sorted key array
        base_list = [sum(vn[:j]) for j in range(K + 1)]
        keys = [base_list[kk] + offs[kk][k1] for kk in range(K + 1) for k1 in range(kk + 1)]
        k1s = [k1 for kk in range(K + 1) for k1 in range(kk + 1)]
        base = torch.tensor(base_list, dtype=torch.int64)
        keys_t, k1_t = torch.tensor(keys, dtype=torch.int64), torch.tensor(k1s, dtype=torch.int64)
    else:  # only the top level (one k for every group) can be this large
        base = keys_t = k1_t = None
    first = tree(n1, K)
    second = first if n2 == n1 else tree(n2, K)
    return Split(n, n1, first, second, K, offs_t, torch.tensor(v2, dtype=torch.int64), base, keys_t, k1_t)


def _encode(node, y: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    if isinstance(node, Leaf):
        return _encode_chunk(y, node.u, node.d)
    g = y.shape[0]
    y1, y2 = y[:, : node.n1], y[:, node.n1 :]
    k1 = y1.abs().sum(dim=1)
    k2 = k - k1
    if node.first is node.second:  # both halves share one plan: code them in one pass
        ab = _encode(node.first, torch.cat([y1, y2]), torch.cat([k1, k2]))
        a, b = ab[:g], ab[g:]
    else:
        a, b = _encode(node.first, y1, k1), _encode(node.second, y2, k2)
    return node.offs[k * (node.K + 1) + k1] + a * node.v2[k2] + b


def decode_node(node: Leaf | Split, idx: torch.Tensor, k: torch.Tensor | int) -> torch.Tensor:
    """The points [len(idx), n] (in the leaves' table dtype) of the indices idx [groups] of P(n, k) under a
    node of `tree`; k an int (every group) or a tensor of one pulse count per group."""
    if isinstance(node, Leaf):
        return node.lut[node.base[k] + idx]
    g = idx.shape[0]
    if isinstance(k, int):  # every group has the same k: search its row of offsets
        row = node.offs[k * (node.K + 1) : k * (node.K + 1) + k + 1]
        k1 = torch.searchsorted(row, idx, right=True) - 1
        rest = idx - row[k1]
    else:  # groups differ in k: one search over the keys of every (k, k1)
        if node.keys is None:
            raise ValueError(f"PVQ sub-block n={node.n}, k<={node.K} is too large for 63-bit keys")
        key = node.base[k] + idx
        pos = torch.searchsorted(node.keys, key, right=True) - 1
        k1 = node.key_k1[pos]
        rest = key - node.keys[pos]
    k2 = k - k1
    v2 = node.v2[k2]
    a = torch.div(rest, v2, rounding_mode="floor")
    b = rest - a * v2
    if node.first is node.second:
        ys = decode_node(node.first, torch.cat([a, b]), torch.cat([k1, k2]))
        return torch.cat([ys[:g], ys[g:]], dim=1)
    return torch.cat([decode_node(node.first, a, k1), decode_node(node.second, b, k2)], dim=1)


def encode(y: torch.Tensor, k: int) -> torch.Tensor:
    """Index in [0, V(n, k)) of each integer vector y[..., n] with sum |y| = k. Returns int64 [...]."""
    y, lead = check_codewords(y, k)
    node = tree(y.shape[1], k)
    out = torch.empty(y.shape[0], dtype=torch.int64)
    for s in range(0, y.shape[0], _CHUNK):
        yc = y[s : s + _CHUNK]
        out[s : s + _CHUNK] = _encode(node, yc, torch.full((yc.shape[0],), k, dtype=torch.int64))
    return out.reshape(lead)


def decode(idx: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """Inverse of `encode`: integer vectors y[..., n] (int64) for indices idx[...] in [0, V(n, k))."""
    flat = check_indices(idx, n, k)
    node = tree(n, k)
    out = torch.empty(flat.shape[0], n, dtype=torch.int64)
    for s in range(0, flat.shape[0], _CHUNK):
        out[s : s + _CHUNK] = decode_node(node, flat[s : s + _CHUNK], k)
    return out.reshape(*idx.shape, n)
