"""Zero-shot ARC-Easy (Clark et al., 2018) by log-likelihood, scored like lm-evaluation-harness.

Each choice is a continuation " {choice}" of the context "Question: {question}\\nAnswer:". Its
score is the summed log-probability of the continuation tokens given the context. `acc` picks the
highest score; `acc_norm` the highest score divided by the choice's length in characters (the
harness's `completion_len`, taken on the choice text without the leading space).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from tqdm.auto import tqdm


def _context(row: dict) -> str:
    return f"Question: {row['question']}\nAnswer:"


def _encode_pair(tokenizer, context: str, continuation: str) -> tuple[list[int], list[int]]:
    # As the harness does: encode context+continuation together and take the continuation as
    # what follows the context's own tokens, so a merge across the boundary cannot drop or
    # duplicate a token. No special tokens, as the harness's default for causal models.
    whole = tokenizer(context + continuation, add_special_tokens=False).input_ids
    ctx = tokenizer(context, add_special_tokens=False).input_ids
    return ctx, whole[len(ctx) :]


def score_continuations(
    model,
    tokenizer,
    requests: list[tuple[str, str]],
    batch_size: int = 16,
    progress: bool = True,
) -> list[float]:
    """Summed log-probability of each continuation given its context, in request order."""
    max_len = getattr(model.config, "max_position_embeddings", None)
    items = []  # (input ids, number of continuation tokens, request index)
    for i, (context, continuation) in enumerate(requests):
        ctx, cont = _encode_pair(tokenizer, context, continuation)
        if not cont:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens")
        tokens = ctx + cont
        if max_len:
            # Keep the end: the continuation must be scored whole, the context may lose its head.
            tokens = tokens[-(max_len + 1) :]
        # The last token is only a target; the model never needs to see it as input.
        items.append((tokens, len(cont), i))

    # Longest first so each batch pads little; results are put back in request order.
    items.sort(key=lambda item: -len(item[0]))
    scores = [0.0] * len(requests)
    device = next(model.parameters()).device
    batches = range(0, len(items), batch_size)
    with torch.inference_mode():
        for start in tqdm(batches, desc="arc", disable=not progress):
            chunk = items[start : start + batch_size]
            width = len(chunk[0][0]) - 1  # longest input in the chunk (sorted)
            # Right padding needs no attention mask: with causal attention a real token never
            # attends to the pad tokens after it, so its logits are those of the unpadded input.
            inputs = torch.zeros(len(chunk), width, dtype=torch.long)  # [B, width]
            for row, (tokens, _, _) in enumerate(chunk):
                inputs[row, : len(tokens) - 1] = torch.tensor(tokens[:-1])
            # Only positions that predict a continuation token need the vocabulary projection,
            # a fifth of SmolLM2's compute per token: ask for the last `keep` positions only.
            keep = width - min(len(tokens) - 1 - n_cont for tokens, n_cont, _ in chunk)
            logits = model(inputs.to(device), logits_to_keep=keep).logits  # [B, keep, vocab]
            # Read the offset from the shape, so a model that ignores logits_to_keep still works.
            offset = width - logits.shape[1]
            for row, (tokens, n_cont, index) in enumerate(chunk):
                n_in = len(tokens) - 1
                # Inputs n_in - n_cont .. n_in - 1 predict the n_cont continuation tokens.
                picked = logits[row, n_in - n_cont - offset : n_in - offset].float()  # [n_cont, vocab]
                targets = torch.tensor(tokens[-n_cont:], device=picked.device)  # [n_cont]
                logp = F.log_softmax(picked, dim=-1).gather(1, targets[:, None])  # [n_cont, 1]
                scores[index] = logp.sum().item()
    return scores


def arc_easy_accuracy(model, tokenizer, rows: list[dict], progress: bool = True, batch_size: int = 16) -> dict:
    """0-shot accuracy on ARC rows (as from pvq.data.load_arc_easy) -> dict(acc, acc_norm, n)."""
    if not rows:
        raise ValueError("no ARC rows to score")
    requests, spans, golds = [], [], []
    for row in rows:
        choices = row["choices"]["text"]
        labels = row["choices"]["label"]
        golds.append(labels.index(row["answerKey"]))
        spans.append((len(requests), len(choices)))
        requests.extend((_context(row), f" {choice}") for choice in choices)

    scores = score_continuations(model, tokenizer, requests, batch_size=batch_size, progress=progress)

    correct = correct_norm = 0
    for (first, count), gold, row in zip(spans, golds, rows):
        lls = scores[first : first + count]
        norm = [ll / max(len(text), 1) for ll, text in zip(lls, row["choices"]["text"])]
        # max over indices keeps the first of tied scores, as numpy's argmax does in the harness.
        correct += max(range(count), key=lls.__getitem__) == gold
        correct_norm += max(range(count), key=norm.__getitem__) == gold
    n = len(rows)
    return {"acc": correct / n, "acc_norm": correct_norm / n, "n": n}
