"""Fake quantization of activations (the inputs of linear layers), one token (row) at a time.

Pure tensor math: x [..., cols] in, the quantized-then-dequantized x out, same shape and dtype.
Every stored bit is counted per activation by the *_bits functions (payload plus the per-token fp16
scale; a token is one row of `cols` activations).

- rtn: symmetric round-to-nearest with one fp16 scale per token, s = max|x| / (2^(b-1) - 1), integer
  codes in [-2^(b-1), 2^(b-1) - 1] (the int8/int4 form integer matmul kernels take; QuaRot's
  per-token activation quantizer). b + 16 / cols bits per activation.
- pvq: gain-shape PVQ of every run of n activations of a token, as for weights (gainshape.py): the
  shape is the greedy (Opus) nearest point of P(n, k), the gain <x, u> is divided by a per-token
  fp16 scale (the RMS of the token's gains) and rounded to the Beta-law Lloyd-Max codebook of
  L levels, which is exact for a rotated (spherically spread) token. (log2(V(n, k) * L) rounded up
  to whole bits) / n + 16 / cols bits per activation. Activations are quantized once per forward,
  so the search is Opus' greedy without the pulse moves the weight quantizer adds.
"""
from __future__ import annotations

import torch

from .fp16 import positive_scale
from .gain import beta_codebook, nearest
from .gainshape import PVQSpec
from .pyramid import shapes
from .search import search

SCALE_BITS = 16  # one fp16 scale per token


def rtn_bits(bits: int, cols: int) -> float:
    """Stored bits per activation of rtn: the code plus a share of the per-token fp16 scale."""
    return bits + SCALE_BITS / cols


def pvq_bits(spec: PVQSpec, cols: int) -> float:
    """Stored bits per activation of pvq: the fused shape+gain code per n, plus the per-token scale."""
    return spec.code_bits / spec.n + SCALE_BITS / cols


def rtn(x: torch.Tensor, bits: int) -> torch.Tensor:
    """Symmetric per-token round-to-nearest of x [..., cols] with `bits`-bit signed codes."""
    if not isinstance(bits, int) or not 2 <= bits <= 16:
        raise ValueError(f"activation bits must be an integer in 2..16, got {bits!r}")
    xf = x.float()
    top = 2 ** (bits - 1) - 1
    s = positive_scale(xf.abs().amax(dim=-1, keepdim=True) / top)
    q = torch.clamp(torch.round(xf / s), -top - 1, top)
    return (q * s).to(x.dtype)


def pvq_shapes(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(unit shapes u [groups, n], gains <x, u> [groups]) of groups x [groups, n] (greedy search)."""
    y = search(x, k, refine=0)
    u = shapes(y)
    return u, (x * u).sum(-1)


def pvq(x: torch.Tensor, spec: PVQSpec, shape_fn=None) -> torch.Tensor:
    """Gain-shape PVQ of every run of spec.n activations of each token of x [..., cols].

    shape_fn(groups [G, n] float32, k) -> (u, gains) computes the shapes (default: pvq_shapes in torch;
    runtime/native.py has the same search in C)."""
    cols = x.shape[-1]
    spec.check_shape(1, cols)
    xf = x.float().reshape(-1, cols)
    tokens = xf.shape[0]
    u, g = (shape_fn or pvq_shapes)(xf.reshape(-1, spec.n).contiguous(), spec.k)
    g = g.reshape(tokens, cols // spec.n)
    s = positive_scale(g.pow(2).mean(dim=1, keepdim=True).sqrt())  # [tokens, 1]
    levels = beta_codebook(spec.n, cols, spec.gain_levels)
    gq = levels.float()[nearest(g / s, levels)] * s  # [tokens, groups]
    out = u.reshape(tokens, -1, spec.n) * gq[..., None]
    return out.reshape(x.shape).to(x.dtype)
