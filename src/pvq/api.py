"""The library front: quantize a causal LM in place, block by block; summarise what is stored.

Calibration runs block by block (GPTQ's sequential scheme): capture the inputs of block 0, collect
the Hessians of the block's linears, quantize them, recompute the block's outputs with the quantized
block, and feed those to the next block. Peak memory is one block plus the calibration activations.
"""
from __future__ import annotations

import math
import time

import torch
from tqdm.auto import tqdm

from . import codec
from .checkpoint import stored_tensors
from .codec.fp16 import FP16RangeError
from .finetune import Teacher, block_targets, reference_stream, tune_block, tune_model, tuned_names
from .loader import check_device
from .memory import release_memory, settled_heap, trim_heap
from .models.adapters import (PerSample, PerToken, block_linear_names, block_linears, block_prefix, blocks,
                              capture_block_inputs, carried_after, carry, check_supported, hand_on, head_hessian,
                              set_module, skipped, weight_read_directly)
from .models.shards import reference_outputs, sharded_asymmetric_sums, sharded_hessians, sharded_outputs
from .models.streaming import materialize, release, release_parameters
from .modules.actquant import attach, bits_per_activation, bits_per_activation_of
from .modules.embedding import HeadRows, QuantEmbedding, checked_scale, embedding_scale
from .modules.linear import QuantLinear
from .picker import act_spec, choose_spec
from .settings import DENSE_DTYPES, QuantConfig, quantization_config, spec_from_dict, spec_to_dict
from .solvers.gptq import asymmetric_target, gptq, rows_per_solve
from .solvers.hessian import ErrorSum
from .solvers.steppers import PVQStepper, UniformStepper
from .transforms.rotate import NO_SEED, derive_seed, layer_seeds, rotate_hessian, rotated_rows


def check_weights(model, cfg: QuantConfig, names=None, reader=None) -> None:
    """Refuse, before any work, a parameter holding NaN or inf, or one that stays dense (embeddings, norms,
    head) with a value outside the range of the dtype it will be stored in (--dense-dtype). `names`: only
    those. A parameter not read yet (meta device) is read from `reader` (a streamed checkpoint, one tensor
    at a time) or, without one, skipped."""
    dtype = DENSE_DTYPES[cfg.dense_dtype]
    top = torch.finfo(dtype).max
    quantized = {id(m.weight) for _, m in block_linear_names(model) if not isinstance(m, QuantLinear)}
    for name, p in model.named_parameters():
        if not p.is_floating_point() or (names is not None and name not in names):
            continue
        if p.device.type == "meta" and (reader is None or name not in reader):
            continue
        t = reader.get(name) if p.device.type == "meta" else p.detach()
        v = _first_bad(t, math.inf if id(p) in quantized else top)
        if v is not None:
            if id(p) in quantized or not math.isfinite(v):
                raise ValueError(f"tensor {name} holds {v}; refusing to quantize a model with NaN or inf weights")
            hint = "" if dtype == torch.float32 else "; store it wider with --dense-dtype bfloat16 or float32"
            raise ValueError(f"tensor {name} holds {v:.4g}, which {cfg.dense_dtype} cannot store{hint}")


def _first_bad(t: torch.Tensor, top: float, chunk: int = 1 << 22) -> float | None:
    """The first value of `t` that is NaN, infinite or above `top` in magnitude (None if none), looked for
    a slice at a time so the check of a large embedding costs no large temporaries."""
    flat = t.reshape(-1)
    for s in range(0, flat.numel(), chunk):
        part = flat[s:s + chunk].float()
        bad = ~torch.isfinite(part) | (part.abs() > top)
        if bool(bad.any()):
            return float(part[bad][0])
    return None


def calibration_precision(cfg: QuantConfig, hidden: torch.Tensor | None):
    """The context the calibration forwards run in: bfloat16 autocast for cfg.calib_dtype "bfloat16" (matrix
    products and attention in bfloat16, norms, softmax and the residual stream in float32), else nothing."""
    on = cfg.uses_data and cfg.calib_dtype == "bfloat16" and hidden is not None
    return torch.autocast(hidden.device.type if on else "cpu", dtype=torch.bfloat16, enabled=on)


def layer_spec(cfg: QuantConfig, name: str, rows: int, cols: int):
    """The codec setting of layer `name`: its override (an allocation plan) or the one cfg.bits picks."""
    if cfg.overrides and name in cfg.overrides:
        spec = spec_from_dict(cfg.overrides[name])
        spec.check_shape(rows, cols)
        return spec
    return choose_spec(cfg, rows, cols)


