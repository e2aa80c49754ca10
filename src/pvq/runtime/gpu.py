"""Triton kernels that rebuild PVQ weights from their packed codes on the device (optional: `pvq[gpu]`).

A group's code is read straight from the bit stream (up to 9 bytes around its bit offset), split into
shape index and gain level (code = index * L + level), and its shape is rebuilt by the split
enumeration of codec/enumeration.py: every split level halves each segment with a binary search over
that level's row of offsets O(k, k1), then a / b = rest div / mod V(n2, k2); the leaves read their
coordinates from one table of every point of P(d, k') (d <= 4, padded to a power of two lanes so the
Triton tensors keep power-of-two shapes; a group of 12 is 4 leaves of 3 in 16 lanes). Tables are small
(a few MiB at most) and built once per (n, k, device).

Supported are the layouts whose splits are all even halvings down to leaves of at most 4 coordinates:
every setting the picker chooses (n in 4, 6, 8, 12, 16). `supports(spec)` says so; other settings decode
with torch.

Kernels:
- `decode(packed, r0, r1)`: rows [r0, r1) of W' as float32 (a tile for a GEMM, or the whole matrix);
- `shapes(packed)`: the integer points, for exact comparison with the torch decoder;
- `gemv(packed, x)`: x W'^T for a few tokens, decoding inside the product (the matrix is never written).

Indices past V(n, k) are reported by `check_codes` (a clear error at load) and clamped inside the
kernels, so corrupt codes never read outside a table. TRITON_INTERPRET=1 runs all of this on CPU
tensors (how CI tests it without a GPU).
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from ..codec import PackedPVQ, PVQSpec
from ..codec.enumeration import Leaf, Split, tree
from ..codec.pyramid import count

BLOCK_GROUPS = 128  # groups one program decodes at once
GEMV_ROWS = 16  # rows one program of the fused product owns
GEMV_GROUPS = 8  # groups per row it decodes per step
MAX_TOKENS = 8  # most rows of x the fused product takes
DECODE_ROWS = 1024  # rows decoded at once for a prompt's GEMM (a 1024 x 4096 float32 tile is 16 MiB)
GEMM_TOKENS = 64  # tokens one program of the fused tiled product owns
GEMM_ROWS = 64  # rows it owns
GEMM_WIDTH = 64  # lanes of each row it rebuilds per step (whole groups, padded lanes included)
# How more than MAX_TOKENS tokens are multiplied: "tiles" decodes DECODE_ROWS rows at a time into the layer's
# dtype and multiplies them with torch; "fused" rebuilds tiles in registers inside the product (gemm_kernel),
# never writing the matrix but rebuilding each row once per GEMM_TOKENS tokens. Which is faster on a given GPU
# is what bench/gpu.py measures (both, per layer shape).
PROMPT = "tiles"
# the dtypes a tile is decoded into or multiplied in, and gemm_kernel's code for each
_DOT = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}


def available() -> bool:
    """Triton imports (a GPU, or TRITON_INTERPRET=1 for CPU tensors)."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _structure(n: int, k: int) -> tuple[int, int] | None:
    """(split depth, leaf dimension) of tree(n, k) when every split halves evenly, else None."""
    node, depth = tree(n, k), 0
    while isinstance(node, Split):
        if node.first is not node.second:
            return None
        node, depth = node.first, depth + 1
    return (depth, node.d) if node.d <= 4 else None


def supports(spec) -> bool:
    return isinstance(spec, PVQSpec) and _structure(spec.n, spec.k) is not None and spec.code_bits <= 63


class Tables:
    """One (n, k)'s decode tables on one device: offsets and V(n2, .) of each split level, leaf points."""

    def __init__(self, n: int, k: int, device):
        st = _structure(n, k)
        if st is None:
            raise ValueError(f"PVQ(n={n}, k={k}) has no even split down to leaves of <= 4: no Triton decoder")
        self.depth, self.d = st
        self.lanes = 1 << (self.d - 1).bit_length()  # leaf lanes, a power of two
        node, offs, v2 = tree(n, k), [], []
        while isinstance(node, Split):
            offs.append(node.offs)
            v2.append(node.v2)
            node = node.first
        leaf: Leaf = node
        K = leaf.K
        self.K = K
        z = torch.zeros(1, dtype=torch.int64)
        self.offs = (torch.cat(offs) if offs else z).to(device)
        self.v2 = (torch.cat(v2) if v2 else z).to(device)
        lut = torch.zeros(leaf.lut.shape[0], self.lanes, dtype=torch.int8)
        lut[:, : self.d] = leaf.lut.to(torch.int8)
        self.lut = lut.reshape(-1).to(device)
        self.base = leaf.base.to(device)
        self.log_k = max(1, (K + 1).bit_length())  # binary-search steps over k1 in [0, k]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.offs, self.v2, self.lut, self.base))


@lru_cache(maxsize=64)
def _tables(n: int, k: int, device: str) -> Tables:
    return Tables(n, k, torch.device(device))


def tables(spec: PVQSpec, device) -> Tables:
    return _tables(spec.n, spec.k, str(torch.device(device)))


@lru_cache(maxsize=1)
def _kernels():
    """(decode kernel, fused product kernel, fused tiled product kernel), imported on first use."""
    from . import gpu_kernels

    return gpu_kernels.decode_kernel, gpu_kernels.gemv_kernel, gpu_kernels.gemm_kernel


def _args(packed: PackedPVQ, tab: Tables) -> dict:
    s = packed.spec
    return dict(B=s.code_bits, NB=(s.code_bits + 7 + 7) // 8, L=s.gain_levels, K=tab.K, DEPTH=tab.depth,
                LANES=tab.lanes, D=tab.d, LOGK=tab.log_k, N=s.n)


