"""QuantLinear: a linear layer held as packed codes (buffers only, no full-precision weight), plus its rotations.

The stored matrix is W' = R_out^T W R_in (transforms/rotate.py) and the layer computes
y = ((x R_in) W'^T) R_out^T + b. The buffers are exactly the tensors of the file format
(checkpoint.py), so a state dict *is* the file: `codes` (uint8 packed stream), `scales` (fp16),
`seeds` (int64 [2]), `gain_levels` (fp16, PVQ with data-fitted gains only) or `offsets` (fp16,
uniform grid), and `bias`. What a forward needs beyond the buffers is a runner, rebuilt from them
whenever they change (a load, a device move):

- DecodeOnce (decode="once"): the codes are decoded on first use and the decoded matrix is kept (in
  `weight_dtype`, float32 by default, bfloat16 to halve it); fastest, memory like a dense layer.
- OnTheFly (decode="on-the-fly"): nothing but the buffers stays resident. A forward with a few tokens
  runs the native fused decode-and-multiply kernel (runtime/) without ever writing the matrix; a
  longer one decodes blocks of rows into a scratch buffer and multiplies each block with every token
  at once. Without a C compiler the same is done with the torch decoder (exact, slower).
- decode="auto" (the default when loading): on-the-fly where the native kernel is available, else once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..codec import PackedPVQ, PackedUniform, PVQSpec, UniformSpec
from ..codec.gain import beta_codebook
from ..codec.gainshape import law_length
from ..runtime import native
from ..runtime.decode import GEMV_TOKENS, Decoder, FusedLinear, rotate, rotation_args
from ..transforms.rotate import NO_SEED, STORED_SEEDS, layer_rotations

DECODE_MODES = ("auto", "once", "on-the-fly")


def check_decode(decode: str) -> str:
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {decode!r}; choose one of {', '.join(DECODE_MODES)}")
    return decode


def resolve_decode(decode: str) -> str:
    """The mode a layer runs in: "auto" is on-the-fly where the native kernel builds, else once."""
    if check_decode(decode) != "auto":
        return decode
    return "on-the-fly" if native.kernel() is not None else "once"


class Rotations:
    """A layer's two randomized Hadamards (None for a side not rotated) and their native arguments."""

    def __init__(self, rows: int, cols: int, seeds: tuple[int, int]):
        self.r_in, self.r_out = layer_rotations(rows, cols, seeds)
        self.args_in = None if self.r_in is None else rotation_args(self.r_in)
        self.args_out = None if self.r_out is None else rotation_args(self.r_out)

    def into(self, h: torch.Tensor) -> torch.Tensor:
        """x R_in for float32 x [..., cols] (the kernel for a few rows, torch otherwise)."""
        if self.r_in is None:
            return h
        out = rotate(self.r_in, h, args=self.args_in)
        return self.r_in.apply(h) if out is None else out

    def out_of(self, h: torch.Tensor) -> torch.Tensor:
        """h R_out^T: back from the rotated output basis."""
        if self.r_out is None:
            return h
        out = rotate(self.r_out, h, inverse=True, args=self.args_out)
        return self.r_out.apply_inverse(h) if out is None else out

    def to_original(self, w: torch.Tensor) -> torch.Tensor:
        """R_out W' R_in^T of a rotated matrix W' [out, in] (float64 math, float32 result)."""
        w = w.double()
        if self.r_out is not None:
            w = self.r_out.apply_inverse(w.T).T
        if self.r_in is not None:
            w = self.r_in.apply_inverse(w)
        return w.float()


class DecodeOnce:
    """decode="once": the decoded matrix, kept from the first use on."""

    def __init__(self, layer: "QuantLinear"):
        self.rot = Rotations(layer.out_features, layer.in_features, layer.seed_pair)
        self.weight: torch.Tensor | None = None
        self.fused = None

    def rotated_weight(self, layer: "QuantLinear") -> torch.Tensor:
        if self.weight is None:
            self.weight = layer.packed.dequantize(torch.float32).to(layer.weight_dtype)
        return self.weight

    def resident_bytes(self) -> int:
        return 0 if self.weight is None else self.weight.numel() * self.weight.element_size()

    def shared_tensors(self) -> list[torch.Tensor]:
        return []