@torch.no_grad()
@settled_heap()
def quantize(model, cfg: QuantConfig, calib_ids: torch.Tensor | None = None, progress: bool = True,
             reader=None, writer=None, pool=None, source: str | None = None, activations=None,
             device: str | torch.device | None = None, tune_ids: torch.Tensor | None = None) -> dict:
    """Quantize every linear of the transformer blocks of `model` in place. Returns a summary dict.

    summary["layer_errors"]: per layer, the relative error the quantizer left
    (solvers.hessian.relative_error, in the calibration Hessian's metric for gptq and pvq-gptq).

    calib_ids: LongTensor [nsamples, seqlen] of calibration tokens (needed by gptq and pvq-gptq).
    reader: a models.streaming.CheckpointReader when `model` is a skeleton (models.loading.load_skeleton):
    each block's weights are read when its turn comes (the input embeddings first when calibrating, the
    rest at the end). writer: a checkpoint.Writer that
    takes each finished block's tensors, after which the block's memory is released (the model is then
    a shell: run the written directory, not this model); a writer that took over a killed run's directory
    makes this continue after the run's last finished block. pool: a distributed.Pool whose workers
    quantize the blocks (data-free methods, with a writer), each opening `source` (the model's path,
    None for the default model) itself; this process writes what they return, in block order.
    activations: an offload.ActivationFiles that holds the calibration activations in files, not memory.
    cfg.finetune "model" / "both" keeps every finished block (a writer still gets each as it is done), carries
    the unquantized model's outputs on the tuning samples beside the quantized stream, and tunes the whole
    model at the end (finetune.tune_model); a writer records the tuned values, so a resumed run assembles them.
    tune_ids: LongTensor [n, seqlen], the samples the whole model is tuned on when they are to be more than the
    calibration's (None: the first --finetune-tokens of calib_ids).
    device: where a calibrated method (gptq, pvq-gptq) runs the work of a block (a GPU: "cuda"): the block,
    the calibration activations and the solver go there, the model stays where it is and each finished block
    comes back (the codes are made on the CPU, where the enumeration and the files are). None: where the
    model is (the CPU). The results are those of the CPU up to the order of floating-point sums.
    """
    check_supported(model)
    device = check_work_device(device, cfg, pool, activations)
    end_modules(model, cfg)  # a head or embedding table that cannot be quantized fails now, not after the blocks
    layers = blocks(model)
    prefixes = tuple(block_prefix(model, i) for i in range(len(layers)))
    before = []  # calibration runs what comes before the blocks now (the input embeddings, OPT's position
    if reader is not None and cfg.uses_data:  # embeddings, ...); the blocks and the head wait
        head = model.get_output_embeddings()
        later = {f"{n}.{k}" if n else k for n, m in model.named_modules() if m is head for k, _ in m.named_parameters()}
        before = materialize(model, reader, lambda n: not n.startswith(prefixes) and n not in later)
    check_weights(model, cfg)  # every parameter read so far
    if cfg.uses_data and calib_ids is None:
        raise ValueError(f"method {cfg.method} needs calibration data (calib_ids)")
    t0 = time.time()
    start, per_layer, errors, saved = writer.resumed() if writer is not None else (0, {}, {}, None)
    hidden = kwargs = fp_kwargs = ref_kwargs = None
    carried: dict = {}  # what the quantized stream's blocks carry to later ones (adapters.carry), as saved
    fp_carried: dict = {}  # the same on --asymmetric's unquantized stream (for Ray workers' shards)
    uncalibrated: list[str] = []
    tuning: list[dict] = []  # per block: the tuning loss before and after (--finetune blocks)
    ref = ref_ids = None  # --finetune model: the unquantized model's stream on the tuning samples
    fp = None  # --asymmetric: the unquantized model's stream on the calibration samples
    if cfg.uses_data:  # block 0's inputs, and every block's call arguments (rotary embeddings, masks)
        hidden, kwargs = capture_block_inputs(model, calib_ids)
        # each stream its own arguments: what a block writes for later ones (carry) differs between them
        fp_kwargs, ref_kwargs = [dict(kw) for kw in kwargs], [dict(kw) for kw in kwargs]
        if cfg.asymmetric:  # both streams start from the same embeddings (on the first samples: see settings)
            paired = hidden[:cfg.asymmetric_samples or hidden.shape[0]]
            fp = paired.clone() if activations is None else activations.reference.hold(paired)
        if cfg.tunes_model:  # the calibration samples, or tune_ids (which may hold more), with their arguments
            ref_ids = calib_ids[:tuning_samples(cfg, calib_ids)] if tune_ids is None else tune_ids
            if tune_ids is None:
                ref = hidden[:ref_ids.shape[0]].float().clone()
            else:  # what a block is given per sample (token ids, per-layer inputs) is the tuning samples' here
                ref, ref_kwargs = capture_block_inputs(model, ref_ids)
                ref = ref.float()
        hidden = hidden if saved is None else saved
        carried = {} if writer is None or saved is None else writer.carried()
        if device is not None:
            hidden, kwargs = hidden.to(device), [to_device(k, device) for k in kwargs]
            fp, fp_kwargs = None if fp is None else fp.to(device), [to_device(k, device) for k in fp_kwargs]
            carried = {k: to_device(v, device) for k, v in carried.items()}
        hand_on(kwargs, start - 1, carried)  # what the blocks a killed run finished carry to later ones
        if reader is not None:  # read again with the rest at the end: not held through every block
            release_parameters(model, [model.get_parameter(n) for n in before])
        if activations is not None:
            hidden = activations.hold(hidden)
    bar = tqdm(total=len(block_linear_names(model)), desc=f"quantize {cfg.method} {cfg.bits} bpw", disable=not progress, unit="linear")
    done_elsewhere, shards = iter(()), None
    if pool is not None and writer is None:
        raise ValueError("quantizing on workers writes each block as it is done: it takes a writer")
    if pool is not None and cfg.finetune != "none":
        raise ValueError(f"--finetune {cfg.finetune} runs in one process: drop --workers / --ray-address")
    if pool is not None and cfg.uses_data:  # the activations go to the workers' object store, in shards
        shards, hidden = pool.calibration(hidden, kwargs, cfg, carried), None
        # the linears' bar moves as workers finish them; this one as blocks are written
        blocks_bar = tqdm(total=len(layers), initial=start, desc="blocks", disable=not progress, unit="block")
    elif pool is not None:  # every remaining block a task of its own, their results taken in block order
        done_elsewhere = pool.quantize_blocks(model, source, cfg, range(start, len(layers)))
    for i, block in enumerate(layers):
        prefix = prefixes[i]
        if i < start:  # done by the run this one resumes
            tuned_ref = ref is not None and writer.tuned() is None
            if reader is not None and (tuned_ref or fp is not None):
                materialize(model, reader, lambda n: n.startswith(prefix))
            if fp is not None:  # the unquantized stream as the killed run computed it, through the float block
                block.to(fp.device)
                written = {}
                with calibration_precision(cfg, fp):
                    fp = reference_outputs(block, fp, fp_kwargs[i], calib_ids.shape[0], cfg.calib_shards,
                                           None if activations is None else activations.reference.empty_like(fp),
                                           written)
                fp_carried = carried_after(fp_carried, carry(fp_kwargs, i, written, fp.shape[0]))
                block.to("cpu")
            if tuned_ref:  # its reference outputs and its quantized form again
                ref = reference_stream(block, ref, ref_kwargs, i)
                install_written(block, prefix, per_layer, writer.block_tensors(i))
            else:
                release(block)
            bar.update(len(block_linears(block)))
            continue
        if shards is not None:  # blocks in order, the work inside each spread over the workers
            if fp is not None:  # the unquantized stream joins the workers' shards from here on
                shards.pair(fp, fp_carried)
                fp = None
            if reader is not None:
                check_weights(model, cfg, materialize(model, reader, lambda n: n.startswith(prefix)))
            # the outputs the next block reads, or the head after the last one
            keep = i + 1 < len(layers) or cfg.head_bits is not None
            saves = writer.shard_activations(i, len(shards.acts)) if keep else None
            made, done, err = shards.quantize_block(block, i, prefix, bar, uncalibrated, saves)
            per_layer.update(done)
            errors.update(err)
            install(block, made)
            act = None if saves is None else shards.checkpoint(saves)  # files the workers wrote, or the tensor
            writer.add_block(i, stored_tensors(model, DENSE_DTYPES[cfg.dense_dtype], prefix), done, err, act,
                             shards.held() if isinstance(act, torch.Tensor) else None)
            release(block)
            release_memory()
            blocks_bar.update(1)
            continue
        if pool is not None:
            _, (tensors, done, err) = next(done_elsewhere)
            per_layer.update(done)
            errors.update(err)
            writer.add_block(i, tensors, done, err, None)
            release(block)  # a model loaded whole keeps none of it: the worker's tensors are what is stored
            bar.update(len(done))
            continue
        if reader is not None:
            check_weights(model, cfg, materialize(model, reader, lambda n: n.startswith(prefix)))
        if device is not None:
            block.to(device)
        tune = hidden[:tuning_samples(cfg, hidden)] if cfg.tunes_blocks else None
        target = None if tune is None else block_targets(block, tune, kwargs[i])
        if ref is not None:
            ref = reference_stream(block, ref, ref_kwargs, i)
        cross, fp_written = {}, {}
        with calibration_precision(cfg, hidden):
            if fp is not None:  # and the block's outputs on the unquantized stream, for the next block
                hess, cross, fp = sharded_asymmetric_sums(block, hidden, fp, kwargs[i], cfg.calib_shards,
                                                          None if activations is None else activations.reference.empty_like(fp),
                                                          fp_kwargs[i], fp_written)
                fp_carried = carried_after(fp_carried, carry(fp_kwargs, i, fp_written, fp.shape[0]))
            else:
                hess = sharded_hessians(block, hidden, kwargs[i], cfg.calib_shards) if cfg.uses_data else {}
        made, done, err = quantize_linears(block, prefix, cfg, hess, bar, uncalibrated, drop=writer is not None,
                                           cross=cross)
        del hess, cross
        if tune is not None:
            tuning.append({"block": i, **tune_block(
                block, made, tune, target, kwargs[i], steps=cfg.finetune_steps, lr=cfg.finetune_lr,
                schedule=cfg.finetune_schedule,
                seed=derive_seed(cfg.seed, f"finetune {i}"), stored=DENSE_DTYPES[cfg.dense_dtype],
                desc=f"tune block {i}", progress=progress, precision=lambda: calibration_precision(cfg, tune))})
            del tune, target
        per_layer.update(done)
        errors.update(err)
        if cfg.uses_data:  # the quantized block's outputs feed the next block, and what it writes for later ones
            written = {}
            with calibration_precision(cfg, hidden):
                hidden = run_as_quantized(block, made, hidden, kwargs[i],
                                          None if activations is None else activations.empty_like(hidden),
                                          cfg.calib_shards, written)
            carried = carried_after(carried, carry(kwargs, i, written, hidden.shape[0]))
        install(block, made)
        if device is not None:  # back where the model is, its codes made there already
            block.to("cpu")
        if writer is not None:
            # the outputs the next block reads, or the head after the last one
            keep = cfg.uses_data and (i + 1 < len(layers) or cfg.head_bits is not None)
            writer.add_block(i, stored_tensors(model, DENSE_DTYPES[cfg.dense_dtype], prefix), done, err,
                             hidden if keep else None, carried)
            if ref is None:  # tuning the whole model needs every block at the end
                release(block)
        release_memory()
    bar.close()
    if shards is not None:
        blocks_bar.close()
        if cfg.head_bits is not None:  # the last block's outputs, every shard's, for the head's Hessian here
            hidden = shards.outputs()
    dense = DENSE_DTYPES[cfg.dense_dtype]
    rows_dtype = None
    if reader is not None:  # what is outside the blocks (embeddings, final norm, head), once they are gone
        ends = [m for _, m in end_modules(model, cfg).values()]
        # read in the checkpoint's own dtype, not float32, what is rounded to its stored dtype at once (the same
        # values: a bfloat16 or float16 value is exact in float32) and a table to be quantized (the rotation reads
        # it in float64 anyway): a Llama 3 head in float32 is 2 GB more. A quantized table's rows come out as the
        # model computes (float32)
        rounded_now = writer is not None and ref is None
        as_stored = ({id(p) for m in ends for p in m.parameters()}  # not a tied twin that stays dense
                     - {id(p) for m in model.modules() if all(m is not e for e in ends) for p in m.parameters(recurse=False)})
        rows_dtype = torch.float32
        for name, p in model.named_parameters(remove_duplicate=False):
            if p.device.type == "meta" and not name.startswith(prefixes):  # a tied twin is filled with it
                dtype = None if rounded_now or id(p) in as_stored else torch.float32
                check_weights(model, cfg, materialize(model, reader, lambda n, name=name: n == name, dtype))
                if rounded_now:  # one embedding or head in memory at a time
                    _round_dense(model, dense, stored=True, keep=ends)
    shared = None
    if cfg.head_bits is not None or cfg.embed_bits is not None:  # the head and embedding table, once every block is done
        done, err, shared = quantize_ends(model, cfg, hidden, calib_ids, progress, rows_dtype)
        per_layer.update(done)
        errors.update(err)
    model_tuning = None
    if ref is not None:  # the reference's head in float32, the tuned model's as it is stored
        model_tuning = None if writer is None else writer.tuned()
        if model_tuning is None:
            teacher = Teacher.of(model, ref, ref_ids, progress=progress)
            del ref
            _round_dense(model, dense)
            model_tuning = tune_model(model, ref_ids, teacher, steps=cfg.finetune_model_steps, lr=cfg.finetune_lr,
                                      schedule=cfg.finetune_schedule,
                                      seed=derive_seed(cfg.seed, "finetune model"), stored=dense, progress=progress,
                                      precision=lambda: calibration_precision(cfg, ref_ids))
            if writer is not None:
                writer.add_tuned(stored_tensors(model, dense, wanted=set(tuned_names(model)).__contains__), model_tuning)
    _round_dense(model, dense, stored=writer is not None)
    summary = summarize(per_layer, shared)
    if cfg.act is not None and writer is not None:  # the blocks are written and released: from the shapes
        summary["bits_per_activation"] = bits_per_activation_of(cfg.act, [v["shape"][1] for v in per_layer.values()
                                                                          if "kind" not in v])
    elif cfg.act is not None:  # the in-memory model runs as the saved one will
        attach(model, cfg.act)
        summary["bits_per_activation"] = bits_per_activation(model)
    # stored without timings, so the same seed, model and data give byte-identical files
    model.config.quantization_config = quantization_config(cfg, per_layer, dict(summary))
    summary["seconds"] = time.time() - t0
    summary["layer_errors"] = errors
    summary["uncalibrated"] = uncalibrated
    # blocks the forward skips on text (Llama 3.2 Vision's cross-attention layers): theirs are uncalibrated too
    summary["skipped_blocks"] = [block_prefix(model, i) for i, kw in enumerate(kwargs or []) if skipped(kw)]
    if tuning:
        summary["finetune"] = tuning
    if model_tuning is not None:
        summary["finetune_model"] = model_tuning
    return summary


