"""Where the blocks and linears of a decoder model are, found rather than listed, and block-by-block capture.

No table per family (DESIGN.md: no script per family, no forked modeling files): the decoder blocks
are the model's ModuleList with one entry per hidden layer (the class transformers names in
`_no_split_modules` when there are several lists), the quantizable linears of a block are every
`nn.Linear` inside it (a router, one output per expert, or a gate with fewer than MIN_ROWS outputs, and a
linear with fewer than MIN_COLS inputs, stay dense: a few numbers per token that steer the rest; a linear
whose weight the family's code reads itself, like Mamba's dt_proj, too), and linears that read the same input
share one Hessian because the hooks of a real pass see the same tensor (block_hessians), whatever their names.
Experts stored as fused 3-D tensors are split into one linear per expert first (experts.py), so an expert's
linear is found, hooked (the tokens routed to it) and replaced like any other.
"""
from __future__ import annotations

import ast
import inspect
import operator
import textwrap
from collections import UserDict
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache

import torch
from torch import nn

from ..errors import one_line
from ..solvers.hessian import CrossAccumulator, HessianAccumulator
from .experts import expert_count, fused_experts, split_experts

MIN_ROWS = 16  # fewer outputs than this: a router or gate, kept dense
MIN_COLS = 8  # fewer inputs than this (the smallest PVQ group): mixing coefficients (Gemma 3n's AltUp), kept dense
BATCH = 8  # calibration samples run through a block at once


def _text_config(config):
    get = getattr(config, "get_text_config", None)
    return get() if callable(get) else config


def _quantizable(mod: nn.Module) -> bool:
    # a QuantLinear (modules/, a layer above) marks itself with pvq_linear rather than being imported here
    return getattr(mod, "pvq_linear", False) or (isinstance(mod, nn.Linear) and mod.out_features >= MIN_ROWS
                                                 and mod.in_features >= MIN_COLS and _plain(type(mod)))


@lru_cache(maxsize=None)
def _plain(cls: type) -> bool:
    """Whether an nn.Linear class computes x W^T + b, as the QuantLinear that replaces it does: nn.Linear, or a
    subclass whose own forward gives that (Falcon's), told on a small random instance. One that computes
    something else with its weight (DeepSeek-V4's grouped output projection, block-diagonal over head groups)
    stays dense."""
    if cls.forward is nn.Linear.forward:
        return True
    g = torch.Generator().manual_seed(0)
    probe = nn.Linear(8, 16)  # the attributes of a plain linear; one the class's forward wants beyond: not plain
    with torch.no_grad():
        probe.weight.copy_(torch.randn(16, 8, generator=g))
        probe.bias.copy_(torch.randn(16, generator=g))
        x = torch.randn(3, 8, generator=g)
        try:
            y = cls.forward(probe, x)
        except Exception:
            return False
    return isinstance(y, torch.Tensor) and y.shape == (3, 16) and torch.allclose(y, probe(x), atol=1e-5)


def blocks_path(model) -> str:
    """The dotted name of the model's list of decoder blocks (e.g. "model.layers"); ValueError naming what
    is missing when the model has none pvq can walk. The first call also splits fused experts into one
    linear per expert (models/experts.py), in place: that is how their linears are found."""
    cached = getattr(model, "_pvq_blocks_path", None)
    if cached is not None:
        return cached
    mt = getattr(model.config, "model_type", None)
    path, layers = _find_blocks(model)
    for block in layers:
        _conv1d_as_linears(block)
    for i, block in enumerate(layers):  # fused 3-D experts become one linear per expert (experts.py)
        try:
            split_experts(block, f"{path}.{i}.")
        except ValueError as exc:
            raise ValueError(f"unsupported architecture {mt!r}: {exc}") from None
    if not any(_quantizable(m) for m in layers[0].modules()):
        raise ValueError(f"unsupported architecture {mt!r}: the blocks of {path} hold no nn.Linear to quantize")
    model._pvq_blocks_path = path  # the walk above costs a pass over every module; block_prefix asks often
    return path


def _conv1d_as_linears(block: nn.Module) -> None:
    """GPT-2's linears are transformers' Conv1D (y = x W + b, W stored [in, out]): each becomes the nn.Linear
    of W^T, the same function, in place, so it is found, hooked and replaced like any linear. The new
    linear is marked `pvq_transposed`: a checkpoint holds its weight as W (streaming.materialize transposes)."""
    for name, mod in list(block.named_modules()):
        if type(mod).__name__ != "Conv1D" or getattr(mod, "weight", None) is None or mod.weight.dim() != 2:
            continue
        w = mod.weight
        lin = nn.Linear(w.shape[0], w.shape[1], bias=mod.bias is not None, device="meta", dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach().T.contiguous(), requires_grad=w.requires_grad)
        if mod.bias is not None:
            lin.bias = mod.bias
        lin.pvq_transposed = True
        set_module(block, name, lin)


def _find_blocks(model) -> tuple[str, nn.ModuleList]:
    """(dotted name, list) of the model's decoder blocks, left as they are; ValueError when there is no one list."""
    mt = getattr(model.config, "model_type", None)
    n = getattr(_text_config(model.config), "num_hidden_layers", None)
    found = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, nn.ModuleList) and len(mod) == n and n]
    wanted = set(getattr(model, "_no_split_modules", None) or ())
    named = [(name, mod) for name, mod in found if type(mod[0]).__name__ in wanted]
    found = named or found
    if not found and n:  # num_hidden_layers counts sublayers (LongCat-Flash's blocks hold lists of two each)
        found = [(name, mod) for name, mod in model.named_modules()
                 if isinstance(mod, nn.ModuleList) and len(mod) and type(mod[0]).__name__ in wanted
                 and any(isinstance(sub, nn.ModuleList) and len(mod) * len(sub) == n for sub in mod[0].children())]
    if len(found) > 1 and callable(getattr(model, "get_decoder", None)):  # a vision tower's blocks beside the text's
        decoder = model.get_decoder()
        under = {f"{n}." if n else "" for n, m in model.named_modules() if m is decoder}
        found = [(name, mod) for name, mod in found if any(name.startswith(u) for u in under)] or found
    if len(found) != 1:
        what = "no list" if not found else f"{len(found)} lists ({', '.join(n for n, _ in found)})"
        raise ValueError(f"unsupported architecture {mt!r}: pvq looks for one list of {n} decoder blocks and found {what}")
    return found[0]


