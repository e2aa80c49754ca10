"""The pvq directory format: config.json (with quantization_config), tokenizer, model.safetensors.

Quantized linears store only their packed codes, scales, any stored gain codebook and two rotation
seeds: `<layer>.codes` (uint8), `<layer>.scales` (fp16), `<layer>.offsets` (fp16, uniform grid),
`<layer>.gain_levels` (fp16, data-fitted PVQ gains only), `<layer>.seeds` (int64 [2]). Everything
else (embeddings, norms, head) is stored dense in the configured dtype. A directory is written
under a temporary name and renamed when complete, so an interrupted run leaves nothing that looks
finished. Building a runnable model from a directory is loader.py's job.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .modules.linear import QuantLinear
from .settings import DENSE_DTYPES, check_format_version, stored_config

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PVQFormatError(ValueError):
    """A pvq directory that cannot be read: one line saying which file and why."""


def save(model, tokenizer, out_dir: str | Path, overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a quantized model (after api.quantize) to out_dir atomically (extra_files: name -> bytes, e.g. reports)."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    qc = stored_config(getattr(model.config, "quantization_config", None))
    if qc is None:
        raise ValueError("save: the model has not been quantized by pvq (no pvq quantization_config)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty (pass overwrite / --force)")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dtype = DENSE_DTYPES[qc["config"]["dense_dtype"]]
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    tensors: dict[str, torch.Tensor] = {}
    seen = {}
    for key, t in model.state_dict().items():
        if key.rpartition(".")[0] in quant:  # packed buffers (and bias) are stored as they are
            tensors[key] = t.detach().contiguous().clone()
            continue
        if t.data_ptr() in seen:  # tied weights (lm_head = embed_tokens): store once
            continue
        seen[t.data_ptr()] = key
        tensors[key] = t.detach().to(dtype if t.is_floating_point() else t.dtype).contiguous()
    # one metadata key only: safetensors writes metadata in hash order, which would break
    # byte-identical files across runs (the format version lives in config.json)
    save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    (tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name, data in (extra_files or {}).items():
        (tmp / name).write_bytes(data)
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out


def read_config(path: str | Path) -> dict:
    p = Path(path)
    f = p / "config.json"
    if not p.is_dir():
        raise PVQFormatError(f"{p}: not a directory")
    if not f.is_file():
        raise PVQFormatError(f"{f}: missing (is {p} a pvq output directory?)")
    try:
        cfg = json.loads(f.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise PVQFormatError(f"{f}: not valid JSON ({exc})") from None
    qc = stored_config(cfg.get("quantization_config"))
    if qc is None:
        raise PVQFormatError(f"{f}: no pvq quantization_config (not a pvq directory)")
    try:
        check_format_version(qc.get("format_version"))
    except ValueError as exc:
        raise PVQFormatError(f"{f}: {exc}") from None
    return cfg


def read_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's model.safetensors (PVQFormatError for a missing or unreadable file)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wf = Path(path) / WEIGHTS
    if not wf.is_file():
        raise PVQFormatError(f"{wf}: missing")
    try:
        return load_file(str(wf))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PVQFormatError(f"{wf}: unreadable or truncated safetensors file ({str(exc).splitlines()[0]})") from None