def check_work_device(device, cfg: QuantConfig, pool, activations) -> torch.device | None:
    """The torch.device a run's blocks are worked on (None: where the model is), or a one-line ValueError for
    a device torch does not know or cannot see, and for what does not run on a GPU yet."""
    if device is None:
        return None
    dev = check_device(device)
    if dev.type == "cpu":
        return dev
    if dev.type != "cuda":
        raise ValueError(f"--device {device}: quantizing runs on the CPU or on a CUDA GPU (cuda, cuda:N)")
    if dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"--device {device}: this machine has {torch.cuda.device_count()} CUDA GPU(s)")
    for bad, why in ((not cfg.uses_data, f"{cfg.method} needs no calibration; it runs on the CPU in seconds"),
                     (pool is not None, "--workers and --ray-address spread the work over CPU processes"),
                     (activations is not None, "--offload keeps the activations in files for the CPU"),
                     (cfg.finetune != "none", "--finetune runs on the CPU for now")):
        if bad:
            raise ValueError(f"--device {device}: {why}; drop one of the two")
    return dev


def to_device(obj, device: torch.device):
    """obj with every tensor inside (in tuples, lists and dicts: a block's call arguments) moved to device."""
    if isinstance(obj, (torch.Tensor, PerSample, PerToken)):
        return obj.to(device)
    if isinstance(obj, (tuple, list)):
        return type(obj)(to_device(o, device) for o in obj)
    if isinstance(obj, dict):
        return {k: to_device(v, device) for k, v in obj.items()}
    return obj


