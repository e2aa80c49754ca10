"""A model bigger than memory: build it without weights, read its tensors from disk one block at a time.

The skeleton is the model transformers builds from the config, with every parameter on the meta
device (no memory) and every buffer real (rotary frequencies are computed when the module is built,
so they must not be lost). `materialize` then fills the parameters under one name prefix from the
checkpoint (safetensors, one tensor at a time with plain reads, any stored dtype, widened to float32),
and `release` gives a finished block's memory back. A tied head shares the embedding's tensor.
"""
from __future__ import annotations

import json
import re
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from .. import tensorfile
from ..errors import one_line
from .experts import fused_leaves

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"


class CheckpointError(ValueError):
    """A checkpoint that cannot be streamed: one line naming the file or tensor."""


def weight_files(folder: Path) -> dict[str, Path]:
    """{tensor name: file} of a safetensors checkpoint folder (an index's weight map, or the single file's
    tensors); empty when the folder has neither."""
    folder = Path(folder)
    if (folder / INDEX).is_file():
        try:
            weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise CheckpointError(f"{folder / INDEX}: not a safetensors index ({exc})") from None
        return {name: folder / file for name, file in weight_map.items()}
    if (folder / SINGLE).is_file():
        return {name: folder / SINGLE for name in _entries(folder / SINGLE)}
    return {}


def _entries(path: Path) -> dict:
    try:
        return tensorfile.entries(path)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"unreadable safetensors file: {exc}") from None


class NotStreamable(CheckpointError):
    """A checkpoint whose tensors are not the model's one for one (merged or split on loading): load it whole."""


