"""Exact storage accounting: bits per weight that count every stored bit."""
from __future__ import annotations

from dataclasses import dataclass

SEED_BITS = 64  # one rotation seed (int64)


@dataclass(frozen=True)
class BitReport:
    """Stored bits of one [rows, cols] matrix, by kind, and the resulting bits per weight."""

    rows: int
    cols: int
    codes: int  # packed indices (and fused gain levels), byte-padded
    scales: int  # per-row / per-group fp16 scales and offsets
    codebook: int  # stored gain codebook, if any
    seeds: int  # rotation seeds
    waste_per_weight: float  # of the code bits: rounding log2(radix) up to whole bits

    @property
    def weights(self) -> int:
        return self.rows * self.cols

    @property
    def total(self) -> int:
        return self.codes + self.scales + self.codebook + self.seeds

    @property
    def bits_per_weight(self) -> float:
        return self.total / self.weights

    def as_dict(self) -> dict:
        return {
            "rows": self.rows, "cols": self.cols, "codes": self.codes, "scales": self.scales,
            "codebook": self.codebook, "seeds": self.seeds, "total_bits": self.total,
            "bits_per_weight": self.bits_per_weight, "waste_bits_per_weight": self.waste_per_weight,
        }


def bits_per_weight(spec, rows: int, cols: int, rotation_seeds: int = 0) -> BitReport:
    """Bit report for coding a [rows, cols] matrix with `spec` (a PVQSpec or UniformSpec).

    rotation_seeds: how many rotation seeds the matrix carries (2 for a matrix rotated on both
    sides, 0 for none); each is a 64-bit integer.
    """
    if rows < 1 or cols < 1:
        raise ValueError(f"matrix shape must be positive, got [{rows}, {cols}]")
    b = spec.bit_breakdown(rows, cols)
    return BitReport(rows, cols, b["codes"], b["scales"], b["codebook"], SEED_BITS * rotation_seeds,
                     spec.waste_bits_per_weight)
