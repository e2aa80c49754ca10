"""Resuming a killed run: the fingerprint of everything a run computes from, and the manifest of what it finished.

A run writes each finished block into its temporary directory (checkpoint.Writer) and then rewrites
`manifest.json` there, atomically: the fingerprint, the blocks done (their file, tensor checksums,
per-layer settings and errors) and, for calibrated methods, the file holding the activations at the
boundary after the last finished block (or one file per calibration shard, where Ray workers wrote
their shards' themselves). Rerunning the same command finds the directory of the dead
run; when the fingerprint is the same it continues from there, and the output is byte-identical to an
uninterrupted run, because every result depends only on the fingerprinted inputs and the block order.
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch

from .settings import FORMAT_VERSION

MANIFEST = "manifest.json"
_HEAD = 1 << 20  # bytes of each input file hashed: its header (safetensors, GGUF) and the first tensors


def _file_print(path: Path) -> dict:
    with open(path, "rb") as f:
        head = f.read(_HEAD)
    return {"name": path.name, "bytes": path.stat().st_size, "head_sha256": hashlib.sha256(head).hexdigest()}


def _input_files(source: Path) -> list[Path]:
    if source.is_file():
        return [source]
    return sorted(p for p in source.iterdir() if p.is_file() and p.suffix in (".safetensors", ".json", ".gguf", ".bin"))


def fingerprint(source: str | Path, settings: dict, calib: torch.Tensor | None) -> dict:
    """What a run's output depends on: the input files (name, size, hash of the first MiB), every setting,
    the calibration tokens, the stored format's version and the versions of pvq and torch (floating-point
    results may change between releases)."""
    from . import __version__

    src = Path(source)
    return {
        "inputs": [_file_print(p) for p in _input_files(src)],
        "settings": json.loads(json.dumps(settings, sort_keys=True, default=str)),
        "calibration_sha256": None if calib is None else hashlib.sha256(calib.contiguous().numpy().tobytes()).hexdigest(),
        "format_version": FORMAT_VERSION,
        "pvq": __version__,
        "torch": torch.__version__,
    }


def difference(a, b, where: str = "") -> str | None:
    """The first place where two fingerprints differ, said in a few words (None when they are equal)."""
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            d = difference(a.get(k), b.get(k), f"{where}.{k}" if where else str(k))
            if d:
                return d
        return None
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        for i, (x, y) in enumerate(zip(a, b)):
            d = difference(x, y, f"{where}[{i}]")
            if d:
                return d
        return None
    return None if a == b else f"{where}: {json.dumps(a)[:60]} then, {json.dumps(b)[:60]} now"


class Manifest:
    """The state of an unfinished run, kept in its temporary directory."""

    def __init__(self, folder: Path, fingerprint: dict | None, blocks: list | None = None,
                 activations: str | list[str] | None = None, tuned: dict | None = None):
        self.folder = Path(folder)
        self.fingerprint = fingerprint
        self.blocks = blocks or []
        self.activations = activations
        self.tuned = tuned  # the whole model's tuning, once done: {"file", "tensors" (checksums), "summary"}

    @classmethod
    def read(cls, folder: Path) -> "Manifest | None":
        try:
            d = json.loads((Path(folder) / MANIFEST).read_text())
            return cls(folder, d["fingerprint"], list(d["blocks"]), d.get("activations"), d.get("tuned"))
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def save(self) -> None:
        tmp = self.folder / (MANIFEST + ".part")
        state = {"fingerprint": self.fingerprint, "blocks": self.blocks, "activations": self.activations}
        if self.tuned is not None:
            state["tuned"] = self.tuned
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, self.folder / MANIFEST)

    @property
    def next_block(self) -> int:
        return len(self.blocks)
