"""Scales are stored as fp16: the value a quantizer must use is the one the file will hold."""
from __future__ import annotations

import torch

FP16_MAX = 65504.0
FP16_TINY = 6e-8  # just above 2^-24, the smallest positive fp16 (subnormal)


def positive_scale(s: torch.Tensor) -> torch.Tensor:
    """The float32 value of a positive scale after storing it as fp16, kept inside fp16's range so that
    dividing by it is always finite."""
    return s.clamp(1e-8, FP16_MAX).half().float().clamp_min(FP16_TINY)


class FP16RangeError(ValueError):
    """A value the codec must store as fp16 lies outside fp16's range (or is not finite)."""


def check_fits(t: torch.Tensor, what: str) -> None:
    """Refuse a value that would be stored as fp16 but does not fit it: clamping would spoil the layer."""
    bad = ~torch.isfinite(t) | (t.abs() > FP16_MAX)
    if bool(bad.any()):
        v = float(t[bad].reshape(-1)[0])
        raise FP16RangeError(f"{what} {v:.4g} does not fit fp16 (|x| <= {FP16_MAX:g}): the weights are too large "
                             f"for this codec")