class CheckpointReader:
    """Tensors of a safetensors checkpoint folder by the model's names, each read with plain file reads when
    asked for (headers parsed once; nothing mapped, so memory holds only the tensors being used).

    Some families store a tensor under another name than their module has (gpt_neox's head is
    `embed_out` on disk, `lm_head` in the model): `follow(model)` applies the renamings transformers'
    loader would (its conversion mapping for the family), so both ask for the same tensor. A mixture of
    experts stored one tensor per expert (the hub's form), which transformers stacks into 3-D experts on
    loading, is read per expert into the linears pvq splits those experts into (models/experts.py): each
    expert's linear is its stored tensor, or the concatenation of its gate and up tensors. Experts stored
    fused (3-D) are read a fused tensor at a time, each expert's linear its slice (swapped back first where the
    checkpoint stores two axes the other way round). Any other conversion of the loader (a fused q/k/v split, two
    tensors joined) runs on its source tensors when one of its targets is asked for, as the loader runs it."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.files = weight_files(self.folder)
        if not self.files:
            raise CheckpointError(f"{self.folder}: no {SINGLE} nor {INDEX}")
        self._headers = {}
        self.stored = {name: name for name in self.files}  # the model's name -> the checkpoint's
        self.parts: dict[str, list[str]] = {}  # a split expert's linear -> the checkpoint's tensors, concatenated
        self.slices: dict[str, tuple[str, int, bool, int]] = {}  # -> (the fused tensor, expert, transposed, flat)
        self._fused: tuple[str, torch.Tensor] | None = None  # the fused tensor read last: its experts come in a row
        self.flips: dict[str, tuple] = {}  # a tensor stored with two axes swapped -> (the swap, the model's shape)
        self.converted: dict[str, str] = {}  # a tensor another conversion makes -> the conversion's key
        self._groups: dict[str, tuple] = {}  # a conversion's key -> (the conversion, {its source pattern: tensor})
        self._converted: tuple[str, dict] | None = None  # the conversion run last: its targets come in a row
        self._model = None
        self._base = lambda key: key  # the model's name for a renamed checkpoint name (follow sets it)

    def follow(self, model) -> None:
        """Name the tensors as `model` does (its fused experts already split, where it has them); NotStreamable
        when its family merges or splits tensors on loading in another way."""
        renames, merges = _conversions(model)
        stored, parts, flips, groups = {}, {}, {}, {}
        names = set(fused_names(model))
        base = self._base = _base_prefix(model, names)
        for name in self.files:
            key = _renamed(name, renames)
            # at most one conversion per tensor, the first that matches, as transformers' loader applies them
            t, target, pattern = next(((t, *m) for t in merges if (m := t.rename_source_key(key))[1]),
                                      (None, key, None))
            if base(target) not in names and base(name) in names:  # a name the model has, renamed away: kept, as
                stored[base(name)] = name  # transformers keeps it (DeepSeek-V4's final norm, not an attention one)
            elif t is None:
                stored[base(key)] = name
            elif (flip := _transpose_only(t)) is not None and target == key:  # two axes swapped (Qwen3-VL-MoE)
                stored[base(key)], flips[base(key)] = name, flip
            elif (part := _expert_part(model, t, key, base(target), pattern)) is not None:
                parts.setdefault(part[0], {})[part[1]] = name
            else:  # any other conversion: its sources read together (every expert's, for a pattern with "*"),
                groups.setdefault(base(target), (t, {}))[1].setdefault(pattern, []).append(name)  # its ops run
        self.stored = stored
        self.parts = {}
        for param, got in parts.items():
            if sorted(got) != list(range(max(got) + 1)):
                raise NotStreamable(f"{self.folder}: {param} lacks some of the tensors it is concatenated from")
            self.parts[param] = [got[i] for i in range(len(got))]
        self.converted, self._groups, self._model = {}, groups, model
        for key, (t, sources) in groups.items():
            if set(sources) != set(t.source_patterns):
                raise NotStreamable(f"{self.folder}: {base(key)} lacks some of the tensors it is converted from")
            for target in t.target_patterns:
                self.converted[base(_target_name(key, t.target_patterns[0], target))] = key
        self.slices = {name: where for name, where in expert_slices(model).items()
                       if name not in self and (where[0] in stored or where[0] in self.converted)}
        self.flips = {key: (flip, _expected_shape(model, key, self.slices)) for key, flip in flips.items()}

    def __contains__(self, name: str) -> bool:
        return name in self.stored or name in self.parts or name in self.slices or name in self.converted

    def where(self, name: str) -> str:
        """Where the model's tensor `name` is stored, for messages."""
        if name in self.parts:
            return f"{self.folder}: tensors {', '.join(self.parts[name])}"
        if name in self.slices:
            fused, e, _, _ = self.slices[name]
            return f"{self.where(fused)}, expert {e}"
        if name in self.converted:
            sources = [n for names in self._groups[self.converted[name]][1].values() for n in names]
            return f"{self.folder}: tensors {', '.join(sources[:4])}{', ...' * (len(sources) > 4)}, converted"
        return f"{self.files[self.stored[name]]}: tensor {self.stored[name]}"

    def get(self, name: str) -> torch.Tensor:
        if name not in self.slices:  # a block's experts are read in a row: past them, the fused tensor goes
            self._fused = None
        if name in self.parts:  # gate and up of one expert: its fused linear's rows, in the stored order
            return torch.cat([self._read(n) for n in self.parts[name]], dim=0)
        if name in self.slices:
            fused, e, transposed, flat = self.slices[name]
            if self._fused is None or self._fused[0] != fused:
                whole = self._whole(fused)
                self._fused = (fused, whole.view(flat, -1, whole.shape[-1]) if flat else whole)
            t = self._fused[1][e]  # a copy, not a view: the fused tensor goes once its experts are read
            return (t.T if transposed else t).clone(memory_format=torch.contiguous_format)
        if name not in self.stored and name not in self.converted:
            raise CheckpointError(f"{self.folder}: tensor {name} is not in the checkpoint")
        return self._whole(name)

    def _whole(self, name: str) -> torch.Tensor:
        if name not in self.converted:
            return self._flipped(name, self._read(self.stored[name]))
        key = self.converted[name]
        if self._converted is None or self._converted[0] != key:  # q, k and v of one stored tensor come in a row
            self._converted = (key, self._convert(key))
        return self._converted[1][name]

    def _convert(self, key: str) -> dict[str, torch.Tensor]:
        """Every tensor one conversion of transformers' loader makes (`key`: its first target's name), by the
        model's names: its sources read, its ops run as the loader runs them."""
        t, sources = self._groups[key]
        collected = {pattern: [self._read(n) for n in sorted(sources[pattern], key=_natural)]
                     for pattern in t.source_patterns}
        try:
            for op in t.operations:
                collected = op.convert(collected, source_patterns=t.source_patterns, target_patterns=t.target_patterns,
                                       full_layer_name=key, model=self._model, config=self._model.config,
                                       missing_keys=None)
        except Exception as exc:  # a conversion that needs more than the sources and the model's shapes
            raise CheckpointError(f"{self.where(next(n for n, k in self.converted.items() if k == key))}: "
                                  f"{one_line(exc, with_type=True)}") from None
        out = {}
        for target, value in collected.items():
            value = value[0] if isinstance(value, list) else value
            out[self._base(_target_name(key, t.target_patterns[0], target))] = value.clone(
                memory_format=torch.contiguous_format)
        return out

    def _flipped(self, name: str, t: torch.Tensor) -> torch.Tensor:
        """`t` with the axes swapped that transformers' loader swaps for `name` (where its shape is not the model's
        already, when the conversion checks)."""
        if name not in self.flips:
            return t
        (dim0, dim1, check), shape = self.flips[name]
        return t if check and tuple(t.shape) == shape else t.transpose(dim0, dim1).contiguous()

    def _read(self, name: str) -> torch.Tensor:
        path = self.files[name]
        if path not in self._headers:
            self._headers[path] = _entries(path)
        entry = self._headers[path].get(name)
        if entry is None:
            raise CheckpointError(f"{path}: tensor {name} is in the index but not in the file")
        try:
            return entry.read()
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot read tensor {name}: {exc}") from None


