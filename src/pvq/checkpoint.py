"""The pvq directory format: config.json (with quantization_config), tokenizer, model.safetensors.

Quantized linears store only their packed codes, scales, any stored gain codebook and two rotation
seeds: `<layer>.codes` (uint8), `<layer>.scales` (fp16), `<layer>.offsets` (fp16, uniform grid),
`<layer>.gain_levels` (fp16, data-fitted PVQ gains only), `<layer>.seeds` (int64 [2]), and an empty
`<layer>.weight` (uint8 [0]) so that a loader unaware of pvq fails instead of guessing. Everything
else (embeddings, norms, head) is stored dense in the configured dtype. A directory is written
under a temporary name (`OUT.tmp-PID`) and renamed when complete, so an interrupted run leaves
nothing that looks finished, and a failed write leaves nothing at all. Where it goes is checked before
any work (`prepare_output`): never a link, the input, the current directory or one above it; an
existing directory is replaced only if it is empty or a pvq output; the place must be writable with
room for the estimated size. Building a runnable model from a directory is loader.py's job.

Integrity: quantization_config["checksums"] holds a CRC-32 of every tensor (its dtype, shape and bytes),
of every other file written (tokenizer, reports) and of config.json itself (its JSON without this
entry). Every reader checks them (`verify`): a tensor missing, extra, of another dtype or shape, or
changed in place, and a changed config, are refused in one line. Directories written before checksums
existed carry none and are read without them. config.json is written last.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import zlib
from pathlib import Path

import torch

from .errors import one_line
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
        raise OutputError(f"output {out}: cannot write in {where} ({exc.strerror or one_line(exc)})") from None
    clean_stale(target)
    if nbytes is not None:
        check_space(target, nbytes)
    return target


def guard_name(layer: str) -> str:
    """The empty tensor stored under a quantized linear's `weight` name (see _tensors)."""
    return f"{layer}.weight"


def _tensors(model, qc: dict) -> dict[str, torch.Tensor]:
    dtype = DENSE_DTYPES[qc["config"]["dense_dtype"]]
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    # A loader that does not know pvq (transformers without `import pvq` skips an unknown quant_method)
    # would build plain linears and fill their missing weights at random: an empty tensor under each
    # weight's name makes that a size-mismatch error instead. It holds no bytes.
    tensors: dict[str, torch.Tensor] = {guard_name(n): torch.empty(0, dtype=torch.uint8) for n in sorted(quant)}
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


CHECKSUMS = "checksums"


def tensor_checksum(t: torch.Tensor) -> str:
    """CRC-32 of a tensor's dtype, shape and bytes (8 hex digits): what the file must give back."""
    crc = zlib.crc32(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    flat = t.detach().contiguous().reshape(-1)
    if flat.numel():
        crc = zlib.crc32(flat.view(torch.uint8).numpy(), crc)
    return f"{crc:08x}"


def file_checksum(path: Path) -> str:
    crc = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 24):
            crc = zlib.crc32(chunk, crc)
    return f"{crc:08x}"


