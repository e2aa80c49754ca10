"""Pure tensor math of the PVQ codec: no nn.Module, no model code.

- pyramid: count V(n, k), the Opus (CWRS) enumeration
- search: nearest-codeword search
- enumeration: fast split enumeration (the index format): encode/decode
- gain: Beta-law Lloyd-Max gain codebooks (and uniform / empirical ones to compare)
- gainshape: PVQ of a weight matrix (shape + gain fused into mixed-radix codes)
- uniform: round-to-nearest baseline (asymmetric, per group, fp16 scale and offset)
- bitpack: dense packing of fixed-width codes
- bits: exact bits-per-weight accounting
"""
from .bits import BitReport, bits_per_weight
from .gainshape import PackedPVQ, PVQSpec
from .enumeration import decode, encode
from .pyramid import INDEX_LIMIT, count, index_bits
from .search import search
from .uniform import PackedUniform, UniformSpec

__all__ = [
    "BitReport", "bits_per_weight", "PackedPVQ", "PVQSpec", "PackedUniform", "UniformSpec",
    "INDEX_LIMIT", "count", "decode", "encode", "index_bits", "search", "quantize",
]


def quantize(w, spec, fit: str = "minmax"):
    """Quantize a 2-D weight matrix with a PVQSpec or UniformSpec; returns its packed form. `fit`: how a
    uniform grid is fitted to each group (uniform.FITS)."""
    from . import gainshape, uniform

    if isinstance(spec, PVQSpec):
        return gainshape.quantize(w, spec)
    if isinstance(spec, UniformSpec):
        return uniform.quantize(w, spec, fit)
    raise ValueError(f"unknown quantizer spec {spec!r}; expected PVQSpec or UniformSpec")
