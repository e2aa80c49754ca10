"""Runtime measurements: prompt and generation speed, peak RSS while generating, resident weight memory.

The prompt is the same for every model: a fixed English paragraph (below), tokenized and repeated
to the requested length, so runs of the original and the quantized model compare. Peak RSS is the
high-water mark reset just before the measured prompt (memory.py), so the memory of loading (e.g.
dequantizing a GGUF file) is not counted.
"""
from __future__ import annotations

import inspect
import time

import torch

from .memory import peak_rss_mib, release_memory, reset_peak_rss, rss_mib
from .modules.linear import QuantLinear

PROMPT_TEXT = (
    "The river leaves the mountains in a narrow gorge and then spreads across a wide plain, where it has built "
    "fields of fine silt over thousands of years. Farmers along its banks grow wheat in the winter and rice in "
    "the summer, and they measure the seasons by the height of the water. Each spring the snow melts in the "
    "high valleys, the river rises, and the small towns repair the dikes that keep the floods away from their "
    "streets. Travellers who arrive by boat see first the old stone bridge, then the market square, and at last "
    "the tower of the town hall, whose clock has not kept the right time for a hundred years. "
)


def prompt_ids(tokenizer, tokens: int) -> torch.Tensor:
    """[1, tokens] ids of the fixed paragraph, repeated as often as needed."""
    ids = tokenizer(PROMPT_TEXT, return_tensors="pt", add_special_tokens=False).input_ids[0]
    reps = -(-tokens // ids.numel())
    return ids.repeat(reps)[:tokens].reshape(1, tokens)


def quantized_memory(model) -> dict:
    """Bytes the quantized linears keep resident, against their packed (stored) size.

    resident: every tensor a QuantLinear holds (buffers, bias, a kept decoded matrix, a decoder's
    float copies of scales) plus the decode plans its layers share (counted once)."""
    packed = resident = 0
    plans: dict[int, int] = {}
    for m in model.modules():
        if not isinstance(m, QuantLinear):
            continue
        packed += m.nbits // 8
        resident += m.resident_bytes()
        for t in m.shared_tensors():  # plans shared by the layers of one (n, k), tables by every plan
            plans[id(t)] = t.numel() * t.element_size()
    resident += sum(plans.values())
    return {"packed_bytes": packed, "resident_bytes": resident,
            "resident_over_packed": resident / packed if packed else None, "shared_plan_bytes": sum(plans.values())}


def _cache_key(model) -> str:
    """The name under which the model's forward takes, and its output holds, the key-value cache: `cache` where
    the forward takes it (transformers 5.x families, which deprecate `past_key_values`), else `past_key_values`."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.inference_mode()
def run(model, tokenizer, prompt_tokens: int = 512, gen_tokens: int = 64, warmup: bool = True) -> dict:
    """Prompt tokens/s (one forward of the prompt), generated tokens/s (greedy, KV cache), peak RSS."""
    model.eval()
    key = _cache_key(model)
    ids = prompt_ids(tokenizer, prompt_tokens)
    if warmup:  # first calls build rotations, decoders and kernel caches: not what a user waits for per token
        out = model(ids[:, :16], use_cache=True)
        model(out.logits[:, -1:].argmax(-1), **{key: out[key]}, use_cache=True)
        del out
    release_memory()
    rss_before = rss_mib()
    hwm = reset_peak_rss()
    t0 = time.perf_counter()
    out = model(ids, use_cache=True)
    t_prompt = time.perf_counter() - t0
    cache, nxt = out[key], out.logits[:, -1:].argmax(-1)
    del out
    t0 = time.perf_counter()
    for _ in range(gen_tokens):
        o = model(nxt, **{key: cache}, use_cache=True)
        cache, nxt = o[key], o.logits[:, -1:].argmax(-1)
    t_gen = time.perf_counter() - t0
    return {
        "prompt_tokens": prompt_tokens, "gen_tokens": gen_tokens,
        "prompt_tokens_per_s": prompt_tokens / t_prompt, "gen_tokens_per_s": gen_tokens / t_gen,
        "prompt_seconds": t_prompt, "gen_seconds": t_gen,
        "rss_before_mib": rss_before,
        "peak_rss_mib": peak_rss_mib() if hwm else None,
        "threads": torch.get_num_threads(),
    }
