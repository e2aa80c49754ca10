"""Uniform round-to-nearest baseline: asymmetric b-bit grid per group of g consecutive weights in a row.

Each group stores an fp16 scale and an fp16 offset (its minimum), so it costs b + 32/g bits per
weight (3-bit g128 = 3.25). A row whose length is not a multiple of g ends in one shorter group
(576 = 4 x 128 + 64, as GPTQ does), which costs its own scale and offset: 3.278 bits there. This is the RTN baseline of GPTQ/AWQ papers and the grid GPTQ
solves over.

Two ways to fit a group's grid, stored alike: "minmax" spans the group's range (RTN); "hqq" keeps that
step and moves the offset to minimize the group's l_p error, p = 0.7, by half-quadratic splitting
(HQQ, Badri & Shaji 2023: a few alternations of rounding, an l_p shrinkage of the error and a closed-form
offset; their defaults: p 0.7, beta 10 growing by 1.01 a step, 20 steps). A small p lets the grid give up
on a few outliers to fit the bulk of the group. Their solver stops every group at once when the matrix's
mean |error| stops falling; here each group keeps the offset of its own least l_p error along the 20 steps
(on SmolLM2's 3-bit g128 weights both lower the squared error by about 4 % from min-max, the absolute by 2 %).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import bitpack
from .fp16 import check_fits, positive_scale
from .gainshape import is_matrix, row_chunks


@dataclass(frozen=True)
class UniformSpec:
    """b-bit asymmetric uniform grid, per group of `group_size` weights along each row."""

    bits: int
    group_size: int = 128

    def __post_init__(self):
        if not isinstance(self.bits, int) or not 1 <= self.bits <= 16:
            raise ValueError(f"uniform bits must be an integer in [1, 16], got {self.bits!r}")
        if not isinstance(self.group_size, int) or self.group_size < 1:
            raise ValueError(f"uniform group_size must be a positive integer, got {self.group_size!r}")

    @property
    def name(self) -> str:
        return f"rtn{self.bits}g{self.group_size}"

    def check_shape(self, rows: int, cols: int) -> None:
        if rows < 1 or cols < 1:
            raise ValueError(f"{self.name}: matrix shape must be positive, got [{rows}, {cols}]")

    def groups_per_row(self, cols: int) -> int:
        return -(-cols // self.group_size)

    @property
    def waste_bits_per_weight(self) -> float:
        return 0.0

    def bit_breakdown(self, rows: int, cols: int) -> dict[str, int]:
        """Every stored bit: packed codes (byte-padded) plus an fp16 scale and offset per group."""
        self.check_shape(rows, cols)
        groups = rows * self.groups_per_row(cols)
        return {"codes": 8 * bitpack.packed_nbytes(rows * cols, self.bits), "scales": 32 * groups, "codebook": 0}


def fit_grid(w: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor]:
    """fp16-representable (scale, offset) of shape [..., 1] for groups w[..., g] (min..max range)."""
    lo = w.amin(dim=-1, keepdim=True)
    hi = w.amax(dim=-1, keepdim=True)
    scale = (hi - lo) / (2**bits - 1)
    check_fits(scale, "a group's step")
    check_fits(lo, "a group's offset")
    # round the parameters to what is stored, so quantization uses exactly the stored values
    return positive_scale(scale), lo.half().float()


def quantize_grid(w: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, bits: int) -> torch.Tensor:
    """Integer levels in [0, 2^bits) of w on the grid offset + scale * q."""
    return torch.clamp(torch.round((w - offset) / scale), 0, 2**bits - 1).to(torch.int64)


FITS = ("minmax", "hqq")
HQQ_P, HQQ_BETA, HQQ_KAPPA, HQQ_STEPS = 0.7, 10.0, 1.01, 20


def _shrink_lp(x: torch.Tensor, beta: float, p: float) -> torch.Tensor:
    """The proximal step of |x|^p / beta: soft thresholding whose threshold grows as |x| shrinks (p < 1)."""
    a = x.abs()
    return torch.sign(x) * torch.relu(a - a.pow(p - 1) / beta)


def fit_hqq(w: torch.Tensor, bits: int, valid: torch.Tensor | None = None,
            steps: int = HQQ_STEPS) -> tuple[torch.Tensor, torch.Tensor]:
    """fit_grid's step, and for each group w[..., g] the offset of least l_p error found along the
    half-quadratic iteration (fp16-representable). `valid` (bool, like w): the entries that count (a
    short group's padding does not)."""
    scale, offset = fit_grid(w, bits)
    valid = torch.ones_like(w, dtype=torch.bool) if valid is None else valid
    n = valid.sum(-1, keepdim=True).clamp_min(1)
    top = 2**bits - 1

    def error(off):  # the group's l_p error with the offset stored as fp16, as the file will hold it
        off = off.half().float()
        q = torch.clamp(torch.round((w - off) / scale), 0, top)
        return ((w - off - scale * q).abs().pow(HQQ_P) * valid).sum(-1, keepdim=True), q

    best, (best_err, q) = offset, error(offset)
    beta = HQQ_BETA
    for _ in range(steps):
        e = _shrink_lp(w - offset - scale * q, beta, HQQ_P)
        offset = ((w - e - scale * q) * valid).sum(-1, keepdim=True) / n
        err, q = error(offset)
        better = err < best_err
        best, best_err = torch.where(better, offset, best), torch.where(better, err, best_err)
        beta *= HQQ_KAPPA
    best = best.half().float()
    check_fits(best, "a group's offset")
    return scale, best


@dataclass
class PackedUniform:
    spec: UniformSpec
    shape: tuple[int, int]
    codes: torch.Tensor  # uint8 [ceil(rows*cols*bits/8)]
    scale: torch.Tensor  # fp16 [rows, ceil(cols/g)]
    offset: torch.Tensor  # fp16 [rows, ceil(cols/g)]

    @property
    def nbits(self) -> int:
        return 8 * self.codes.numel() + 16 * (self.scale.numel() + self.offset.numel())

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The matrix, or its rows [start, end) only."""
        s, e = (0, self.shape[0]) if rows is None else rows
        cols = self.shape[1]
        g = self.spec.group_size
        q = bitpack.unpack_range(self.codes, self.shape[0] * cols, s * cols, (e - s) * cols, self.spec.bits)
        q = q.reshape(e - s, cols).float()
        scale = self.scale[s:e].float().repeat_interleave(g, dim=1)[:, :cols]
        offset = self.offset[s:e].float().repeat_interleave(g, dim=1)[:, :cols]
        return (offset + scale * q).to(dtype)


def padded_groups(part: torch.Tensor, spec: UniformSpec) -> torch.Tensor:
    """Rows of a matrix as float32 groups [rows, groups, g]; a short last group is padded with copies of its
    last weight, which leaves its range unchanged."""
    rows, cols = part.shape
    ng, g = spec.groups_per_row(cols), spec.group_size
    part = part.float()
    return torch.cat([part, part[:, -1:].expand(rows, ng * g - cols)], dim=1).reshape(rows, ng, g)


def quantize(w: torch.Tensor, spec: UniformSpec, fit: str = "minmax") -> PackedUniform:
    """Round-to-nearest quantization of a 2-D weight matrix with the uniform grid of `spec`, each group's
    grid fitted by `fit` (FITS)."""
    if fit not in FITS:
        raise ValueError(f"unknown grid fit {fit!r}; choose one of {', '.join(FITS)}")
    if not is_matrix(w):
        raise ValueError(f"quantize expects a 2-D floating-point weight matrix, got {getattr(w, 'shape', type(w))}")
    rows, cols = w.shape
    spec.check_shape(rows, cols)
    g = spec.group_size
    ng = spec.groups_per_row(cols)
    q = torch.empty(rows, cols, dtype=bitpack.code_dtype(spec.bits), device=w.device)
    scale = torch.empty(rows, ng, dtype=torch.float16, device=w.device)
    offset = torch.empty(rows, ng, dtype=torch.float16, device=w.device)
    # a few rows at a time (each group's grid is its own): float copies of a whole large matrix would set the
    # peak; only the levels, in the narrowest dtype holding them, are kept whole
    for s, e in row_chunks(rows, cols):
        padded = padded_groups(w[s:e], spec)
        if fit == "hqq":
            valid = (torch.arange(ng * g, device=w.device) < cols).reshape(1, ng, g).expand(e - s, ng, g)
            sc, off = fit_hqq(padded, spec.bits, valid)
        else:
            sc, off = fit_grid(padded, spec.bits)
        q[s:e] = quantize_grid(padded, sc, off, spec.bits).reshape(e - s, ng * g)[:, :cols]
        scale[s:e], offset[s:e] = sc[..., 0].half(), off[..., 0].half()
    return PackedUniform(spec, (rows, cols), bitpack.pack(q.reshape(-1), spec.bits), scale, offset)
