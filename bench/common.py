"""Helpers shared by the benchmarks: atomic writes, so an interrupted run never leaves a half file."""
from __future__ import annotations

import json
import os
from pathlib import Path


def write_json(path: Path, obj) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


def save_figure(fig, path: Path) -> None:
    tmp = path.with_name(path.stem + ".tmp" + path.suffix)
    fig.tight_layout()
    fig.savefig(tmp, dpi=120)
    os.replace(tmp, path)


def row_line(label: str, row: dict) -> str:
    """One measured quantization as the benchmarks print it while they run."""
    return (f"{label}: {row['bits_per_weight']:.4f} bpw, ppl {row['ppl']:.2f}, kl {row['kl']:.4f}, "
            f"top-1 {row['top1_agree']:.3f}, quantize {row['quantize_seconds']:.0f} s, "
            f"{row['quantize_peak_rss_mib']:.0f} MiB")
