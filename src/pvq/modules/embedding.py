"""Quantized input embeddings: a table held as packed codes, whose lookup decodes only the rows it returns.

The table E [vocab, hidden] is stored like a quantized linear of that shape (QuantLinear's buffers), rotated on
its hidden side only: E' = E R_in, so that each token's row is one row of codes, decoded on its own and rotated
back (e = e' R_in^T). Rotating the vocabulary side too would make every row depend on every other.

- QuantEmbedding: a table of its own (--embed-bits B).
- HeadRows: a tied model's embedding that reads the rows of its quantized head (--embed-bits head): the head
  [vocab, hidden] is that same table, quantized without a rotation of its vocabulary side, and stored once.

A family that scales its embedding's rows (Gemma's `*ScaledWordEmbedding`: rows * sqrt(hidden), the factor
rounded to the table's dtype first) keeps that factor (`embed_scale`), read from its own module.

A lookup decodes each distinct id once. On the fly (the native kernel on a CPU, the Triton kernels on a GPU), only
those rows are decoded, so the table stays packed in memory; in decode="once" mode, or where no kernel is there (no
compiler; a setting the Triton kernels do not cover), the whole table is decoded on first use and kept, like any
decode-once layer.
"""
from __future__ import annotations

import torch
from torch import nn

from .dense import follow_dtype
from .linear import OnTheFly, QuantLinear


def embedding_scale(mod: nn.Module) -> float | None:
    """The factor a scaled embedding of a family multiplies its rows by (Gemma's *ScaledWordEmbedding keeps it as
    `scalar_embed_scale`); None for anything else."""
    s = getattr(mod, "scalar_embed_scale", None)
    if not (isinstance(mod, nn.Embedding) and type(mod).__name__.endswith("ScaledWordEmbedding")):
        return None
    return float(s) if isinstance(s, (int, float)) and not isinstance(s, bool) else None


def checked_scale(mod: nn.Module) -> float | None:
    """embedding_scale of a table that is about to be quantized, once its forward was seen to return its rows
    times that factor (ValueError otherwise: a family whose scaled embedding does more)."""
    factor = embedding_scale(mod)
    if factor is not None:
        probe = torch.tensor([0, mod.num_embeddings - 1], device=mod.weight.device)
        with torch.no_grad():
            same = torch.equal(mod(probe), scaled(nn.functional.embedding(probe, mod.weight), factor))
        if not same:
            raise ValueError(f"--embed-bits: this model's {type(mod).__name__} does not return its rows times "
                             f"{factor:g}, which is all pvq keeps of it; drop --embed-bits")
    return factor


def scaled(rows: torch.Tensor, embed_scale: float | None) -> torch.Tensor:
    """rows times a scaled embedding's factor as the family multiplies them: the factor in float32, rounded to the
    rows' dtype."""
    return rows if embed_scale is None else rows * torch.tensor(embed_scale).to(rows.dtype)


def lookup(q: QuantLinear, ids: torch.Tensor, dtype: torch.dtype, embed_scale: float | None = None) -> torch.Tensor:
    """Rows `ids` [*ids] of the table q holds (in its original basis) as [*ids, hidden] in `dtype`, times
    `embed_scale` where given."""
    vocab = q.out_features
    flat = ids.reshape(-1)
    if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab):
        bad = int(flat[(flat < 0) | (flat >= vocab)][0])
        raise IndexError(f"token id {bad} is outside the embedding table of {vocab} rows")
    uniq, where = torch.unique(flat, return_inverse=True)
    rows = _rotated_rows(q, uniq)
    r_in = q.runner.rot.r_in
    if r_in is not None:
        rows = r_in.apply_inverse(rows)
    return scaled(rows[where].reshape(*ids.shape, q.in_features).to(dtype), embed_scale)


def _rotated_rows(q: QuantLinear, uniq: torch.Tensor) -> torch.Tensor:
    """Rows `uniq` (sorted distinct ids) of the rotated table as float32 [len(uniq), hidden]."""
    run = q.runner
    dec = run.decoder if isinstance(run, OnTheFly) else None
    if dec is not None and dec.gpu is not None:  # the Triton kernel decodes just those rows
        return dec.gpu.decode_rows(uniq)
    if dec is None or not dec.native:
        if isinstance(run, OnTheFly):  # a decoder that cannot pick rows: the table kept, as decode-once does
            if run.kept is None:
                run.kept = run.rotated_weight(q)
            table = run.kept
        else:
            table = q.rotated_weight()
        return table[uniq.to(table.device)].float()
    out = torch.empty(uniq.numel(), q.in_features, dtype=torch.float32)
    for j, r in enumerate(uniq.tolist()):
        dec.decode_rows(r, r + 1, out[j:j + 1])
    return out


class QuantEmbedding(QuantLinear):
    """nn.Embedding's forward over QuantLinear's packed buffers: [*ids] -> [*ids, hidden] in compute_dtype."""

    pvq_linear = False  # not a block linear: models.adapters must not take it for one
    compute_dtype = torch.float32
    embed_scale: float | None = None  # a scaled embedding's factor (embedding_scale)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup(self, ids, self.compute_dtype, self.embed_scale)

    def _apply(self, fn, recurse=True):
        follow_dtype(self, fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f", rows x {self.embed_scale:g}"
        return (f"{self.out_features}, {self.in_features}, {self.spec.name}, "
                f"{self.nbits / (self.in_features * self.out_features):.4f} bits/weight, decode={self.decode}{scale}")


class HeadRows(nn.Module):
    """The input embedding of a tied model whose table is its quantized head: rows decoded from the head's codes.
    It holds no tensor: the head's are stored once, under the head's name."""

    def __init__(self, head: QuantLinear, compute_dtype: torch.dtype = torch.float32, embed_scale: float | None = None):
        super().__init__()
        if not isinstance(head, QuantLinear):  # whose vocabulary side is not rotated: checked where it is made
            raise ValueError(f"an embedding reads the rows of a quantized head, not of a {type(head).__name__}")
        object.__setattr__(self, "head", head)  # not a submodule: its buffers would be stored twice
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.compute_dtype = compute_dtype
        self.embed_scale = embed_scale

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup(self.head, ids, self.compute_dtype, self.embed_scale)

    def _apply(self, fn, recurse=True):
        follow_dtype(self, fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        scale = "" if self.embed_scale is None else f" x {self.embed_scale:g}"
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantized head{scale}"
