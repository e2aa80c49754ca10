"""Where the pieces of each supported model family live, and block-by-block calibration capture.

One table for every family (DESIGN.md: no script per family, no forked modeling files). The
Llama family as transformers defines it (llama, mistral, qwen2, qwen3) shares one layout:
model.model.layers[i].{self_attn.{q,k,v,o}_proj, mlp.{gate,up,down}_proj}.
"""
from __future__ import annotations

import torch
from torch import nn

from ..solvers.hessian import HessianAccumulator
from .loading import SUPPORTED_MODEL_TYPES

# linears of one block, in the order they run; names are relative to the block
LINEARS = (
    "self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
    "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
)
# linears that read the same input (so one Hessian serves all of them)
SHARED_INPUT = {"self_attn.k_proj": "self_attn.q_proj", "self_attn.v_proj": "self_attn.q_proj",
                "mlp.up_proj": "mlp.gate_proj"}


def check_supported(model) -> None:
    mt = getattr(model.config, "model_type", None)
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unsupported architecture {mt!r}; pvq supports {', '.join(SUPPORTED_MODEL_TYPES)}")


def blocks(model) -> nn.ModuleList:
    check_supported(model)
    return model.model.layers


def layer_name(index: int, name: str) -> str:
    """The full module name of linear `name` (relative to its block, e.g. "mlp.up_proj") of block `index`."""
    return f"{block_prefix(index)}{name}"


def block_prefix(index: int) -> str:
    """The prefix of the full names of block `index`'s modules and tensors."""
    return f"model.layers.{index}."


def block_linear_names(model) -> list[tuple[str, nn.Module]]:
    """(full name, module) of every quantizable linear of the model's blocks, in block and run order."""
    return [(layer_name(i, name), block.get_submodule(name)) for i, block in enumerate(blocks(model))
            for name in LINEARS]


def block_linears(block: nn.Module) -> dict[str, nn.Module]:
    """The quantizable linears of one block, by name relative to the block."""
    return {name: block.get_submodule(name) for name in LINEARS}


def set_module(root: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, leaf = name.rpartition(".")
    setattr(root.get_submodule(parent) if parent else root, leaf, module)


class _Stop(Exception):
    """Raised by the capture hook: nothing past block 0 needs to run."""


@torch.no_grad()
def capture_block_inputs(model, input_ids: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """Inputs of block 0 for every calibration sample: (hidden [N, L, D], keyword arguments of the call).

    The keyword arguments (rotary position embeddings, masks) are the same for every sample of the
    same length, so they are kept once.
    """
    layers = blocks(model)
    hidden, kwargs = [], {}

    def hook(_module, args, kw):
        hidden.append((args[0] if args else kw["hidden_states"]).detach())
        if not kwargs:
            kwargs.update({k: v for k, v in kw.items() if k != "hidden_states"})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(hook, with_kwargs=True)
    try:
        for i in range(input_ids.shape[0]):
            try:
                model(input_ids[i : i + 1], use_cache=False)
            except _Stop:
                pass
    finally:
        handle.remove()
    kwargs.pop("past_key_values", None)
    kwargs.pop("cache", None)
    kwargs["use_cache"] = False
    return torch.cat(hidden), kwargs


@torch.no_grad()
def run_block(block: nn.Module, hidden: torch.Tensor, kwargs: dict, batch: int = 8, keep: bool = True):
    """Outputs of one block for all samples (hidden [N, L, D]), a few samples at a time.

    keep=False runs the block only for its side effects (hooks) and keeps no output.
    """
    out = torch.empty_like(hidden) if keep else None
    for s in range(0, hidden.shape[0], batch):
        r = block(hidden[s : s + batch], **kwargs)
        if keep:
            out[s : s + batch] = r[0] if isinstance(r, tuple) else r
    return out


@torch.no_grad()
def block_hessians(block: nn.Module, hidden: torch.Tensor, kwargs: dict, keep: bool = False):
    """({linear name: H = X^T X of its input}, the block's outputs if keep) for one block run on hidden.

    Linears that read the same input (SHARED_INPUT) share one accumulated Hessian."""
    linears = block_linears(block)
    accs, handles = {}, []
    for name, mod in linears.items():
        if name in SHARED_INPUT:
            continue
        accs[name] = HessianAccumulator(mod.in_features)
        handles.append(mod.register_forward_hook(lambda m, a, o, acc=accs[name]: acc.add_batch(a[0])))
    try:
        out = run_block(block, hidden, kwargs, keep=keep)
    finally:
        for h in handles:
            h.remove()
    return {name: accs[SHARED_INPUT.get(name, name)].hessian() for name in linears}, out