def expert_slices(model) -> dict[str, tuple[str, int, bool, int]]:
    """{a split expert's parameter: (the fused tensor it is a slice of, its expert, whether the slice is stored
    transposed, flat)} for every experts module of `model` that pvq has split (models/experts.py). `flat` is the
    number of experts a 2-D tensor stacks along its first axis (DBRX's), 0 for a tensor stacked [E, ...]."""
    slices = {}
    for path, mod in model.named_modules():
        if not getattr(mod, "pvq_split_experts", False):
            continue
        for leaf, (kind, param) in fused_leaves(mod).items():
            linears = getattr(mod, kind)
            for e, lin in enumerate(linears):
                if getattr(lin, param, None) is not None:
                    slices[f"{path}.{kind}.{e}.{param}"] = (f"{path}.{leaf}", e,
                                                            mod.pvq_stored_transposed(kind) and param == "weight",
                                                            len(linears) if mod.pvq_flat else 0)
    return slices


def fused_names(model) -> list[str]:
    """The names of `model`'s parameters as they are before its experts are split: each split experts
    module's linears named by the fused tensors they came from (what a checkpoint that stores them fused, and
    transformers' loader, call them)."""
    split = {path: mod for path, mod in model.named_modules() if getattr(mod, "pvq_split_experts", False)}
    names = []
    for name in model.state_dict(keep_vars=True):
        owner = next((p for p in split if name.startswith(f"{p}.")), None)
        if owner is None:
            names.append(name)
        elif name.split(".")[len(owner.split("."))] not in {kind for kind, _ in fused_leaves(split[owner]).values()}:
            names.append(name)  # the module's own other tensors
    for path, mod in split.items():
        names += [f"{path}.{leaf}" for leaf, (kind, param) in fused_leaves(mod).items()
                  if any(getattr(lin, param, None) is not None for lin in getattr(mod, kind))]
    return names


def _base_prefix(model, names: set[str]):
    """A function naming a checkpoint's tensor (renamed already) as the model does where the checkpoint is laid out
    around its base model (the hub's gpt2 and bloom store `h.0...` for the model's `transformer.h.0...`), as
    transformers' loader does, name by name: the base model's prefix taken off where the model has the name
    (`names`) without it, or put on where it has the name with it."""
    prefix = getattr(model, "base_model_prefix", "") or ""
    if not prefix:
        return lambda key: key

    def based(key: str) -> str:
        if key.startswith(f"{prefix}.") and key[len(prefix) + 1:] in names:
            return key[len(prefix) + 1:]
        return f"{prefix}.{key}" if key not in names and f"{prefix}.{key}" in names else key
    return based


def _natural(name: str) -> list:
    """A sort key putting expert 10 after expert 9, as transformers' loader orders the tensors it stacks."""
    return [(0, int(part), "") if part.isdigit() else (1, 0, part) for part in name.split(".")]