def _check(packed) -> None:
    if not supports(packed.spec):
        raise ValueError(f"{packed.spec.name}: no Triton decoder for this setting (supports: {__name__})")


class Operands:
    """What the kernels read of one packed matrix on its device: codes, float32 levels and scales, tables."""

    def __init__(self, packed: PackedPVQ):
        _check(packed)
        dev = packed.codes.device
        self.packed = packed
        self.rows, self.cols = packed.shape
        self.codes = packed.codes.contiguous()
        self.levels = packed.gain_levels.to(dev, torch.float32).contiguous()
        self.scales = packed.row_scale.to(dev, torch.float32).contiguous()
        self.tab = tables(packed.spec, dev)
        self.kw = _args(packed, self.tab)
        self.gpr = self.cols // packed.spec.n
        self.V = count(packed.spec.n, packed.spec.k)

    def _decode(self, r0: int, r1: int, shapes: bool, dtype=torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
        dk = _kernels()[0]
        G = (r1 - r0) * self.gpr
        dev = self.codes.device
        out = torch.empty(r1 - r0, self.cols, dtype=torch.int32 if shapes else dtype, device=dev)
        bad = torch.empty(max(G, 1), dtype=torch.int8, device=dev)
        t = self.tab
        grid = (max(1, math.ceil(G / BLOCK_GROUPS)),)
        dk[grid](self.codes, self.codes.numel(), t.offs, t.v2, t.lut, t.base, self.levels, self.scales, out, bad,
                 G, self.gpr, self.V, int(self.scales.numel() > 1), SHAPES=shapes, BLOCK=BLOCK_GROUPS,
                 G0=r0 * self.gpr, **self.kw)
        return out, bad[:G]

    def decode(self, r0: int = 0, r1: int | None = None, dtype=torch.float32) -> torch.Tensor:
        """Rows [r0, r1) of W' [r1 - r0, cols] on the codes' device, computed in float32 and stored in `dtype`
        (a prompt's tile goes straight to the dtype it is multiplied in)."""
        if dtype not in _DOT:
            raise ValueError(f"decode: dtype must be float32, float16 or bfloat16, got {dtype}")
        return self._decode(r0, self.rows if r1 is None else r1, False, dtype)[0]

    def shapes(self) -> torch.Tensor:
        """The integer points [rows, groups, n] (int32)."""
        return self._decode(0, self.rows, True)[0].reshape(self.rows, self.gpr, self.packed.spec.n)

    def bad_group(self) -> int:
        """The first group whose shape index is >= V(n, k), or -1."""
        bad = self._decode(0, self.rows, True)[1]
        hit = torch.nonzero(bad).reshape(-1)
        return int(hit[0]) if hit.numel() else -1

    def gemv(self, x: torch.Tensor) -> torch.Tensor:
        """x [t, cols] float32 (t <= MAX_TOKENS) -> x W'^T [t, rows] float32, decoding inside the product."""
        gk = _kernels()[1]
        t = x.shape[0]
        if not 1 <= t <= MAX_TOKENS or x.shape[1] != self.cols:
            raise ValueError(f"gemv takes 1..{MAX_TOKENS} rows of {self.cols} values, got {tuple(x.shape)}")
        xc = x.to(torch.float32).contiguous()
        out = torch.empty(t, self.rows, dtype=torch.float32, device=x.device)
        tb = self.tab
        grid = (math.ceil(self.rows / GEMV_ROWS),)
        gk[grid](self.codes, self.codes.numel(), tb.offs, tb.v2, tb.lut, tb.base, self.levels, self.scales, xc, out,
                 self.gpr, self.rows, self.V, int(self.scales.numel() > 1), t, BR=GEMV_ROWS, BG=GEMV_GROUPS,
                 TP=1 << (t - 1).bit_length(), **self.kw)
        return out

    def matmul(self, x: torch.Tensor, dtype=torch.bfloat16) -> torch.Tensor:
        """x [t, cols] -> x W'^T [t, rows] float32 for any t, rebuilding tiles of W' inside the product (the fused
        tiled kernel), its operands rounded to `dtype` (float32: exact products), the sums float32. (Triton's
        interpreter multiplies bfloat16 wrongly, 3.9: CI checks float32 and float16, a GPU bfloat16.)"""
        gk = _kernels()[2]
        if x.dim() != 2 or x.shape[1] != self.cols:
            raise ValueError(f"matmul takes rows of {self.cols} values, got {tuple(x.shape)}")
        if dtype not in _DOT:
            raise ValueError(f"matmul: dtype must be float32, float16 or bfloat16, got {dtype}")
        t = x.shape[0]
        xc = x.to(torch.float32).contiguous()
        out = torch.empty(t, self.rows, dtype=torch.float32, device=x.device)
        if t == 0:
            return out
        tb = self.tab
        width = (1 << tb.depth) * tb.lanes  # lanes of one group
        grid = (math.ceil(t / GEMM_TOKENS), math.ceil(self.rows / GEMM_ROWS))
        gk[grid](self.codes, self.codes.numel(), tb.offs, tb.v2, tb.lut, tb.base, self.levels, self.scales, xc, out,
                 self.gpr, self.rows, self.V, int(self.scales.numel() > 1), t, BM=GEMM_TOKENS, BR=GEMM_ROWS,
                 BG=max(1, GEMM_WIDTH // width), DOT=_DOT[dtype], **self.kw)
        return out