def tuning_windows(cfg: QuantConfig, seqlen: int) -> int:
    """--finetune-tokens in whole windows of seqlen tokens (at least one)."""
    return max(1, cfg.finetune_tokens // seqlen)


def tuning_samples(cfg: QuantConfig, calib: torch.Tensor) -> int:
    """How many of the calibration samples (the first ones) the tuning uses: --finetune-tokens in whole samples."""
    return min(calib.shape[0], tuning_windows(cfg, calib.shape[1]))


def install_written(block, prefix: str, layers: dict, tensors: dict) -> None:
    """Put back a block as a run this one resumes wrote it: QuantLinear modules built from their
    quantization_config entries (`layers`, by full name), every tensor from the block's file (`tensors`)."""
    for name, mod in block_linears(block).items():
        entry = layers.get(prefix + name)
        if entry is not None:
            set_module(block, name, QuantLinear(spec_from_dict(entry), tuple(entry["shape"]),
                                                bias=getattr(mod, "bias", None) is not None))
    own = block.state_dict()
    block.load_state_dict({k[len(prefix):]: t for k, t in tensors.items() if k[len(prefix):] in own}, strict=False)


def quantize_block(block, prefix: str, cfg: QuantConfig, hess: dict, bar, uncalibrated: list) -> tuple[dict, dict]:
    """Swap the linears of a block (its tensor names start with `prefix`) for QuantLinear modules; returns
    their quantization_config entries and the relative error each kept (`bar`: a progress bar or None). A Hessian method quantizes a
    linear missing from `hess` (no token reached it) with the identity for Hessian and appends its name
    to `uncalibrated`."""
    made, per_layer, errors = quantize_linears(block, prefix, cfg, hess, bar, uncalibrated)
    install(block, made)
    return per_layer, errors


def install(block, made: dict) -> None:
    for name, q in made.items():
        set_module(block, name, q)


def run_as_quantized(block, made: dict, hidden: torch.Tensor, kwargs: dict, out: torch.Tensor | None = None,
                     shards: int = 1, written: dict | None = None) -> torch.Tensor:
    """The block's outputs with its linears' quantized matrices, still as plain nn.Linear weights in the
    original basis: one dense product per linear, where a QuantLinear would rotate its inputs and outputs on
    every call (most of a calibration forward's time); what it writes for later blocks goes to `written`."""
    linears = block_linears(block)
    for name, q in made.items():
        linears[name].weight.data = q.weight_in_original_basis().to(hidden.device, linears[name].weight.dtype)
        q.drop_decoded()  # rebuilt if the model is run later; a stream keeps none
    return sharded_outputs(block, hidden, kwargs, shards, out, written)


def quantize_linears(block, prefix: str, cfg: QuantConfig, hess: dict, bar, uncalibrated: list, drop: bool = False,
                     cross: dict | None = None):
    """(QuantLinear by linear name, quantization_config entries, relative errors) of a block's linears; the
    block itself is left as it was (see quantize_block), but for `drop`: each linear's float weight is
    emptied once quantized (a block whose quantized form goes to a writer), so the peak of its largest
    linear is not paid on top of all the others' float weights. cross: {linear name: C} of --asymmetric
    (hessian.CrossAccumulator); a linear without one is aimed at its own weight."""
    made, per_layer, errors = {}, {}, {}
    for name, mod in block_linears(block).items():
        full = prefix + name
        h = hess.pop(name, None)  # taken out: a Hessian no later linear shares is rotated in place, and freed
        if cfg.uses_data and h is None:
            uncalibrated.append(full)
        owned = h is not None and not any(o is h for o in hess.values())
        weight = aimed_weight(mod.weight.detach(), h, (cross or {}).get(name), cfg)
        made[name], per_layer[full], errors[full] = quantize_linear(full, weight, mod.bias, cfg, h, owned)
        del weight
        del h
        if drop:
            mod.weight.data = torch.empty(0, dtype=mod.weight.dtype)
        trim_heap()
        if bar is not None:
            bar.update(1)
    return made, per_layer, errors


def aimed_weight(weight: torch.Tensor, h: torch.Tensor | None, c: torch.Tensor | None, cfg: QuantConfig):
    """The weight a linear's solve aims at: its own, or with --asymmetric and its cross moments c the target
    moved toward the unquantized model's outputs (solvers.gptq.asymmetric_target)."""
    if c is not None and h is not None and cfg.asymmetric:
        return asymmetric_target(weight, h, c, cfg.damp, cfg.asymmetric)
    return weight


def quantize_linear(full: str, weight: torch.Tensor, bias, cfg: QuantConfig, h: torch.Tensor | None = None,
                    owned: bool = False, seeds: tuple[int, int] | None = None, cls=QuantLinear,
                    without_data: bool = False):
    """(QuantLinear, quantization_config entry, relative error) of the linear called `full` with this weight
    and bias. A Hessian method takes the mean Hessian h of its inputs (None: no token reached it, an expert
    nobody was routed to; it is rounded with the identity for Hessian); `owned`: h is used by nothing
    else, so it is rotated in its own memory. `seeds`: its rotations where not the layer's own; `cls`: the
    QuantLinear class made (QuantEmbedding); `without_data`: rounded without data whatever the method."""
    rows, cols = weight.shape
    spec = layer_spec(cfg, full, rows, cols)
    seeds = layer_seeds(cfg.seed, full, cfg.rotates) if seeds is None else seeds
    # float32, from the weight's own dtype (the rotation reads it in float64); rotated as its rows are read where
    # only the input side is (a head, an embedding table: the largest matrices)
    w_rot = rotated_rows(weight, seeds)
    try:
        if cfg.uses_data and not without_data:
            stepper = PVQStepper(spec) if cfg.is_pvq else UniformStepper(spec)
            if h is not None:
                h_rot = rotate_hessian(h, seeds[0], in_place=owned)
                consume = owned or h_rot is not h  # the solve factors in h_rot's memory where nothing else reads it
                del h
            else:
                h_rot, consume = torch.eye(cols, dtype=torch.float64, device=w_rot.device), True
            total = ErrorSum(cols)
            # the solved rows are compared with the target as they come (no whole w_hat is kept), in the Hessian
            # through the solve's factor: h_rot is consumed where nothing else has it (factor_in_place)
            _, packed = gptq(w_rot, h_rot, stepper, damp=cfg.damp, consume_h=consume, keep_hat=False,
                             error=total, block_size=cfg.block_size, **({"act_order": True} if cfg.act_order else {}))
            error = total.value()
            del h_rot, total
        else:
            packed = codec.quantize(w_rot, spec, cfg.grid_fit)
            total, step = ErrorSum(cols), rows_per_solve(rows, cols)
            for s in range(0, rows, step):  # a block of rows decoded at a time: no whole float copy
                e = min(s + step, rows)
                total.add(w_rot[s:e], packed.dequantize(torch.float32, rows=(s, e)))
            error = total.value()
    except FP16RangeError as exc:
        raise ValueError(f"layer {full}: {exc}") from None
    q = cls.from_packed(packed, seeds, bias)
    entry = {**spec_to_dict(spec), "shape": [rows, cols], "seeds": list(seeds),
             "stored_bits": q.nbits, "bits_per_weight": q.nbits / (rows * cols)}
    return q, entry, error


def end_modules(model, cfg: QuantConfig) -> dict[str, tuple[str, torch.nn.Module]]:
    """{kind: (name, module)} of the output head ("head", with --head-bits) and the input embedding table
    ("embedding", with --embed-bits) this run quantizes; a one-line ValueError for a model whose head is not a
    plain linear, or whose embedding is neither a plain table nor a family's scaled one (Gemma's, embedding_scale)."""
    names = {id(m): n for n, m in model.named_modules()}
    out = {}
    for kind, bits, mod, want in (("head", cfg.head_bits, model.get_output_embeddings(), torch.nn.Linear),
                                  ("embedding", cfg.embed_bits, model.get_input_embeddings(), torch.nn.Embedding)):
        if bits is None:
            continue
        option = "--head-bits" if kind == "head" else "--embed-bits"
        plain = type(mod) is want or (kind == "embedding" and embedding_scale(mod) is not None)
        if mod is None or not plain or id(mod) not in names:
            what = "none" if mod is None else type(mod).__name__
            raise ValueError(f"{option}: this model's {'output head' if kind == 'head' else 'input embedding'} is "
                             f"{what}, not a plain {want.__name__} that pvq quantizes; drop {option}")
        if kind == "head" and weight_read_directly(model, mod):
            raise ValueError(f"{option}: this family reads its head's weight itself; drop {option}")
        if kind == "embedding" and mod.weight.device.type != "meta":  # a scaled one's forward, where it can run
            checked_scale(mod)
        out[kind] = (names[id(mod)], mod)
    if cfg.embed_from_head and out["embedding"][1].weight is not out["head"][1].weight:
        raise ValueError("--embed-bits head: this model's input embedding and output head are two tables (not tied); "
                         "give --embed-bits a number of bits")
    return out


def quantize_ends(model, cfg: QuantConfig, hidden: torch.Tensor | None, calib_ids: torch.Tensor | None,
                  progress: bool = True, rows_dtype: torch.dtype | None = None) -> tuple[dict, dict, dict | None]:
    """Quantize the output head (--head-bits: like a block linear, with the Hessian of its inputs where the
    method calibrates) and the input embedding table (--embed-bits: rounded without data, rotated on its hidden
    side only, so each row decodes alone) in place. `hidden`: the last block's outputs on the calibration
    samples. A tied pair becomes two tensors, each quantized for its own use (or one left dense; or, with
    --embed-bits head, one table the embedding reads the head's rows of), and the model's config no longer ties them. Returns (quantization_config entries, relative errors) by layer name, and with
    --embed-bits head the embedding that reads the head's rows ({"layer", "reads"}; it has no entry of its own).
    `rows_dtype`: the dtype a quantized embedding's rows come out in (None: the table's)."""
    ends = end_modules(model, cfg)
    per_layer, errors = {}, {}
    bar = tqdm(total=len(ends), desc="quantize head and embedding", disable=not progress, unit="table")
    shared = None
    for kind in ("head", "embedding"):
        if kind not in ends:
            continue
        name, mod = ends[kind]
        factor = embedding_scale(mod) if kind == "embedding" else None  # its forward checked by end_modules
        out_dtype = rows_dtype or mod.weight.dtype  # the rows come out as the table's did
        if kind == "embedding" and cfg.embed_from_head:  # the head's table, its rows decoded, as the table's were
            set_module(model, name, HeadRows(model.get_output_embeddings(), out_dtype, factor))
            shared = {"layer": name, "reads": ends["head"][0]}
            if factor is not None:  # on the entry of the table it reads (settings.SCALED_FORMAT_VERSION)
                per_layer[ends["head"][0]]["embed_scale"] = factor
            bar.update(1)
            continue
        sub = cfg.for_end(kind)
        weight = mod.weight.detach()
        # rotated on the hidden side only, a scale per row (QuantConfig.for_end): each row decodes alone, as an
        # embedding reads them, and for the head that measured better on SmolLM2 than both sides rotated with one
        # scale (docs/results.md)
        seeds = (layer_seeds(cfg.seed, name, cfg.rotates)[0], NO_SEED)
        if kind == "head":
            h = None
            if cfg.uses_data:
                if hidden is None:
                    raise ValueError("--head-bits with a calibrated method needs the last block's outputs")
                with calibration_precision(cfg, hidden):  # the forward only: the solve in float, as the blocks'
                    h = head_hessian(model, hidden, calib_ids)
            q, entry, err = quantize_linear(name, weight, mod.bias, sub, h, owned=True, seeds=seeds)
        else:
            q, entry, err = quantize_linear(name, weight, None, sub, seeds=seeds, cls=QuantEmbedding,
                                            without_data=True)
            q.compute_dtype = out_dtype
            q.embed_scale = factor
        set_module(model, name, q)
        per_layer[name], errors[name] = {**entry, "kind": kind}, err
        if factor is not None:
            per_layer[name]["embed_scale"] = factor
        del weight
        bar.update(1)
    bar.close()
    # a tied head and embedding are separate tensors from now on: loading must not tie them again
    for c in {id(c): c for c in (model.config, model.config.get_text_config())}.values():
        if getattr(c, "tie_word_embeddings", False):
            c.tie_word_embeddings = False
    return per_layer, errors, shared


def _round_dense(model, dtype: torch.dtype, stored: bool = False, keep=()) -> None:
    """Round the parameters that stay dense to their storage dtype, so the in-memory model equals the saved
    one; `stored`: keep them in that dtype (a model whose blocks went to a writer only has them to store).
    `keep`: modules whose parameters are left as they are (a head or embedding table still to be quantized; a tied
    twin is left with them)."""
    kept = {id(p) for m in keep for p in m.parameters(recurse=False)}
    for mod in model.modules():
        if isinstance(mod, QuantLinear):
            continue
        for p in mod.parameters(recurse=False):
            if p.device.type == "meta" or p.dtype == dtype or id(p) in kept:
                continue
            if stored:
                p.data = p.data.to(dtype)
            else:  # in place: an embedding's float32 copy costs no second one
                p.data.copy_(p.data.to(dtype))


def summarize(per_layer: dict, shared: dict | None = None) -> dict:
    """Bits of the blocks' quantized linears (bits_per_weight, as every method reports it); a quantized head and
    embedding table apart, under "ends" (their kind: layer, stored bits, bits per weight)."""
    linears = {k: v for k, v in per_layer.items() if "kind" not in v}
    bits = sum(v["stored_bits"] for v in linears.values())
    weights = sum(v["shape"][0] * v["shape"][1] for v in linears.values())
    out = {"linear_bits": bits, "linear_weights": weights, "bits_per_weight": bits / max(weights, 1),
           "layers": len(linears)}
    ends = {v["kind"]: {"layer": k, "stored_bits": v["stored_bits"], "bits_per_weight": v["bits_per_weight"]}
            for k, v in sorted(per_layer.items()) if "kind" in v}
    if shared is not None:  # --embed-bits head: the embedding reads the head's rows, no bits of its own
        ends["embedding"] = shared
    if ends:
        out["ends"] = ends
    return out


def check_reachable(model, cfg: QuantConfig) -> None:
    """Raise the ValueError quantizing would raise for a --bits (or --abits pvq) no setting reaches, for
    every distinct linear shape of the model's blocks, before any long work."""
    shapes = {(m.out_features, m.in_features) for _, m in block_linear_names(model)}
    for rows, cols in sorted(shapes):
        choose_spec(cfg, rows, cols)
    for kind, (_, mod) in end_modules(model, cfg).items():
        if kind == "embedding" and cfg.embed_from_head:
            continue
        rows, cols = mod.weight.shape
        try:
            choose_spec(cfg.for_end(kind), rows, cols)
        except ValueError as exc:
            raise ValueError(f"--{'head' if kind == 'head' else 'embed'}-bits: {exc}") from None
    if cfg.abits is not None and cfg.act_method == "pvq":
        for cols in sorted({c for _, c in shapes}):
            act_spec(cfg.abits, cols)


def check_context(config, cfg: QuantConfig, allocate_seqlen: int | None = None) -> None:
    """Refuse calibration windows longer than the context (max_position_embeddings) of a model's `config`, or of
    its text part: --seqlen where the method uses data, --allocate-seqlen where an allocation measures."""
    ctx = getattr(config.get_text_config(), "max_position_embeddings", None)
    if not isinstance(ctx, int):
        return
    for option, seqlen in (("--seqlen", cfg.seqlen if cfg.uses_data else None), ("--allocate-seqlen", allocate_seqlen)):
        if seqlen is not None and seqlen > ctx:
            raise ValueError(f"{option} {seqlen} is longer than the model's context of {ctx} tokens "
                             f"(max_position_embeddings); use at most {ctx}")


def estimate_bytes(model, cfg: QuantConfig) -> int:
    """About the bytes of model.safetensors once quantized: the blocks' linears at cfg.bits per weight, every
    other parameter (a tied head once) in cfg.dense_dtype, the linears' biases as they are."""
    linears = [m for _, m in block_linear_names(model)]
    weights = {id(m.weight) for m in linears}
    dense = torch.finfo(DENSE_DTYPES[cfg.dense_dtype]).bits // 8
    total = sum(m.weight.numel() for m in linears) * cfg.bits / 8
    ends = end_modules(model, cfg)
    for kind, (_, mod) in ends.items():  # quantized, and stored once each even where they are tied
        if not (kind == "embedding" and cfg.embed_from_head):  # which reads the head's table
            total += mod.weight.numel() * cfg.for_end(kind).bits / 8
        weights.add(id(mod.weight))
    for p in model.parameters():  # each shared parameter once
        if id(p) not in weights:
            total += p.numel() * (dense if p.is_floating_point() else p.element_size())
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    if len(ends) == 1 and getattr(emb, "weight", None) is getattr(head, "weight", False):
        (_, mod), = ends.values()  # the other one of a tied pair stays dense, in a tensor of its own
        total += mod.weight.numel() * dense
    return int(total)
