"""Gain-shape PVQ of a weight matrix: every run of n consecutive weights in a row is one group.

A group w (n weights) is stored as a pyramid codeword y in P(n, k) (its shape u = y / ||y||) and a
gain g, the MSE-optimal one for that shape, g = <w, u> (docs/pvq.md). Gains are divided by a
per-row fp16 scale (the RMS of the row's gains) and quantized with an L-level scalar codebook
(`gain.py`). The shape index and the gain index are fused into one mixed-radix code,
code = index * L + level, of B = ceil(log2(V(n, k) * L)) bits, and the codes are bit-packed.
Choosing L = floor(2^B / V) (`PVQSpec.for_code_bits`) leaves less than log2(1 + 1/L) bits of a
code unused, so the stored size is within a hair of log2 V(n, k) + log2 L.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import bitpack, enumeration, pyramid
from .fp16 import check_fits, positive_scale
from .search import search
from .gain import GAIN_KINDS, GainCodebook, fit_gain_codebook


@dataclass(frozen=True)
class PVQSpec:
    """PVQ codec settings: group dimension n, pulses k, gain levels L, gain quantizer kind."""

    n: int
    k: int
    gain_levels: int = 16
    gain: str = "beta"
    scale: str = "row"  # gains are divided by one fp16 scale per "row" or per "tensor"

    def __post_init__(self):
        pyramid._check_nk(self.n, self.k)
        if not isinstance(self.gain_levels, int) or self.gain_levels < 1:
            raise ValueError(f"gain_levels must be a positive integer, got {self.gain_levels!r}")
        if self.gain not in GAIN_KINDS:
            raise ValueError(f"unknown gain quantizer {self.gain!r}; choose one of {GAIN_KINDS}")
        if self.scale not in SCALE_KINDS:
            raise ValueError(f"unknown gain scale {self.scale!r}; choose one of {SCALE_KINDS}")
        if self.radix > pyramid.INDEX_LIMIT:
            raise ValueError(
                f"PVQ(n={self.n}, k={self.k}, L={self.gain_levels}): a code needs "
                f"{math.log2(self.radix):.2f} bits, more than the 63-bit limit of the codec"
            )

    @classmethod
    def for_code_bits(cls, n: int, k: int, code_bits: int, gain: str = "beta", scale: str = "row") -> "PVQSpec":
        """The spec with as many gain levels as fit next to V(n, k) in a `code_bits`-bit code."""
        levels = min(1 << code_bits, pyramid.INDEX_LIMIT) // pyramid.count(n, k)  # the radix fits an int64
        if levels < 1:
            raise ValueError(f"PVQ(n={n}, k={k}) needs {pyramid.index_bits(n, k):.2f} bits, more than {code_bits}")
        return cls(n, k, levels, gain, scale)

    @property
    def name(self) -> str:
        return f"pvq-n{self.n}k{self.k}L{self.gain_levels}-{self.gain}-{self.scale}"

    @property
    def radix(self) -> int:
        return pyramid.count(self.n, self.k) * self.gain_levels

    @property
    def code_bits(self) -> int:
        """Bits of one group's fused code."""
        return bitpack.mixed_radix_width(self.radix)

    @property
    def waste_bits_per_weight(self) -> float:
        """Bits per weight lost to rounding log2(V * L) up to whole bits."""
        return bitpack.waste_bits(self.radix) / self.n

    def check_shape(self, rows: int, cols: int) -> None:
        if cols % self.n:
            raise ValueError(f"{self.name}: {cols} columns are not a multiple of the group dimension n={self.n}")

    def bit_breakdown(self, rows: int, cols: int) -> dict[str, int]:
        """Every stored bit of a [rows, cols] matrix: packed codes, fp16 row scales, gain codebook."""
        self.check_shape(rows, cols)
        groups = rows * cols // self.n
        return {
            "codes": 8 * bitpack.packed_nbytes(groups, self.code_bits),
            "scales": 16 * (rows if self.scale == "row" else 1),
            "codebook": {"beta": 0, "empirical": 16 * self.gain_levels, "uniform": 32}[self.gain],
        }