def holds_fused_experts(model) -> bool:
    """Whether the model's blocks hold experts as 3-D tensors, not split yet (outside the blocks a 3-D tensor,
    like a vision tower's pooling probe, is no expert). False where no blocks are found: check_supported says why."""
    try:
        return fused_experts(model.get_submodule(_find_blocks(model)[0]))
    except ValueError:
        return False


def check_supported(model) -> None:
    blocks_path(model)


def blocks(model) -> nn.ModuleList:
    return model.get_submodule(blocks_path(model))


def layer_name(model, index: int, name: str) -> str:
    """The full module name of linear `name` (relative to its block, e.g. "mlp.up_proj") of block `index`."""
    return f"{block_prefix(model, index)}{name}"


def block_prefix(model, index: int) -> str:
    """The prefix of the full names of block `index`'s modules and tensors."""
    return f"{blocks_path(model)}.{index}."


def block_linear_names(model) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every quantizable linear of the model's blocks, in block and module order."""
    return [(layer_name(model, i, name), mod) for i, block in enumerate(blocks(model))
            for name, mod in block_linears(block).items()]


def _routers(block: nn.Module) -> set[int]:
    """ids of a block's routers: linears outside its experts with one output per expert. They stay dense
    however many experts there are: a few numbers per token that steer the rest, and some families give
    theirs a forward of its own (Llama 4's and PhiMoE's routers are nn.Linear subclasses that take the
    top k), which a quantized linear would replace."""
    counts, inside = set(), set()
    for name, mod in block.named_modules():
        if getattr(mod, "pvq_split_experts", False):
            counts.add(expert_count(mod))
        elif name.rpartition(".")[2] == "experts" and isinstance(mod, nn.ModuleList):  # one module per expert
            counts.add(len(mod))
        else:
            continue
        inside |= {id(m) for m in mod.modules()}
    return {id(m) for m in block.modules()
            if isinstance(m, nn.Linear) and m.out_features in counts and id(m) not in inside}


_SHARED = ("torch.", "transformers.modeling_", "transformers.generation", "transformers.utils",
           "transformers.integrations")


@lru_cache(maxsize=None)
def _weights_read(cls: type) -> frozenset[str]:
    """Paths of the submodules whose `.weight` the code of module class `cls` (and its bases outside torch)
    reads itself, outside `__init__` and branches on the module's own settings (`if self.training ...`, which
    the family's tests then show are not taken by default): Mamba's mixer multiplies by
    `self.dt_proj.weight`; Ergo's block reads `self.self_attn.o_proj.weight.dtype` ("self_attn.o_proj").
    Read from the class's source; empty where there is none."""
    found: set[str] = set()

    def path(node) -> str | None:  # "a.b" of self.a.b, None for anything else
        names = []
        while isinstance(node, ast.Attribute):
            names.append(node.attr)
            node = node.value
        return ".".join(reversed(names)) if isinstance(node, ast.Name) and node.id == "self" and names else None

    def visit(node) -> None:
        if isinstance(node, ast.FunctionDef) and node.name == "__init__":
            return
        if isinstance(node, ast.If) and "self." in ast.unparse(node.test):
            for n in node.orelse:  # a branch on the module's settings (training, BLOOM's pretraining_tp > 1):
                visit(n)           # the default path is taken to be the else
            return
        if isinstance(node, ast.Attribute) and node.attr == "weight" and (owner := path(node.value)) is not None:
            found.add(owner)
        for child in ast.iter_child_nodes(node):
            visit(child)

    for klass in cls.__mro__:  # the family's classes (transformers' shared bases read no child's weight)
        if klass is object or klass.__module__.startswith(_SHARED):
            continue
        try:
            visit(ast.parse(textwrap.dedent(inspect.getsource(klass))))
        except (OSError, TypeError, SyntaxError):  # no source (built in a session, compiled)
            continue
    return frozenset(found)


def _read_directly(block: nn.Module) -> set[int]:
    """ids of the block's linears whose weight their parent module's code reads itself rather than calling
    them: a quantized linear holds codes, not a weight, so they stay dense (Mamba's dt_proj, small)."""
    return {id(child) for mod in block.modules() for owner in _weights_read(type(mod))
            if isinstance(child := _submodule(mod, owner), nn.Linear)}


def _submodule(mod: nn.Module, path: str) -> nn.Module | None:
    for name in path.split("."):
        mod = mod._modules.get(name) if isinstance(mod, nn.Module) else None
    return mod


def weight_read_directly(model: nn.Module, module: nn.Module) -> bool:
    """Whether the code of some module of `model` reads `module.weight` itself (Mamba casts the head's input
    to `self.lm_head.weight.dtype`)."""
    return module is not None and any(_submodule(mod, owner) is module for mod in model.modules()
                                      for owner in _weights_read(type(mod)))


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The quantizable linears of one block, by name relative to the block, in module order (the order
    their forward runs them in every family tested)."""
    dense = _routers(block) | _read_directly(block)
    return {name: mod for name, mod in block.named_modules() if name and _quantizable(mod) and id(mod) not in dense}


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _Stop(Exception):
    """Raised by the capture hook: nothing past block 0 needs to run."""


class _Refused(Exception):
    """Raised by the capture hook: a block is called in a way pvq cannot replay (its message says how)."""


def _hidden(args, kw) -> torch.Tensor:
    """The hidden states a block was called with."""
    return args[0] if args else kw["hidden_states"]


@contextmanager
def _forwards(layers: nn.ModuleList, make):
    """Inside, block j's forward is make(j): no block computes, each records or hands on its input."""
    for j, block in enumerate(layers):
        block.forward = make(j)
    try:
        yield
    finally:
        for block in layers:
            del block.forward


