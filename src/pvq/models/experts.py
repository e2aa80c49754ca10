"""Mixture-of-experts blocks whose experts are fused 3-D parameters (or 2-D stacks), given one linear per expert.

transformers keeps a block's experts as two stacked tensors (`gate_up_proj` [E, 2I, H] or `up_proj`,
and `down_proj` [E, H, I]; transposed in some families) and multiplies with slices of them, so there
is no `nn.Linear` per expert for pvq to find, hook or replace. `split_experts` turns every such module
into the same module with `gate_up` (or `up`) and `down`: lists of E `nn.Linear` holding the slices
(with their biases), and a forward that routes each token to its experts through them. Each expert's
linears are then ordinary linears: the calibration hooks see exactly the tokens routed to that expert
(its own Hessian), and pvq swaps each for a QuantLinear like any other.

The forward follows the description transformers' experts interface gives every decorated experts
class (`has_gate`, `has_bias`, `is_transposed`, `has_post_expert_norm`, the class's `_apply_gate` and
`act_fn`), the description its batched and grouped kernels already compute from for every family;
the gate/up layout (concatenated or interleaved) is the class's `_apply_gate`'s business, since the
fused gate/up linear keeps the rows in the stored order. An experts module that carries 3-D parameters
without that description is refused with one line. A few classes outside the interface have a known layout
(`_KNOWN`), as DBRX's, whose experts are stacked along the first axis of 2-D parameters.
"""
from __future__ import annotations

import torch
from torch import nn

FIRST = {True: "gate_up", False: "up"}  # the list of first (input) linears, by has_gate


def fused_leaves(mod: nn.Module) -> dict[str, tuple[str, str]]:
    """{a fused tensor's name in a split experts module: (the list of linears it is split into, their parameter)}."""
    return mod.pvq_leaves()


def expert_count(mod: nn.Module) -> int:
    """How many experts a split experts module holds."""
    return len(getattr(mod, next(iter(fused_leaves(mod).values()))[0]))


def _fused(mod: nn.Module) -> bool:
    # other 3-D parameters are no stack of experts and stay as they are: a convolution's kernel (the short
    # causal convolutions of Mamba and linear-attention blocks), RecurrentGemma's block-diagonal gates, RWKV's
    # per-channel mixing vectors. Experts are told by transformers' experts interface or by their class's name
    # (every experts class transformers has is called ...Experts), so one outside the interface is refused
    # rather than left dense unnoticed
    if isinstance(mod, nn.modules.conv._ConvNd):
        return False
    mixin = _KNOWN.get(type(mod).__name__, (None, None))[1]
    if mixin is not None and mixin.pvq_flat:  # experts stacked in 2-D parameters of a child: known by class
        return all(isinstance(_leaf(mod, leaf), nn.Parameter) for leaf in mixin.pvq_leaves(mod))
    if not any(p.dim() == 3 for p in mod.parameters(recurse=False)):
        return False
    return hasattr(mod, "has_gate") or "expert" in type(mod).__name__.lower()


def _holder(mod: nn.Module, leaf: str) -> tuple[nn.Module, str]:
    """(the module holding a fused leaf: `mod`, or its child for one like DBRX's `mlp.w1`; the parameter's name)."""
    owner, _, name = leaf.rpartition(".")
    return (mod.get_submodule(owner) if owner else mod), name


def _leaf(mod: nn.Module, leaf: str):
    """The tensor a fused leaf names, or None."""
    try:
        holder, name = _holder(mod, leaf)
    except AttributeError:
        return None
    return holder._parameters.get(name)


def fused_experts(model: nn.Module) -> bool:
    """Whether `model` still holds fused experts (not split yet)."""
    return any(_fused(m) for m in model.modules())


class _Split:
    """What every mixin below tells about the fused tensors it splits, unless it says otherwise."""

    pvq_split_experts = True
    pvq_flat = False  # True: the fused tensors are 2-D, the experts stacked along their first axis

    def pvq_stored_transposed(self, kind: str) -> bool:
        """Whether the weights of the linears `kind` are stored [in, out] in the fused tensor."""
        return self.is_transposed

    def pvq_stacked(self, fused: torch.Tensor) -> torch.Tensor:
        """The fused weight as [E, ., .], one slice per expert."""
        return fused


