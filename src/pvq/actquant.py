"""Quantized activations: the input of every linear of the transformer blocks, one token at a time.

The paper reports a Pareto front in bits per weight *and* bits per activation. Here the input x of
each quantized linear is quantized per token (codec/activation.py: rtn or pvq) right where an
integer kernel would quantize it:

- rotate=True (default): after the layer's randomized Hadamard input rotation x R_in, which spreads
  the outlier channels of x over the whole token (QuaRot). A QuantLinear of the pvq methods already
  multiplies by R_in, so quantizing there is free. A layer without its own input rotation (rtn and
  gptq files, unquantized models) gets a seeded one: x -> Q(x R) R^T, the same arithmetic.
- rotate=False: x itself is quantized, outliers and all (to show what the rotation buys).

The activation settings live in QuantConfig (abits, act_method, act_rotate) and so in the file's
config.json; `attach` applies them to a model (after quantize, at load, or from `pvq eval --abits`
on any model). The quantization is simulated in float (fake quantization): every number the model
then produces is the one the quantized activations give. Not quantized: the attention products
(Q K^T, P V, the KV cache) and the input of the LM head.
"""
from __future__ import annotations

import math
import zlib
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from .codec import PVQSpec
from .codec import activation as act_math
from .config import check_act_settings, pvq_candidates
from .models.adapters import LINEARS, blocks
from .nn import NO_SEED, QuantLinear
from .runtime import native
from .transforms.hadamard import RandomHadamard

ACT_GROUP_DIMS = (4, 8, 16)  # candidate PVQ group sizes for activations; each must divide the input size


@dataclass(frozen=True)
class ActConfig:
    """How the inputs of the linears are quantized: `bits` per activation (plus a per-token fp16 scale)."""

    bits: int
    method: str = "rtn"
    rotate: bool = True
    seed: int = 0  # seeds the rotations of layers that have none of their own

    def __post_init__(self):
        if self.bits is None:
            raise ValueError("--abits must be an integer from 2 to 16, got None")
        check_act_settings(self.bits, self.method)

    @property
    def name(self) -> str:
        return f"{self.method} A{self.bits} per token, {'after the input rotation' if self.rotate else 'no rotation'}"

    @classmethod
    def from_quant_config(cls, cfg: dict) -> "ActConfig | None":
        """The activation settings of a QuantConfig dict (None when activations stay in float)."""
        if cfg.get("abits") is None:
            return None
        return cls(int(cfg["abits"]), cfg.get("act_method", "rtn"), bool(cfg.get("act_rotate", True)),
                   int(cfg.get("seed", 0)))


@lru_cache(maxsize=64)
def pvq_spec(bits: int, cols: int) -> PVQSpec:
    """The PVQ setting for tokens of `cols` activations at the same stored bits as rtn: `bits` per
    activation for the codes (n * bits per group) plus the per-token fp16 scale. The one with the
    best SQNR on Gaussian tokens (what rotated tokens look like) among the group sizes
    ACT_GROUP_DIMS that divide cols."""
    best = None
    for n in ACT_GROUP_DIMS:
        if cols % n:
            continue
        for spec in pvq_candidates(n, n * bits, "beta", "row"):
            q = _gaussian_sqnr(spec, cols)
            if best is None or q > best[0]:
                best = (q, spec)
    if best is None:
        raise ValueError(f"--abits {bits} --act-method pvq: no PVQ setting (n in {ACT_GROUP_DIMS} dividing {cols}, "
                         f"codes of {bits} bits per activation) exists")
    return best[1]


def _gaussian_sqnr(spec: PVQSpec, cols: int) -> float:
    """SQNR (dB) of activation PVQ on 64 fixed i.i.d. Gaussian tokens of `cols` activations."""
    x = torch.randn(64, cols, generator=torch.Generator().manual_seed(4321))
    e = x - act_math.pvq(x, spec, _native_shapes)
    return 10 * math.log10(float(x.pow(2).sum() / e.pow(2).sum().clamp_min(1e-30)))


