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

from .config import FORMAT_VERSION, spec_from_dict
from .models.adapters import check_supported, set_module
from .nn import QuantLinear, check_decode, reserve_tables
from .runtime.dense import keep_stored

DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PVQFormatError(ValueError):
    """A pvq directory that cannot be read: one line saying which file and why."""


def save(model, tokenizer, out_dir: str | Path, overwrite: bool = False, extra_files: dict[str, bytes] | None = None) -> Path:
    """Write a quantized model (after api.quantize) to out_dir atomically (extra_files: name -> bytes, e.g. reports)."""
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
    qc = cfg.get("quantization_config")
    if not isinstance(qc, dict) or qc.get("quant_method") != "pvq":
        raise PVQFormatError(f"{f}: no pvq quantization_config (not a pvq directory)")
    v = qc.get("format_version")
    if not isinstance(v, int) or v > FORMAT_VERSION:
        raise PVQFormatError(f"{f}: format version {v!r} is newer than this pvq reads ({FORMAT_VERSION}); upgrade pvq")
    return cfg


def is_pvq_dir(path: str | Path) -> bool:
    return (Path(path) / "config.json").is_file() and (Path(path) / WEIGHTS).is_file()


def replace_linears(model, layers: dict, decode: str = "auto", weight_dtype: torch.dtype = torch.float32,
                    source: str = "config.json") -> None:
    """Swap the linears named in quantization_config["layers"] for empty QuantLinear modules to be filled."""
    for name, layer in layers.items():
        try:
            spec = spec_from_dict(layer)
            shape = tuple(int(s) for s in layer["shape"])
            old = model.get_submodule(name)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise PVQFormatError(f"{source}: quantization_config layer {name!r} is invalid ({exc})") from None
        if getattr(old, "weight", None) is not None and tuple(old.weight.shape) != shape:
            raise PVQFormatError(f"{source}: layer {name} has shape {list(shape)} but the model expects {list(old.weight.shape)}")
        bias = getattr(old, "bias", None) is not None
        set_module(model, name, QuantLinear(spec, shape, bias=bias, decode=decode, weight_dtype=weight_dtype))


def attach_activations(model, qc: dict, source: str = "config.json") -> None:
    """Quantize the linears' inputs as the stored settings say (abits, act_method, act_rotate)."""
    from .actquant import ActConfig, attach

    try:
        act = ActConfig.from_quant_config(qc.get("config") or {})
    except (TypeError, ValueError) as exc:
        raise PVQFormatError(f"{source}: invalid activation settings in quantization_config ({exc})") from None
    attach(model, act)


def finish_loading(model, qc: dict, source: str = "config.json") -> None:
    """What a loaded pvq model gets once its tensors are in (pvq.load and transformers' from_pretrained):
    its activation quantizers, the embeddings and head kept in the file's 16-bit dtype (exact, half the
    bytes; runtime/dense.py), and the kernel's shared tables sized for all its on-the-fly layers."""
    attach_activations(model, qc, source)
    keep_stored(model, DENSE_DTYPES.get((qc.get("config") or {}).get("dense_dtype")))
    reserve_tables(model)


def check_tensors(model, tensors: dict, layers: dict, source) -> None:
    """Every packed buffer present with the shape and dtype its spec implies (one clear line otherwise)."""
    for name in layers:
        q = model.get_submodule(name)
        for key, want in [*q.named_buffers(), *(("bias", q.bias),) * (q.bias is not None)]:
            t = tensors.get(f"{name}.{key}")
            if t is None:
                raise PVQFormatError(f"{source}: tensor {name}.{key} is missing")
            if tuple(t.shape) != tuple(want.shape) or t.dtype != want.dtype:
                raise PVQFormatError(f"{source}: tensor {name}.{key} is {t.dtype} {list(t.shape)}, "
                                     f"{q.spec.name} of {[q.out_features, q.in_features]} needs {want.dtype} {list(want.shape)}")


def load(path: str | Path, dtype: torch.dtype = torch.float32, decode: str = "auto",
         weight_dtype: torch.dtype | None = None):
    """Load a pvq directory: (model with QuantLinear layers, tokenizer or None if the directory has none).

    decode="once" decodes every quantized linear on first use and keeps it (in `weight_dtype`,
    default `dtype`); decode="on-the-fly" keeps only the packed codes resident (nn.py); "auto" is
    on-the-fly where the native kernel builds, else once. The embeddings
    and head stay in the file's 16-bit dtype and are widened where used (runtime/dense.py)."""
    check_decode(decode)
    weight_dtype = weight_dtype or dtype
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
    replace_linears(model, qc["layers"], decode, weight_dtype, str(p / "config.json"))
    check_tensors(model, tensors, qc["layers"], wf)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    tied = getattr(config, "tie_word_embeddings", False)
    # quantized layers got their tensors above; a tied head shares the embedding
    missing = [m for m in missing if m.rpartition(".")[0] not in qc["layers"] and not (tied and m == "lm_head.weight")]
    if missing:
        raise PVQFormatError(f"{wf}: tensors missing: {', '.join(missing[:5])}")
    if tied:
        model.tie_weights()
    model.config.quantization_config = qc
    finish_loading(model, qc, str(p / "config.json"))
    tokenizer = None
    if any((p / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p))
        except Exception as exc:  # a directory with broken tokenizer files is an error, not "no tokenizer"
            raise PVQFormatError(f"{p}: the tokenizer files cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    return model.to(dtype).eval(), tokenizer
