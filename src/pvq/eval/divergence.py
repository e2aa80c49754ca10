"""How far a quantized model's next-token distribution is from the unquantized model's, token by token.

The figures llama.cpp users compare quantizations by (its `perplexity --kl-divergence`): the mean over
predicted tokens of KL(P_ref || P_model) = sum_v p_ref(v) (log p_ref(v) - log p(v)), in nats, and the
share of tokens whose most likely next token is the same in both. Perplexity alone hides a model that
is confidently wrong where the reference was right and unsure where it was wrong; the divergence does
not. The windows are perplexity's (eval/perplexity.py), so the model's perplexity comes out of the same
passes and equals what `perplexity` reports.
"""
from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from .perplexity import Windows, window_nll


def divergence(model, reference, tokenizer, text: str, seqlen: int = 2048, windows: int | None = 16,
               progress: bool = True) -> dict:
    """dict(kl, top1_agree, ppl, ref_ppl, ...) of `model` against `reference` over the protocol's windows."""
    w = Windows(model, tokenizer, text, seqlen, windows)
    kl_sum, agree, nll, ref_nll = 0.0, 0, 0.0, 0.0
    with torch.inference_mode():
        for batch in tqdm(w, total=w.count, desc=f"kl seqlen={w.seqlen}", disable=not progress):
            logits = model(batch).logits
            ref = reference(batch.to(next(reference.parameters()).device)).logits.to(logits.device)
            if ref.shape[-1] != logits.shape[-1]:
                raise ValueError(f"the reference model predicts {ref.shape[-1]} tokens and the model {logits.shape[-1]}: "
                                 f"they do not share a vocabulary")
            nll += window_nll(logits, batch)
            ref_nll += window_nll(ref, batch)
            lq = logits[0, :-1].float().log_softmax(-1)
            lp = ref[0, :-1].float().log_softmax(-1)
            kl_sum += float((lp.exp() * (lp - lq)).sum(-1).double().sum())
            agree += int((lp.argmax(-1) == lq.argmax(-1)).sum())
    s = w.summary()
    return {"kl": kl_sum / s["predicted"], "top1_agree": agree / s["predicted"], "ppl": math.exp(nll / w.count),
            "ref_ppl": math.exp(ref_nll / w.count), **s}
