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
    max_pos = getattr(model.config, "max_position_embeddings", None)
    used_seqlen = min(seqlen, max_pos) if max_pos else seqlen
    if used_seqlen < 2:
        raise ValueError(f"seqlen must be at least 2, got {used_seqlen}")

    ids = encode_text(tokenizer, text)  # [n_tokens]
    available = ids.numel() // used_seqlen
    if available == 0:
        raise ValueError(f"text has {ids.numel()} tokens, fewer than one window of {used_seqlen}")
    if windows is not None and windows < 1:
        raise ValueError(f"windows must be positive or None, got {windows}")
    count = available if windows is None else min(windows, available)

    device = next(model.parameters()).device
    nll_sum = 0.0  # float64 accumulator: summing many float32 means would drift in the last digit
    with torch.inference_mode():
        for w in tqdm(range(count), desc=f"ppl seqlen={used_seqlen}", disable=not progress):
            batch = ids[w * used_seqlen : (w + 1) * used_seqlen].unsqueeze(0).to(device)  # [1, seqlen]
            logits = model(batch).logits  # [1, seqlen, vocab]
            # Position t predicts token t+1; the loss is taken in float32 whatever the model dtype.
            loss = F.cross_entropy(
                logits[0, :-1].float(),  # [seqlen-1, vocab]
                batch[0, 1:],  # [seqlen-1]
                reduction="mean",
            )
            nll_sum += loss.item()

    nll = nll_sum / count
    return {
        "ppl": math.exp(nll),
        "nll": nll,
        "tokens": count * used_seqlen,
        "predicted": count * (used_seqlen - 1),
        "text_tokens": ids.numel(),
        "windows": count,
        "seqlen": used_seqlen,
        "protocol": "full" if count == available else "quick",
    }
