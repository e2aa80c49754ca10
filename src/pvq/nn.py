"""QuantLinear: a linear layer held as packed codes (no full-precision weight), plus its rotations.

With seeded randomized Hadamards R_in, R_out (QuIP#-style incoherence processing on both sides)
the stored matrix is W' = R_out^T W R_in, and y = x W^T = ((x R_in) W'^T) R_out^T, so the network
output is unchanged before quantization. Only the two seeds are stored. The codes are decoded
once, on first use, and the decoded matrix is kept (decode="once").
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codec import PackedPVQ, PackedUniform
from .transforms.hadamard import RandomHadamard

NO_SEED = -1  # marks a side that is not rotated


def rotations(rows: int, cols: int, seeds: tuple[int, int]) -> tuple[RandomHadamard | None, RandomHadamard | None]:
    """(R_in over the input dim, R_out over the output dim) for seeds (seed_in, seed_out)."""
    s_in, s_out = seeds
    return (RandomHadamard(cols, s_in) if s_in != NO_SEED else None,
            RandomHadamard(rows, s_out) if s_out != NO_SEED else None)


def rotate_weight(w: torch.Tensor, seeds: tuple[int, int]) -> torch.Tensor:
    """W' = R_out^T W R_in (float64 math, float32 result)."""
    r_in, r_out = rotations(*w.shape, seeds)
    w = w.double()
    if r_in is not None:
        w = r_in.apply(w)
    if r_out is not None:
        w = r_out.apply(w.T).T
    return w.float()


def rotate_hessian(h: torch.Tensor, seed_in: int) -> torch.Tensor:
    """Hessian of the rotated inputs x R_in: R_in^T H R_in (H symmetric, float64)."""
    if seed_in == NO_SEED:
        return h
    r = RandomHadamard(h.shape[0], seed_in)
    return r.apply(r.apply(h.double()).T)


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as packed PVQ or uniform codes in a rotated basis."""

    def __init__(self, packed: PackedPVQ | PackedUniform, seeds: tuple[int, int], bias: torch.Tensor | None = None):
        super().__init__()
        self.packed = packed
        self.out_features, self.in_features = packed.shape
        self.seeds = (int(seeds[0]), int(seeds[1]))
        self.r_in, self.r_out = rotations(self.out_features, self.in_features, self.seeds)
        self.bias = nn.Parameter(bias.detach().float().clone(), requires_grad=False) if bias is not None else None
        self._w: torch.Tensor | None = None

    @property
    def spec(self):
        return self.packed.spec

    @property
    def nbits(self) -> int:
        """Every stored bit of this layer: packed codes, scales, stored codebook, two 64-bit seeds."""
        return self.packed.nbits + 64 * 2

    def rotated_weight(self) -> torch.Tensor:
        """The decoded matrix W' in the rotated basis (float32 [out, in]); decoded once, then kept."""
        if self._w is None:
            self._w = self.packed.dequantize(torch.float32)
        return self._w

    def weight_in_original_basis(self) -> torch.Tensor:
        """R_out W' R_in^T: the matrix this layer applies, for inspection and tests."""
        w = self.rotated_weight().double()
        if self.r_out is not None:
            w = self.r_out.apply_inverse(w.T).T
        if self.r_in is not None:
            w = self.r_in.apply_inverse(w)
        return w.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        if self.r_in is not None:
            h = self.r_in.apply(h)
        h = F.linear(h, self.rotated_weight())
        if self.r_out is not None:
            h = self.r_out.apply_inverse(h)
        if self.bias is not None:
            h = h + self.bias
        return h.to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.spec.name}, "
                f"{self.nbits / (self.in_features * self.out_features):.4f} bits/weight, seeds={self.seeds}")
