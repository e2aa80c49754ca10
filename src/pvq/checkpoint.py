"""The pvq directory format: config.json (with quantization_config), tokenizer, model.safetensors.

Quantized linears store only their packed codes, scales, any stored gain codebook and two rotation
seeds: `<layer>.codes` (uint8), `<layer>.scales` (fp16), `<layer>.offsets` (fp16, uniform grid),
`<layer>.gain_levels` (fp16, data-fitted PVQ gains only), `<layer>.seeds` (int64 [2]). Everything
else (embeddings, norms, head) is stored dense in the configured dtype. A directory is written
under a temporary name (`OUT.tmp-PID`) and renamed when complete, so an interrupted run leaves
nothing that looks finished, and a failed write leaves nothing at all. Where it goes is checked before
any work (`prepare_output`): never a link, the input, the current directory or one above it; an
existing directory is replaced only if it is empty or a pvq output; the place must be writable with
room for the estimated size. Building a runnable model from a directory is loader.py's job.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

import torch

from .modules.linear import QuantLinear
from .settings import DENSE_DTYPES, check_format_version, stored_config

WEIGHTS = "model.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


class PVQFormatError(ValueError):
    """A pvq directory that cannot be read: one line saying which file and why."""


class OutputError(ValueError):
    """An output location pvq refuses to write (or replace), found before any work: one line saying why."""


class WriteError(OSError):
    """Writing a directory failed (disk full, ...); nothing is left of it: one line saying why."""


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__


def is_pvq_output(path: Path) -> bool:
    """Whether `path` holds a config.json with a pvq quantization_config (of any format version)."""
    try:
        cfg = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(cfg, dict) and stored_config(cfg.get("quantization_config")) is not None


_TMP = re.compile(r"\.tmp-(\d+)(?:\.old)?")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    except (OverflowError, ValueError):
        return False
    return True


def clean_stale(target: Path) -> list[Path]:
    """Remove the temporary directories (`NAME.tmp-PID`, `NAME.tmp-PID.old`) left next to `target` by runs
    whose process no longer exists; returns what was removed."""
    removed = []
    if not target.parent.is_dir():
        return removed
    for p in target.parent.iterdir():
        if not p.name.startswith(target.name):
            continue
        m = _TMP.fullmatch(p.name[len(target.name):])
        if m is None or int(m.group(1)) == os.getpid() or p.is_symlink() or not p.is_dir() or _alive(int(m.group(1))):
            continue
        shutil.rmtree(p, ignore_errors=True)
        removed.append(p)
    return removed


def _existing_ancestor(p: Path) -> Path:
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_space(out: str | Path, nbytes: int) -> None:
    """Refuse (OutputError) when the file system of `out` has less free space than `nbytes` and a margin."""
    where = _existing_ancestor(Path(out).resolve().parent)
    free = shutil.disk_usage(where).free
    need = int(nbytes * 1.05) + (8 << 20)  # tokenizer, config and reports on top
    if free < need:
        raise OutputError(f"not enough free space for {out}: it needs about {need / 2**20:.1f} MiB, "
                          f"{where} has {free / 2**20:.1f} MiB free")


def prepare_output(out: str | Path, force: bool = False, sources=(), nbytes: int | None = None) -> Path:
    """Check where a directory will be written, before any work; returns its absolute path.

    Refused (OutputError, or FileExistsError without `force`): a symbolic link; something that is not a
    directory; the current directory or one above it; an input (`sources`: the model's path) or a
    directory holding one; a non-empty directory without `force`, and with it one that is not a pvq
    output; a location that cannot be written; too little free space for `nbytes`. Temporary
    directories of this output left by runs that died are removed (clean_stale)."""
    given = Path(out)
    if str(out) == "":
        raise OutputError("the output path is empty")
    if given.is_symlink():
        link = os.readlink(given)
        raise OutputError(f"output {out} is a symbolic link (to {link}{', which does not exist' if not given.exists() else ''}); "
                          f"pvq writes a real directory: name the directory itself or remove the link")
    target = given.resolve()
    if target == target.parent:
        raise OutputError(f"output {out} is the root directory")
    if target.exists():
        if not target.is_dir():
            raise OutputError(f"output {out} exists and is not a directory")
        cwd = Path.cwd().resolve()
        if target == cwd or target in cwd.parents:
            raise OutputError(f"output {out} is the current directory or one above it; pvq will not replace it")
        for src in sources:
            s = Path(src).expanduser()
            if not s.exists():
                continue
            s = s.resolve()
            if s == target or target in s.parents:
                what = "is the input model" if s == target else f"holds the input model {src}"
                raise OutputError(f"output {out} {what}; pvq will not replace it: choose another -o")
        if any(target.iterdir()):
            if not force:
                raise FileExistsError(f"output directory {out} exists and is not empty (use --force to replace it)")
            if not is_pvq_output(target):
                raise OutputError(f"output {out} is not empty and not a pvq output directory; --force only replaces "
                                  f"one (or an empty directory): choose another -o")
    where = _existing_ancestor(target.parent)
    if not where.is_dir():
        raise OutputError(f"output {out}: {where} is not a directory")
    try:  # the temporary directory goes next to the output: can we create one there?
        os.rmdir(tempfile.mkdtemp(prefix=f".{target.name}.probe-", dir=where))
    except OSError as exc:
        raise OutputError(f"output {out}: cannot write in {where} ({exc.strerror or _one_line(exc)})") from None
    clean_stale(target)
    if nbytes is not None:
        check_space(target, nbytes)
    return target


def _tensors(model, qc: dict) -> dict[str, torch.Tensor]:
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
    return tensors


def _replace(tmp: Path, target: Path) -> None:
    """Put the finished `tmp` at `target`; an old output there is moved aside first and removed last."""
    old = None
    if target.exists():
        old = target.with_name(f"{tmp.name}.old")
        os.replace(target, old)
    try:
        os.replace(tmp, target)
    except BaseException:
        if old is not None:
            os.replace(old, target)
        raise
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def save(model, tokenizer, out_dir: str | Path, overwrite: bool = False, extra_files: dict[str, bytes] | None = None,
         sources=()) -> Path:
    """Write a quantized model (after api.quantize) to out_dir atomically (extra_files: name -> bytes, e.g. reports).

    The location is checked first (prepare_output; `sources`: the input model's path, never replaced). A
    failure while writing removes the temporary directory and raises WriteError naming the cause."""
    from safetensors.torch import save_file

    qc = stored_config(getattr(model.config, "quantization_config", None))
    if qc is None:
        raise ValueError("save: the model has not been quantized by pvq (no pvq quantization_config)")
    tensors = _tensors(model, qc)
    target = prepare_output(out_dir, overwrite, sources, sum(t.numel() * t.element_size() for t in tensors.values()))
    tmp = target.with_name(f"{target.name}.tmp-{os.getpid()}")
    if tmp.is_symlink() or tmp.is_file():
        tmp.unlink()
    elif tmp.exists():
        shutil.rmtree(tmp)
    try:
        tmp.mkdir(parents=True)
        # one metadata key only: safetensors writes metadata in hash order, which would break
        # byte-identical files across runs (the format version lives in config.json)
        save_file(tensors, str(tmp / WEIGHTS), metadata={"format": "pt"})
        cfg = model.config.to_dict()
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        _replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):  # KeyboardInterrupt and the like: cleaned up, passed on
            raise
        raise WriteError(f"writing {out_dir} failed, nothing was written ({_one_line(exc)})") from None
    return Path(out_dir)


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