class OnTheFly:
    """decode="on-the-fly": a decoder over the packed buffers and, where the kernel runs, the whole layer
    as one native call for a few tokens."""

    def __init__(self, layer: "QuantLinear"):
        self.rot = Rotations(layer.out_features, layer.in_features, layer.seed_pair)
        self.decoder = Decoder(layer.packed)
        self.fused = (FusedLinear(self.decoder, self.rot.args_in, self.rot.args_out, layer.bias)
                      if self.decoder.native else None)
        # the decoded matrix, where a caller that cannot use the decoder keeps it (an embedding's lookup without
        # the native kernel's row decoding: modules/embedding.py)
        self.kept: torch.Tensor | None = None

    def rotated_weight(self, layer: "QuantLinear") -> torch.Tensor:
        return self.decoder.dense()

    def resident_bytes(self) -> int:
        kept = 0 if self.kept is None else self.kept.numel() * self.kept.element_size()
        return self.decoder.resident_bytes() + kept

    def shared_tensors(self) -> list[torch.Tensor]:
        return self.decoder.shared_tensors()


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as packed PVQ or uniform codes in a rotated basis."""

    pvq_linear = True  # what models.adapters looks for to find a block's quantized linears

    def __init__(self, spec: PVQSpec | UniformSpec, shape: tuple[int, int], *, bias: bool = False,
                 decode: str = "once", weight_dtype: torch.dtype = torch.float32):
        super().__init__()
        rows, cols = (int(s) for s in shape)
        spec.check_shape(rows, cols)
        self.spec = spec
        self.out_features, self.in_features = rows, cols
        self.decode = resolve_decode(decode)
        self.weight_dtype = weight_dtype
        nbytes = spec.bit_breakdown(rows, cols)["codes"] // 8
        self.register_buffer("codes", torch.zeros(nbytes, dtype=torch.uint8))  # [ceil(groups * bits / 8)]
        self.register_buffer("seeds", torch.full((STORED_SEEDS,), NO_SEED, dtype=torch.int64))  # (seed_in, seed_out)
        if isinstance(spec, PVQSpec):
            self.register_buffer("scales", torch.ones(rows if spec.scale == "row" else 1, dtype=torch.float16))
            if spec.gain != "beta":
                self.register_buffer("gain_levels", torch.zeros(spec.gain_levels, dtype=torch.float16))  # [L]
        else:
            ng = spec.groups_per_row(cols)
            self.register_buffer("scales", torch.zeros(rows, ng, dtype=torch.float16))
            self.register_buffer("offsets", torch.zeros(rows, ng, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(rows), requires_grad=False) if bias else None
        self._runner: DecodeOnce | OnTheFly | None = None  # built from the buffers on first use
        self.act = None  # an actquant.ActQuantizer when the inputs are quantized too (a run setting, not stored bits)

    @classmethod
    def from_packed(cls, packed: PackedPVQ | PackedUniform, seeds: tuple[int, int], bias: torch.Tensor | None = None,
                    decode: str = "once") -> "QuantLinear":
        q = cls(packed.spec, packed.shape, bias=bias is not None, decode=decode)
        q.codes.copy_(packed.codes)
        q.seeds.copy_(torch.tensor([int(seeds[0]), int(seeds[1])], dtype=torch.int64))
        if isinstance(packed, PackedPVQ):
            q.scales.copy_(packed.row_scale.reshape(q.scales.shape))
            if packed.spec.gain != "beta":
                q.gain_levels.copy_(packed.gain_levels.reshape(-1))
        else:
            q.scales.copy_(packed.scale)
            q.offsets.copy_(packed.offset)
        if bias is not None:
            q.bias.data.copy_(bias.detach().float())
        return q

    # ---------------------------------------------------------------- runner rebuilt from the buffers
    def _load_from_state_dict(self, *args, **kwargs):
        self._runner = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        # the runner (rotations, kernel arguments: ctypes objects that cannot be pickled) is rebuilt from
        # the buffers; deepcopy and pickle take the buffers only
        state = self.__dict__.copy()
        state["_runner"] = None
        return state

    def _apply(self, fn, recurse=True):
        # model.to(dtype) must not round the fp16 scales or the float32 bias: they are stored bits
        before = {name: t for name, t in [*self._buffers.items(), ("bias", self.bias)] if t is not None}
        super()._apply(fn, recurse)
        for name, t in self._buffers.items():
            if t is not None and t.dtype != before[name].dtype:
                self._buffers[name] = before[name].to(t.device)
        if self.bias is not None and self.bias.dtype != before["bias"].dtype:
            self.bias.data = before["bias"].data.to(self.bias.device)
        self._runner = None
        return self

    @property
    def packed(self) -> PackedPVQ | PackedUniform:
        rows, cols = self.out_features, self.in_features
        spec = self.spec
        if isinstance(spec, PVQSpec):
            if spec.gain == "beta":
                levels = beta_codebook(spec.n, law_length(spec, rows, cols), spec.gain_levels)
            else:
                levels = self.gain_levels.double()
            return PackedPVQ(spec, (rows, cols), self.codes, self.scales.half(), levels)
        return PackedUniform(spec, (rows, cols), self.codes, self.scales.half(), self.offsets.half())

    @property
    def nbits(self) -> int:
        """Every stored bit of this layer: packed codes, scales, stored codebook, two 64-bit seeds."""
        return self.packed.nbits + 64 * STORED_SEEDS

    @property
    def seed_pair(self) -> tuple[int, int]:
        return int(self.seeds[0]), int(self.seeds[1])

    @property
    def runner(self) -> DecodeOnce | OnTheFly:
        if self._runner is None:
            self._runner = OnTheFly(self) if self.decode == "on-the-fly" else DecodeOnce(self)
        return self._runner

    def rotated_weight(self) -> torch.Tensor:
        """The decoded matrix W' in the rotated basis ([out, in]); kept in decode="once" mode."""
        return self.runner.rotated_weight(self)

    def drop_decoded(self) -> None:
        """Forget the decoded matrix and decoder state; both are rebuilt from the buffers on next use."""
        self._runner = None

    def weight_in_original_basis(self) -> torch.Tensor:
        """R_out W' R_in^T: the matrix this layer applies, for inspection and tests."""
        return self.runner.rot.to_original(self.rotated_weight())

    def resident_bytes(self) -> int:
        """Bytes this layer keeps: its buffers and bias, a kept decoded matrix, a decoder's float copies."""
        tensors = [*self.buffers(recurse=False), *self.parameters(recurse=False)]
        own = sum(t.numel() * t.element_size() for t in tensors)
        return own + (0 if self._runner is None else self._runner.resident_bytes())

    def shared_tensors(self) -> list[torch.Tensor]:
        """Decode tables this layer uses that other layers share (count each once per model)."""
        return [] if self._runner is None else self._runner.shared_tensors()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        run = self.runner
        if (run.fused is not None and self.act is None and x.numel() <= GEMV_TOKENS * self.in_features
                and x.device.type == "cpu"):
            return run.fused(x)
        dtype = x.dtype
        h = x.float()
        act = self.act
        if act is not None and not act.after_rotation:
            h = act(h)
        h = run.rot.into(h)
        if act is not None and act.after_rotation:
            h = act.quantize(h)
        if isinstance(run, OnTheFly):
            h = run.decoder.matmul(h, self.weight_dtype)
        else:
            w = self.rotated_weight()
            h = F.linear(h.to(w.dtype), w).float()
        h = run.rot.out_of(h)
        if self.bias is not None:
            h = h + self.bias
        return h.to(dtype)

    def extra_repr(self) -> str:
        return (f"in={self.in_features}, out={self.out_features}, {self.spec.name}, "
                f"{self.nbits / (self.in_features * self.out_features):.4f} bits/weight, decode={self.decode}")



def reserve_tables(model) -> None:
    """Size the kernel's shared tables for every on-the-fly PVQ layer of `model` at once (before any layer
    builds its plan: built in layer order, a small table and then a larger one would both stay resident)."""
    if native.kernel() is None:
        return
    native.reserve([(m.spec.n, m.spec.k) for m in model.modules()
                    if isinstance(m, QuantLinear) and m.decode == "on-the-fly" and isinstance(m.spec, PVQSpec)])
