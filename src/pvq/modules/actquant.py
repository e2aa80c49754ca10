"""Quantized activations: the input of every linear of the transformer blocks, one token at a time.

The paper reports a Pareto front in bits per weight *and* bits per activation. Here the input x of
each quantized linear is quantized per token (codec/activation.py: rtn or pvq, the pvq setting from
picker.act_spec) right where an integer kernel would quantize it:

- rotate=True (default): after the layer's randomized Hadamard input rotation x R_in, which spreads
  the outlier channels of x over the whole token (QuaRot). A QuantLinear of the pvq methods already
  multiplies by R_in, so quantizing there is free. A layer without its own input rotation (rtn and
  gptq files, unquantized models) gets a seeded one: x -> Q(x R) R^T, the same arithmetic.
- rotate=False: x itself is quantized, outliers and all (to show what the rotation buys).

The activation settings live in QuantConfig (abits, act_method, act_rotate; settings.ActConfig) and so
in the file's config.json; `attach` applies them to a model (after quantize, at load, or from
`pvq eval --abits` on any model). The quantization is simulated in float (fake quantization): every number the model
then produces is the one the quantized activations give. Not quantized: the attention products
(Q K^T, P V, the KV cache) and the input of the LM head.
"""
from __future__ import annotations

import torch
from torch import nn

from ..codec import activation as act_codec
from ..models.adapters import block_linear_names
from ..picker import act_shapes, act_spec
from ..settings import ActConfig
from ..transforms.hadamard import RandomHadamard
from ..transforms.rotate import NO_SEED, derive_seed
from .linear import QuantLinear


class ActQuantizer:
    """Quantizes the [..., cols] input of one linear; `rotation` (if any) is its own x -> Q(x R) R^T."""

    def __init__(self, cfg: ActConfig, cols: int, rotation: RandomHadamard | None = None,
                 after_rotation: bool = False):
        self.cfg, self.cols, self.rotation = cfg, int(cols), rotation
        self.after_rotation = after_rotation  # a QuantLinear applies quantize() after its own R_in
        self.spec = act_spec(cfg.bits, self.cols) if cfg.method == "pvq" else None

    @property
    def bits_per_activation(self) -> float:
        if self.spec is not None:
            return act_codec.pvq_bits(self.spec, self.cols)
        return act_codec.rtn_bits(self.cfg.bits, self.cols)

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        if self.spec is not None:
            return act_codec.pvq(x, self.spec, act_shapes)
        return act_codec.rtn(x, self.cfg.bits)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.rotation is None:
            return self.quantize(x)
        dtype = x.dtype
        return self.rotation.apply_inverse(self.quantize(self.rotation.apply(x.float()))).to(dtype)

    def __repr__(self) -> str:
        what = self.spec.name if self.spec is not None else f"rtn{self.cfg.bits}"
        return f"ActQuantizer({what}, {self.bits_per_activation:.4f} bits/activation)"


def _pre_hook(module, args):
    return (module._pvq_act(args[0]), *args[1:])


def attach(model, cfg: ActConfig | None) -> None:
    """Quantize the inputs of every linear of the blocks of `model` as cfg says (None: stop quantizing them)."""
    for full, mod in block_linear_names(model):
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
            q = ActQuantizer(cfg, cols, RandomHadamard(cols, derive_seed(cfg.seed, f"{full}:act")) if cfg.rotate else None)
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