@dataclass
class PackedPVQ:
    """A PVQ-coded matrix: everything needed to rebuild it, nothing more."""

    spec: PVQSpec
    shape: tuple[int, int]
    codes: torch.Tensor  # uint8 [ceil(groups * code_bits / 8)], fused (index * L + level) codes
    row_scale: torch.Tensor  # fp16 [rows] (scale="row") or [1] (scale="tensor")
    gain_levels: torch.Tensor  # float64 [L]; stored only for data-fitted gain kinds

    @property
    def nbits(self) -> int:
        book = GainCodebook(self.spec.gain, self.gain_levels).stored_bits
        return 8 * self.codes.numel() + 16 * self.row_scale.numel() + book

    def unpack(self, rows: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(shape indices [rows, groups], gain levels [rows, groups]) from the packed stream; `rows`: only the
        rows [start, end)."""
        s, e = (0, self.shape[0]) if rows is None else rows
        g = self.shape[1] // self.spec.n
        code = bitpack.unpack_range(self.codes, self.shape[0] * g, s * g, (e - s) * g, self.spec.code_bits)
        code = code.reshape(e - s, g)
        return code // self.spec.gain_levels, code % self.spec.gain_levels

    def dequantize(self, dtype: torch.dtype = torch.float32, rows: tuple[int, int] | None = None) -> torch.Tensor:
        """The matrix, or its rows [start, end) only."""
        first, last = (0, self.shape[0]) if rows is None else rows
        cols = self.shape[1]
        out = torch.empty(last - first, cols, dtype=dtype)
        for s, e in row_chunks(last - first, cols):  # the int64 shapes of a few rows at a time
            idx, lvl = self.unpack((first + s, first + e))
            y = enumeration.decode(idx, self.spec.n, self.spec.k)  # [rows, groups, n]
            scale = self.row_scale if self.row_scale.numel() == 1 else self.row_scale[first + s:first + e]
            out[s:e] = reconstruct(y, lvl, scale, self.gain_levels).reshape(e - s, cols)
        return out


# weights handled at once by the data-free codec: its int64 shapes and float temporaries take about 40
# bytes a weight, so a whole 14336 x 4096 matrix at once would add gigabytes to a run's peak memory. Small
# (1 MB of float64): temporaries of 16 MB sit in glibc's heap between longer-lived arrays and fragment it,
# so the peak of a 36-block streamed run was 20 % above a 4-block run's; at this size the two are equal
# (docs/results.md, "Models bigger than memory") for about 7 % more time
CHUNK_WEIGHTS = 1 << 17


def chunk_rows(cols: int) -> int:
    """Rows of `cols` weights in a chunk of about CHUNK_WEIGHTS (at least one)."""
    return max(1, CHUNK_WEIGHTS // max(cols, 1))


def row_chunks(rows: int, cols: int):
    """(start, end) row ranges of about CHUNK_WEIGHTS weights each."""
    step = chunk_rows(cols)
    return [(s, min(s + step, rows)) for s in range(0, rows, step)]


def reconstruct(y: torch.Tensor, lvl: torch.Tensor, row_scale: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
    """Weights [rows, groups, n] = row_scale * level value * y / ||y||."""
    gain = row_scale.float().reshape(-1, 1) * levels.float()[lvl]  # [rows, groups]
    return pyramid.shapes(y) * gain[..., None]


SCALE_KINDS = ("row", "tensor")


def gain_scale(gains: torch.Tensor, kind: str) -> torch.Tensor:
    """fp16-representable RMS of the group gains (gains [rows, groups]) per row ([rows]) or per tensor ([1])."""
    g2 = gains.float().pow(2)
    s = g2.mean(dim=1).sqrt() if kind == "row" else g2.mean().sqrt().reshape(1)
    check_fits(s, "the gain scale")
    return positive_scale(s)


def law_length(spec: "PVQSpec", rows: int, cols: int) -> int:
    """Length m of the vector that one scale normalises: the Beta law of gains is Beta(n/2, (m-n)/2)."""
    return cols if spec.scale == "row" else rows * cols


@dataclass
class GainShapeFit:
    """What gain-shape PVQ fixes from a weight matrix before any gain is rounded: the nearest shapes,
    their optimal gains over the fp16 scale, the scale and the gain codebook. The data-free codec
    rounds these gains; the Hessian-aware solver keeps the scale and codebook and searches again."""

    y: torch.Tensor  # int64 [rows, groups, n] nearest points of P(n, k)
    ratios: torch.Tensor  # float32 [rows, groups] optimal gain / scale
    scale: torch.Tensor  # float32 [rows] or [1], fp16-representable
    book: GainCodebook


def is_matrix(w) -> bool:
    """What the codec and the solvers quantize: a 2-D floating-point tensor, or a matrix read a block of rows at a
    time (`shape` [rows, cols], `device`, and w[s:e] the float32 rows s..e: a weight rotated as it is read)."""
    if isinstance(w, torch.Tensor):
        return w.dim() == 2 and w.is_floating_point()
    return len(getattr(w, "shape", ())) == 2 and hasattr(w, "device") and callable(getattr(w, "__getitem__", None))


def _check_matrix(w, spec: PVQSpec) -> None:
    if not is_matrix(w):
        raise ValueError(f"quantize expects a 2-D floating-point weight matrix, got {getattr(w, 'shape', type(w))}")
    spec.check_shape(*w.shape)


def _shapes(w: torch.Tensor, spec: PVQSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """(nearest shapes y [rows, groups, n], their optimal gains g = <w, u> [rows, groups]) of rows of w."""
    rows, cols = w.shape
    x = w.float().reshape(rows, cols // spec.n, spec.n)
    y = search(x, spec.k)
    return y, (x * pyramid.shapes(y)).sum(-1)  # gains >= 0 since signs agree


def _gains(g: torch.Tensor, spec: PVQSpec, rows: int, cols: int):
    """(fp16-representable scale, gains over it, gain codebook) of a matrix's group gains [rows, groups]."""
    s = gain_scale(g, spec.scale)
    r = g / s.reshape(-1, 1)
    return s, r, fit_gain_codebook(spec.gain, r, spec.n, law_length(spec, rows, cols), spec.gain_levels)


def fit(w: torch.Tensor, spec: PVQSpec) -> GainShapeFit:
    """Shapes, gain scale and gain codebook of a 2-D weight matrix (shape search, then g = <w, u>)."""
    _check_matrix(w, spec)
    y, g = _shapes(w, spec)
    s, r, book = _gains(g, spec, *w.shape)
    return GainShapeFit(y, r, s, book)


def _searched(w: torch.Tensor, spec: PVQSpec, encode: bool) -> tuple[torch.Tensor | None, torch.Tensor]:
    """(shape indices [rows, groups], or None without `encode`; optimal gains [rows, groups]) of a 2-D weight
    matrix, its shapes searched a few rows at a time: their int64 points never exist for the whole matrix."""
    _check_matrix(w, spec)
    rows, cols = w.shape
    idx = [torch.zeros(0, cols // spec.n, dtype=torch.int64)]  # what a matrix of no rows gives
    gains = [torch.zeros(0, cols // spec.n, dtype=torch.float32, device=w.device)]
    for s, e in row_chunks(rows, cols):
        y, g = _shapes(w[s:e], spec)
        if encode:
            idx.append(enumeration.encode(y, spec.k))
        gains.append(g)
        del y
    return (torch.cat(idx) if encode else None), torch.cat(gains)


def gain_fit(w: torch.Tensor, spec: PVQSpec) -> tuple[torch.Tensor, GainCodebook]:
    """(fp16-representable gain scale, gain codebook) that `fit` gives, without keeping the shapes."""
    _, g = _searched(w, spec, encode=False)
    s, _, book = _gains(g, spec, *w.shape)
    return s, book


def _round(w: torch.Tensor, spec: PVQSpec):
    """(y [rows, groups, n], gain levels [rows, groups], fp16 scale, codebook) of a 2-D weight matrix."""
    f = fit(w, spec)
    return f.y, f.book.quantize(f.ratios), f.scale.half(), f.book.levels


def quantize(w: torch.Tensor, spec: PVQSpec) -> PackedPVQ:
    """Data-free PVQ of a 2-D weight matrix (round to the nearest shape, then the nearest gain)."""
    idx, gains = _searched(w, spec, encode=True)
    rows, cols = w.shape
    scale, ratios, book = _gains(gains, spec, rows, cols)
    code = idx.mul_(spec.gain_levels).add_(book.quantize(ratios))  # in place: the codes are the largest array
    return PackedPVQ(spec, tuple(w.shape), bitpack.pack(code.reshape(-1), spec.code_bits), scale.half(), book.levels)


def fake_quantize(w: torch.Tensor, spec: PVQSpec) -> torch.Tensor:
    """quantize(w, spec).dequantize() without enumerating and packing the indices (same floats)."""
    y, lvl, scale, levels = _round(w, spec)
    return reconstruct(y, lvl, scale, levels).reshape(w.shape)