@dataclass(frozen=True)
class PerSample:
    """A block argument with one slice per sample along `dim` (BLOOM's ALiBi biases, [batch * heads, 1, L];
    a mask [batch, 1, L, L], which XGLM wants as long as the batch rather than broadcast), held for one sample:
    calibration samples all have the same length and no padding, so every sample's slice is this one,
    repeated for a batch of n by `batched(n)` (a view where the slice has length 1)."""

    tensor: torch.Tensor
    dim: int

    def batched(self, n: int) -> torch.Tensor:
        if n == 1:
            return self.tensor
        if self.tensor.shape[self.dim] == 1:
            return self.tensor.expand(*(n if d == self.dim else -1 for d in range(self.tensor.dim())))
        return torch.cat([self.tensor] * n, dim=self.dim)

    def to(self, device) -> PerSample:
        return PerSample(self.tensor.to(device), self.dim)


@dataclass(frozen=True)
class PerToken:
    """A block argument that differs from sample to sample, held for every calibration sample, concatenated
    along `dim`: the token ids a block reads itself (DeepSeek-V4's hash routing picks experts by token id), or
    an input of the block's own computed from them (Gemma 4 E2B/E4B's per-layer inputs)."""

    tensor: torch.Tensor
    dim: int

    def rows(self, rows) -> torch.Tensor:
        return self.tensor[(slice(None),) * self.dim + (rows,)]

    def samples(self, s: int, e: int) -> PerToken:
        return PerToken(self.rows(slice(s, e)), self.dim)

    def to(self, device) -> PerToken:
        return PerToken(self.tensor.to(device), self.dim)


def _map(kwargs: dict, f) -> dict:
    def at(v):
        if isinstance(v, (PerSample, PerToken)):
            return f(v)
        if isinstance(v, (dict, UserDict)):  # state carried to later blocks (carry): a new mapping of the same kind
            return _mapping_like(v, {k: at(u) for k, u in v.items()})
        return type(v)(at(u) for u in v) if isinstance(v, (tuple, list)) else v
    return {k: at(v) for k, v in kwargs.items()}


# the arguments of a block the model's forward does not call on calibration text (Llama 3.2 Vision's
# cross-attention layers, which run only beside an image): it hands its input on, and no linear of it sees data
SKIPPED = "_pvq_skipped"


def skipped(kwargs: dict) -> bool:
    """Whether a block's captured arguments are those of a block the forward skips on text (SKIPPED)."""
    return bool(kwargs.get(SKIPPED))


def call_kwargs(kwargs: dict, n: int, rows=None) -> dict:
    """A block's captured keyword arguments for a batch of n samples: PerSample ones repeated, PerToken ones
    those of samples `rows` (a slice or indices; the first n where not given) of the samples kwargs hold."""
    rows = slice(0, n) if rows is None else rows
    return _map(kwargs, lambda v: v.batched(n) if isinstance(v, PerSample) else v.rows(rows))


def call_block(block: nn.Module, x: torch.Tensor, kwargs: dict, rows=None, written: dict | None = None
               ) -> torch.Tensor:
    """The hidden states block(x) outputs (the first item where it returns a tuple, or GPT-1's list), with its
    captured arguments for the samples `rows` (call_kwargs). A mapping among them is state the model hands
    every block (Gemma 4's key-value sharing: one layer stores its keys and values there, later layers read
    them); run one block at a time, batch by batch, a later block would read another batch's. Each call gets a
    mapping of its own: what a block writes stays with its call, and is appended, a batch's value, to
    `written` {(argument, key): [value per batch]} where given, for `carry` to hand on to later blocks; a block
    that reads what an earlier block wrote and nobody carried stops with one line. A block the forward skips
    on text (SKIPPED) hands x on, as the forward does."""
    if skipped(kwargs):
        return x
    kw = call_kwargs(kwargs, x.shape[0], rows)
    given = {}
    for k, v in kw.items():
        if isinstance(v, (dict, UserDict)):
            given[k] = v
            kw[k] = _own_state(v, f"unsupported architecture: a {type(block).__name__} reads {{key!r}} from its "
                                  f"argument {k!r}, which an earlier block writes (key-value sharing across layers), "
                                  f"and nothing carried it to this call (adapters.carry); a data-free method (--method "
                                  f"pvq) runs no block")
    d = getattr(block, "_pvq_batch_dim", 0)
    out = block(x.movedim(0, d) if d else x, **kw)
    for k, v in given.items():
        for key, value in kw[k].items():
            if written is not None and (key not in v or v[key] is not value):
                written.setdefault((k, key), []).append(_batch_first(value, x.shape[0], f"{type(block).__name__} "
                                                                                        f"writes {key!r} into {k!r}"))
    hands = getattr(block, "_pvq_hands", None)  # the next block's argument this block's second output is
    if written is not None and hands is not None:
        if not (isinstance(out, (tuple, list)) and len(out) > 1):
            raise ValueError(f"unsupported architecture: a {type(block).__name__} hands the next block {hands!r} "
                             f"in some calls only")
        written.setdefault((hands, None), []).append(
            None if out[1] is None else _batch_first(out[1], x.shape[0], f"{type(block).__name__} hands on {hands!r}"))
    out = out[0] if isinstance(out, (tuple, list)) else out
    return out.movedim(d, 0) if d else out


def _batch_first(value, n: int, where: str):
    """value (a tensor, or tuple of them, that a block wrote for a batch of n samples) where each tensor's first
    dimension is the batch: what carry holds per sample."""
    if isinstance(value, (tuple, list)):
        for v in value:
            _batch_first(v, n, where)
    elif not (isinstance(value, torch.Tensor) and value.dim() and value.shape[0] == n):
        raise ValueError(f"unsupported architecture: a {where} that is not tensors laid out by sample (first "
                         f"dimension {n}, the batch): pvq cannot carry it from block to block")
    return value


