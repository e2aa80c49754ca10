"""The pvq directory format: config.json (with quantization_config), tokenizer, model.safetensors.

Quantized linears store only their packed codes, scales, any stored gain codebook and two rotation
seeds: `<layer>.codes` (uint8), `<layer>.scales` (fp16), `<layer>.offsets` (fp16, uniform grid),
`<layer>.gain_levels` (fp16, data-fitted PVQ gains only), `<layer>.seeds` (int64 [2]). Everything
else (embeddings, norms, head) is stored dense in the configured dtype. A directory is written
under a temporary name and renamed when complete, so an interrupted run leaves nothing that looks
finished.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from .codec import PackedPVQ, PackedUniform, PVQSpec
from .codec.gain import beta_codebook
from .codec.gainshape import law_length
from .config import FORMAT_VERSION, spec_from_dict
from .models.adapters import check_supported, set_module
from .nn import QuantLinear

WEIGHTS = "model.safetensors"


class PVQFormatError(ValueError):
    """A pvq directory that cannot be read: one line saying which file and why."""


def _quant_tensors(name: str, q: QuantLinear) -> dict[str, torch.Tensor]:
    p = q.packed
    out = {f"{name}.codes": p.codes.contiguous(), f"{name}.seeds": torch.tensor(q.seeds, dtype=torch.int64)}
    if isinstance(p, PackedPVQ):
        out[f"{name}.scales"] = p.row_scale.half().contiguous()
        if p.spec.gain != "beta":
            out[f"{name}.gain_levels"] = p.gain_levels.half().contiguous()
    else:
        out[f"{name}.scales"] = p.scale.half().contiguous()
        out[f"{name}.offsets"] = p.offset.half().contiguous()
    return out


def save(model, tokenizer, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write a quantized model (after api.quantize) to out_dir atomically."""
    from safetensors.torch import save_file

    out = Path(out_dir)
    qc = getattr(model.config, "quantization_config", None)
    if not isinstance(qc, dict) or qc.get("quant_method") != "pvq":
        raise ValueError("save: the model has not been quantized by pvq (no pvq quantization_config)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"output directory {out} exists and is not empty (pass overwrite / --force)")
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    dtype = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}[qc["config"]["dense_dtype"]]
    tensors: dict[str, torch.Tensor] = {}
    quant = {n: m for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    for name, q in quant.items():
        tensors.update(_quant_tensors(name, q))
    seen = {}
    for key, t in model.state_dict().items():
        owner = key.rpartition(".")[0]
        if owner in quant and key.endswith(".bias"):
            tensors[key] = t.detach().float().contiguous()
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
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "pvq":
        raise PVQFormatError(f"{f}: no pvq quantization_config (not a pvq directory)")
    v = qc.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise PVQFormatError(f"{f}: format version {v!r} is newer than this pvq reads ({FORMAT_VERSION}); upgrade pvq")
    return cfg


def is_pvq_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / WEIGHTS).is_file()


def _packed(spec, shape, t: dict, name: str, cols_law: int):
    codes, scales = t[f"{name}.codes"], t[f"{name}.scales"]
    if isinstance(spec, PVQSpec):
        if spec.gain == "beta":
            levels = beta_codebook(spec.n, cols_law, spec.gain_levels)
        else:
            levels = t[f"{name}.gain_levels"].double()
        packed = PackedPVQ(spec, shape, codes, scales, levels)
    else:
        packed = PackedUniform(spec, shape, codes, scales, t[f"{name}.offsets"])
    want = spec.bit_breakdown(*shape)["codes"] // 8
    if codes.numel() != want:
        raise PVQFormatError(f"tensor {name}.codes has {codes.numel()} bytes, {spec.name} of {list(shape)} needs {want}")
    return packed


def load(path: str | Path, dtype: torch.dtype = torch.float32):
    """Load a pvq directory: (model with QuantLinear layers, tokenizer)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    p = Path(path)
    cfg = read_config(p)
    wf = p / WEIGHTS
    if not wf.is_file():
        raise PVQFormatError(f"{wf}: missing")
    try:
        tensors = load_file(str(wf))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise PVQFormatError(f"{wf}: unreadable or truncated safetensors file ({str(exc).splitlines()[0]})") from None
    qc = cfg.pop("quantization_config")
    model_type = cfg.pop("model_type", None)
    try:
        config = AutoConfig.for_model(model_type, **cfg)
    except Exception as exc:
        raise PVQFormatError(f"{p / 'config.json'}: cannot build a {model_type!r} config ({exc})") from None
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    check_supported(model)
    for name, layer in qc["layers"].items():
        try:
            spec = spec_from_dict(layer)
            shape = tuple(layer["shape"])
            law = law_length(spec, *shape) if isinstance(spec, PVQSpec) else 0
            packed = _packed(spec, shape, tensors, name, law)
            bias = tensors.get(f"{name}.bias")
            q = QuantLinear(packed, tuple(int(s) for s in tensors[f"{name}.seeds"].tolist()), bias)
        except KeyError as exc:
            raise PVQFormatError(f"{wf}: tensor {exc.args[0]} is missing") from None
        set_module(model, name, q)
    dense = {k: v for k, v in tensors.items() if k.rpartition(".")[0] not in qc["layers"]}
    missing, unexpected = model.load_state_dict(dense, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    # quantized layers got their tensors above; a tied head shares the embedding
    missing = [m for m in missing if m.rpartition(".")[0] not in qc["layers"] and not (tied and m == "lm_head.weight")]
    if missing:
        raise PVQFormatError(f"{wf}: tensors missing: {', '.join(missing[:5])}")
    if tied:
        model.tie_weights()
    model.config.quantization_config = qc
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(p))
    except Exception:
        tokenizer = None
    return model.to(dtype).eval(), tokenizer
