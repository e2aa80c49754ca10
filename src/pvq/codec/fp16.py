"""Scales are stored as fp16: the value a quantizer must use is the one the file will hold."""
from __future__ import annotations

import torch

FP16_MAX = 65504.0
FP16_TINY = 6e-8  # just above 2^-24, the smallest positive fp16 (subnormal)


def positive_scale(s: torch.Tensor) -> torch.Tensor:
    """The float32 value of a positive scale after storing it as fp16, kept inside fp16's range so that
    dividing by it is always finite."""
    return s.clamp(1e-8, FP16_MAX).half().float().clamp_min(FP16_TINY)
