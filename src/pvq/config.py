"""Quantization settings: a frozen, versioned, JSON-serialisable dataclass, and the per-layer codec choice.

`choose_spec` turns a target in bits per weight into a codec setting for one [rows, cols] matrix,
counting every stored bit (codes, scales, codebooks, rotation seeds), and says what it achieves.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields
from functools import lru_cache

import torch

from .codec import PVQSpec, UniformSpec, bits_per_weight, index_bits
from .codec.bitpack import MAX_WIDTH

FORMAT_VERSION = 1
METHODS = ("rtn", "gptq", "pvq", "pvq-gptq")
PVQ_GROUP_DIMS = (8, 12, 16)  # candidate n; each must divide the layer's input size
FAST_GROUP_DIMS = (4, 6, 8)  # candidate n of layout="fast"
LAYOUTS = ("compact", "fast")
ACT_METHODS = ("rtn", "pvq")  # activation quantizers (actquant.py)


def check_act_settings(abits, method: str) -> None:
    """--abits (None, or an integer 2..16) and --act-method, as QuantConfig and actquant.ActConfig take them."""
    if abits is not None and (not isinstance(abits, int) or isinstance(abits, bool) or not 2 <= abits <= 16):
        raise ValueError(f"--abits must be an integer from 2 to 16, got {abits!r}")
    if method not in ACT_METHODS:
        raise ValueError(f"unknown activation quantizer {method!r}; choose one of {', '.join(ACT_METHODS)}")


@dataclass(frozen=True)
class QuantConfig:
    method: str = "pvq-gptq"
    bits: float = 3.25  # target bits per weight of the quantized linears, every stored bit counted
    seed: int = 0
    # uniform grid (rtn, gptq)
    group_size: int = 128
    # pvq, pvq-gptq
    group_dim: int | None = None  # n; None picks the best of PVQ_GROUP_DIMS for each layer
    gain: str = "beta"
    scale: str = "tensor"
    # "compact": the best rate-distortion setting; "fast": only settings whose every shape fits one
    # small table (runtime/native.py), so on-the-fly decoding is a table read per group
    layout: str = "compact"
    rotate: bool | None = None  # None: rotate for the pvq methods, not for rtn/gptq (their published form)
    # calibration (gptq, pvq-gptq)
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 512
    damp: float = 0.01
    block_size: int = 128
    act_order: bool = False
    dense_dtype: str = "float16"  # embeddings, head and norms are stored in this dtype
    # per-layer settings by full layer name (spec_to_dict form), e.g. from allocation.plan
    overrides: dict | None = None
    # activations (actquant.py): the inputs of the quantized linears, per token; None keeps them in float
    abits: int | None = None
    act_method: str = "rtn"
    act_rotate: bool = True  # quantize them after the layer's input rotation

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits) and self.bits > 0):
            raise ValueError(f"--bits must be a positive number, got {self.bits!r}")
        if self.dense_dtype not in ("float16", "bfloat16", "float32"):
            raise ValueError(f"dense_dtype must be float16, bfloat16 or float32, got {self.dense_dtype!r}")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.overrides is not None:
            for name, d in self.overrides.items():
                try:
                    spec_from_dict(d)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"override for layer {name!r} is not a codec setting: {exc}") from None
        check_act_settings(self.abits, self.act_method)
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError("--nsamples must be >= 1 and --seqlen >= 2")

    @property
    def is_pvq(self) -> bool:
        return self.method.startswith("pvq")

    @property
    def uses_data(self) -> bool:
        return self.method.endswith("gptq")

    @property
    def rotates(self) -> bool:
        return self.is_pvq if self.rotate is None else bool(self.rotate)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})


def spec_to_dict(spec) -> dict:
    if isinstance(spec, PVQSpec):
        return {"codec": "pvq", "n": spec.n, "k": spec.k, "gain_levels": spec.gain_levels, "gain": spec.gain,
                "scale": spec.scale}
    return {"codec": "uniform", "bits": spec.bits, "group_size": spec.group_size}


def spec_from_dict(d: dict):
    if d.get("codec") == "pvq":
        return PVQSpec(int(d["n"]), int(d["k"]), int(d["gain_levels"]), d["gain"], d["scale"])
    if d.get("codec") == "uniform":
        return UniformSpec(int(d["bits"]), int(d["group_size"]))
    raise ValueError(f"unknown codec in layer settings: {d!r}")


@lru_cache(maxsize=256)
def _proxy_sqnr(spec: PVQSpec) -> float:
    """SQNR of a spec on a fixed i.i.d. Gaussian matrix: a data-free proxy for rotated weights."""
    from .codec.gainshape import fake_quantize

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
        spec = PVQSpec.for_code_bits(n, k, code_bits, gain=gain, scale=scale)
        if 2 <= spec.gain_levels <= 512 and spec.waste_bits_per_weight < 0.01:
            out.append(spec)
    return out


def choose_spec(cfg: QuantConfig, rows: int, cols: int):
    """The codec setting for a [rows, cols] layer that lands on cfg.bits without exceeding it by
    more than the unavoidable per-layer overhead. Raises ValueError if no setting reaches it."""
    seeds = 2 if cfg.rotates else 0
    if not cfg.is_pvq:
        b = int(math.floor(cfg.bits - 32 / cfg.group_size + 1e-9))
        if not 1 <= b <= 8:
            raise ValueError(f"--bits {cfg.bits}: no uniform grid with group size {cfg.group_size} reaches it "
                             f"(1..8 bits plus {32 / cfg.group_size:.3f} for scales)")
        return UniformSpec(b, cfg.group_size)
    fast = cfg.layout == "fast"
    if fast:
        from .runtime.limits import LUT_BYTES, full_table_fits
    dims = [cfg.group_dim] if cfg.group_dim else [n for n in (FAST_GROUP_DIMS if fast else PVQ_GROUP_DIMS) if cols % n == 0]
    if not dims or cols % dims[0]:
        raise ValueError(f"no PVQ group dimension divides the layer input size {cols} (tried {dims or PVQ_GROUP_DIMS})")
    best = None
    for n in dims:
        probe = bits_per_weight(PVQSpec(n, 1, 2, cfg.gain, cfg.scale), rows, cols, seeds)
        overhead = (probe.total - probe.codes) / (rows * cols)  # scales, codebook, seeds
        code_bits = int(math.floor(n * (cfg.bits - overhead) + 1e-6))
        # the last few thousandths (the fp16 scale, the seeds) may round a code up by one bit: allow it
        if (code_bits + 1) / n + overhead <= cfg.bits + 0.005:
            code_bits += 1
        for spec in pvq_candidates(n, code_bits, cfg.gain, cfg.scale):
            if fast and not full_table_fits(spec.n, spec.k):
                continue
            q = _proxy_sqnr(spec)
            if best is None or q > best[0]:
                best = (q, spec)
    if best is None:
        what = f", with a decode table of at most {LUT_BYTES} bytes (--layout fast)" if fast else ""
        raise ValueError(f"--bits {cfg.bits}: no PVQ setting (n in {dims}, codes of at most {MAX_WIDTH} bits{what}) reaches it")
    return best[1]