def config_checksum(cfg: dict) -> str:
    """CRC-32 of a config.json's content without its checksums entry (canonical JSON: sorted keys)."""
    qc = {k: v for k, v in (cfg.get("quantization_config") or {}).items() if k != CHECKSUMS}
    text = json.dumps({**cfg, "quantization_config": qc}, sort_keys=True, separators=(",", ":"))
    return f"{zlib.crc32(text.encode()):08x}"


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
        if tokenizer is not None:
            tokenizer.save_pretrained(str(tmp))
        for name, data in (extra_files or {}).items():
            (tmp / name).write_bytes(data)
        cfg = model.config.to_dict()
        qc = {k: v for k, v in cfg["quantization_config"].items() if k != CHECKSUMS}
        cfg["quantization_config"] = qc
        qc[CHECKSUMS] = {"tensors": {k: tensor_checksum(t) for k, t in sorted(tensors.items())},
                         "files": {f.name: file_checksum(f) for f in sorted(tmp.iterdir())
                                   if f.is_file() and f.name != WEIGHTS},
                         "config": config_checksum(cfg)}
        (tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
        _replace(tmp, target)
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        if not isinstance(exc, Exception):  # KeyboardInterrupt and the like: cleaned up, passed on
            raise
        raise WriteError(f"writing {out_dir} failed, nothing was written ({one_line(exc)})") from None
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
    _checksums(cfg, f)
    return cfg


def _checksums(cfg: dict, source) -> dict | None:
    sums = cfg["quantization_config"].get(CHECKSUMS)
    if sums is None:
        return None
    if not (isinstance(sums, dict) and isinstance(sums.get("tensors"), dict) and isinstance(sums.get("files", {}), dict)):
        raise PVQFormatError(f"{source}: quantization_config checksums are malformed")
    if sums.get("config") != config_checksum(cfg):
        raise PVQFormatError(f"{source}: checksum mismatch: config.json was changed after pvq wrote it")
    return sums


def verify(path: str | Path, cfg: dict, tensors, keep=None) -> dict[str, torch.Tensor]:
    """Check (name, tensor) pairs read from a directory against its config: the checksums where it has
    them, and every layer's stored seeds against the seeds its config lists. Returns {name: keep(name,
    tensor)} (the tensor itself by default)."""
    p = Path(path)
    sums = _checksums(cfg, p / "config.json")
    want = None if sums is None else sums["tensors"]
    out = {}
    for name, t in tensors:
        if want is not None:
            if name not in want:
                raise PVQFormatError(f"{p / WEIGHTS}: unexpected tensor {name} (not in the checksums pvq wrote)")
            if tensor_checksum(t) != want[name]:
                raise PVQFormatError(f"{p / WEIGHTS}: tensor {name} ({str(t.dtype).removeprefix('torch.')} "
                                     f"{list(t.shape)}): checksum mismatch, the file is damaged or was changed")
        out[name] = t if keep is None else keep(name, t)
    if want is not None and (missing := sorted(set(want) - set(out))):
        raise PVQFormatError(f"{p / WEIGHTS}: tensor {missing[0]} is missing" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    for name, f in sorted(((sums or {}).get("files") or {}).items()):
        fp = p / name
        if fp.is_file() and file_checksum(fp) != f:  # one removed (a tokenizer, a report) leaves the model as it was
            raise PVQFormatError(f"{fp}: checksum mismatch, the file is damaged or was changed")
    for name, layer in (cfg["quantization_config"].get("layers") or {}).items():
        t, listed = out.get(f"{name}.seeds"), layer.get("seeds") if isinstance(layer, dict) else None
        if t is not None and listed is not None and [int(v) for v in t.reshape(-1).tolist()] != listed:
            raise PVQFormatError(f"{p / WEIGHTS}: tensor {name}.seeds {t.tolist()} differs from the seeds "
                                 f"config.json lists for the layer ({listed})")
    return out


def _safetensors_error(wf: Path, exc: BaseException) -> PVQFormatError:
    return PVQFormatError(f"{wf}: unreadable or truncated safetensors file ({one_line(exc)})")


def read_tensors(path: str | Path, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a directory's model.safetensors (PVQFormatError for a missing or unreadable file),
    checked against `cfg` (its config.json, read_config) by `verify` when given."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    wf = Path(path) / WEIGHTS
    if not wf.is_file():
        raise PVQFormatError(f"{wf}: missing")
    try:
        tensors = load_file(str(wf))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise _safetensors_error(wf, exc) from None
    return tensors if cfg is None else verify(path, cfg, tensors.items())


def scan_tensors(path: str | Path, cfg: dict) -> dict[str, torch.Tensor]:
    """`verify` a directory reading one tensor at a time (memory: the largest tensor), without keeping
    them: returns each tensor's dtype and shape (on the meta device), and the stored seeds themselves."""
    from safetensors import SafetensorError, safe_open

    wf = Path(path) / WEIGHTS
    if not wf.is_file():
        raise PVQFormatError(f"{wf}: missing")

    def keep(name, t):  # the seeds are compared with the config; of the rest only dtype and shape are used
        return t if name.endswith(".seeds") else torch.empty(t.shape, dtype=t.dtype, device="meta")

    try:
        with safe_open(str(wf), framework="pt") as f:
            return verify(path, cfg, ((n, f.get_tensor(n)) for n in f.keys()), keep)
    except (SafetensorError, OSError, RuntimeError) as exc:
        raise _safetensors_error(wf, exc) from None
