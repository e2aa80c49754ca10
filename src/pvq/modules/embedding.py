"""Quantized input embeddings: a table held as packed codes, whose lookup decodes only the rows it returns.

The table E [vocab, hidden] is stored like a quantized linear of that shape (QuantLinear's buffers), rotated on
its hidden side only: E' = E R_in, so that each token's row is one row of codes, decoded on its own and rotated
back (e = e' R_in^T). Rotating the vocabulary side too would make every row depend on every other.

- QuantEmbedding: a table of its own (--embed-bits B).
- HeadRows: a tied model's embedding that reads the rows of its quantized head (--embed-bits head): the head
  [vocab, hidden] is that same table, quantized without a rotation of its vocabulary side, and stored once.

A lookup decodes each distinct id once. On the fly (the native kernel), only those rows are decoded, so the
table stays packed in memory; in decode="once" mode, or where the kernel is not there (no compiler, a GPU), the
whole table is decoded on first use and kept, like any decode-once layer.
"""
from __future__ import annotations

import torch
from torch import nn

from .dense import follow_dtype
from .linear import OnTheFly, QuantLinear


def lookup(q: QuantLinear, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` [*ids] of the table q holds (in its original basis) as [*ids, hidden] in `dtype`."""
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
    return rows[where].reshape(*ids.shape, q.in_features).to(dtype)


def _rotated_rows(q: QuantLinear, uniq: torch.Tensor) -> torch.Tensor:
    """Rows `uniq` (sorted distinct ids) of the rotated table as float32 [len(uniq), hidden]."""
    run = q.runner
    dec = run.decoder if isinstance(run, OnTheFly) else None
    if dec is None or not dec.native or dec.gpu is not None:
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

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup(self, ids, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        follow_dtype(self, fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"{self.out_features}, {self.in_features}, {self.spec.name}, "
                f"{self.nbits / (self.in_features * self.out_features):.4f} bits/weight, decode={self.decode}")


class HeadRows(nn.Module):
    """The input embedding of a tied model whose table is its quantized head: rows decoded from the head's codes.
    It holds no tensor: the head's are stored once, under the head's name."""

    def __init__(self, head: QuantLinear, compute_dtype: torch.dtype = torch.float32):
        super().__init__()
        if not isinstance(head, QuantLinear):  # whose vocabulary side is not rotated: checked where it is made
            raise ValueError(f"an embedding reads the rows of a quantized head, not of a {type(head).__name__}")
        object.__setattr__(self, "head", head)  # not a submodule: its buffers would be stored twice
        self.num_embeddings, self.embedding_dim = head.out_features, head.in_features
        self.compute_dtype = compute_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return lookup(self.head, ids, self.compute_dtype)

    def _apply(self, fn, recurse=True):
        follow_dtype(self, fn)
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return f"{self.num_embeddings}, {self.embedding_dim}, rows of the quantized head"
