"""Calibration activations in files instead of memory, for models whose activations would not fit.

Block-by-block calibration holds one block's inputs and outputs, each [samples, tokens, hidden] in
float32: 2 GiB each for 128 x 512 tokens of an 8192-wide model. With an offload folder both live in
two memory-mapped files there (the block's inputs, and its outputs written batch by batch), which the
operating system pages in and out as the block runs, so they cost page cache, not committed memory.
The values and so the quantized files are the same either way.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import torch

# offload without being asked when both copies would take more than this share of the available memory
AUTO_SHARE = 0.25


def activation_bytes(samples: int, tokens: int, hidden: int) -> int:
    """Bytes of one copy of the calibration activations (float32)."""
    return 4 * samples * tokens * hidden


def available_bytes() -> int | None:
    """MemAvailable of /proc/meminfo (None where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def needs_offload(samples: int, tokens: int, hidden: int) -> bool:
    """Whether an input and an output copy of the activations would take more than AUTO_SHARE of the memory
    available now."""
    avail = available_bytes()
    return avail is not None and 2 * activation_bytes(samples, tokens, hidden) > AUTO_SHARE * avail


class ActivationFiles:
    """Two memory-mapped files in the folder `name` inside `parent` (made anew, so what a killed run left
    there goes; removed by `close`): `hold(t)` copies t into one and returns it as a tensor; `empty_like(t)`
    gives the other, for the next block's outputs; they alternate. `reference`: another such pair."""

    def __init__(self, parent: str | Path, name: str):
        self.folder = Path(parent) / name
        try:
            shutil.rmtree(self.folder, ignore_errors=True)
            self.folder.mkdir(parents=True)
        except OSError as exc:
            raise ValueError(f"--offload {parent}: cannot make a folder there ({exc.strerror or exc})") from None
        self._turn = 0
        self._reference: "ActivationFiles | None" = None

    @property
    def reference(self) -> "ActivationFiles":
        """Two more files, in a folder inside this one, for the unquantized model's stream (--asymmetric)."""
        if self._reference is None:
            self._reference = ActivationFiles(self.folder, "reference")
        return self._reference

    def empty_like(self, t: torch.Tensor) -> torch.Tensor:
        path = self.folder / f"activations-{self._turn}.bin"
        self._turn ^= 1
        numel = t.numel()
        try:
            with open(path, "ab") as f:  # never shortened: a mapping of it that is still alive stays valid
                f.truncate(t.element_size() * numel)
        except OSError as exc:
            raise ValueError(f"--offload: cannot write {path} ({exc.strerror or exc})") from None
        return torch.from_file(str(path), shared=True, size=numel, dtype=t.dtype).reshape(t.shape)

    def hold(self, t: torch.Tensor) -> torch.Tensor:
        out = self.empty_like(t)
        out.copy_(t)
        return out

    def close(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def __enter__(self) -> "ActivationFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def pick_folder(offload: str | None, output: str | Path, samples: int, tokens: int, hidden: int) -> Path | None:
    """The folder activations go to: --offload, else beside the output when they would not fit in memory
    (needs_offload), else None (memory)."""
    if offload is not None:
        return Path(offload)
    if needs_offload(samples, tokens, hidden):
        return Path(os.fspath(output)).expanduser().resolve().parent
    return None


def folder_name(output: str | Path) -> str:
    """The activations folder of a run writing `output`: one name per output, so a rerun clears a killed
    run's files."""
    return f".{Path(os.fspath(output)).expanduser().resolve().name}.pvq-activations"
