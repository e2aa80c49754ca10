"""Embeddings and head kept in the 16-bit dtype they are stored in, while the model computes in float32.

A pvq file stores the dense tensors (embeddings, head, norms) in `dense_dtype` (float16 by default).
Upcasting the embedding matrix to float32 at load doubles it in memory (SmolLM2-135M: 57 MB stored,
113 MB as float32, more than all its quantized linears) and doubles the bytes the head reads per
generated token. Here the embedding and head modules keep the stored tensor and widen it only where
it is used: an embedding lookup widens the rows it returns; the head widens every weight in
registers (native kernel `dense16_gemv`) for a few tokens, and blocks of rows for many. Every 16-bit
value widens to float32 exactly, so the outputs are the float32 model's up to summation order.

`keep_stored(model, dtype)` swaps the classes of the model's input embedding and output head in place
(tied weights stay one tensor) and turns their weight into a buffer: `model.dtype`, which transformers
reads from the first floating-point parameter, then still reports the compute dtype.
"""
from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F
from torch import nn

from ..runtime import native
from .linear import QuantLinear

GEMV_TOKENS = 8  # at most this many rows of x: native kernel; more: widen ROW_BLOCK rows at a time
ROW_BLOCK = 4096


# id(stored tensor) -> (weak reference to it, weak reference to its copy on another device)
_MOVED: dict[int, tuple[weakref.ref, weakref.ref]] = {}


def follow_dtype(module: nn.Module, fn) -> None:
    """module.compute_dtype after module._apply(fn): a dtype conversion changes it, a device move does not."""
    module.compute_dtype = fn(torch.empty(0, dtype=module.compute_dtype)).dtype


def _keep_weight(module: nn.Module, fn, recurse: bool) -> None:
    """module._apply(fn) for a module whose weight buffer must keep its stored dtype: the weight
    follows device moves only (a tied embedding and head move to one tensor: the second module finds
    the first one's copy in _MOVED); `compute_dtype` follows dtype conversions."""
    before = module._buffers["weight"]
    follow_dtype(module, fn)
    nn.Module._apply(module, fn, recurse)
    after = module._buffers["weight"]
    if after.device == before.device:
        module._buffers["weight"] = before
        return
    src, copy = _MOVED.get(id(before), (None, None))
    moved = copy() if src is not None and src() is before else None
    if moved is None or moved.device != after.device:
        moved = before.to(after.device)
        for key in [k for k, (s, c) in _MOVED.items() if s() is None or c() is None]:
            del _MOVED[key]
        _MOVED[id(before)] = (weakref.ref(before), weakref.ref(moved))
    module._buffers["weight"] = moved


class StoredEmbedding(nn.Embedding):
    """nn.Embedding over a 16-bit weight buffer; returns rows in `compute_dtype`."""

    compute_dtype: torch.dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(ids, self.weight, self.padding_idx, self.max_norm, self.norm_type, self.scale_grad_by_freq,
                           self.sparse).to(self.compute_dtype)

    def _apply(self, fn, recurse=True):
        _keep_weight(self, fn, recurse)
        return self


class StoredHead(nn.Linear):
    """nn.Linear over a 16-bit weight buffer: x W^T (+ b) computed in float32, returned in x's dtype."""

    compute_dtype: torch.dtype

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        rows, cols = w.shape
        h = x.reshape(-1, cols).float().contiguous()
        t = h.shape[0]
        out = native.dense16_gemv(w, h) if t <= GEMV_TOKENS else None
        if out is None:
            out = torch.empty(t, rows, dtype=torch.float32, device=h.device)
            for r0 in range(0, rows, ROW_BLOCK):
                out[:, r0: r0 + ROW_BLOCK] = h @ w[r0: r0 + ROW_BLOCK].float().T
        if self.bias is not None:
            out += self.bias.float()
        return out.reshape(*x.shape[:-1], rows).to(x.dtype)

    def _apply(self, fn, recurse=True):
        _keep_weight(self, fn, recurse)
        return self


def keep_stored(model, dtype: torch.dtype) -> bool:
    """Hold the input embedding and the output head of a float32 transformers model in `dtype` (float16
    or bfloat16: the dense dtype of its file), still computing in float32. Only where that is exact:
    the weights must be float32 copies of `dtype` values (as loaded from the file). Returns whether it did."""
    if dtype not in native.DENSE16_KINDS:
        return False
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    mods = [(m, cls) for m, cls in ((emb, StoredEmbedding), (head, StoredHead)) if type(m) is cls.__bases__[0]]
    # both, or the one left dense beside a quantized one (--head-bits or --embed-bits)
    if len(mods) != 2 and not (len(mods) == 1 and any(isinstance(m, QuantLinear) for m in (emb, head))):
        return False
    if all(any(p is m.weight for m, _ in mods) for p in model.parameters()):
        return False  # nothing else has parameters (OLMo's norms have none): transformers reads device and dtype there
    held: dict[int, torch.Tensor] = {}
    for m, _ in mods:
        w = m.weight.detach()
        if id(m.weight) not in held:
            narrow = w.to(dtype)
            if w.dtype != torch.float32 or not torch.equal(narrow.float(), w):
                return False  # not float32 copies of `dtype` values: narrowing would change the model
            held[id(m.weight)] = narrow
    for m, cls in mods:
        stored = held[id(m.weight)]
        del m._parameters["weight"]
        m.register_buffer("weight", stored)
        m.__class__ = cls
        m.compute_dtype = torch.float32
    return True