def _target_name(key: str, first: str, target: str) -> str:
    """The name of a conversion's output `target` where `key` names its first target `first` (transformers keeps
    what surrounds the pattern in the name: the layer's prefix, the parameter's suffix)."""
    first, target = first.replace("\\", ""), target.replace("\\", "")
    prefix, found, suffix = key.partition(first)
    return f"{prefix}{target}{suffix}" if found else key


def _transpose_only(transform) -> tuple[int, int, bool] | None:
    """(dim0, dim1, whether it checks the shape first) where a conversion only swaps two axes of one tensor."""
    from transformers.core_model_loading import Transpose

    ops = transform.operations
    if len(ops) != 1 or type(ops[0]) is not Transpose or len(transform.source_patterns) != 1:
        return None
    return ops[0].dim0, ops[0].dim1, bool(getattr(ops[0], "check_dims", False))


def _expected_shape(model, name: str, slices: dict) -> tuple | None:
    """The shape the model holds `name` in: its parameter's, or, for the fused experts tensor pvq split, the
    experts' slices stacked."""
    try:
        return tuple(model.get_parameter(name).shape)
    except AttributeError:
        pass
    rows = sorted((e, part, transposed, flat) for part, (fused, e, transposed, flat) in slices.items() if fused == name)
    if not rows:
        return None
    one = tuple(model.get_parameter(rows[0][1]).shape)
    one = one[::-1] if rows[0][2] else one
    return (len(rows) * one[0], *one[1:]) if rows[0][3] else (len(rows), *one)


def _expert_part(model, transform, key: str, target: str, pattern: str) -> tuple[str, int] | None:
    """(the name of the split expert's parameter that the checkpoint's tensor `key` is part of, its position in
    the concatenation) where `transform` (one of the family's conversions, which names the fused `target`)
    only stacks experts (and concatenates gate and up) into an experts module pvq has split, untransposed;
    None otherwise (another conversion, or experts left fused)."""
    from transformers.core_model_loading import Concatenate, MergeModulelist

    ops = [(type(op), getattr(op, "dim", None)) for op in transform.operations]
    if ops not in ([(MergeModulelist, 0)], [(MergeModulelist, 0), (Concatenate, 1)]):
        return None
    expert = re.search(pattern.replace("*", r"(\d+)"), key)  # a source pattern is a regex, "*" the expert
    path, _, leaf = target.rpartition(".")
    try:
        mod = model.get_submodule(path)
    except AttributeError:
        return None
    if expert is None or not getattr(mod, "pvq_split_experts", False):
        return None
    kind, param = fused_leaves(mod).get(leaf, (None, None))
    e = int(expert.group(1))
    if kind is None or mod.pvq_stored_transposed(kind) or e >= len(getattr(mod, kind)):
        return None
    position = transform.source_patterns.index(pattern) if len(ops) == 2 else 0
    return f"{path}.{kind}.{e}.{param}", position


def _conversions(model) -> tuple[list, list]:
    """(renamings, merging conversions) transformers' loader applies to `model`'s checkpoint keys; none where
    this transformers has no such mapping."""
    try:
        from transformers.conversion_mapping import get_model_conversion_mapping
        from transformers.core_model_loading import WeightRenaming
    except ImportError:  # a transformers before conversion mappings: names are the model's
        return [], []
    transforms = get_model_conversion_mapping(model)  # fresh objects: matching keeps state in them
    renames = [t for t in transforms if isinstance(t, WeightRenaming)]
    return renames, [t for t in transforms if not isinstance(t, WeightRenaming)]


def renamed_on_loading(model, names) -> set[str]:
    """`names` of a checkpoint's tensors and what transformers' loader renames each to for `model` (its
    conversion mapping's renamings; a renaming may apply to a model's own name, as Mistral Large 4's `.experts.`
    -> `.mlp.experts.` does)."""
    renames, _ = _conversions(model)
    return set(names) | {_renamed(key, renames) for key in names}


def _renamed(key: str, renames: list) -> str:
    """`key` after every renaming of transformers' loader, in order."""
    for t in renames:
        key = t.rename_source_key(key)[0]
    return key


