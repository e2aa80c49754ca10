"""Choosing settings: a target in bits per weight (or per activation) -> the codec setting of one matrix.

Every stored bit is counted (codes, scales, codebooks, rotation seeds). Among the settings that land
on the target, the one with the best SQNR on i.i.d. Gaussian data wins: after the randomized Hadamard
rotation weights and activations are that close to Gaussian (bench/results/codec.json: 17.45 dB on
SmolLM2 against 17.49 dB on Gaussian weights at 3.25 bits), so one data-free proxy serves every layer.
"""
from __future__ import annotations

import math
from functools import lru_cache

import torch

from .codec import PVQSpec, UniformSpec, bits_per_weight, count, index_bits
from .codec import activation as act_codec
from .codec.bitpack import MAX_WIDTH
from .codec.gainshape import fake_quantize
from .runtime import native
from .runtime.limits import LUT_BYTES, full_table_fits
from .settings import QuantConfig
from .transforms.rotate import STORED_SEEDS

PVQ_GROUP_DIMS = (8, 12, 16)  # candidate n; each must divide the layer's input size
FAST_GROUP_DIMS = (4, 6, 8)  # candidate n of layout="fast"
ACT_GROUP_DIMS = (4, 8, 16)  # candidate n for activations; each must divide the input size


# unbounded: a plan over every rate (allocation) visits ~600 settings per layer shape in the same order, so a
# bounded LRU would evict each one before its next use and compute all of them again for every shape
@lru_cache(maxsize=None)
def proxy_sqnr(spec: PVQSpec) -> float:
    """SQNR of a spec on a fixed i.i.d. Gaussian matrix: a data-free proxy for rotated weights."""
    cols = 2304  # divisible by 8, 12 and 16
    w = torch.randn(256, cols, generator=torch.Generator().manual_seed(1234))
    w_hat = fake_quantize(w, spec)  # the decoded floats, without enumerating the indices
    return 10 * math.log10(float((w**2).sum() / ((w - w_hat) ** 2).sum()))


def pvq_candidates(n: int, code_bits: int, gain: str, scale: str) -> list[PVQSpec]:
    """PVQ settings filling a `code_bits`-bit code with 2..512 gain levels and < 0.01 bit/weight waste."""
    out = []
    if code_bits > MAX_WIDTH:
        return out
    for k in range(1, 512):
        if index_bits(n, k) > code_bits - 1:
            break
        # gain levels first: a setting with more than 512 (k=1 in a 63-bit code) may exceed the codec's limit
        if not 2 <= (1 << code_bits) // count(n, k) <= 512:
            continue
        spec = PVQSpec.for_code_bits(n, k, code_bits, gain=gain, scale=scale)
        if spec.waste_bits_per_weight < 0.01:
            out.append(spec)
    return out


def choose_spec(cfg: QuantConfig, rows: int, cols: int):
    """The codec setting for a [rows, cols] layer that lands on cfg.bits without exceeding it by
    more than the unavoidable per-layer overhead. Raises ValueError if no setting reaches it."""
    seeds = STORED_SEEDS
    if not cfg.is_pvq:
        b = int(math.floor(cfg.bits - 32 / cfg.group_size + 1e-9))
        if not 1 <= b <= 8:
            raise ValueError(f"--bits {cfg.bits}: no uniform grid with group size {cfg.group_size} reaches it "
                             f"(1..8 bits plus {32 / cfg.group_size:.3f} for scales)")
        return UniformSpec(b, cfg.group_size)
    fast = cfg.layout == "fast"
    dims = [cfg.group_dim] if cfg.group_dim else [n for n in (FAST_GROUP_DIMS if fast else PVQ_GROUP_DIMS) if cols % n == 0]
    if not dims or cols % dims[0]:
        raise ValueError(f"no PVQ group dimension divides the layer input size {cols} (tried {dims or PVQ_GROUP_DIMS})")
    best = None
    for n in dims:
        probe = bits_per_weight(PVQSpec(n, 1, 2, cfg.gain, cfg.scale), rows, cols, seeds)
        overhead = (probe.total - probe.codes) / (rows * cols)  # scales, codebook, seeds
        code_bits = int(math.floor(n * (cfg.bits - overhead) + 1e-6))
        # the last few thousandths (the fp16 scale, the seeds) may round a code up by one bit: allow it,
        # unless no setting has that code (past the 63-bit limit)
        widths = [code_bits + 1, code_bits] if (code_bits + 1) / n + overhead <= cfg.bits + 0.005 else [code_bits]
        for width in widths:
            specs = [s for s in pvq_candidates(n, width, cfg.gain, cfg.scale) if not fast or full_table_fits(s.n, s.k)]
            if specs:
                break
        for spec in specs:
            q = proxy_sqnr(spec)
            if best is None or q > best[0]:
                best = (q, spec)
    if best is None:
        what = f", with a decode table of at most {LUT_BYTES} bytes (--layout fast)" if fast else ""
        raise ValueError(f"--bits {cfg.bits}: no PVQ setting (n in {dims}, codes of at most {MAX_WIDTH} bits{what}) reaches it")
    return best[1]


def act_shapes(x: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """PVQ shapes and gains of every token of x: the native search where it runs, else the codec's."""
    return native.act_pvq_shapes(x, k) or act_codec.pvq_shapes(x, k)


@lru_cache(maxsize=64)
def act_spec(bits: int, cols: int) -> PVQSpec:
    """The PVQ setting for tokens of `cols` activations at the same stored bits as rtn: `bits` per
    activation for the codes (n * bits per group) plus the per-token fp16 scale. The one with the
    best SQNR on Gaussian tokens (what rotated tokens look like) among the group sizes
    ACT_GROUP_DIMS that divide cols."""
    best = None
    for n in ACT_GROUP_DIMS:
        if cols % n:
            continue
        for spec in pvq_candidates(n, n * bits, "beta", "row"):
            q = _gaussian_token_sqnr(spec, cols)
            if best is None or q > best[0]:
                best = (q, spec)
    if best is None:
        raise ValueError(f"--abits {bits} --act-method pvq: no PVQ setting (n in {ACT_GROUP_DIMS} dividing {cols}, "
                         f"codes of {bits} bits per activation) exists")
    return best[1]


def _gaussian_token_sqnr(spec: PVQSpec, cols: int) -> float:
    """SQNR (dB) of activation PVQ on 64 fixed i.i.d. Gaussian tokens of `cols` activations."""
    x = torch.randn(64, cols, generator=torch.Generator().manual_seed(4321))
    e = x - act_codec.pvq(x, spec, act_shapes)
    return 10 * math.log10(float(x.pow(2).sum() / e.pow(2).sum().clamp_min(1e-30)))
