"""Calibration samples cut into a fixed number of shards, so the work of a block can be spread.

A block's Hessians are sums over every calibration token. With `shards` > 1 each shard's sums are
formed on their own (its samples run a few at a time from the shard's first sample) and then added
in shard order, in float64; the quantized block's outputs are likewise computed shard by shard. That
is the definition of the result, whoever computes it: one process here, or Ray workers
(distributed.py) that each hold some shards, give the same floats. The shard count is a setting,
never the worker count, so the bytes do not depend on how many workers ran. One shard is the plain
sequential sum.
"""
from __future__ import annotations

import torch

from .adapters import block_hessian_sums, block_input_sums, run_block, samples_of


def shard_bounds(samples: int, shards: int) -> list[tuple[int, int]]:
    """(start, end) sample ranges of `shards` contiguous shards, sizes differing by at most one (the first
    ones larger); fewer when there are fewer samples than shards."""
    if shards < 1:
        raise ValueError(f"calibration shards must be at least 1, got {shards}")
    shards = min(shards, samples)
    base, extra = divmod(samples, shards)
    out, s = [], 0
    for j in range(shards):
        e = s + base + (j < extra)
        out.append((s, e))
        s = e
    return out


def paired_bounds(samples: int, paired: int, shards: int) -> list[tuple[int, int] | None]:
    """Per shard of `samples` samples, the range of its samples that are paired with the unquantized stream
    (the first `paired` samples, --asymmetric-samples), None for a shard past them."""
    return [(s, min(e, paired)) if s < paired else None for s, e in shard_bounds(samples, shards)]


def merge(parts) -> dict[str, torch.Tensor]:
    """{linear name: mean H} from per-shard (leaders, accumulators) taken in shard order: the running
    sum lives in the first shard's memory, each later shard is added to it and dropped."""
    leader, total = {}, {}
    for lead, accs in parts:
        for name, who in lead.items():
            leader.setdefault(name, who)
        for name, acc in accs.items():
            if name in total:
                total[name].merge(acc)
            else:
                total[name] = acc
        del accs
    hess = {name: total[name].take() for name in total}
    return {name: hess[leader[name]] for name in leader if leader[name] in hess}


def sharded_hessians(block, hidden: torch.Tensor, kwargs: dict, shards: int) -> dict[str, torch.Tensor]:
    """{linear name: H} of a block run on every sample of hidden, summed shard by shard."""
    def parts():
        for s, e in shard_bounds(hidden.shape[0], shards):
            lead, accs, _ = block_hessian_sums(block, hidden[s:e], samples_of(kwargs, s, e))
            yield lead, accs
    return merge(parts())


def sharded_asymmetric_sums(block, hidden: torch.Tensor, reference: torch.Tensor, kwargs: dict, shards: int,
                            out: torch.Tensor | None = None, ref_kwargs: dict | None = None,
                            ref_written: dict | None = None):
    """({linear name: H}, {linear name: C}, the block's outputs on reference, written into `out` where given) of
    a block run on every sample of hidden (the quantized model's stream) and of reference (the unquantized
    model's, the same samples or the first of them: C from those, H from all), summed shard by shard
    (adapters.block_input_sums); a linear paired in no shard, or not in every shard with paired samples, has
    no C. ref_kwargs: the block's arguments on the reference stream where they differ from hidden's (state
    carried from earlier blocks); what the block writes there goes to ref_written (adapters.carry)."""
    ref_out = torch.empty_like(reference) if out is None else out
    bounds = shard_bounds(hidden.shape[0], shards)
    pairs = paired_bounds(hidden.shape[0], reference.shape[0], shards)

    def parts():
        for (s, e), pair in zip(bounds, pairs):
            part = None if pair is None else reference[pair[0]:pair[1]]
            lead, accs, crosses, _, part_out = block_input_sums(
                block, hidden[s:e], samples_of(kwargs, s, e), reference=part,
                ref_kwargs=None if pair is None or ref_kwargs is None else samples_of(ref_kwargs, *pair),
                ref_written=ref_written)
            if pair is not None:
                ref_out[pair[0]:pair[1]] = part_out
            yield lead, accs, None if pair is None else crosses
    hess, cross = merge_asymmetric(parts())
    return hess, cross, ref_out


def merge_asymmetric(parts) -> tuple[dict, dict]:
    """({linear name: H}, {linear name: C}) from per-shard (leaders, Hessian accumulators, cross accumulators or
    None for a shard without paired samples) taken in shard order; a linear missing from the crosses of a shard
    with paired samples (no token of those reached it) has no C."""
    paired: list[tuple[dict, dict]] = []  # per shard with paired samples: (leaders, cross accumulators)

    def hessians():
        for lead, accs, crosses in parts:
            if crosses is not None:
                paired.append((lead, crosses))
            yield lead, accs
    hess = merge(hessians())
    both = set.intersection(*(set(c) for _, c in paired)) if paired else set()
    cross = merge((lead, {k: v for k, v in c.items() if k in both}) for lead, c in paired)
    return hess, cross


def reference_outputs(block, reference: torch.Tensor, kwargs: dict, samples: int, shards: int,
                      out: torch.Tensor | None = None, written: dict | None = None) -> torch.Tensor:
    """The block's outputs on the unquantized stream (the first reference.shape[0] of `samples` calibration
    samples), run in the pieces sharded_asymmetric_sums runs them in (batches start at each shard), so a
    resumed run carries the floats of an uninterrupted one; what it writes for later blocks goes to
    `written`."""
    out = torch.empty_like(reference) if out is None else out
    for pair in paired_bounds(samples, reference.shape[0], shards):
        if pair is not None:
            run_block(block, reference[pair[0]:pair[1]], samples_of(kwargs, *pair), out=out[pair[0]:pair[1]],
                      written=written)
    return out


def sharded_outputs(block, hidden: torch.Tensor, kwargs: dict, shards: int, out: torch.Tensor | None = None,
                    written: dict | None = None):
    """The block's outputs for every sample, computed shard by shard (into `out` where given); what it writes
    for later blocks goes to `written` (adapters.carry)."""
    out = torch.empty_like(hidden) if out is None else out
    for s, e in shard_bounds(hidden.shape[0], shards):
        run_block(block, hidden[s:e], samples_of(kwargs, s, e), out=out[s:e], written=written)
    return out