@contextmanager
def parameters_on_meta():
    """Every parameter registered inside goes to the meta device; buffers stay where they are built."""
    register = nn.Module.register_parameter

    def on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.detach().to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(config, trust_remote_code: bool = False):
    """The model of `config` (classes.auto_class) with no weights in memory (parameters on meta), in eval mode;
    trust_remote_code: built by the code its checkpoint carries."""
    from .classes import auto_class

    with parameters_on_meta():
        model = auto_class(config).from_config(config, dtype=torch.float32, trust_remote_code=trust_remote_code)
    return model.eval()


def _slots(model: nn.Module):
    """(module, parameter name, full name) for every parameter slot, tied ones each under every name."""
    for mod_name, mod in model.named_modules():
        for leaf, p in mod._parameters.items():
            if p is not None:
                yield mod, leaf, f"{mod_name}.{leaf}" if mod_name else leaf


def materialize(model: nn.Module, reader: CheckpointReader, keep, dtype: torch.dtype | None = torch.float32) -> list[str]:
    """Fill every parameter still on meta whose full name `keep(name)` accepts from the checkpoint (in `dtype`;
    None: as stored); a parameter shared by several names (a tied head) is read once, under a name the
    checkpoint has. Returns the names filled."""
    by_param: dict[int, list] = {}
    for mod, leaf, name in _slots(model):
        p = mod._parameters[leaf]
        if p.device.type == "meta":
            by_param.setdefault(id(p), []).append((mod, leaf, name, p))
    filled = []
    for slots in by_param.values():
        if not any(keep(name) for _, _, name, _ in slots):  # a tied parameter goes with any of its names
            continue
        names = [name for _, _, name, _ in slots]
        stored = next((n for n in names if n in reader), None)
        if stored is None:
            raise CheckpointError(f"{reader.folder}: tensor {names[0]} is not in the checkpoint")
        want = slots[0][3]
        t = reader.get(stored)
        if slots[0][1] == "weight" and getattr(slots[0][0], "pvq_transposed", False):  # a Conv1D made a linear
            t = t.T.contiguous()
        where = reader.where(stored)
        if tuple(t.shape) != tuple(want.shape):
            raise CheckpointError(f"{where} is {list(t.shape)}, the model expects {list(want.shape)}")
        if not t.is_floating_point():
            raise CheckpointError(f"{where} is {t.dtype}, not a float tensor")
        new = nn.Parameter(t if dtype is None else t.to(dtype), requires_grad=False)
        for mod, leaf, name, _ in slots:
            mod._parameters[leaf] = new
            filled.append(name)
    _fill_buffers(model, reader, keep)
    return filled


def _fill_buffers(model: nn.Module, reader, keep) -> None:
    """The persistent buffers under `keep` that the checkpoint holds, read from it (a router's score correction,
    DeepSeek-V4's token-to-expert table): the skeleton built them with their initial values, which a whole load
    replaces with the checkpoint's. Buffers it does not hold keep what the model computed."""
    for mod_name, mod in model.named_modules():
        for leaf, b in mod._buffers.items():
            name = f"{mod_name}.{leaf}" if mod_name else leaf
            if b is None or leaf in mod._non_persistent_buffers_set or not keep(name) or name not in reader:
                continue
            t = reader.get(name)
            if tuple(t.shape) != tuple(b.shape):
                raise CheckpointError(f"{reader.where(name)} is {list(t.shape)}, the model expects {list(b.shape)}")
            mod._buffers[leaf] = t.to(b.dtype)


def release(module: nn.Module) -> None:
    """Give a finished part's memory back: its parameters and buffers go to the meta device."""
    for mod in module.modules():
        for leaf, p in mod._parameters.items():
            if p is not None and p.device.type != "meta":
                mod._parameters[leaf] = nn.Parameter(p.detach().to("meta"), requires_grad=False)
        for leaf, b in mod._buffers.items():
            if b is not None and b.device.type != "meta":
                mod._buffers[leaf] = b.to("meta")


def release_parameters(model: nn.Module, params) -> None:
    """Give these parameters' memory back (to the meta device) under every name they have: a tied head goes
    with its embedding, so both are read again as one."""
    new = {id(p): nn.Parameter(p.detach().to("meta"), requires_grad=False) for p in params if p.device.type != "meta"}
    for mod, leaf, _ in list(_slots(model)):
        if id(mod._parameters[leaf]) in new:
            mod._parameters[leaf] = new[id(mod._parameters[leaf])]
