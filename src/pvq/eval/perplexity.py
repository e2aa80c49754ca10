"""Perplexity with the fixed protocol of GPTQ (Frantar et al., 2022), also used by QuIP# and AQLM.

The corpus is tokenized once as a whole and cut into non-overlapping windows of `seqlen` tokens
(the tail shorter than a window is dropped). Each window is scored on its own, labels = inputs:
the first token of a window is context only, so a window predicts seqlen - 1 tokens. The
perplexity is exp of the mean NLL over all predicted tokens; every window predicts the same
number of tokens, so this equals exp of the mean of the per-window mean losses, which is how the
GPTQ scripts compute it. The quick protocol scores the first 16 windows, the full one all.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from pvq.data import encode_text


def perplexity(
    model,
    tokenizer,
    text: str,
    seqlen: int = 2048,
    windows: int | None = 16,
    progress: bool = True,
) -> dict:
    """Score `text` and return dict(ppl, nll, tokens, windows, seqlen, protocol, ...).

    `tokens` counts the tokens fed to the model (windows * seqlen), `predicted` the tokens whose
    NLL is averaged (windows * (seqlen - 1)), `text_tokens` the whole tokenized corpus.
    `seqlen` is capped at the model's max_position_embeddings (tiny test models have 256); the
    value actually used is the one returned. `protocol` is "full" when every window of the text
    was scored, else "quick".

    BOS: the tokenizer's own rule is applied once to the whole text (SmolLM2 adds no BOS, Llama-2
    style tokenizers add one at the very start); windows get no BOS of their own, as in GPTQ.
    """
    w = Windows(model, tokenizer, text, seqlen, windows)
    nll_sum = 0.0  # float64 accumulator: summing many float32 means would drift in the last digit
    with torch.inference_mode():
        for batch in tqdm(w, total=w.count, desc=f"ppl seqlen={w.seqlen}", disable=not progress):
            nll_sum += window_nll(model(batch).logits, batch)
    nll = nll_sum / w.count
    return {"ppl": math.exp(nll), "nll": nll, **w.summary()}


def window_nll(logits: torch.Tensor, batch: torch.Tensor) -> float:
    """Mean NLL of one window: position t predicts token t+1, in float32 whatever the model dtype."""
    return F.cross_entropy(logits[0, :-1].float(), batch[0, 1:], reduction="mean").item()


class Windows:
    """The protocol's windows of `text` for `model`: iterating gives each [1, seqlen] batch on the model's
    device. `seqlen` is capped at the model's max_position_embeddings."""

    def __init__(self, model, tokenizer, text: str, seqlen: int = 2048, windows: int | None = 16):
        max_pos = getattr(model.config, "max_position_embeddings", None)
        self.seqlen = min(seqlen, max_pos) if max_pos else seqlen
        if self.seqlen < 2:
            raise ValueError(f"seqlen must be at least 2, got {self.seqlen}")
        self.ids = encode_text(tokenizer, text)  # [n_tokens]
        self.available = self.ids.numel() // self.seqlen
        if self.available == 0:
            raise ValueError(f"text has {self.ids.numel()} tokens, fewer than one window of {self.seqlen}")
        if windows is not None and windows < 1:
            raise ValueError(f"windows must be positive or None, got {windows}")
        self.count = self.available if windows is None else min(windows, self.available)
        self.device = next(model.parameters()).device

    def __iter__(self):
        for w in range(self.count):
            yield self.ids[w * self.seqlen : (w + 1) * self.seqlen].unsqueeze(0).to(self.device)

    def summary(self) -> dict:
        return {"tokens": self.count * self.seqlen, "predicted": self.count * (self.seqlen - 1),
                "text_tokens": self.ids.numel(), "windows": self.count, "seqlen": self.seqlen,
                "protocol": "full" if self.count == self.available else "quick"}
