"""QuantEmbedding: an input embedding table held as packed codes, whose lookup decodes only the rows it returns.

The table E [vocab, hidden] is stored like a quantized linear of that shape (QuantLinear's buffers), rotated on
its hidden side only: E' = E R_in, so that each token's row is one row of codes, decoded on its own and rotated
back (e = e' R_in^T). Rotating the vocabulary side too would make every row depend on every other.

A lookup decodes each distinct id once. On the fly (the native kernel), only those rows are decoded, so the
table stays packed in memory; in decode="once" mode, or where the kernel is not there (no compiler, a GPU), the
whole table is decoded on first use and kept, like any decode-once layer.
"""
from __future__ import annotations

import torch

from .linear import OnTheFly, QuantLinear


class QuantEmbedding(QuantLinear):
    """nn.Embedding's forward over QuantLinear's packed buffers: [*ids] -> [*ids, hidden] in compute_dtype."""

    pvq_linear = False  # not a block linear: models.adapters must not take it for one
    compute_dtype = torch.float32

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        vocab = self.out_features
        flat = ids.reshape(-1)
        if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= vocab):
            bad = int(flat[(flat < 0) | (flat >= vocab)][0])
            raise IndexError(f"token id {bad} is outside the embedding table of {vocab} rows")
        uniq, where = torch.unique(flat, return_inverse=True)
        rows = self.rotated_rows(uniq)
        r_in = self.runner.rot.r_in
        if r_in is not None:
            rows = r_in.apply_inverse(rows)
        return rows[where].reshape(*ids.shape, self.in_features).to(self.compute_dtype)

    def rotated_rows(self, uniq: torch.Tensor) -> torch.Tensor:
        """Rows `uniq` (sorted distinct ids) of E' as float32 [len(uniq), hidden]."""
        run = self.runner
        dec = run.decoder if isinstance(run, OnTheFly) else None
        if dec is None or not dec.native or dec.gpu is not None:
            if isinstance(run, OnTheFly):  # a decoder that cannot pick rows: the table kept, as decode-once does
                if getattr(run, "kept", None) is None:
                    run.kept = run.rotated_weight(self)
                table = run.kept
            else:
                table = self.rotated_weight()
            return table[uniq.to(table.device)].float()
        out = torch.empty(uniq.numel(), self.in_features, dtype=torch.float32)
        for j, r in enumerate(uniq.tolist()):
            dec.decode_rows(r, r + 1, out[j:j + 1])
        return out

    def _apply(self, fn, recurse=True):
        self.compute_dtype = fn(torch.empty(0, dtype=self.compute_dtype)).dtype
        return super()._apply(fn, recurse)

    def extra_repr(self) -> str:
        return (f"{self.out_features}, {self.in_features}, {self.spec.name}, "
                f"{self.nbits / (self.in_features * self.out_features):.4f} bits/weight, decode={self.decode}")
