"""Assembling a runnable model from a pvq directory (pvq.load), and loading any model the CLI accepts.

The model is built from its config with empty QuantLinear modules where quantization_config lists a
quantized linear; the stored tensors fill them, each checked for presence, shape and dtype first.
transformers' from_pretrained (hf.py) uses the same swap and the same finishing steps.
"""
from __future__ import annotations

from pathlib import Path

import torch

from .checkpoint import (TOKENIZER_FILES, PVQFormatError, guard_name, missing_error, read_config, read_tensors,
                         scan_tensors)
from .errors import one_line
from .models.adapters import check_supported, set_module, weight_read_directly
from .models.classes import auto_class
from .models.loading import load_model
from .modules.actquant import attach
from .modules.dense import keep_stored
from .modules.embedding import HeadRows, QuantEmbedding, embedding_scale
from .modules.linear import QuantLinear, check_decode, reserve_tables
from .settings import DENSE_DTYPES, EMBED_FROM_HEAD, LAYER_KINDS, ActConfig, spec_from_dict
from .transforms.rotate import NO_SEED


def replace_linears(model, layers: dict, decode: str = "auto", weight_dtype: torch.dtype = torch.float32,
                    source: str = "config.json", gpu: bool = False) -> None:
    """Swap the linears named in quantization_config["layers"] for empty QuantLinear modules to be filled.
    gpu: the model goes to a GPU, where "auto" is on the fly for the PVQ settings the Triton kernels cover
    and once for the rest (their torch decoder would otherwise run on every forward)."""
    for name, layer in layers.items():
        try:
            spec = spec_from_dict(layer)
            shape = tuple(int(s) for s in layer["shape"])
            old = model.get_submodule(name)
        except (KeyError, ValueError, TypeError, AttributeError) as exc:
            raise PVQFormatError(f"{source}: quantization_config layer {name!r} is invalid ({exc})") from None
        if getattr(old, "weight", None) is not None and tuple(old.weight.shape) != shape:
            raise PVQFormatError(f"{source}: layer {name} has shape {list(shape)} but the model expects {list(old.weight.shape)}")
        kind = layer.get("kind")
        if kind is not None and kind not in LAYER_KINDS:
            raise PVQFormatError(f"{source}: quantization_config layer {name!r} has an unknown kind {kind!r}")
        expected = old if kind is None else (model.get_output_embeddings() if kind == "head"
                                              else model.get_input_embeddings())
        if expected is not old:
            raise PVQFormatError(f"{source}: quantization_config layer {name!r} is stored as the model's {kind}, "
                                 f"which this model has elsewhere")
        bias = getattr(old, "bias", None) is not None
        mode = decode
        if gpu and decode == "auto":
            from .runtime import gpu as kernels

            mode = "on-the-fly" if kernels.supports(spec) and kernels.available() else "once"
        q = (QuantEmbedding if kind == "embedding" else QuantLinear)(spec, shape, bias=bias, decode=mode,
                                                                     weight_dtype=weight_dtype)
        if kind == "embedding":  # its rows in the dtype the model is built in (from_pretrained(dtype=...))
            q.compute_dtype = model.dtype
            q.embed_scale = _checked_scale(layer, old, name, source)
        set_module(model, name, q)


def read_head_rows(model, qc: dict, source: str = "config.json") -> None:
    """Where the embedding reads the rows of the quantized head (embed_bits "head"), swap it for a HeadRows over
    the head's QuantLinear (after replace_linears)."""
    if (qc.get("config") or {}).get("embed_bits") != EMBED_FROM_HEAD:
        return
    head, emb = model.get_output_embeddings(), model.get_input_embeddings()
    entry = next((v for v in qc["layers"].values() if v.get("kind") == "head"), None)
    if not isinstance(head, QuantLinear) or entry is None or entry.get("seeds", [0, 0])[1] != NO_SEED:
        raise PVQFormatError(f"{source}: the embedding reads the rows of the quantized head, but no quantized head "
                             f"with an unrotated vocabulary side is listed")
    name = next(n for n, m in model.named_modules() if m is emb)
    # rows as the model is built (from_pretrained(dtype=...)), scaled as the family's embedding scales them
    set_module(model, name, HeadRows(head, model.dtype, _checked_scale(entry, emb, name, source)))


def _checked_scale(entry: dict, emb, name: str, source: str) -> float | None:
    """The factor the embedding `name` multiplies the rows of the table `entry` describes by: the family's own
    (embedding_scale of its module `emb`), which must be the one the file was written with."""
    want, stored = embedding_scale(emb), entry.get("embed_scale")
    if want != stored:
        raise PVQFormatError(f"{source}: the embedding {name} of this model scales its rows by {want}, but the file "
                             f"was quantized from one that scales them by {stored}")
    return want


def attach_activations(model, qc: dict, source: str = "config.json") -> None:
    """Quantize the linears' inputs as the stored settings say (abits, act_method, act_rotate)."""
    try:
        act = ActConfig.from_quant_config(qc.get("config") or {})
    except (TypeError, ValueError) as exc:
        raise PVQFormatError(f"{source}: invalid activation settings in quantization_config ({exc})") from None
    attach(model, act)


def finish_loading(model, qc: dict, source: str = "config.json") -> None:
    """What a loaded pvq model gets once its tensors are in (pvq.load and transformers' from_pretrained):
    its activation quantizers, the embeddings and head kept in the file's 16-bit dtype (exact, half the
    bytes; modules/dense.py), and the kernel's shared tables sized for all its on-the-fly layers."""
    attach_activations(model, qc, source)
    # a family that reads the head's weight itself casts the head's input to its dtype (Mamba): float32 there
    if not weight_read_directly(model, model.get_output_embeddings()):
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