def carry(kwargs: list[dict], after: int, written: dict, samples: int) -> dict:
    """Hand what block `after` wrote into a mapping argument on a run over all `samples` calibration samples
    (written: call_block's, each batch's value in sample order) to every later block given that mapping:
    its value for every sample, as PerToken tensors (cut with the samples like token ids), in a mapping of the
    block's own (kwargs is one stream's list of every block's arguments; the others' are left as they are);
    and the second output it hands the next block (key None: GLM-5's and Hunyuan-V4's indexer choices, which
    a layer sharing them takes from its predecessor) as that block's argument.
    Returns {(argument, key): the value for every sample} (tensors, or tuples of them), for hand_on. Floats are
    held in float32, as the streams are: a block calibrated in bfloat16 writes bfloat16, and a later block run
    without autocast (the tuning targets) would be given a mix of precisions."""
    held = held_of(written, after, samples)
    hand_on(kwargs, after, held)
    return held


def held_of(written: dict, after: int | None, samples: int) -> dict:
    """{(argument, key): the value for every sample} of what block `after` wrote or handed on (call_block's
    `written`, each batch's value in sample order): carry's return, without handing it on."""
    held = {}
    for (arg, key), pieces in written.items():
        held[(arg, key)] = value = _joined(pieces, f"block {after} hands the next block something")
        first = value[0] if isinstance(value, tuple) else value
        if first is not None and first.shape[0] != samples:
            raise ValueError(f"unsupported architecture: block {after} writes {key!r} into {arg!r} for "
                             f"{first.shape[0]} of {samples} calibration samples: pvq carries only what a "
                             f"block writes for every sample")
    return held


def carried_after(carried: dict, held: dict) -> dict:
    """What a stream carries after a block: what the blocks before it wrote for later ones (carried, less what
    the block before handed this one), with what this block wrote or hands on (held) over it."""
    return {**{k: v for k, v in carried.items() if k[1] is not None}, **held}


def with_carried(kwargs: dict, carried: dict) -> dict:
    """One block's arguments (kwargs) with what its stream carries to it (carried, as carry returns it, for the
    samples kwargs hold) given as hand_on gives it: a Ray worker's copy of the arguments."""
    kw = dict(kwargs)
    for (arg, key), value in carried.items():
        _give(kw, arg, key, _as_per_token(value), nearest=True)
    return kw


def cut_carried(carried: dict, s: int, e: int) -> dict:
    """carried for samples s..e."""
    def at(v):
        return None if v is None else tuple(at(u) for u in v) if isinstance(v, tuple) else v[s:e]
    return {k: at(v) for k, v in carried.items()}


def join_carried(parts: list[dict]) -> dict:
    """One carried from those of consecutive samples (shards), in sample order."""
    return {k: _joined([p[k] for p in parts], "a calibration shard's carried state")
            for k in (parts[0] if parts else {})}


def _joined(pieces: list, where: str):
    """The value for all samples of pieces held for consecutive ones (tensors laid out by sample, tuples of them,
    or None throughout), joined along the first dimension; floats in float32, as the streams are."""
    if all(p is None for p in pieces):
        return None
    if any(p is None for p in pieces):
        raise ValueError(f"unsupported architecture: {where} for some calibration samples only")
    if isinstance(pieces[0], (tuple, list)):
        return tuple(_joined([p[i] for p in pieces], where) for i in range(len(pieces[0])))
    whole = torch.cat(pieces)
    return whole.float() if whole.is_floating_point() else whole


def hand_on(kwargs: list[dict], after: int, held: dict) -> None:
    """Give every block after `after` that takes a mapping argument the values `held` ({(argument, key): a
    tensor, or a tuple of them, for every sample}: carry's, or what a resumed run saved) in it, as PerToken;
    a value of key None (what block `after` hands on) is the next block's argument itself."""
    for (arg, key), value in held.items():
        value = _as_per_token(value)
        for j, kw in enumerate(kwargs[after + 1:]):
            _give(kw, arg, key, value, nearest=j == 0)


def _as_per_token(value):
    """A held value (a tensor for every sample, a tuple of them, or None) as PerToken, cut with the samples."""
    return tuple(PerToken(v, 0) for v in value) if isinstance(value, tuple) else None if value is None \
        else PerToken(value, 0)


def _give(kw: dict, arg: str, key, value, nearest: bool) -> None:
    """Put one carried value into a block's arguments kw: into its mapping argument `arg` under `key`, or, key
    None (handed on by the block before), as `arg` itself where kw is the nearest later block's."""
    if key is None:
        if nearest and arg in kw:
            kw[arg] = value
    elif isinstance(kw.get(arg), (dict, UserDict)):
        kw[arg] = _mapping_like(kw[arg], {**kw[arg], key: value})


class _OwnState:
    """Mixed into a copy of a block's state mapping for one call: a key no one wrote in this call was written by
    another block (_missing: the message)."""

    def __missing__(self, key):
        raise ValueError(self._pvq_missing.format(key=key))


@lru_cache(maxsize=None)
def _own_class(cls: type) -> type:
    return type(cls.__name__, (_OwnState, cls), {"__module__": cls.__module__})


def _mapping_like(mapping, items: dict):
    """A new mapping of mapping's class holding items."""
    new = type(mapping)()
    new.update(items)
    return new


def _own_state(mapping, missing: str):
    own = _own_class(type(mapping))()
    own.update(mapping)
    own._pvq_missing = missing
    return own


def samples_of(kwargs: dict, s: int, e: int) -> dict:
    """kwargs for samples s..e of those they hold (PerToken ones cut), to run a block on hidden[s:e]."""
    return _map(kwargs, lambda v: v.samples(s, e) if isinstance(v, PerToken) else v)