class _SplitExperts(_Split):
    """Mixed into the family's experts class: the forward over one linear per expert."""

    def pvq_leaves(self) -> dict[str, tuple[str, str]]:
        return {f"{kind}_proj{suffix}": (kind, param) for kind in (FIRST[self.has_gate], "down")
                for suffix, param in (("", "weight"), ("_bias", "bias"))}

    def pvq_missing(self) -> list[str]:
        """What the module lacks of the experts interface's description, for the refusal."""
        missing = [a for a in ("has_gate", "has_bias", "is_transposed") if not hasattr(self, a)]
        missing += [] if getattr(self, "has_gate", True) else ["act_fn"] * (not hasattr(self, "act_fn"))
        if not missing:
            missing = [n for n in (f"{FIRST[self.has_gate]}_proj", "down_proj") if getattr(self, n, None) is None]
        return missing

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        first = getattr(self, FIRST[self.has_gate])
        out = torch.zeros_like(hidden_states)
        for e in torch.unique(top_k_index).tolist():  # ascending: the same order on every run
            if e >= len(first):  # an expert-parallel placeholder index: no expert here
                continue
            # a slot of weight 0 adds nothing: LongCat-Flash sends its identity ("zero") experts' tokens to real
            # experts with weight 0, which would otherwise count in those experts' Hessians
            token, slot = torch.where((top_k_index == e) & (top_k_weights != 0))
            h = first[e](hidden_states[token])
            h = self._apply_gate(h) if self.has_gate else self.act_fn(h)
            h = self.down[e](h)
            if self.has_post_expert_norm:
                h = self.post_expert_norm(h)
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
        return out


class _SplitDenseExperts(_SplitExperts):
    """Mixed into Llama 4's experts class, which is called with every token for every expert ([E * T, H],
    each expert's rows already scaled by its router score: zero where the router did not choose it): the
    forward over one linear per expert, run on the rows that expert was given. A zero row gives a zero
    output through gate, up and down (no bias, act(0) * 0 = 0), so skipping it is exact, and each expert's
    calibration sees only its own tokens."""

    def forward(self, hidden_states: torch.Tensor) -> torch.Tensor:
        x = hidden_states.view(len(self.gate_up), -1, hidden_states.shape[-1])
        out = torch.zeros_like(x)
        for e in range(x.shape[0]):
            rows = torch.where(x[e].ne(0).any(-1))[0]
            if rows.numel() == 0:
                continue
            gate, up = self.gate_up[e](x[e, rows]).chunk(2, dim=-1)
            out[e, rows] = self.down[e](up * self.act_fn(gate)).to(out.dtype)
        return out.view(-1, x.shape[-1])


class _SplitParallelLinears(_Split):
    """Mixed into JetMoE's experts class, one linear per expert stored as `weight` [E, out, in] (its MLP's
    gate-and-up and down projections, its attention experts' query and output projections, each a module of
    its own): called with the tokens sorted by expert and each expert's count, as the family's router hands
    them. An expert given no token is not called, so its calibration counts no empty batch."""

    def pvq_leaves(self) -> dict[str, tuple[str, str]]:
        return {"weight": ("linears", "weight")}

    def pvq_missing(self) -> list[str]:
        weight = self._parameters.get("weight")
        return [] if weight is not None and weight.dim() == 3 else ["3-D weight"]

    def forward(self, inputs: torch.Tensor, expert_size: list[int]) -> torch.Tensor:
        parts = inputs.split(expert_size, dim=0)
        return torch.cat([lin(x) if len(x) else x.new_zeros(0, lin.out_features) for lin, x in zip(self.linears, parts)])


class _SplitSharedExperts(_Split):
    """Mixed into Inkling's shared experts, `gate_proj`, `up_proj` [S, I, H] and `down_proj` [S, H, I], which
    every token goes through, each scaled by its router weight (`gammas`) before the down projection: the
    forward over one linear per expert and projection, summed in float32 as the family sums them."""

    def pvq_leaves(self) -> dict[str, tuple[str, str]]:
        return {f"{kind}_proj": (kind, "weight") for kind in ("gate", "up", "down")}

    def pvq_missing(self) -> list[str]:
        return [n for n in ("gate_proj", "up_proj", "down_proj", "act_fn") if getattr(self, n, None) is None]

    def forward(self, hidden_states: torch.Tensor, gammas: torch.Tensor) -> torch.Tensor:
        x = hidden_states.reshape(-1, hidden_states.shape[-1])
        gammas = gammas.reshape(x.shape[0], len(self.gate))
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        for s, (gate, up, down) in enumerate(zip(self.gate, self.up, self.down)):
            out += down(self.act_fn(gate(x)) * up(x) * gammas[:, s, None]).float()
        return out.to(hidden_states.dtype).view(hidden_states.shape)


class _SplitFlatGLU(_Split):
    """Mixed into DBRX's experts, whose child `mlp` keeps gate `w1`, up `v1` and down `w2` as 2-D [E * I, H]
    parameters (the down projection multiplied as `h @ w2`, so stored transposed): the forward over one linear
    per expert and projection, on the tokens its router sent it, in the family's order."""

    pvq_flat = True

    def pvq_leaves(self) -> dict[str, tuple[str, str]]:
        return {"mlp.w1": ("gate", "weight"), "mlp.v1": ("up", "weight"), "mlp.w2": ("down", "weight")}

    def pvq_missing(self) -> list[str]:
        missing = [leaf for leaf in _SplitFlatGLU.pvq_leaves(self) if _leaf(self, leaf) is None]
        missing += [a for a in ("num_experts", "hidden_size") if not hasattr(self, a)]
        return missing + ["mlp.activation_fn"] * (not hasattr(getattr(self, "mlp", None), "activation_fn"))

    def pvq_stored_transposed(self, kind: str) -> bool:
        return kind == "down"

    def pvq_stacked(self, fused: torch.Tensor) -> torch.Tensor:
        return fused.view(self.num_experts, -1, fused.shape[-1])

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        x = hidden_states.reshape(-1, self.hidden_size)
        out = torch.zeros_like(x)
        for e in torch.unique(top_k_index).tolist():  # ascending, as the family's loop over the experts hit
            token, slot = torch.where((top_k_index == e) & (top_k_weights != 0))
            h = self.down[e](self.mlp.activation_fn(self.gate[e](x[token])) * self.up[e](x[token]))
            out.index_add_(0, token, (h * top_k_weights[token, slot, None]).to(out.dtype))
        return out.view(hidden_states.shape[0], -1, self.hidden_size)


