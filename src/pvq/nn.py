"""QuantLinear: a linear layer held as packed codes (buffers only, no full-precision weight), plus its rotations.

With seeded randomized Hadamards R_in, R_out (QuIP#-style incoherence processing on both sides)
the stored matrix is W' = R_out^T W R_in, and y = x W^T = ((x R_in) W'^T) R_out^T, so the network
output is unchanged before quantization. Only the two seeds are stored.

The buffers are exactly the tensors of the file format (io.py), so a state dict *is* the file:
`codes` (uint8 packed stream), `scales` (fp16), `seeds` (int64 [2]), `gain_levels` (fp16, PVQ with
data-fitted gains only) or `offsets` (fp16, uniform grid), and `bias`. Two execution modes:

- decode="once": the codes are decoded on first use and the decoded matrix is kept (in
  `weight_dtype`, float32 by default, bfloat16 to halve it); fastest, memory like a dense layer.
- decode="on-the-fly": nothing but the buffers stays resident. A forward with a few tokens runs
  the native fused decode-and-multiply kernel (runtime/kernel.c) without ever writing the matrix;
  a longer one decodes blocks of rows into a scratch buffer and multiplies each block with every
  token at once. Without a C compiler the same is done with the torch decoder (exact, slower).
- decode="auto" (the default when loading): on-the-fly where the native kernel is available,
  else once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .codec import PackedPVQ, PackedUniform, PVQSpec, UniformSpec
from .codec.gain import beta_codebook
from .codec.gainshape import law_length
from .runtime import native
from .runtime.decode import GEMV_TOKENS, Decoder, FusedLinear, rotate, rotation_args
from .transforms.hadamard import RandomHadamard

NO_SEED = -1  # marks a side that is not rotated
DECODE_MODES = ("auto", "once", "on-the-fly")


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


def check_decode(decode: str) -> str:
    if decode not in DECODE_MODES:
        raise ValueError(f"unknown decode mode {decode!r}; choose one of {', '.join(DECODE_MODES)}")
    return decode


def resolve_decode(decode: str) -> str:
    """The mode a layer runs in: "auto" is on-the-fly where the native kernel builds (SmolLM2 on a 2-core
    EPYC then generates as fast as with decode once, its quantized linears in a tenth of the memory:
    bench/results/runtime.json), else once."""
    if check_decode(decode) != "auto":
        return decode
    return "on-the-fly" if native.kernel() is not None else "once"


class QuantLinear(nn.Module):
    """y = x W^T + b with W stored as packed PVQ or uniform codes in a rotated basis."""

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
        self.register_buffer("seeds", torch.full((2,), NO_SEED, dtype=torch.int64))  # (seed_in, seed_out)
        if isinstance(spec, PVQSpec):
            self.register_buffer("scales", torch.ones(rows if spec.scale == "row" else 1, dtype=torch.float16))
            if spec.gain != "beta":
                self.register_buffer("gain_levels", torch.zeros(spec.gain_levels, dtype=torch.float16))  # [L]
        else:
            ng = spec.groups_per_row(cols)
            self.register_buffer("scales", torch.zeros(rows, ng, dtype=torch.float16))
            self.register_buffer("offsets", torch.zeros(rows, ng, dtype=torch.float16))
        self.bias = nn.Parameter(torch.zeros(rows), requires_grad=False) if bias else None
        self._state: dict | None = None  # rotations, decoded weight or kernel arguments; rebuilt from buffers
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

    # ---------------------------------------------------------------- state rebuilt from the buffers
    def _load_from_state_dict(self, *args, **kwargs):
        self._state = None
        super()._load_from_state_dict(*args, **kwargs)

    def __getstate__(self):
        # what _prepared() derived (rotations, kernel arguments: ctypes objects that cannot be pickled) is
        # rebuilt from the buffers; deepcopy and pickle take the buffers only
        state = self.__dict__.copy()
        state["_state"] = None
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
        self._state = None
        return self

    def reset(self, decode: str | None = None, weight_dtype: torch.dtype | None = None) -> None:
        """Drop what was derived from the buffers (after they change, or to switch the decode mode)."""
        if decode is not None:
            self.decode = resolve_decode(decode)
        if weight_dtype is not None:
            self.weight_dtype = weight_dtype
        self._state = None

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
        return self.packed.nbits + 64 * 2

    @property
    def seed_pair(self) -> tuple[int, int]:
        return int(self.seeds[0]), int(self.seeds[1])

    def _prepared(self) -> dict:
        if self._state is None:
            r_in, r_out = rotations(self.out_features, self.in_features, self.seed_pair)
            st = {"r_in": r_in, "r_out": r_out, "args_in": None if r_in is None else rotation_args(r_in),
                  "args_out": None if r_out is None else rotation_args(r_out)}
            if self.decode == "on-the-fly":
                st["decoder"] = Decoder(self.packed)
                # a few tokens: rotations, decode-and-multiply and bias in one native call
                if st["decoder"].native:
                    st["linear"] = FusedLinear(st["decoder"], st["args_in"], st["args_out"], self.bias)
            self._state = st
        return self._state

    def rotated_weight(self) -> torch.Tensor:
        """The decoded matrix W' in the rotated basis ([out, in]); kept in decode="once" mode."""
        st = self._prepared()
        if "w" in st:
            return st["w"]
        if self.decode == "on-the-fly":
            return st["decoder"].dense()
        st["w"] = self.packed.dequantize(torch.float32).to(self.weight_dtype)
        return st["w"]

    def weight_in_original_basis(self) -> torch.Tensor:
        """R_out W' R_in^T: the matrix this layer applies, for inspection and tests."""
        st = self._prepared()
        w = self.rotated_weight().double()
        if st["r_out"] is not None:
            w = st["r_out"].apply_inverse(w.T).T
        if st["r_in"] is not None:
            w = st["r_in"].apply_inverse(w)
        return w.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        st = self._prepared()
        lin = st.get("linear")
        if (lin is not None and self.act is None and x.numel() <= GEMV_TOKENS * self.in_features
                and x.device.type == "cpu"):
            return lin(x)
        dtype = x.dtype
        h = x.float()
        act = self.act
        if act is not None and not act.after_rotation:
            h = act(h)
        if st["r_in"] is not None:
            h2 = rotate(st["r_in"], h, args=st["args_in"])
            h = st["r_in"].apply(h) if h2 is None else h2
        if act is not None and act.after_rotation:
            h = act.quantize(h)
        if self.decode == "on-the-fly":
            h = st["decoder"].matmul(h, self.weight_dtype)
        else:
            w = self.rotated_weight()
            h = F.linear(h.to(w.dtype), w).float()
        if st["r_out"] is not None:
            h2 = rotate(st["r_out"], h, inverse=True, args=st["args_out"])
            h = st["r_out"].apply_inverse(h) if h2 is None else h2
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