def _native_shapes(x: torch.Tensor, k: int):
    return native.act_pvq_shapes(x, k) or act_math.pvq_shapes(x, k)


class ActQuantizer:
    """Quantizes the [..., cols] input of one linear; `rotation` (if any) is its own x -> Q(x R) R^T."""

    def __init__(self, cfg: ActConfig, cols: int, rotation: RandomHadamard | None = None,
                 after_rotation: bool = False):
        self.cfg, self.cols, self.rotation = cfg, int(cols), rotation
        self.after_rotation = after_rotation  # a QuantLinear applies quantize() after its own R_in
        self.spec = pvq_spec(cfg.bits, self.cols) if cfg.method == "pvq" else None

    @property
    def bits_per_activation(self) -> float:
        if self.spec is not None:
            return act_math.pvq_bits(self.spec, self.cols)
        return act_math.rtn_bits(self.cfg.bits, self.cols)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is not None:
            return act_math.pvq(x, self.spec, _native_shapes)
        return act_math.rtn(x, self.cfg.bits)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is None:
            return self.quantize(x)
        dtype = x.dtype
        return self.rotation.apply_inverse(self.quantize(self.rotation.apply(x.float()))).to(dtype)

    def __repr__(self) -> str:
        what = self.spec.name if self.spec is not None else f"rtn{self.cfg.bits}"
        return f"ActQuantizer({what}, {self.bits_per_activation:.4f} bits/activation)"


def act_seed(seed: int, name: str) -> int:
    return ((int(seed) * 1_000_003) % (1 << 31)) << 32 | zlib.crc32(f"{name}:act".encode())


def _pre_hook(module, args):
    return (module._pvq_act(args[0]), *args[1:])


def attach(model, cfg: ActConfig | None) -> None:
    """Quantize the inputs of every linear of the blocks of `model` as cfg says (None: stop quantizing them)."""
    for i, block in enumerate(blocks(model)):
        for name in LINEARS:
            full = f"model.layers.{i}.{name}"
            mod = block.get_submodule(name)
            handle = getattr(mod, "_pvq_act_handle", None)
            if handle is not None:
                handle.remove()
                mod._pvq_act_handle = None
            mod._pvq_act = None
            if isinstance(mod, QuantLinear):
                mod.act = None
            if cfg is None:
                continue
            cols = mod.in_features
            own = isinstance(mod, QuantLinear) and int(mod.seeds[0]) != NO_SEED
            if cfg.rotate and own:
                q = ActQuantizer(cfg, cols, after_rotation=True)
            else:
                q = ActQuantizer(cfg, cols, RandomHadamard(cols, act_seed(cfg.seed, full)) if cfg.rotate else None)
            if isinstance(mod, QuantLinear):
                mod.act = q
            elif isinstance(mod, nn.Linear):
                mod._pvq_act = q
                mod._pvq_act_handle = mod.register_forward_pre_hook(_pre_hook)
            else:
                raise ValueError(f"{full}: cannot quantize the input of a {type(mod).__name__}")


def quantizers(model) -> dict[str, ActQuantizer]:
    out = {}
    for name, mod in model.named_modules():
        q = getattr(mod, "act", None) if isinstance(mod, QuantLinear) else getattr(mod, "_pvq_act", None)
        if isinstance(q, ActQuantizer):
            out[name] = q
    return out


def _mean_bits(qs) -> float | None:
    """Stored bits per activation over the inputs of the given quantizers (one token each; None if none)."""
    qs = list(qs)
    if not qs:
        return None
    return sum(q.bits_per_activation * q.cols for q in qs) / sum(q.cols for q in qs)


def bits_per_activation(model) -> float | None:
    """Stored bits per quantized activation over the inputs of all linears of one token (None: none quantized)."""
    return _mean_bits(quantizers(model).values())


def bits_per_activation_of(cfg: ActConfig, input_sizes: list[int]) -> float:
    """The same figure from the settings and the input size of every quantized linear (pvq info)."""
    return _mean_bits(ActQuantizer(cfg, c) for c in input_sizes) or 0.0