# experts classes outside transformers' experts interface whose layout is known: the interface's
# description they lack, and the forward their callers expect
_KNOWN = {"Llama4TextExperts": (dict(has_gate=True, has_bias=False, is_transposed=True, has_post_expert_norm=False),
                                _SplitDenseExperts),
          "JetMoeParallelExperts": (dict(has_bias=False, is_transposed=False), _SplitParallelLinears),
          "InklingSharedExperts": (dict(has_bias=False, is_transposed=False), _SplitSharedExperts),
          "DbrxExperts": (dict(has_bias=False, is_transposed=False), _SplitFlatGLU)}

_CLASSES: dict[tuple[type, type], type] = {}


def _split_class(cls: type, mixin: type) -> type:
    """`cls` with the mixin's forward over one linear per expert. Where the family's class builds on the
    class transformers' experts interface decorates (the one holding `_apply_gate`) and calls its forward
    through super() (Ergo's experts: each route its own row, then a norm per expert), the mixin goes beneath
    the family's class: its forward stays, and its super().forward is the split one."""
    if (cls, mixin) not in _CLASSES:
        base = next((k for k in cls.__mro__ if "_apply_gate" in k.__dict__), cls)
        if base is cls:
            made = type(cls.__name__, (mixin, cls), {"__module__": cls.__module__})
        else:  # method resolution: cls, the split base, the mixin, base
            under = type(base.__name__, (mixin, base), {"__module__": base.__module__})
            made = type(cls.__name__, (cls, under), {"__module__": cls.__module__})
        _CLASSES[cls, mixin] = made
    return _CLASSES[cls, mixin]


def _linears(weight: torch.Tensor, bias: torch.Tensor | None, transposed: bool) -> nn.ModuleList:
    """One nn.Linear per expert from a stacked [E, out, in] weight ([E, in, out] when transposed)."""
    out = nn.ModuleList()
    for e in range(weight.shape[0]):
        w = weight[e].T if transposed else weight[e]
        lin = nn.Linear(w.shape[1], w.shape[0], bias=bias is not None, device=w.device, dtype=w.dtype)
        lin.weight = nn.Parameter(w.detach().clone(memory_format=torch.contiguous_format), requires_grad=False)
        if bias is not None:
            lin.bias = nn.Parameter(bias[e].detach().clone(), requires_grad=False)
        out.append(lin)
    return out


def _pop(mod: nn.Module, leaf: str) -> torch.Tensor | None:
    holder, name = _holder(mod, leaf)
    return holder._parameters.pop(name, None)


def split_module(mod: nn.Module, where: str) -> None:
    """Give one fused experts module (`where`: its full name, for the error) one linear per expert, in place."""
    described, mixin = _KNOWN.get(type(mod).__name__, ({}, _SplitExperts))
    for k, v in described.items():
        setattr(mod, k, v)
    missing = mixin.pvq_missing(mod)
    if missing:
        raise ValueError(f"{where} ({type(mod).__name__}) stores its experts as {2 if mixin.pvq_flat else 3}-D tensors "
                         f"without transformers' experts interface (no {', '.join(missing)}); pvq cannot split it")
    leaves = mixin.pvq_leaves(mod)
    for kind in dict.fromkeys(kind for kind, _ in leaves.values()):  # each list once, in the leaves' order
        fused = {param: leaf for leaf, (k, param) in leaves.items() if k == kind}
        weight = mixin.pvq_stacked(mod, _pop(mod, fused["weight"]))
        bias = _pop(mod, fused["bias"]) if mod.has_bias and "bias" in fused else None
        mod.add_module(kind, _linears(weight, bias, mixin.pvq_stored_transposed(mod, kind)))
    mod.__class__ = _split_class(type(mod), mixin)
    # the family's weight initialisation reads the fused tensors this module (or its child holding them, DBRX's
    # mlp) no longer has; its linears hold the values (or, loading a pvq directory, are about to be filled)
    for leaf in leaves:
        _holder(mod, leaf)[0]._is_hf_initialized = True


def split_experts(root: nn.Module, prefix: str = "") -> int:
    """Split every fused experts module under `root` (full names start with `prefix`); returns how many."""
    fused = [(name, mod) for name, mod in root.named_modules() if _fused(mod) and not getattr(mod, "pvq_split_experts", False)]
    for name, mod in fused:
        split_module(mod, prefix + name)
    return len(fused)
