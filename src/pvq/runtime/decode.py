"""On-the-fly decoding of one packed matrix: y = x W'^T without keeping W' resident.

A Decoder holds references to the packed buffers (codes, scales, gain levels; nothing is copied)
and, shared by every layer with the same (n, k), the serialised enumeration plan of the native
kernel (whose tables of points every plan shares). `matmul(x)` picks the fused decode-and-multiply
kernel for a few tokens (generation) and decode-a-block-of-rows-then-GEMM for many (prompt
processing): each block is decoded once per call and reused for every token. Without the native
kernel it falls back to the torch decoder.
"""
from __future__ import annotations

import ctypes

import torch

from ..codec import PackedPVQ, PackedUniform
from . import native

GEMV_TOKENS = 2  # at most this many rows of x: fused kernel
ROTATE_TOKENS = 8  # at most this many rows: rotations in the kernel (torch's small GEMMs cost ~10 us a call)
ROW_BLOCK = 512  # rows decoded at once otherwise (a 512 x 1536 float32 block is 3 MiB)


class Decoder:
    def __init__(self, packed: PackedPVQ | PackedUniform):
        self.packed = packed
        self.rows, self.cols = packed.shape
        # the kernel reads CPU memory only: codes on another device decode with torch there
        self.lib = native.kernel() if packed.codes.device.type == "cpu" else None
        self.is_pvq = isinstance(packed, PackedPVQ)
        self.plan = self.table = None
        if self.is_pvq and self.lib is not None:
            # a small pyramid is decoded from a full table of its points, a large one by the split enumeration
            self.table = native.full_table(packed.spec.n, packed.spec.k)
            if self.table is None:
                self.plan = native.plan(packed.spec.n, packed.spec.k)
                if self.plan is None:
                    self.lib = None  # beyond the kernel (k >= 128 or n > 64): torch path
        if self.is_pvq:
            self.levels = packed.gain_levels.float().contiguous()  # [L]
            self.scales = packed.row_scale.float().contiguous()  # [rows] or [1]
        else:
            self.scale = packed.scale.float().contiguous()  # [rows, groups]
            self.offset = packed.offset.float().contiguous()
        if self.lib is not None:
            # the kernel's leading arguments and entry points, chosen once (the tensors the pointers
            # point into live as long as self)
            p = packed
            if self.is_pvq:
                s = p.spec
                self._check_codes()
                tail = (self.levels.data_ptr(), self.scales.data_ptr(), int(self.scales.numel() > 1))
                if self.table is not None:
                    self._args = (p.codes.data_ptr(), p.codes.numel(), s.code_bits, s.gain_levels,
                                  self.table[0].data_ptr(), self.table[1].data_ptr(), s.n, *tail)
                    self._decode_fn, self._gemv_fn = self.lib.lut_decode, self.lib.lut_gemv
                else:
                    self._args = (self.plan.words.data_ptr(), 0, p.codes.data_ptr(), p.codes.numel(), s.code_bits,
                                  s.gain_levels, s.n, s.k, *tail)
                    self._decode_fn, self._gemv_fn = self.lib.pvq_decode, self.lib.pvq_gemv
            else:
                self._args = (p.codes.data_ptr(), p.codes.numel(), p.spec.bits, self.scale.data_ptr(),
                              self.offset.data_ptr(), p.spec.group_size)
                self._decode_fn, self._gemv_fn = self.lib.uni_decode, self.lib.uni_gemv

    def _check_codes(self) -> None:
        """Refuse codes whose shape index is >= V(n, k): the kernel would read outside its tables."""
        from ..codec.pyramid import count

        p, s = self.packed, self.packed.spec
        bad = self.lib.pvq_check_codes(p.codes.data_ptr(), p.codes.numel(), s.code_bits, s.gain_levels,
                                       count(s.n, s.k), self.rows * self.cols // s.n)
        if bad >= 0:
            raise ValueError(f"packed {s.name} codes of a {self.rows}x{self.cols} layer: group {bad} holds a shape "
                             f"index >= V({s.n}, {s.k}); the codes are corrupt")

    @property
    def native(self) -> bool:
        return self.lib is not None

    def resident_bytes(self) -> int:
        """Bytes this decoder keeps besides the packed buffers (float copies of scales/levels)."""
        t = [self.levels, self.scales] if self.is_pvq else [self.scale, self.offset]
        return sum(x.numel() * x.element_size() for x in t)

    def shared_tensors(self) -> list[torch.Tensor]:
        """The decode tables this decoder uses that other layers share (count each once per model)."""
        if self.table is not None:
            return list(self.table)
        if self.plan is not None:
            return [self.plan.words, *self.plan.tables]
        return []

    def decode_rows(self, r0: int, r1: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [r0, r1) of W' as float32 [r1 - r0, cols]."""
        if out is None:
            out = torch.empty(r1 - r0, self.cols, dtype=torch.float32)
        self._decode_fn(*self._args, self.cols, r0, r1, out.data_ptr())
        return out

    def dense(self) -> torch.Tensor:
        if not self.native:
            return self.packed.dequantize(torch.float32)
        return self.decode_rows(0, self.rows)

    def matmul(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x [..., cols] float32 -> x W'^T [..., rows] float32. Many tokens at a time multiply each decoded
        block in `dtype` (bfloat16: the weights rounded to it, as decode="once" keeps them in a bfloat16
        model, and a bfloat16 GEMM); a few always go through the float32 kernel."""
        lead = x.shape[:-1]
        h = x.reshape(-1, self.cols).contiguous()
        t = h.shape[0]
        if not self.native or h.device.type != "cpu":
            return (h @ self.packed.dequantize(torch.float32).to(h.device).T).reshape(*lead, self.rows)
        out = torch.empty(t, self.rows, dtype=torch.float32)
        if t <= GEMV_TOKENS:
            self._gemv_fn(*self._args, self.rows, self.cols, h.data_ptr(), self.cols, t, out.data_ptr(), self.rows)
        else:
            block = torch.empty(min(ROW_BLOCK, self.rows), self.cols, dtype=torch.float32)
            hd = h if dtype == torch.float32 else h.to(dtype)
            for r0 in range(0, self.rows, ROW_BLOCK):
                r1 = min(r0 + ROW_BLOCK, self.rows)
                w = self.decode_rows(r0, r1, block[: r1 - r0])
                out[:, r0:r1] = hd @ (w if dtype == torch.float32 else w.to(dtype)).T
        return out.reshape(*lead, self.rows)


class LinearArgs(ctypes.Structure):
    """kernel.c linear_t: one layer's packed codes, tables and rotations, for pvq_linear."""

    _fields_ = [(name, ctypes.c_int64) for name in ("kind", "rows", "cols")] + [
        ("plan", ctypes.c_void_p), ("codes", ctypes.c_void_p)] + [
        (name, ctypes.c_int64) for name in ("nbytes", "width", "L", "n", "k", "per_row")] + [
        (name, ctypes.c_void_p) for name in ("levels", "scales", "lut", "lut_rinv", "uscale", "uoffset")] + [
        (name, ctypes.c_int64) for name in ("group_size", "in_m", "in_p", "out_m", "out_p")] + [
        (name, ctypes.c_void_p) for name in ("in_signs", "in_small", "out_signs", "out_small", "bias")]


class FusedLinear:
    """One quantized linear as a single native call for a few tokens (kernel pvq_linear): input rotation,
    decode-and-multiply, output rotation and bias, its arguments packed once. Holds what the packed
    arguments point into."""

    def __init__(self, dec: "Decoder", args_in: tuple | None, args_out: tuple | None, bias: torch.Tensor | None):
        if not dec.native:
            raise ValueError("FusedLinear needs a native decoder")
        p = dec.packed
        a = LinearArgs(rows=dec.rows, cols=dec.cols)
        keep = [dec]
        if dec.is_pvq:
            s = p.spec
            a.codes, a.nbytes, a.width, a.L, a.n, a.k = p.codes.data_ptr(), p.codes.numel(), s.code_bits, s.gain_levels, s.n, s.k
            a.levels, a.scales, a.per_row = dec.levels.data_ptr(), dec.scales.data_ptr(), int(dec.scales.numel() > 1)
            if dec.table is not None:
                a.kind, a.lut, a.lut_rinv = 1, dec.table[0].data_ptr(), dec.table[1].data_ptr()
            else:
                a.kind, a.plan = 0, dec.plan.words.data_ptr()
        else:
            a.kind, a.codes, a.nbytes, a.width = 2, p.codes.data_ptr(), p.codes.numel(), p.spec.bits
            a.uscale, a.uoffset, a.group_size = dec.scale.data_ptr(), dec.offset.data_ptr(), p.spec.group_size
        if args_in is not None:
            a.in_m, a.in_p, a.in_signs, a.in_small = args_in[:4]
            keep.append(args_in)
        if args_out is not None:
            a.out_m, a.out_p, a.out_signs, a.out_small = args_out[:4]
            keep.append(args_out)
        if bias is not None:
            b = bias.detach().float().contiguous()
            a.bias = b.data_ptr()
            keep.append(b)
        self.rows, self.cols = dec.rows, dec.cols
        self.work = (GEMV_TOKENS + 1) * (dec.rows + dec.cols)  # floats of work space for GEMV_TOKENS tokens
        self._args = a
        self._keep = keep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., cols] (at most GEMV_TOKENS rows, CPU) -> the layer's output [..., rows] in x's dtype."""
        t, rows = x.numel() // self.cols, self.rows
        h = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        buf = torch.empty(t * rows + self.work, dtype=torch.float32)  # the output, then the kernel's work space
        native.kernel().pvq_linear(ctypes.addressof(self._args), h.data_ptr(), buf.data_ptr(), t,
                                   buf.data_ptr() + 4 * t * rows)
        return buf[: t * rows].view(*x.shape[:-1], rows).to(x.dtype)


def rotation_args(r) -> tuple:
    """The native kernel's arguments for rotation r: (m, p, signs pointer, small-factor pointer, the
    float32 tensors they point into). Build once per layer and pass to rotate()."""
    s, small, m, p = r.factors(torch.float32)
    small = small.contiguous()
    return (m, p, s.data_ptr(), small.data_ptr(), (s, small))


def rotate(r, x: torch.Tensor, inverse: bool = False, args: tuple | None = None) -> torch.Tensor | None:
    """x @ R (or x @ R^T) for a RandomHadamard r and float32 x [..., dim] with a few rows, natively.

    args: rotation_args(r), kept by the caller (else built here). None when the kernel is
    unavailable or x has too many rows (the caller then uses r.apply)."""
    lib = native.kernel()
    d = x.shape[-1]
    rows = x.numel() // d if d else 0
    if lib is None or rows > ROTATE_TOKENS or x.dtype != torch.float32 or x.device.type != "cpu":
        return None
    if args is None:
        args = rotation_args(r)
    xc = x.contiguous()
    out = torch.empty_like(xc)
    tmp = torch.empty(d, dtype=torch.float32)  # per call: ctypes releases the GIL, calls may overlap
    lib.rot_apply(xc.data_ptr(), out.data_ptr(), rows, *args[:4], int(inverse), tmp.data_ptr())
    return out