def per_token(kwargs: dict) -> bool:
    """Whether a block's captured arguments hold something per sample (PerToken): cut with the samples."""
    found = []
    _map(kwargs, lambda v: found.append(isinstance(v, PerToken)))
    return any(found)


def _doubled(one, two) -> int | None:
    """The one dimension along which `two` (an argument given for two samples) is twice `one` (for one sample),
    every other the same; None where there is no such dimension."""
    if not isinstance(one, torch.Tensor) or not isinstance(two, torch.Tensor) or one.dim() != two.dim():
        return None
    grown = [d for d in range(one.dim()) if one.shape[d] != two.shape[d]]
    return grown[0] if len(grown) == 1 and two.shape[grown[0]] == 2 * one.shape[grown[0]] else None


def _per_sample(one, two):
    """`one` (an argument given for one sample), or PerSample where the same argument for two samples (`two`)
    is twice as long along one dimension: laid out per sample (batch, or batch * heads)."""
    if isinstance(one, (tuple, list)) and isinstance(two, (tuple, list)) and len(one) == len(two):
        return type(one)(_per_sample(a, b) for a, b in zip(one, two))
    dim = _doubled(one, two)
    return one if dim is None else PerSample(one, dim)


# handed on as a block's second output where the family's forward unpacks two (Bamba's attention weights); a
# block that finds it among its arguments was handed its predecessor's other output (GLM-5's indexer choices)
_SECOND = object()


class Unreplayable:
    """Given to a block in place of what its predecessor hands it beside the hidden states (GLM-5's indexer
    choices) until a run of the predecessor on the block's stream carries its value there (carry); where none
    did (a block run on its own), a block that ignores it runs as the model runs it (GLM-5's layers with an
    indexer of their own), and one that reads it (a layer sharing its predecessor's choices) stops with
    `message`, one line, rather than running on something else."""

    def __init__(self, message: str):
        self.message = message

    def _refuse(self, *args, **kwargs):
        raise ValueError(self.message)

    def __getattr__(self, name):
        if name.startswith("__"):  # copy, pickle and the like look for optional protocols: absent
            raise AttributeError(name)
        self._refuse()

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        held = [a for a in (*args, *(kwargs or {}).values()) if isinstance(a, Unreplayable)]
        held[0]._refuse()

    __getitem__ = __len__ = __iter__ = __bool__ = __add__ = __radd__ = __mul__ = __rmul__ = __sub__ = __rsub__ = _refuse

    def __reduce__(self):
        return Unreplayable, (self.message,)


def _hand_on(model, hidden):
    """What a pass-through block returns: its hidden states, or (hidden, _SECOND) where the family's forward
    unpacks two outputs from each block (_blocks_return_pairs)."""
    return (hidden, _SECOND) if model._pvq_block_pairs else hidden


@torch.no_grad()
def _blocks_return_pairs(model, input_ids: torch.Tensor) -> bool:
    """Whether the family's forward takes a block's hidden states from a pair (hidden, other) rather than
    from a tensor (Bamba unpacks two; GPT-1 takes item 0 of a list), told by one pass of one token with block 0
    a pass-through returning its input: block 1 must be handed a tensor of that shape, else blocks return
    pairs. Asked once per model, before any call with a batch, where unpacking two samples, or taking the
    first, would not fail."""
    if not hasattr(model, "_pvq_block_pairs"):
        layers = blocks(model)
        given, handed = [], []

        def first(*args, **kw):
            given.append(_hidden(args, kw))
            return given[0]

        def second(*args, **kw):
            handed.append(_hidden(args, kw))
            raise _Stop

        if len(layers) > 1:
            with _forwards(layers, lambda j: first if j == 0 else second):
                try:
                    model(input_ids[:1, :1], use_cache=False)
                except Exception:  # _Stop, or the forward failed on a tensor where it wanted a pair
                    pass
        model._pvq_block_pairs = len(layers) > 1 and not (
            handed and isinstance(handed[0], torch.Tensor) and handed[0].shape == given[0].shape)
    return model._pvq_block_pairs


def _as_keywords(block: nn.Module, args: tuple, kw: dict, where: str) -> dict:
    """A block's call arguments other than its hidden states, by name: what a family hands its blocks
    positionally (XGLM's attention mask; RecurrentGemma's positions, mask and cache flag) is bound to the names
    of the block's forward, so that pvq replays every call with keywords."""
    if len(args) <= 1:
        return {k: v for k, v in kw.items() if k != "hidden_states"}
    sig = inspect.signature(type(block).forward)
    try:
        bound = sig.bind(block, *args, **kw).arguments
    except TypeError as exc:
        raise _Refused(f"{where} is called with arguments its forward does not name ({exc})") from None
    out = {}
    for p in list(sig.parameters.values())[2:]:  # after self and the hidden states
        if p.kind is p.VAR_POSITIONAL and bound.get(p.name):
            raise _Refused(f"{where} is given {len(bound[p.name])} tensors positionally past the arguments its "
                           f"forward names; pvq replays blocks with keyword arguments")
        if p.kind is p.VAR_KEYWORD:
            out.update(bound.get(p.name, {}))
        elif p.kind is not p.VAR_POSITIONAL and p.name in bound:
            out[p.name] = bound[p.name]
    return out