def check_complete(model, names, source) -> None:
    """Every tensor the model holds is among the stored `names` (a tied head shares the embedding)."""
    tied = getattr(model.config, "tie_word_embeddings", False)
    missing = [k for k in model.state_dict() if k not in names and not (tied and k == "lm_head.weight")]
    if missing:
        raise missing_error(source, missing)


def check_directory(model, path: str | Path, layers: dict) -> None:
    """What transformers is about to read from `path` (its config, checksums, every tensor's presence, dtype
    and shape, the seeds), checked one tensor at a time against the model with its QuantLinear modules."""
    cfg = read_config(path)
    tensors = scan_tensors(path, cfg)
    check_tensors(model, tensors, layers, path)
    check_complete(model, tensors, path)


def load(path: str | Path, dtype: torch.dtype = torch.float32, decode: str = "auto",
         weight_dtype: torch.dtype | None = None, device: str | torch.device = "cpu", trust_remote_code: bool = False):
    """Load a pvq directory: (model with QuantLinear layers, tokenizer or None if the directory has none).

    decode="once" decodes every quantized linear on first use and keeps it (in `weight_dtype`,
    default `dtype`); decode="on-the-fly" keeps only the packed codes resident (modules/linear.py); "auto" is
    on-the-fly where the native kernel builds, else once. The embeddings
    and head stay in the file's 16-bit dtype and are widened where used (modules/dense.py).

    device="cuda" moves the model there; "auto" then decodes on the fly with the Triton kernels
    (runtime/gpu.py) the PVQ layers they cover where Triton imports, and once the others.

    trust_remote_code: a model whose code came with its checkpoint (the directory carries it) is built by it."""
    check_decode(decode)
    device = check_device(device)
    weight_dtype = weight_dtype or dtype
    from transformers import AutoConfig, AutoTokenizer, GenerationConfig
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    p = Path(path)
    cfg = read_config(p)
    tensors = read_tensors(p, cfg)
    qc = cfg.pop("quantization_config")
    model_type = cfg.pop("model_type", None)
    remote = "auto_map" in cfg and (trust_remote_code or model_type not in CONFIG_MAPPING)
    if remote and not trust_remote_code:
        raise PVQFormatError(f"{p / 'config.json'}: model_type {model_type!r} is built by the code the directory "
                             f"carries; pvq.load(..., trust_remote_code=True) or --trust-remote-code runs it")
    try:
        if remote:  # the directory's own configuration class reads its config.json
            config = AutoConfig.from_pretrained(str(p), trust_remote_code=True)
            config.__dict__.pop("quantization_config", None)  # set again below, once the model is built
        else:
            config = AutoConfig.for_model(model_type, **cfg)
    except Exception as exc:
        raise PVQFormatError(f"{p / 'config.json'}: cannot build a {model_type!r} config ({one_line(exc)})") from None
    model = auto_class(config).from_config(config, dtype=torch.float32, trust_remote_code=remote)
    check_supported(model)
    replace_linears(model, qc["layers"], decode, weight_dtype, str(p / "config.json"), gpu=device.type != "cpu")
    read_head_rows(model, qc, str(p / "config.json"))
    check_tensors(model, tensors, qc["layers"], p)
    check_complete(model, tensors, p)
    guards = {guard_name(n) for n in qc["layers"]}
    model.load_state_dict({k: v for k, v in tensors.items() if k not in guards}, strict=False)
    if getattr(config, "tie_word_embeddings", False):
        model.tie_weights()
    model.config.quantization_config = qc
    finish_loading(model, qc, str(p / "config.json"))
    if (p / "generation_config.json").is_file():  # the source's generation defaults (models.loading.RUN_FILES)
        try:
            model.generation_config = GenerationConfig.from_pretrained(str(p))
        except Exception as exc:
            raise PVQFormatError(f"{p / 'generation_config.json'}: cannot be read ({one_line(exc)})") from None
    tokenizer = None
    if any((p / f).is_file() for f in TOKENIZER_FILES):
        try:
            tokenizer = AutoTokenizer.from_pretrained(str(p), trust_remote_code=trust_remote_code)
        except Exception as exc:  # a directory with broken tokenizer files is an error, not "no tokenizer"
            raise PVQFormatError(f"{p}: the tokenizer files cannot be read ({one_line(exc)})") from None
    return model.to(device=device, dtype=dtype).eval(), tokenizer


def check_device(device) -> torch.device:
    """torch.device(device), or a one-line error for a name torch does not know or a GPU that is absent."""
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ValueError(f"device {device!r}: not a torch device ({one_line(exc)})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device!r}: this torch sees no CUDA GPU")
    return dev


def load_any(spec: str | None, decode: str = "auto", dtype: str = "float32", trust_remote_code: bool = False):
    """A pvq directory (through load) or anything models.loading.load_model accepts, as (model, tokenizer)."""
    dt = getattr(torch, dtype)
    path = Path(spec) if spec is not None else None
    if path is not None and path.is_dir() and (path / "config.json").is_file():
        try:
            read_config(path)
            is_pvq = True
        except PVQFormatError as exc:
            if "no pvq quantization_config" not in str(exc):
                raise
            is_pvq = False
        if is_pvq:
            model, tok = load(path, dt, decode=decode, trust_remote_code=trust_remote_code)
            if tok is None:
                raise ValueError(f"{spec}: no tokenizer files in the directory (save it with the tokenizer)")
            return model, tok
    model, tok = load_model(spec, trust_remote_code=trust_remote_code)
    return model.to(dt), tok
