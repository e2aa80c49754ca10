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
import warnings
import zlib
from pathlib import Path
from typing import Callable

import torch

from . import tensorfile
from .errors import one_line
from .models.adapters import join_carried
from .models.tokenizer_files import save_tokenizer
from .modules.linear import QuantLinear
from .resume import MANIFEST, Manifest, difference
from .settings import DENSE_DTYPES, check_format_version, stored_config

WEIGHTS = "model.safetensors"
INDEX = "model.safetensors.index.json"
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
    whose process no longer exists, except resumable ones (`unfinished`); returns what was removed."""
    removed = []
    for p in _dead_runs(target):
        if not (p / MANIFEST).is_file():  # one with a manifest can be resumed: the Writer decides
            shutil.rmtree(p, ignore_errors=True)
            removed.append(p)
    return removed


_HELD: set[Path] = set()  # the temporary directories this process's Writers work in


def _dead_runs(target: Path) -> list[Path]:
    """The temporary directories next to `target` whose process no longer exists, or that this process left (an
    interrupted call before: no Writer of it holds them)."""
    out = []
    for p in sorted(target.parent.iterdir()) if target.parent.is_dir() else ():
        m = _TMP.fullmatch(p.name[len(target.name):]) if p.name.startswith(target.name) else None
        if m is None or p.is_symlink() or not p.is_dir():
            continue
        pid = int(m.group(1))
        working = p in _HELD if pid == os.getpid() else _alive(pid)
        if not working:
            out.append(p)
    return out


def unfinished(target: Path) -> list[Path]:
    """Directories of runs of `target` that died before finishing and kept a manifest (resumable)."""
    return [p for p in _dead_runs(target) if (p / MANIFEST).is_file()]


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


def stored_tensors(model, dense_dtype: torch.dtype, prefix: str = "",
                   wanted: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """The tensors a directory stores for `model` (only those whose names start with `prefix`, and only
    those `wanted(name)` where given): a quantized linear's buffers (and bias) and the model's other
    buffers as they are, every other tensor in `dense_dtype`, a tied one once. Tensors on the meta device
    (a streamed block already written) are left out."""
    quant = {n for n, m in model.named_modules() if isinstance(m, QuantLinear) and n.startswith(prefix)}
    # A loader that does not know pvq (transformers without `import pvq` skips an unknown quant_method)
    # would build plain linears and fill their missing weights at random: an empty tensor under each
    # weight's name makes that a size-mismatch error instead. It holds no bytes.
    tensors: dict[str, torch.Tensor] = {guard_name(n): torch.empty(0, dtype=torch.uint8) for n in sorted(quant)
                                        if any(b.device.type != "meta" for b in model.get_submodule(n).buffers())
                                        and (wanted is None or wanted(guard_name(n)))}
    seen = {}
    # a family's persistent float buffers (MiniMax's attention decay tables) are constants computed in
    # their own dtype, not weights: stored as they are, so the loaded model is the quantized one exactly
    buffers = {name for name, _ in model.named_buffers(remove_duplicate=False)}
    for key, t in model.state_dict().items():
        if not key.startswith(prefix) or t.device.type == "meta" or (wanted is not None and not wanted(key)):
            continue
        if key.rpartition(".")[0] in quant:  # packed buffers (and bias) are stored as they are
            tensors[key] = t.detach().contiguous().clone()
            continue
        if t.data_ptr() in seen:  # tied weights (lm_head = embed_tokens): store once
            continue
        seen[t.data_ptr()] = key
        keep = key in buffers or not t.is_floating_point()
        tensors[key] = t.detach().to(t.dtype if keep else dense_dtype).contiguous()
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


def tensor_checksum(t) -> str:
    """CRC-32 of a tensor's dtype, shape and bytes (8 hex digits): what the file must give back. `t` is a
    tensor, or one still in a file (tensorfile.Entry, read in chunks)."""
    crc = zlib.crc32(f"{str(t.dtype).removeprefix('torch.')}{list(t.shape)}".encode())
    if isinstance(t, tensorfile.Entry):
        for data in t.chunks():
            crc = zlib.crc32(data, crc)
        return f"{crc:08x}"
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


DEFAULT_SHARD_BYTES = 2 << 30
SHARD = "model-{:05d}-of-{:05d}.safetensors"
_BLOCK = "block-{:05d}.safetensors"
_ACTIVATIONS = "activations-{:05d}.safetensors"
_SHARD_ACTIVATIONS = "activations-{:05d}-{:04d}.safetensors"
_TUNED = "tuned-model.safetensors"


def _save_atomic(tensors: dict, path: Path) -> None:
    part = path.with_name(path.name + ".part")
    # the bytes safetensors' save_file writes (one metadata key: the library writes metadata in hash
    # order, which would break byte-identical files), one tensor at a time
    tensorfile.write(part, tensors, metadata={"format": "pt"})
    os.replace(part, path)


def save_activations(hidden: torch.Tensor, path: Path, carried: dict | None = None) -> None:
    """The calibration activations at a block boundary (or one shard's), whole or not at all, with what the
    blocks before it carry to later ones (carried: {(argument, key): a tensor or a tuple of them, per sample},
    adapters.carry) as tensors named carried/ARGUMENT/KEY[/ITEM], and what the last hands the next
    (key None) as handed/ARGUMENT[/ITEM] (handed/ARGUMENT/none: None)."""
    tensors = {"hidden": hidden.cpu().contiguous()}
    for (arg, key), value in (carried or {}).items():
        if not all(isinstance(n, str) and n and "/" not in n for n in (arg, "-" if key is None else key)):
            raise ValueError(f"state {key!r} of argument {arg!r} cannot be named in an activations file")
        name = f"handed/{arg}" if key is None else f"carried/{arg}/{key}"  # key None: the next block's argument
        items = ({"/none": torch.empty(0)} if value is None else {f"/{i}": v for i, v in enumerate(value)}
                 if isinstance(value, (tuple, list)) else {"": value})
        tensors.update({name + k: v.cpu().contiguous() for k, v in items.items()})
    _save_atomic(tensors, path)


def _carried(entries: dict) -> dict:
    """What save_activations stored as carried: {(argument, key or None): a tensor, a tuple of them, or None}."""
    out: dict = {}
    for name in sorted(entries, key=lambda n: [(0, int(p), "") if p.isdigit() else (1, 0, p) for p in n.split("/")]):
        parts = name.split("/")
        if parts[0] not in ("carried", "handed"):
            continue
        where, rest = ((parts[1], parts[2]), parts[3:]) if parts[0] == "carried" else ((parts[1], None), parts[2:])
        if rest == ["none"]:
            out[where] = None
        elif rest:
            out[where] = out.get(where, ()) + (entries[name].read(),)
        else:
            out[where] = entries[name].read()
    return out


def _files(activations) -> list[str]:
    """The manifest's activation files: none, one name, or a list of shard files."""
    return [] if activations is None else [activations] if isinstance(activations, str) else list(activations)


def _nbytes(tensors: dict) -> int:
    return sum(t.nbytes if isinstance(t, tensorfile.Entry) else t.numel() * t.element_size() for t in tensors.values())



class Writer:
    """Writes a pvq directory as the work goes, resumably. Each finished block (`add_block`) goes to its own
    file in `OUT.tmp-PID` at once, with resume.Manifest saying what is done; `finish` assembles the files
    (one `model.safetensors`, or Hugging Face shards of about `shard_bytes` with an index, cut between
    blocks), adds the tokenizer, reports and config.json (last, with the checksums) and renames the
    directory into place. Leaving the `with` block on an error removes it; on an interruption (Ctrl-C) of a
    resumable run it stays, as a killed run's does, for the same command to continue.

    With a `fingerprint` (resume.fingerprint) the directory of a run of this output that died is taken
    over when its fingerprint is the same, and the work continues after its last finished block; one of
    other inputs is refused (OutputError saying what differs) unless `overwrite`, which discards it."""

    def __init__(self, out_dir: str | Path, overwrite: bool = False, sources=(), nbytes: int | None = None,
                 shard_bytes: int = DEFAULT_SHARD_BYTES, fingerprint: dict | None = None):
        self.out_dir = Path(out_dir)
        self.target = prepare_output(out_dir, overwrite, sources, nbytes)
        self.tmp = self.target.with_name(f"{self.target.name}.tmp-{os.getpid()}")
        self.shard_bytes = int(shard_bytes)
        self.rest: dict[str, torch.Tensor] = {}
        if self.tmp.is_symlink() or self.tmp.is_file():
            self.tmp.unlink()
        old = self._take_over(fingerprint, overwrite)  # this process's own too (an interrupted call before)
        if old is None:
            self._guard(lambda: self.tmp.mkdir(parents=True))
        self.manifest = old or Manifest(self.tmp, fingerprint)
        _HELD.add(self.tmp)
        self._guard(self.manifest.save)

    def _take_over(self, fingerprint, overwrite: bool) -> "Manifest | None":
        for old in unfinished(self.target):
            m = Manifest.read(old)
            same = fingerprint is not None and m is not None and m.fingerprint == fingerprint
            if same:
                os.replace(old, self.tmp)
                m.folder = self.tmp
                self._tidy(keep={b["file"] for b in m.blocks} | set(_files(m.activations))
                           | ({m.tuned["file"]} if m.tuned else set()))
                return m
            if m is None or m.fingerprint is None or overwrite:
                shutil.rmtree(old, ignore_errors=True)
                continue
            raise OutputError(f"{old} holds an unfinished run of {self.out_dir} from other inputs "
                              f"({difference(m.fingerprint, fingerprint)}); rerun that command to finish it, "
                              f"or add --force to start over")
        return None

    def __enter__(self) -> "Writer":
        return self

    def __exit__(self, kind, exc, tb) -> None:
        _HELD.discard(self.tmp)
        if exc is not None and not self.keeps(exc):
            self.abort()

    def keeps(self, exc: BaseException) -> bool:
        """Whether `exc` leaves the work in place: an interruption (Ctrl-C) of a run the same command resumes
        (one with a fingerprint), whose finished blocks the next run takes over (files are written beside and
        renamed, so none is half-written)."""
        manifest = getattr(self, "manifest", None)
        return isinstance(exc, KeyboardInterrupt) and manifest is not None and manifest.fingerprint is not None

    def abort(self) -> None:
        shutil.rmtree(self.tmp, ignore_errors=True)

    def _guard(self, step):
        try:
            return step()
        except BaseException as exc:
            if not self.keeps(exc):
                self.abort()
            if not isinstance(exc, Exception):  # KeyboardInterrupt and the like: passed on
                raise
            raise WriteError(f"writing {self.out_dir} failed, nothing was written ({one_line(exc)})") from None

    def resumed(self) -> tuple[int, dict, dict, torch.Tensor | None]:
        """(first block still to do, per-layer entries and errors of the blocks done, the activations after
        the last block done or None): what an interrupted run had finished."""
        layers, errors = {}, {}
        for b in self.manifest.blocks:
            layers.update(b["layers"])
            errors.update(b["errors"])
        files = _files(self.manifest.activations)
        hidden = torch.cat([tensorfile.entries(self.tmp / f)["hidden"].read() for f in files]) if files else None
        return self.manifest.next_block, layers, errors, hidden

    def carried(self) -> dict:
        """What the blocks done carry to later ones, as the last activations files hold it (save_activations;
        a run on workers writes each shard's beside its activations), in sample order; {} where none."""
        parts = [_carried(tensorfile.entries(self.tmp / f)) for f in _files(self.manifest.activations)]
        return join_carried(parts) if parts else {}

    def add_block(self, index: int, tensors: dict[str, torch.Tensor], layers: dict, errors: dict,
                  activations: "torch.Tensor | list[str] | None" = None, carried: dict | None = None) -> None:
        """Write block `index`'s stored tensors (and the activations after it) and record it as done.
        `activations`: the tensor, or the names of the files (shard_activations) already holding it in
        sample order; `carried`: what the blocks so far carry to later ones, saved with the tensor
        (save_activations)."""
        if index != self.manifest.next_block:
            raise ValueError(f"block {index} written out of order (block {self.manifest.next_block} is next)")
        file, act = _BLOCK.format(index), None
        self._guard(lambda: _save_atomic(tensors, self.tmp / file))
        if isinstance(activations, list):
            missing = [f for f in activations if not (self.tmp / f).is_file()]
            if missing:
                raise ValueError(f"block {index}: activation files {missing} are not in {self.tmp}")
            act = activations
        elif activations is not None:
            act = _ACTIVATIONS.format(index + 1)
            self._guard(lambda: save_activations(activations, self.tmp / act, carried))
        previous = _files(self.manifest.activations)
        self.manifest.blocks.append({"index": index, "file": file, "bytes": _nbytes(tensors),
                                     "tensors": {k: tensor_checksum(t) for k, t in sorted(tensors.items())},
                                     "layers": layers, "errors": errors})
        self.manifest.activations = act
        self._guard(self.manifest.save)
        for f in set(previous) - set(_files(act)):
            (self.tmp / f).unlink(missing_ok=True)

    def block_tensors(self, index: int) -> dict[str, torch.Tensor]:
        """The tensors block `index` was written with (a resumed run that tunes the whole model needs every
        block back in memory)."""
        b = self.manifest.blocks[index]
        return {k: e.read() for k, e in tensorfile.entries(self.tmp / b["file"]).items()}

    def add_tuned(self, tensors: dict[str, torch.Tensor], summary: dict) -> None:
        """Record the whole model's tuning (--finetune model): the tensors it changed, which replace those of
        the block files and of the rest when the directory is assembled, and its summary. One file, written
        before the manifest names it: a run killed while tuning tunes again from the same state."""
        if self.manifest.tuned is not None:
            raise ValueError("the model's tuning is already recorded")
        self._guard(lambda: _save_atomic(tensors, self.tmp / _TUNED))
        self.manifest.tuned = {"file": _TUNED, "tensors": {k: tensor_checksum(t) for k, t in sorted(tensors.items())},
                               "summary": summary}
        self._guard(self.manifest.save)

    def tuned(self) -> dict | None:
        """The summary of the whole model's tuning where a run recorded it (add_tuned), else None."""
        return None if self.manifest.tuned is None else self.manifest.tuned["summary"]

    def _tuned_tensors(self) -> dict:
        return {} if self.manifest.tuned is None else dict(tensorfile.entries(self.tmp / self.manifest.tuned["file"]))

    def shard_activations(self, index: int, shards: int) -> list[Path]:
        """Where the activations after block `index` go when each calibration shard's are written apart
        (by the worker that computed them), in sample order."""
        return [self.tmp / _SHARD_ACTIVATIONS.format(index + 1, j) for j in range(shards)]

    def _weights(self, sums: dict[str, str]) -> list[str]:
        """Assemble the block files and the rest into the final weight files; returns their names."""
        items = [(b["file"], b["bytes"]) for b in self.manifest.blocks] + [(None, _nbytes(self.rest))]
        tuned = self._tuned_tensors()  # the whole model's tuning replaces what the blocks were written with
        groups, size = [[]], 0
        for item in items:
            if groups[-1] and size + item[1] > self.shard_bytes:
                groups.append([])
                size = 0
            groups[-1].append(item[0])
            size += item[1]
        names = [WEIGHTS] if len(groups) == 1 else [SHARD.format(i, len(groups)) for i in range(1, len(groups) + 1)]
        weight_map = {}
        for name, group in zip(names, groups):
            tensors = {}  # tensors of the block files stay on disk: copied into the shard one at a time
            for file in group:
                tensors.update(self.rest if file is None else tensorfile.entries(self.tmp / file))
            tensors.update({k: tuned[k] for k in tensors.keys() & tuned.keys()})
            for k, t in tensors.items():  # a block file damaged while the run was stopped is not assembled
                crc = tensor_checksum(t)
                if sums.setdefault(k, crc) != crc:
                    raise PVQFormatError(f"{self.tmp}: tensor {k} changed on disk while the run was stopped")
            _save_atomic(tensors, self.tmp / name)
            weight_map.update({k: name for k in tensors})
        if len(names) > 1:
            index = {"metadata": {"total_size": sum(n for _, n in items)}, "weight_map": dict(sorted(weight_map.items()))}
            (self.tmp / INDEX).write_text(json.dumps(index, indent=1))
        (self.tmp / MANIFEST).unlink()  # from here on the directory is no longer an unfinished run
        self._tidy(keep=set())
        return names

    def _tidy(self, keep: set) -> None:
        """Remove the work files (blocks, activations, half-written `.part` files) except those in `keep`:
        a run killed between writing a file and recording it leaves such orphans."""
        for f in self.tmp.iterdir():
            work = f.name.endswith(".part") or f.name.startswith(("block-", "activations-", "tuned-"))
            if work and f.name not in keep:
                f.unlink(missing_ok=True)

    def finish(self, model, tokenizer, extra_files: dict[str, bytes] | None = None,
               stored: dict[str, torch.Tensor] | None = None) -> Path:
        """Write what is left of `model` (after api.quantize; `stored`: its stored_tensors, where the caller
        has them), the tokenizer, `extra_files` (name -> bytes, e.g. reports) and config.json; then put the
        directory in place. Returns out_dir."""
        sums = {k: v for b in self.manifest.blocks for k, v in b["tensors"].items()}
        try:  # the blocks' tensors are in their files already (a model kept whole for tuning still has them)
            stored = _stored(model, lambda k: k not in sums) if stored is None else stored
        except ValueError:
            self.abort()
            raise
        self.rest = {k: v for k, v in stored.items() if k not in sums}
        if self.manifest.tuned is not None:  # the tuned values, wherever they are assembled from
            sums.update(self.manifest.tuned["tensors"])

        def write():
            weights = set(self._weights(sums)) | {INDEX}
            if tokenizer is not None:
                save_tokenizer(tokenizer, self.tmp)
            for name, data in (extra_files or {}).items():
                (self.tmp / name).write_bytes(data)
            cfg = model.config.to_dict()
            q = {k: v for k, v in cfg["quantization_config"].items() if k != CHECKSUMS}
            cfg["quantization_config"] = q
            q[CHECKSUMS] = {"tensors": dict(sorted(sums.items())),
                            "files": {f.name: file_checksum(f) for f in sorted(self.tmp.iterdir())
                                      if f.is_file() and f.name not in weights},
                            "config": config_checksum(cfg)}
            (self.tmp / "config.json").write_text(json.dumps(cfg, indent=1, sort_keys=True))
            _replace(self.tmp, self.target)
        self._guard(write)
        return self.out_dir


def save(model, tokenizer, out_dir: str | Path, overwrite: bool = False, extra_files: dict[str, bytes] | None = None,
         sources=(), shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write a quantized model (after api.quantize) to out_dir atomically (extra_files: name -> bytes, e.g. reports).

    The location is checked first (prepare_output; `sources`: the input model's path, never replaced). A
    failure while writing removes the temporary directory and raises WriteError naming the cause."""
    tensors = _stored(model)
    with Writer(out_dir, overwrite, sources, _nbytes(tensors), shard_bytes) as w:
        return w.finish(model, tokenizer, extra_files, tensors)


def _stored(model, wanted: Callable[[str], bool] | None = None) -> dict[str, torch.Tensor]:
    """stored_tensors of a model pvq quantized, in its configured dense dtype (ValueError otherwise)."""
    qc = stored_config(getattr(model.config, "quantization_config", None))
    if qc is None:
        raise ValueError("save: the model has not been quantized by pvq (no pvq quantization_config)")
    return stored_tensors(model, DENSE_DTYPES[qc["config"]["dense_dtype"]], wanted=wanted)


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
    wf = p / (INDEX if (p / INDEX).is_file() else WEIGHTS)
    want = None if sums is None else sums["tensors"]
    out = {}
    for name, t in tensors:
        if name in out:
            raise PVQFormatError(f"{wf}: tensor {name} is stored twice")
        if want is not None:
            if name not in want:
                raise PVQFormatError(f"{wf}: unexpected tensor {name} (not in the checksums pvq wrote)")
            if tensor_checksum(t) != want[name]:
                raise PVQFormatError(f"{wf}: tensor {name} ({str(t.dtype).removeprefix('torch.')} "
                                     f"{list(t.shape)}): checksum mismatch, the file is damaged or was changed")
        out[name] = t if keep is None else keep(name, t)
    if want is not None and (missing := sorted(set(want) - set(out))):
        raise missing_error(wf, missing)
    for name in changed_files(p, cfg):  # a chat template or end-of-turn id edited: said, not refused
        warnings.warn(f"{p / name}: changed since pvq wrote it (edited, or damaged); the weights and config.json "
                      f"are as written", stacklevel=2)
    for name, layer in (cfg["quantization_config"].get("layers") or {}).items():
        t, listed = out.get(f"{name}.seeds"), layer.get("seeds") if isinstance(layer, dict) else None
        if t is not None and listed is not None and [int(v) for v in t.reshape(-1).tolist()] != listed:
            raise PVQFormatError(f"{wf}: tensor {name}.seeds {t.tolist()} differs from the seeds "
                                 f"config.json lists for the layer ({listed})")
    return out


def changed_files(path: str | Path, cfg: dict) -> list[str]:
    """The files beside the weights (tokenizer, generation_config.json, chat templates, reports) whose checksum
    differs from the one pvq wrote: what a user may edit, as a chat template or the end-of-turn ids. One removed
    leaves the model as it was."""
    p, sums = Path(path), (cfg["quantization_config"].get(CHECKSUMS) or {}).get("files") or {}
    return [name for name, f in sorted(sums.items()) if (p / name).is_file() and file_checksum(p / name) != f]


def missing_error(source, missing: list[str]) -> PVQFormatError:
    """The refusal of a directory lacking tensors: the first one named, the rest counted."""
    more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
    return PVQFormatError(f"{source}: tensor {missing[0]} is missing{more}")


def _safetensors_error(wf: Path, exc: BaseException) -> PVQFormatError:
    return PVQFormatError(f"{wf}: unreadable or truncated safetensors file ({one_line(exc)})")


def weight_files(path: str | Path) -> list[Path]:
    """The safetensors files of a pvq directory: model.safetensors, or the shards its index names."""
    p = Path(path)
    if (p / INDEX).is_file():
        try:
            files = sorted(set(json.loads((p / INDEX).read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise PVQFormatError(f"{p / INDEX}: not a safetensors index ({one_line(exc)})") from None
        if not all(isinstance(f, str) and Path(f).name == f for f in files):
            raise PVQFormatError(f"{p / INDEX}: names a file outside the directory")
        return [p / f for f in files]
    return [p / WEIGHTS]


def weights_bytes(path: str | Path) -> int:
    """Bytes of a directory's safetensors files."""
    return sum(f.stat().st_size for f in weight_files(path) if f.is_file())


def _shard_tensors(wf: Path):
    """(name, tensor) pairs of one safetensors file, one tensor at a time."""
    if not wf.is_file():
        raise PVQFormatError(f"{wf}: missing")
    for n, e in tensorfile.entries(wf).items():
        yield n, e.read()


def _read(path: str | Path, cfg: dict | None, keep=None) -> dict[str, torch.Tensor]:
    files = weight_files(path)

    def pairs():
        for wf in files:
            try:
                yield from _shard_tensors(wf)
            except PVQFormatError:
                raise
            except (OSError, RuntimeError, ValueError) as exc:
                raise _safetensors_error(wf, exc) from None
    if cfg is None:
        return dict(pairs())
    return verify(path, cfg, pairs(), keep)


def read_tensors(path: str | Path, cfg: dict | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a directory (model.safetensors or its shards; PVQFormatError for a missing or
    unreadable file), checked against `cfg` (its config.json, read_config) by `verify` when given."""
    return _read(path, cfg)


def scan_tensors(path: str | Path, cfg: dict) -> dict[str, torch.Tensor]:
    """`verify` a directory reading one tensor at a time (memory: the largest tensor), without keeping
    them: returns each tensor's dtype and shape (on the meta device), and the stored seeds themselves."""
    def keep(name, t):  # the seeds are compared with the config; of the rest only dtype and shape are used
        return t if name.endswith(".seeds") else torch.empty(t.shape, dtype=t.dtype, device="meta")
    return _read(path, cfg, keep)