def _varies(a, b) -> bool:
    """Whether two captures of one argument differ (tensors by value; nested tuples, lists and dicts)."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                    and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return len(a) != len(b) or any(_varies(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() != b.keys() or any(_varies(a[k], b[k]) for k in a)
    return False


def _differing(first: list[dict], second: list[dict], mt) -> dict[int, dict[str, list]]:
    """{block: {argument: [first sample's value, second's]}} of the arguments that differ between the first two
    samples. pvq captures each block's arguments once and gives them to every sample (positions, masks, rotary
    tables are alike for samples of one length); a tensor that differs (token ids a block reads itself, as
    DeepSeek-V4's hash routing; Gemma 4 E2B/E4B's per-layer inputs, a float per token and per block) is held for
    every sample (PerToken); anything else that differs is refused."""
    found: dict[int, dict[str, list]] = {}
    for j, (a, b) in enumerate(zip(first, second)):
        if a is None or b is None:  # a block the forward skips on text
            if (a is None) != (b is None):
                raise ValueError(f"unsupported architecture {mt!r}: its forward calls block {j} for some calibration "
                                 f"samples only")
            continue
        for k in a:
            if not _varies(a[k], (b or {}).get(k)):
                continue
            if not (isinstance(a[k], torch.Tensor) and a[k].dtype != torch.bool):
                raise ValueError(f"unsupported architecture {mt!r}: block {j}'s argument {k!r} differs from sample "
                                 f"to sample and is not a tensor pvq can hold per sample; pvq gives every sample "
                                 f"the arguments it captured once")
            found.setdefault(j, {})[k] = [a[k], b[k]]
    return found


def _per_token(values: list, two, where: str) -> PerToken:
    """Each sample's value of an argument (values) as one PerToken, laid along the dimension that the two-sample
    call (`two`) doubles."""
    dim = _doubled(values[0], two)
    if dim is None:
        raise ValueError(f"{where} differs from sample to sample, and pvq cannot tell its samples apart "
                         f"(shape {tuple(values[0].shape)} for one sample)")
    return PerToken(torch.cat(values, dim=dim), dim)


@torch.no_grad()
def capture_block_inputs(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, list[dict]]:
    """Inputs of block 0 for every calibration sample (hidden [N, L, D]) and the keyword arguments of each
    block's call (rotary position embeddings, masks: a family with alternating sliding and full attention
    gives its blocks different masks; arguments given positionally are named, _as_keywords), the same for
    every sample of the same length, so kept once: the first two samples' are compared, and tensors that
    differ between them (token ids, per-layer inputs) are kept for every sample as PerToken, anything else
    that differs refused (_differing); an argument laid out per sample is told by a third call with two samples, and kept as
    PerSample (run blocks through call_kwargs, on a part of the samples through samples_of).

    The blocks do not run here: each is a pass-through that records its arguments, so this needs only
    the embeddings' weights (a streamed skeleton has no others yet)."""
    layers = blocks(model)
    n = input_ids.shape[0]
    hidden: list[torch.Tensor] = []
    kwargs, again, pairs = [None] * len(layers), [None] * len(layers), [None] * len(layers)
    mt = getattr(model.config, "model_type", None)
    _blocks_return_pairs(model, input_ids)

    # where the sample being run records its arguments; the last block it needs; the last block it called
    state = {"into": None, "after": 0, "last": -1}
    differing: dict[int, dict[str, list]] = {}  # block -> {argument: each sample's value}: those that differ

    def record(j, keep):
        def forward(*args, **kw):
            if j <= state["last"]:  # pvq hands each block's output to the next in the list, once
                raise _Refused(f"unsupported architecture {mt!r}: its forward runs block {j} again after block "
                               f"{state['last']} (a looped model, whose layers run more than once per forward, as "
                               f"Dory's recurrent section); pvq calibrates each block once, in order; a data-free "
                               f"method (--method pvq) runs no block")
            state["last"] = j
            into = state["into"]
            if into is not None and into[j] is None:
                bound = _as_keywords(layers[j], args, kw, f"unsupported architecture {mt!r}: block {j}")
                for k, v in bound.items():
                    if v is _SECOND:  # what the block before returns beside its hidden states: carry hands it on
                        layers[j - 1]._pvq_hands = k
                # where nothing carries it (Ray workers), a block that reads it stops with one line
                into[j] = {k: Unreplayable(f"unsupported architecture {mt!r}: block {j} reads {k!r}, which block "
                                           f"{j - 1} hands it beside the hidden states (a layer sharing its "
                                           f"predecessor's indexer choices, as GLM-5 can), and nothing carried it "
                                           f"to this call (adapters.carry); a data-free method (--method pvq) runs "
                                           f"no block") if v is _SECOND else v
                           for k, v in bound.items()}
            elif into is None and j in differing:
                bound = _as_keywords(layers[j], args, kw, f"block {j}")
                for k, values in differing[j].items():
                    values.append(bound[k])
            if keep and j == 0:
                hidden.append(_hidden(args, kw).detach())
            elif into is pairs and j == 0:
                state["two"] = _hidden(args, kw)
            if j >= state["after"]:
                raise _Stop
            return _hand_on(model, _hidden(args, kw))
        return forward

    def call(ids):
        state["last"] = -1
        try:
            model(ids, use_cache=False)
        except _Stop:
            pass
        except _Refused as exc:
            raise ValueError(str(exc)) from None
        except Exception as exc:  # the family's forward needs more of its blocks than their hidden states
            raise ValueError(f"unsupported architecture {mt!r}: its forward fails with each block handing on only its "
                             f"hidden states ({one_line(exc, with_type=True)}): a family whose forward works on more "
                             f"of its blocks' outputs than that is not supported") from exc

    with _forwards(layers, lambda j: record(j, True)):
        for i in range(n):  # the first two samples record every block's arguments, the rest those that differ
            state["into"] = kwargs if i == 0 else again if i == 1 else None
            state["after"] = len(layers) - 1 if i < 2 else max(differing, default=0)
            call(input_ids[i : i + 1])
            if i == 1:
                differing.update(_differing(kwargs, again, mt))
    state.update(into=pairs, after=len(layers) - 1)  # two samples (one twice where there is one)
    with _forwards(layers, lambda j: record(j, False)):
        call(input_ids[:2] if n > 1 else input_ids[[0, 0]])
    batch_dim = _doubled(hidden[0], state["two"])
    if batch_dim is None:
        raise ValueError(f"unsupported architecture {mt!r}: pvq cannot tell the samples apart in the hidden states "
                         f"its blocks are given (shape {tuple(hidden[0].shape)} for one sample)")
    for block in layers:  # Gemma 3n's AltUp blocks take [streams, batch, L, D]: pvq holds [batch, streams, L, D]
        block._pvq_batch_dim = batch_dim
    hidden = [h.movedim(batch_dim, 0) for h in hidden]
    if n > 1:
        kwargs = [None if kw is None else {k: _per_sample(v, (two or {}).get(k)) for k, v in kw.items()}
                  for kw, two in zip(kwargs, pairs)]
        for j, args in differing.items():
            for k, values in args.items():
                kwargs[j][k] = _per_token(values, pairs[j].get(k), f"unsupported architecture {mt!r}: block {j}'s "
                                                                   f"argument {k!r}")
    if all(kw is None for kw in kwargs):
        raise ValueError(f"unsupported architecture {mt!r}: its forward calls none of its blocks on text")
    kwargs = [{SKIPPED: True} if kw is None else kw for kw in kwargs]
    for block, kw in zip(layers, kwargs):
        if skipped(kw):
            continue
        for k in ("past_key_values", "past_key_value", "cache"):
            kw.pop(k, None)
        if _takes(block, "use_cache"):  # not every block's forward has it (GPT-1's)
            kw["use_cache"] = False
    return torch.cat(hidden), kwargs


