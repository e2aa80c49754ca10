"""On-the-fly decoding of one packed matrix: y = x W'^T without keeping W' resident.

A Decoder holds references to the packed buffers (codes, scales, gain levels; nothing is copied)
and, shared by every layer with the same (n, k), the serialised enumeration plan of the native
kernel (whose tables of points every plan shares). `matmul(x)` picks the fused decode-and-multiply
kernel for a few tokens (generation) and decode-a-block-of-rows-then-GEMM for many (prompt
processing): each block is decoded once per call and reused for every token. PVQ codes on a GPU use
the same two strategies with the Triton kernels of gpu.py. Without a kernel it falls back to the torch
decoder (on a CPU copy of the codes: the torch unpacker is numpy's).
"""
from __future__ import annotations

import ctypes

import torch

from ..codec import PackedPVQ, PackedUniform
from . import gpu, native

GEMV_TOKENS = 2  # at most this many rows of x: fused kernel
ROTATE_TOKENS = 8  # at most this many rows: rotations in the kernel (torch's small GEMMs cost ~10 us a call)
ROW_BLOCK = 512  # rows decoded at once otherwise (a 512 x 1536 float32 block is 3 MiB)


class Decoder:
    def __init__(self, packed: PackedPVQ | PackedUniform, triton: bool | None = None):
        """triton: None uses the Triton kernels for PVQ codes on a GPU; True for any codes (CPU ones need
        TRITON_INTERPRET=1: how the kernels are tested without a GPU); False never."""
        self.packed = packed
        self.rows, self.cols = packed.shape
        # the kernel reads CPU memory only: codes on another device decode with torch there
        self.lib = native.kernel() if packed.codes.device.type == "cpu" else None
        self.is_pvq = isinstance(packed, PackedPVQ)
        self.plan = self.table = None
        self.gpu = None  # gpu.Operands: PVQ codes on a GPU, decoded by the Triton kernels
        if triton is None:
            triton = packed.codes.device.type != "cpu" and gpu.supports(packed.spec) and gpu.available()
        if triton:
            self.gpu = gpu.Operands(packed)  # raises for a setting the kernels do not cover
            self._check_gpu_codes()
            self.lib = None
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
            self.matrix = self._matrix()  # the kernel's view of the packed matrix, built once
            self._ref = ctypes.byref(self.matrix)
            if self.is_pvq:
                self._check_codes()

    def _check_gpu_codes(self) -> None:
        bad = self.gpu.bad_group()
        if bad >= 0:
            s = self.packed.spec
            raise ValueError(f"packed {s.name} codes of a {self.rows}x{self.cols} layer: group {bad} holds a shape "
                             f"index >= V({s.n}, {s.k}); the codes are corrupt")

    def _matrix(self) -> native.Matrix:
        """The packed matrix as the kernel reads it; its pointers point into tensors self keeps."""
        p = self.packed
        m = native.Matrix(rows=self.rows, cols=self.cols, codes=p.codes.data_ptr(), nbytes=p.codes.numel())
        if not self.is_pvq:
            m.kind, m.width, m.group_size = native.MatrixKind.UNIFORM, p.spec.bits, p.spec.group_size
            m.uscale, m.uoffset = self.scale.data_ptr(), self.offset.data_ptr()
            return m
        s = p.spec
        m.width, m.L, m.n, m.k = s.code_bits, s.gain_levels, s.n, s.k
        m.levels, m.scales, m.per_row = self.levels.data_ptr(), self.scales.data_ptr(), int(self.scales.numel() > 1)
        if self.table is not None:
            m.kind, m.lut, m.lut_rinv = native.MatrixKind.LUT, self.table[0].data_ptr(), self.table[1].data_ptr()
        else:
            m.kind, m.plan = native.MatrixKind.PLAN, self.plan.words.data_ptr()
        return m

    def _check_codes(self) -> None:
        """Refuse codes whose shape index is >= V(n, k): the kernel would read outside its tables."""
        from ..codec.pyramid import count

        s = self.packed.spec
        bad = self.lib.pvq_check_codes(self._ref, count(s.n, s.k))
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
        self.lib.pvq_decode(self._ref, r0, r1, out.data_ptr())
        return out

    def dense(self) -> torch.Tensor:
        if self.gpu is not None:
            return self.gpu.decode()
        if not self.native:
            return _torch_dense(self.packed)
        return self.decode_rows(0, self.rows)

    def matmul(self, x: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """x [..., cols] float32 -> x W'^T [..., rows] float32. Many tokens at a time multiply each decoded
        block in `dtype` (bfloat16: the weights rounded to it, as decode="once" keeps them in a bfloat16
        model, and a bfloat16 GEMM); a few always go through the float32 kernel."""
        lead = x.shape[:-1]
        h = x.reshape(-1, self.cols).contiguous()
        t = h.shape[0]
        if self.gpu is not None and h.device == self.packed.codes.device:
            return self._gpu_matmul(h, dtype).reshape(*lead, self.rows)
        if not self.native or h.device.type != "cpu":
            return (h @ _torch_dense(self.packed).to(h.device).T).reshape(*lead, self.rows)
        out = torch.empty(t, self.rows, dtype=torch.float32)
        if t <= GEMV_TOKENS:
            self.lib.pvq_gemv(self._ref, h.data_ptr(), self.cols, t, out.data_ptr(), self.rows)
        else:
            block = torch.empty(min(ROW_BLOCK, self.rows), self.cols, dtype=torch.float32)
            hd = h if dtype == torch.float32 else h.to(dtype)
            for r0 in range(0, self.rows, ROW_BLOCK):
                r1 = min(r0 + ROW_BLOCK, self.rows)
                w = self.decode_rows(r0, r1, block[: r1 - r0])
                out[:, r0:r1] = hd @ (w if dtype == torch.float32 else w.to(dtype)).T
        return out.reshape(*lead, self.rows)


    def _gpu_matmul(self, h: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """A few tokens: the fused Triton product; more: as gpu.PROMPT says, blocks of rows decoded into `dtype`
        and multiplied by torch, or the fused tiled product in `dtype`."""
        if h.shape[0] <= gpu.MAX_TOKENS:
            return self.gpu.gemv(h)
        if gpu.PROMPT == "fused":
            return self.gpu.matmul(h, dtype)
        out = torch.empty(h.shape[0], self.rows, dtype=torch.float32, device=h.device)
        hd = h.to(dtype)
        step = gpu.DECODE_ROWS
        for r0 in range(0, self.rows, step):
            r1 = min(r0 + step, self.rows)
            out[:, r0:r1] = hd @ self.gpu.decode(r0, r1, dtype).T
        return out


def _torch_dense(packed: PackedPVQ | PackedUniform) -> torch.Tensor:
    """The torch decoder's float32 matrix, on the codes' device."""
    dev = packed.codes.device
    if dev.type == "cpu":
        return packed.dequantize(torch.float32)
    cpu = type(packed)(packed.spec, packed.shape, *(t.cpu() for t in _fields(packed)))
    return cpu.dequantize(torch.float32).to(dev)


def _fields(packed) -> tuple:
    if isinstance(packed, PackedPVQ):
        return packed.codes, packed.row_scale, packed.gain_levels
    return packed.codes, packed.scale, packed.offset


class FusedLinear:
    """One quantized linear as a single native call for a few tokens (kernel pvq_linear): input rotation,
    decode-and-multiply, output rotation and bias, its arguments (native.Linear: the decoder's Matrix and the
    two rotations) packed once. Holds what they point into."""

    def __init__(self, dec: "Decoder", args_in: tuple | None, args_out: tuple | None, bias: torch.Tensor | None):
        if not dec.native:
            raise ValueError("FusedLinear needs a native decoder")
        a = native.Linear(w=dec.matrix)
        keep = [dec]
        if args_in is not None:
            a.r_in = native.Rotation(*args_in[:4])
            keep.append(args_in)
        if args_out is not None:
            a.r_out = native.Rotation(*args_out[:4])
            keep.append(args_out)
        if bias is not None:
            b = bias.detach().float().contiguous()
            a.bias = b.data_ptr()
            keep.append(b)
        self.rows, self.cols = dec.rows, dec.cols
        self.work = (GEMV_TOKENS + 1) * (dec.rows + dec.cols)  # floats of work space for GEMV_TOKENS tokens
        self._lib, self._ref = dec.lib, ctypes.byref(a)
        self._keep = keep

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., cols] (at most GEMV_TOKENS rows, CPU) -> the layer's output [..., rows] in x's dtype."""
        t, rows = x.numel() // self.cols, self.rows
        h = x if x.dtype == torch.float32 and x.is_contiguous() else x.float().contiguous()
        buf = torch.empty(t * rows + self.work, dtype=torch.float32)  # the output, then the kernel's work space
        self._lib.pvq_linear(self._ref, h.data_ptr(), buf.data_ptr(), t, buf.data_ptr() + 4 * t * rows)
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
    lib.rot_apply(ctypes.byref(native.Rotation(*args[:4])), xc.data_ptr(), out.data_ptr(), rows, int(inverse),
                  tmp.data_ptr())
    return out
