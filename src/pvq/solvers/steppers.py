"""Quantizers that a solver drives a few columns at a time ("steppers").

GPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", arXiv 2210.17323) quantizes a weight matrix column by column and pushes each
column's error onto the columns not yet quantized. Vector quantizers such as PVQ (Fischer, "A
Pyramid Vector Quantizer", IEEE Trans. Inf. Theory 32(4), 1986; van der Ouderaa et al., "Pyramid
Vector Quantization for LLMs", arXiv 2410.16926) code `dim` consecutive weights of a row jointly,
so the solver steps `dim` columns at a time (vector GPTQ / LDLQ, Chee et al., "QuIP", 2023).

A stepper owns everything codec-specific: the parameters fixed before the solve (row scales, gain
codebook), the choice of codes for each group of columns, and the packed result. It reuses the
codec's own functions (gainshape.gain_fit, search, fit_grid, quantize_grid, reconstruct, encode, bitpack) so
that with H = I the solver reproduces `pvq.codec.quantize` bit for bit, and so that the values a
stepper returns are exactly what the packed result dequantizes to.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import torch

from ..codec import bitpack, enumeration, pyramid
from ..codec.gain import GainCodebook
from ..codec.gainshape import PackedPVQ, PVQSpec, gain_fit, reconstruct, row_chunks
from ..codec.search import search
from ..codec.uniform import PackedUniform, UniformSpec, fit_grid, padded_groups, quantize_grid

Packed = PackedPVQ | PackedUniform


@runtime_checkable
class Stepper(Protocol):
    """The quantizer interface every solver uses.

    dim:    columns quantized jointly (a solver steps through the matrix `dim` columns at a time).
    begin:  sees the initial (unquantized, dead columns zeroed) matrix w [rows, cols], a tensor of any
            floating dtype or a matrix read a block of rows at a time (codec.gainshape.is_matrix: w[s:e] are
            float rows); fixes what must be known up front (row scales, gain codebooks, static group grids);
            resets state.
    step:   block = w_cur[:, col:col+dim] (the current, error-compensated weights of the matrix's rows
            `rows`, a slice; None: all of them); returns its quantized values [len(rows), dim] (float32)
            and records their codes. `metric` is the [dim, dim] Hessian metric A of the group's error
            (an error row e costs e A e^T after optimal compensation of the later columns) or None.
            Rows are independent: a solver may step the matrix a block of rows at a time.
    finish: the packed matrix, exactly what step() chose.

    Optional attribute `group_size`: columns whose parameters are fitted together when the first
    of them is stepped; a solver aligns its lazy-update blocks to it so that those columns are
    fully updated at that moment.
    """

    dim: int

    def begin(self, w: torch.Tensor) -> None: ...

    def step(self, w_cur: torch.Tensor, col: int, block: torch.Tensor, metric: torch.Tensor | None,
             rows: slice | None = None) -> torch.Tensor: ...

    def finish(self) -> Packed: ...


def _check_begun(stepper, what: str) -> None:
    if getattr(stepper, "_shape", None) is None:
        raise RuntimeError(f"{type(stepper).__name__}.{what}() called before begin()")


# ------------------------------------------------------------------------------------ uniform
class UniformStepper:
    """GPTQ's scalar quantizer: the asymmetric b-bit grid of `pvq.codec.uniform`, one column a step.

    Groups are GPTQ's non-static ones by default: a group's (scale, offset) is fitted when its first
    column is reached, on the current (already error-compensated) weights of the group. With
    `begin(w, static_groups=True)` (what act_order uses) every group's grid is fitted up front on
    the initial w, so columns may be stepped in any order; then `col` in step() is the column's
    place in the stored order.
    """

    dim = 1
    supports_act_order = True

    def __init__(self, spec: UniformSpec):
        if not isinstance(spec, UniformSpec):
            raise ValueError(f"UniformStepper needs a UniformSpec, got {spec!r}")
        self.spec = spec
        self.group_size = spec.group_size
        self._shape: tuple[int, int] | None = None

    def begin(self, w: torch.Tensor, *, static_groups: bool = False) -> None:
        rows, cols = w.shape
        self.spec.check_shape(rows, cols)
        ng = self.spec.groups_per_row(cols)
        self._shape = (rows, cols)
        self._static = bool(static_groups)
        # grid levels, in the narrowest dtype holding them: the largest array a solve keeps
        self._q = torch.zeros(rows, cols, dtype=bitpack.code_dtype(self.spec.bits), device=w.device)
        # the fit_grid values (used to round) for every group; their fp16 copies are what is stored
        self._scale = torch.ones(rows, ng, dtype=torch.float32, device=w.device)
        self._offset = torch.zeros(rows, ng, dtype=torch.float32, device=w.device)
        self._fitted = torch.zeros(ng, dtype=torch.bool)
        self._stepped = torch.zeros(cols, dtype=torch.bool)
        if self._static:
            # the groups padded as uniform.quantize pads them, a few rows at a time: no float copy of the whole matrix
            for s, e in row_chunks(rows, cols):
                scale, offset = fit_grid(padded_groups(w[s:e], self.spec), self.spec.bits)
                self._scale[s:e] = scale[..., 0]
                self._offset[s:e] = offset[..., 0]
            self._fitted[:] = True

    def step(self, w_cur: torch.Tensor, col: int, block: torch.Tensor, metric: torch.Tensor | None = None,
             rows: slice | None = None) -> torch.Tensor:
        _check_begun(self, "step")
        rows = slice(None) if rows is None else rows
        g = self.spec.group_size
        grp = col // g
        if not self._static and col % g == 0:
            # GPTQ's non-static groups: the grid sees the group after all earlier errors were pushed
            # onto it (a short last group is just narrower; its min..max is the same as padded)
            scale, offset = fit_grid(w_cur[:, col : col + g].float(), self.spec.bits)
            self._scale[rows, grp] = scale[:, 0]
            self._offset[rows, grp] = offset[:, 0]
            self._fitted[grp] = True
        if not bool(self._fitted[grp]):
            raise RuntimeError(f"UniformStepper: column {col} stepped before its group's first column")
        scale = self._scale[rows, grp : grp + 1]  # [rows, 1]
        offset = self._offset[rows, grp : grp + 1]
        q = quantize_grid(block.float(), scale, offset, self.spec.bits)  # [rows, 1]
        self._q[rows, col : col + 1] = q
        self._stepped[col] = True
        # the value rebuilt from the stored fp16 parameters, exactly as PackedUniform.dequantize does
        return offset.half().float() + scale.half().float() * q.float()

    def finish(self) -> PackedUniform:
        _check_begun(self, "finish")
        if not bool(self._stepped.all()):
            raise RuntimeError("UniformStepper.finish(): not every column was stepped")
        return PackedUniform(
            self.spec,
            self._shape,
            bitpack.pack(self._q.reshape(-1).cpu(), self.spec.bits),
            self._scale.half().cpu(),
            self._offset.half().cpu(),
        )


# ---------------------------------------------------------------------------------------- PVQ
def _metric_gain(x: torch.Tensor, y: torch.Tensor, u: torch.Tensor, metric: torch.Tensor) -> torch.Tensor:
    """Per-row gain g minimising (x - g u) A (x - g u)^T: g = (u A x) / (u A u), clamped at 0.

    A is normalised by its largest diagonal entry (g does not depend on A's scale), which makes the
    metric of an identity Hessian exactly I. Then u A x is the float32 <x, u> of the codec, and
    u A u = (y A y) / (y y) is formed from the integer codeword y in float64, exactly 1 for A = I,
    so this path reproduces the codec's gains bit for bit when H = I.
    """
    a = metric.to(device=x.device, dtype=torch.float64)
    a = a / a.diagonal().max()
    num = (x * (u @ a.float())).sum(-1)  # [rows] u A x
    yd = y.to(torch.float64)
    yy = (yd * yd).sum(-1)
    den = torch.where(yy > 0, ((yd @ a) * yd).sum(-1) / yy.clamp_min(1), torch.ones_like(yy))  # u A u
    # a shape can anti-correlate with x in the A metric; a negative gain is not codable, 0 is closest
    return (num.double() / den).float().clamp_min(0)


class PVQStepper:
    """Gain-shape PVQ of `pvq.codec.gainshape`, one group of n columns a step.

    begin(w) fixes what the codec fixes from the data: it searches the shapes of the initial w,
    takes their optimal gains, and from them the fp16 gain scale (per row or per tensor) and the
    gain codebook (Beta law, or fitted to those gains), exactly as gainshape.quantize does. Each
    step searches the shape of the current (error-compensated) group, picks its gain (optimal in
    the Hessian metric when `hessian_gain` and a metric is given, else <w, u>), rounds the gain to
    the nearest codebook level and records (shape index, level).
    """

    supports_act_order = False

    def __init__(self, spec: PVQSpec, hessian_gain: bool = True):
        if not isinstance(spec, PVQSpec):
            raise ValueError(f"PVQStepper needs a PVQSpec, got {spec!r}")
        self.spec = spec
        self.dim = spec.n
        self.hessian_gain = bool(hessian_gain)
        self._shape: tuple[int, int] | None = None

    def begin(self, w: torch.Tensor) -> None:
        rows, cols = w.shape
        groups = cols // self.spec.n
        scale, book = gain_fit(w, self.spec)  # the codec's own fit of the initial weights
        self._shape = (rows, cols)
        self._scale = scale.to(w.device)  # divides the gains, as in the codec
        self._scale_h = self._scale.half()  # what is stored, and what dequantization multiplies by
        self._book = GainCodebook(book.kind, book.levels.to(w.device))  # on w's device, as the gains it rounds
        # fused codes (shape index * L + gain level; CPU: the enumeration is), the largest array a solve keeps
        self._code = torch.zeros(rows, groups, dtype=torch.int64)
        self._stepped = torch.zeros(groups, dtype=torch.bool)

    def step(self, w_cur: torch.Tensor, col: int, block: torch.Tensor, metric: torch.Tensor | None = None,
             rows: slice | None = None) -> torch.Tensor:
        _check_begun(self, "step")
        rows = slice(None) if rows is None else rows
        spec = self.spec
        if col % spec.n:
            raise ValueError(f"PVQStepper: col={col} is not a multiple of n={spec.n}")
        grp = col // spec.n
        x = block.float().contiguous()  # [rows, n]
        y = search(x, spec.k)  # [rows, n] int64
        u = pyramid.shapes(y)
        if metric is not None and self.hessian_gain:
            g = _metric_gain(x, y, u, metric)
        else:
            g = (x * u).sum(-1)
        one = self._scale.numel() == 1  # a scale per tensor, or one per row
        scale, scale_h = (self._scale, self._scale_h) if one else (self._scale[rows], self._scale_h[rows])
        lvl = self._book.quantize(g / scale)  # [rows]; nearest level = best in the A metric too
        self._code[rows, grp] = enumeration.encode(y.cpu(), spec.k) * spec.gain_levels + lvl.cpu()
        self._stepped[grp] = True
        # rebuilt from the stored fp16 scale and codebook, exactly as PackedPVQ.dequantize does
        return reconstruct(y[:, None, :], lvl[:, None], scale_h, self._book.levels)[:, 0, :]

    def finish(self) -> PackedPVQ:
        _check_begun(self, "finish")
        if not bool(self._stepped.all()):
            raise RuntimeError("PVQStepper.finish(): not every group of columns was stepped")
        spec = self.spec
        return PackedPVQ(
            spec, self._shape, bitpack.pack(self._code.reshape(-1), spec.code_bits), self._scale_h.cpu(),
            self._book.levels.cpu()
        )