def _takes(module: nn.Module, name: str) -> bool:
    """Whether the module's forward takes keyword `name` (by name or through **kwargs)."""
    params = inspect.signature(type(module).forward).parameters.values()
    return any(p.name == name or p.kind is inspect.Parameter.VAR_KEYWORD for p in params)


@torch.no_grad()
def logits_after_blocks(model, hidden: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """The model's logits when the last block outputs `hidden` [N, L, D] for `input_ids` [N, L]: whatever
    the family does after its blocks (final norm, head, logit scaling or soft-capping) runs as the model
    runs it, with the blocks as pass-throughs that hand on `hidden`."""
    _blocks_return_pairs(model, input_ids)

    d = getattr(blocks(model)[0], "_pvq_batch_dim", 0)
    given = hidden.movedim(0, d) if d else hidden

    def handover(*args, **kw):
        return _hand_on(model, given)

    def through(*args, **kw):
        return _hand_on(model, _hidden(args, kw))

    with _forwards(blocks(model), lambda j: handover if j == 0 else through):
        return model(input_ids, use_cache=False).logits


class _HeadReached(Exception):
    """Raised from the head's pre-hook once its input is summed: the logits themselves are not needed."""


@torch.no_grad()
def head_hessian(model, hidden: torch.Tensor, input_ids: torch.Tensor, batch: int = BATCH) -> torch.Tensor:
    """The mean Hessian of the output head's inputs (float64 [hidden, hidden]) when the last block outputs
    `hidden` [N, L, D] for `input_ids` [N, L]: the family's own code after its blocks (the final norm) runs, a few
    samples at a time, and stops at the head, so no [N, L, vocab] logits are made."""
    head = model.get_output_embeddings()
    acc = HessianAccumulator(head.in_features)

    def summed(module, args):
        acc.add_batch(args[0].float())
        raise _HeadReached

    handle = head.register_forward_pre_hook(summed)
    try:
        for s in range(0, hidden.shape[0], batch):
            part = hidden[s:s + batch]
            try:
                logits_after_blocks(model, part.to(head.weight.device), input_ids[s:s + part.shape[0]])
            except _HeadReached:
                continue
            raise ValueError("the model's forward never reached its output head (get_output_embeddings()), so "
                             "its inputs cannot be measured")
    finally:
        handle.remove()
    return acc.take()


@torch.no_grad()
def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch: int = BATCH, keep: bool = True,
              out: torch.Tensor | None = None, written: dict | None = None):
    """Outputs of one block for all samples (hidden [N, L, D]), a few samples at a time, written into `out`
    where given (a memory-mapped file, say); what the block writes into state later blocks read is appended to
    `written` where given (call_block).

    keep=False runs the block only for its side effects (hooks) and keeps no output.
    """
    out = (torch.empty_like(hidden) if out is None else out) if keep else None
    for s in range(0, hidden.shape[0], batch):
        x = hidden[s : s + batch]
        r = call_block(block, x, kwargs, slice(s, s + x.shape[0]), written)
        if keep:
            out[s : s + batch] = r
    return out


@torch.no_grad()
def run_carrying(block: nn.Module, hidden: torch.Tensor, kwargs: list[dict], index: int, **run) -> torch.Tensor:
    """run_block of block `index` on one stream (kwargs: that stream's arguments of every block), what the block
    writes for later blocks carried to them (carry)."""
    written: dict = {}
    out = run_block(block, hidden, kwargs[index], written=written, **run)
    carry(kwargs, index, written, hidden.shape[0])
    return out


@torch.no_grad()
def block_hessian_sums(block: nn.Module, hidden: torch.Tensor, kwargs: dict, keep: bool = False,
                       written: dict | None = None):
    """({linear name: the linear whose accumulator holds its input's sums}, {that linear: its
    HessianAccumulator}, the block's outputs if keep) for one block run on hidden.

    Linears that read the same tensor share one accumulated Hessian: the first batch is run with hooks
    that hold every linear's input, which tells which inputs are one tensor; the rest accumulate once
    per distinct input (a linear first reached after the first batch, an expert, gets its own). A linear
    no token reached (an expert nobody was routed to) is missing. What the block writes for later blocks goes
    to `written` (carry)."""
    leader, accs, _, out, _ = block_input_sums(block, hidden, kwargs, keep, written=written)
    return leader, accs, out


def _watch(see, name: str):
    """A forward pre-hook that shows a linear's input to see(name, input) and lets it through unchanged: a
    pre-hook's return value replaces the input, so it must return None (dict.setdefault's return would hand a
    linear run twice per call its first input again)."""
    def hook(module, args):
        see(name, args[0])
    return hook


@torch.no_grad()
def block_input_sums(block: nn.Module, hidden: torch.Tensor, kwargs: dict, keep: bool = False,
                     reference: torch.Tensor | None = None, written: dict | None = None,
                     ref_kwargs: dict | None = None, ref_written: dict | None = None):
    """block_hessian_sums, and with `reference` (the unquantized model's inputs to this block for the same
    samples, hidden being the quantized model's) also ({leader: CrossAccumulator of its input's pairs}, the
    block's outputs on reference): (leader, Hessian accumulators, cross accumulators, outputs if keep,
    reference outputs). Each batch of reference runs first, its linears' inputs held, then the same batch of
    hidden, whose hooks pair every token's two inputs. reference may hold only the first samples of hidden:
    the cross sums then come from those and the Hessians from all. Only linears every token reaches are
    paired (a linear whose input is not [batch, tokens, dim] in both, an expert, has no cross accumulator):
    an expert's tokens in one stream are not those in the other. ref_kwargs: the block's arguments for the
    reference's samples, where they differ from kwargs' (state carried on that stream); what the block writes
    for later blocks goes to written (hidden's) and ref_written (reference's)."""
    linears = block_linears(block)
    n = hidden.shape[0]
    if reference is not None and (reference.shape[0] > n or tuple(reference.shape[1:]) != tuple(hidden.shape[1:])):
        raise ValueError(f"block_input_sums: reference {tuple(reference.shape)} must be the first samples of "
                         f"hidden {tuple(hidden.shape)}")
    n_ref = 0 if reference is None else reference.shape[0]  # the samples paired
    out = torch.empty_like(hidden) if keep else None
    ref_out = None if reference is None else torch.empty_like(reference)
    ref_in: dict[str, torch.Tensor] = {}
    crosses: dict[str, CrossAccumulator] = {}
    unpaired: set[str] = set()
    on_ref = [False]  # the hooks below watch the quantized stream only

    def run(s: int) -> None:  # one batch: the reference's (its linears' inputs held), then the quantized stream's
        e = min(s + BATCH, n)
        ref_in.clear()
        if s < n_ref:
            hs = [mod.register_forward_pre_hook(_watch(lambda n, x: ref_in.setdefault(n, x.detach()), name))
                  for name, mod in linears.items()]
            on_ref[0] = True
            try:
                run_block(block, reference[s:min(e, n_ref)],
                          samples_of(kwargs if ref_kwargs is None else ref_kwargs, s, min(e, n_ref)),
                          out=ref_out[s:min(e, n_ref)], written=ref_written)
            finally:
                on_ref[0] = False
                for h in hs:
                    h.remove()
        run_block(block, hidden[s:e], samples_of(kwargs, s, e), keep=keep, out=None if out is None else out[s:e],
                  written=written)

    def pair(name: str, x: torch.Tensor, lead_dims) -> None:
        if not ref_in or name in unpaired:  # no reference for this batch, or a linear not every token reaches
            return
        r = ref_in.get(name)
        if r is None or tuple(x.shape[:-1]) != tuple(lead_dims) or x.shape[1:] != r.shape[1:] \
                or r.shape[0] > x.shape[0]:
            unpaired.add(name)
            crosses.pop(name, None)
            return
        if name not in crosses:
            crosses[name] = CrossAccumulator(x.shape[-1])
        crosses[name].add_batch(x[:r.shape[0]], r)  # a batch that straddles the last paired sample

    # every input of each linear in the first batch, in call order (a linear may run more than once per call:
    # Zaya's delayed value projection also projects a zero state), the tensors themselves (no autograd here:
    # a detached view would be a new object for every linear)
    seen: dict[str, list[torch.Tensor]] = {}

    def see(name: str, x: torch.Tensor) -> None:
        if not on_ref[0]:
            seen.setdefault(name, []).append(x)

    handles = [mod.register_forward_pre_hook(_watch(see, name)) for name, mod in linears.items()]
    try:
        run(0)
    finally:
        for h in handles:
            h.remove()
    # the first linear (in call order) that read the same tensors holds their Hessian
    leader = {name: next(other for other, ys in seen.items() if len(ys) == len(xs) and all(map(operator.is_, ys, xs)))
              for name, xs in seen.items()}
    accs = {name: HessianAccumulator(linears[name].in_features) for name in seen if leader[name] == name}
    lead_dims = hidden.shape[1:-1]
    for name, acc in accs.items():
        for x in seen[name]:
            acc.add_batch(x)
        if len(seen[name]) == 1:
            pair(name, seen[name][0], (min(BATCH, n), *lead_dims))
        else:  # which of the reference's calls a call pairs with is not known
            unpaired.add(name)
    seen.clear()

    def accumulate(name):  # a leader, or a linear the first batch did not reach (an expert): a Hessian of its own
        def hook(m, a, o):
            if on_ref[0]:
                return
            if name not in accs:
                accs[name] = HessianAccumulator(m.in_features)
                leader[name] = name
                unpaired.add(name)  # not in the first batch: perhaps not in every batch
            accs[name].add_batch(a[0])
            pair(name, a[0], (batch[0], *lead_dims))
        return hook

    batch = [0]
    handles = [linears[name].register_forward_hook(accumulate(name)) for name in linears
               if name in accs or name not in leader]
    try:
        for s in range(BATCH, n, BATCH):
            batch[0] = min(s + BATCH, n) - s
            run(s)
    finally:
        for h in handles:
            h.remove()
    return {name: leader[name] for name in linears if name in leader}, accs, crosses, out, ref_out


def block_hessians(block: nn.Module, hidden: torch.Tensor, kwargs: dict, keep: bool = False,
                   written: dict | None = None):
    """({linear name: H = X^T X / rows of its input}, the block's outputs if keep) for one block run on
    hidden; linears that read one tensor share one H (the same tensor object). What the block writes for
    later blocks goes to `written` (carry)."""
    leader, accs, out = block_hessian_sums(block, hidden, kwargs, keep, written)
    hess = {name: accs[name].take() for name in accs}  # one mean at a time, in its sum's memory
    return {name: hess[leader[name]] for name in leader}, out
