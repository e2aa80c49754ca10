"""Stored settings: what a pvq file records about how it was made, frozen and JSON-serialisable.

`QuantConfig` is every setting of a quantization run (written to config.json under
quantization_config["config"]); `ActConfig` the activation part of it as a model runs it; a layer's
codec setting is stored as a spec dict (`spec_to_dict`). Choosing settings from a target lives in
picker.py; this module only says what the stored values mean and whether they are valid.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, fields, replace

import torch

from .codec import PVQSpec, UniformSpec
from .transforms.rotate import MAX_RUN_SEED

FORMAT_VERSION = 3  # the newest format this pvq reads; a file is written with the oldest that holds it
# version 2: a quantized output head or input embedding table (a layer entry with a "kind"), which a reader
# of version 1 would build as a block linear; a file without one is written as version 1, as before
ENDS_FORMAT_VERSION = 2
# version 3: an embedding whose family scales its rows (Gemma's), read from a quantized table: the entry of that
# table (the embedding's, or with --embed-bits head the head's) carries "embed_scale", the factor, which a reader
# of version 2 would leave out
SCALED_FORMAT_VERSION = 3
EMBED_FROM_HEAD = "head"  # --embed-bits head: a tied model's embedding reads its quantized head's rows
LAYER_KINDS = ("head", "embedding")  # layer entries outside the blocks, by the module they replace
METHODS = ("rtn", "hqq", "gptq", "pvq", "pvq-gptq")
LAYOUTS = ("compact", "fast")
ACT_METHODS = ("rtn", "pvq")  # activation quantizers (modules/actquant.py)
MAX_BITS = 64  # a target above this is no number of stored bits per weight (and overflows the picker's arithmetic)
DENSE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
FINETUNE_MODES = ("none", "blocks", "model", "both")  # what --finetune tunes after quantizing (finetune.py)
SCHEDULES = ("cosine", "constant")  # the tuning's learning rate over its steps (finetune.py)
CALIB_DTYPES = ("auto", "float32", "bfloat16")  # what the calibration forwards multiply in


def native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 in hardware (AVX512-BF16 or AMX): there bfloat16 calibration
    forwards run about twice as fast as float32 ones; elsewhere they would be emulated, and slower."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _positive_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 1


def check_act_settings(abits, method: str) -> None:
    """--abits (None, or an integer 2..16) and --act-method, as QuantConfig and ActConfig take them."""
    if abits is not None and (not isinstance(abits, int) or isinstance(abits, bool) or not 2 <= abits <= 16):
        raise ValueError(f"--abits must be an integer from 2 to 16, got {abits!r}")
    if method not in ACT_METHODS:
        raise ValueError(f"unknown activation quantizer {method!r}; choose one of {', '.join(ACT_METHODS)}")


@dataclass(frozen=True)
class QuantConfig:
    method: str = "pvq-gptq"
    bits: float = 3.25  # target bits per weight of the quantized linears, every stored bit counted
    seed: int = 0
    # uniform grid (rtn, hqq, gptq)
    group_size: int = 128
    # pvq, pvq-gptq
    group_dim: int | None = None  # n; None picks the best of picker.PVQ_GROUP_DIMS for each layer
    gain: str = "beta"
    scale: str = "tensor"
    # "compact": the best rate-distortion setting; "fast": only settings whose every shape fits one
    # small table (runtime/limits.py), so on-the-fly decoding is a table read per group
    layout: str = "compact"
    rotate: bool | None = None  # None: rotate for the pvq methods, not for rtn/hqq/gptq (their published forms)
    # calibration (gptq, pvq-gptq)
    calib: str = "wikitext2"
    nsamples: int = 128
    seqlen: int = 512
    damp: float = 0.01
    block_size: int = 128
    # the calibration forwards' matrix products: "bfloat16" (autocast; weights are quantized from their float32
    # values, Hessians summed in float32/float64 either way) or "float32"; "auto" takes bfloat16 for a method
    # that calibrates where the CPU has it in hardware, and is stored as what it chose
    calib_dtype: str = "auto"
    # the calibration samples in this many shards, each summed on its own, the sums then added in shard order
    # (models/shards.py): the unit of work Ray workers share; 1 is the plain sequential sum, and is not stored
    calib_shards: int = 1
    act_order: bool = False
    # how far GPTQ's target moves from each weight toward the unquantized model's outputs (solvers.gptq.
    # asymmetric_target; 0: the weight's own outputs on the quantized model's inputs, as GPTQ; 1: all the way)
    asymmetric: float = 0.0
    # the calibration samples (the first ones) the unquantized model's stream runs on for --asymmetric: the
    # target's cross moments come from these, the Hessians from all; 0 takes every sample
    asymmetric_samples: int = 0
    # after each block is quantized, tune its stored continuous values (scales, norms, biases) so its outputs
    # match the unquantized block's ("blocks"), and/or those of the whole model so its next-token
    # distributions match the unquantized model's ("model"; "both": one then the other) (finetune.py);
    # the other four only matter when tuning
    finetune: str = "none"
    finetune_tokens: int = 16384  # calibration tokens the tuning uses (whole samples, the first ones)
    finetune_steps: int = 100  # Adam steps a block
    finetune_lr: float = 5e-3
    finetune_model_steps: int = 100  # Adam steps of the whole model's tuning
    finetune_schedule: str = "cosine"  # the learning rate over the steps: "cosine" decays it to 0, "constant"
    dense_dtype: str = "float16"  # embeddings, head and norms are stored in this dtype
    # per-layer settings by full layer name (spec_to_dict form), e.g. from allocation.allocate
    overrides: dict | None = None
    # activations (modules/actquant.py): the inputs of the quantized linears, per token; None keeps them in float
    abits: int | None = None
    act_method: str = "rtn"
    act_rotate: bool = True  # quantize them after the layer's input rotation
    # the output head and the input embedding table, quantized at these bits per weight (None: kept dense in
    # dense_dtype); a head is calibrated like a block linear, the embedding rounded without data, by rows;
    # embed_bits "head": a tied model's embedding reads the rows of its quantized head (one table stored)
    head_bits: float | None = None
    embed_bits: float | str | None = None

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; choose one of {', '.join(METHODS)}")
        if not (isinstance(self.bits, (int, float)) and math.isfinite(self.bits) and 0 < self.bits <= MAX_BITS):
            raise ValueError(f"--bits must be a number above 0 and at most {MAX_BITS}, got {self.bits!r}")
        if not _positive_int(self.group_size):
            raise ValueError(f"--group-size must be an integer >= 1, got {self.group_size!r}")
        if self.group_dim is not None and not _positive_int(self.group_dim):
            raise ValueError(f"--group-dim must be an integer >= 1, got {self.group_dim!r}")
        if self.dense_dtype not in DENSE_DTYPES:
            raise ValueError(f"dense_dtype must be float16, bfloat16 or float32, got {self.dense_dtype!r}")
        if self.calib_dtype not in CALIB_DTYPES:
            raise ValueError(f"--calib-dtype must be one of {', '.join(CALIB_DTYPES)}, got {self.calib_dtype!r}")
        if self.calib_dtype == "auto":  # a data-free method runs no forward: float32, the same on every CPU
            object.__setattr__(self, "calib_dtype", "bfloat16" if self.uses_data and native_bf16() else "float32")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout must be one of {', '.join(LAYOUTS)}, got {self.layout!r}")
        if self.overrides is not None:
            for name, d in self.overrides.items():
                try:
                    spec_from_dict(d)
                except (KeyError, TypeError, ValueError) as exc:
                    raise ValueError(f"override for layer {name!r} is not a codec setting: {exc}") from None
        check_act_settings(self.abits, self.act_method)
        if not (isinstance(self.seed, int) and not isinstance(self.seed, bool) and 0 <= self.seed <= MAX_RUN_SEED):
            raise ValueError(f"--seed must be an integer from 0 to {MAX_RUN_SEED}, got {self.seed!r}")
        if not _positive_int(self.calib_shards):
            raise ValueError(f"--calib-shards must be an integer >= 1, got {self.calib_shards!r}")
        if self.finetune not in FINETUNE_MODES:
            raise ValueError(f"--finetune must be one of {', '.join(FINETUNE_MODES)}, got {self.finetune!r}")
        if self.finetune != "none" and not self.uses_data:
            raise ValueError(f"--finetune {self.finetune} tunes against calibration data: use it with a calibrated "
                             f"method (gptq, pvq-gptq), not {self.method}")
        if not all(_positive_int(v) for v in (self.finetune_tokens, self.finetune_steps, self.finetune_model_steps)):
            raise ValueError("--finetune-tokens, --finetune-steps and --finetune-model-steps must be integers >= 1")
        if not (isinstance(self.finetune_lr, (int, float)) and math.isfinite(self.finetune_lr) and self.finetune_lr > 0):
            raise ValueError(f"--lr must be a number above 0, got {self.finetune_lr!r}")
        if self.finetune_schedule not in SCHEDULES:
            raise ValueError(f"--finetune-schedule must be one of {', '.join(SCHEDULES)}, got {self.finetune_schedule!r}")
        if not (isinstance(self.asymmetric, (int, float)) and not isinstance(self.asymmetric, bool)
                and math.isfinite(self.asymmetric) and 0 <= self.asymmetric <= 1):
            raise ValueError(f"--asymmetric must be a number from 0 to 1, got {self.asymmetric!r}")
        default = {f.name: f.default for f in fields(self)}
        pvq_options = [f"--{k.replace('_', '-')}" for k in ("group_dim", "gain", "scale", "layout")
                       if getattr(self, k) != default[k]]
        if pvq_options and not self.is_pvq:
            raise ValueError(f"{', '.join(pvq_options)} set PVQ's codes: use them with --method pvq or pvq-gptq, "
                             f"not {self.method} (its grid is set by --group-size)")
        if self.group_size != default["group_size"] and self.is_pvq:
            raise ValueError(f"--group-size sets the uniform grid's groups (rtn, hqq, gptq), not {self.method}'s: "
                             f"PVQ's group dimension is --group-dim")
        if self.act_order and self.method != "gptq":
            raise ValueError(f"--act-order orders GPTQ's columns on the uniform grid: use it with --method gptq, "
                             f"not {self.method}")
        if self.asymmetric and not self.uses_data:
            raise ValueError(f"--asymmetric aims GPTQ at the unquantized model's outputs on calibration data: use it "
                             f"with a calibrated method (gptq, pvq-gptq), not {self.method}")
        if not (isinstance(self.asymmetric_samples, int) and not isinstance(self.asymmetric_samples, bool)
                and self.asymmetric_samples >= 0):
            raise ValueError(f"--asymmetric-samples must be an integer >= 0 (0: every calibration sample), got "
                             f"{self.asymmetric_samples!r}")
        if self.embed_bits == EMBED_FROM_HEAD and self.head_bits is None:
            raise ValueError("--embed-bits head reads the rows of the quantized head: give --head-bits too")
        for option, v in (("--head-bits", self.head_bits),
                          ("--embed-bits", None if self.embed_bits == EMBED_FROM_HEAD else self.embed_bits)):
            if v is not None and not (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                                      and 0 < v <= MAX_BITS):
                raise ValueError(f"{option} must be a number above 0 and at most {MAX_BITS}"
                                 f"{' or head' if option == '--embed-bits' else ''}, got {v!r}")
        if (self.head_bits is not None or self.embed_bits is not None) and self.tunes_model:
            raise ValueError(f"--finetune {self.finetune} tunes the whole model with its head and embeddings dense: "
                             f"drop --head-bits / --embed-bits or use --finetune blocks")
        if self.nsamples < 1 or self.seqlen < 2:
            raise ValueError("--nsamples must be >= 1 and --seqlen >= 2")

    @property
    def is_pvq(self) -> bool:
        return self.method.startswith("pvq")

    @property
    def uses_data(self) -> bool:
        return self.method.endswith("gptq")

    @property
    def grid_fit(self) -> str:
        """How the data-free uniform grid is fitted to each group (codec.uniform.FITS)."""
        return "hqq" if self.method == "hqq" else "minmax"

    @property
    def tunes_blocks(self) -> bool:
        return self.finetune in ("blocks", "both")

    @property
    def tunes_model(self) -> bool:
        return self.finetune in ("model", "both")

    @property
    def rotates(self) -> bool:
        return self.is_pvq if self.rotate is None else bool(self.rotate)

    @property
    def act(self) -> "ActConfig | None":
        """The activation settings of this run (None when activations stay in float)."""
        return ActConfig.from_quant_config(self.to_dict())

    def to_dict(self) -> dict:
        d = asdict(self)
        if d["calib_shards"] == 1:  # the sum every file made before shards existed: stored as it always was
            del d["calib_shards"]
        if d["asymmetric"] == 0:  # GPTQ's own target, as every file before it could move
            del d["asymmetric"], d["asymmetric_samples"]
        if d["finetune"] == "none":  # an untuned file is stored as every file before tuning existed
            for k in ("finetune", "finetune_tokens", "finetune_steps", "finetune_lr", "finetune_model_steps",
                      "finetune_schedule"):
                del d[k]
        elif d["finetune"] == "blocks":  # as stored before the whole model could be tuned
            del d["finetune_model_steps"]
        elif d["finetune"] == "model":  # unused: a resume with other block steps is the same run
            del d["finetune_steps"]
        for k in ("head_bits", "embed_bits"):  # dense, as every file before they could be quantized
            if d[k] is None:
                del d[k]
        return d

    def for_end(self, kind: str) -> "QuantConfig":
        """The settings the output head ("head") or the input embedding table ("embedding") is quantized with:
        this run's at --head-bits / --embed-bits, without the blocks' per-layer plan. Neither is rotated on its
        vocabulary side (an embedding's rows are decoded one by one; a head's rotation there measured worse), so
        PVQ gives each row its own scale."""
        bits = self.head_bits if kind == "head" else self.embed_bits
        return replace(self, bits=bits, overrides=None, scale="row" if self.is_pvq else self.scale)

    @property
    def embed_from_head(self) -> bool:
        """Whether the embedding reads the rows of the quantized head (--embed-bits head)."""
        return self.embed_bits == EMBED_FROM_HEAD

    @classmethod
    def from_dict(cls, d: dict) -> "QuantConfig":
        names = {f.name for f in fields(cls)}
        # a config stored before calib_dtype existed was calibrated in float32; a tuned one stored before
        # schedules existed tuned at a constant rate; an asymmetric one before --asymmetric-samples paired all
        old = {"calib_dtype": "float32", **({"finetune_schedule": "constant"} if "finetune" in d else {}),
               **({"asymmetric_samples": 0} if "asymmetric" in d else {})}
        return cls(**{**old, **{k: v for k, v in d.items() if k in names}})


@dataclass(frozen=True)
class ActConfig:
    """How the inputs of the linears are quantized: `bits` per activation (plus a per-token fp16 scale)."""

    bits: int
    method: str = "rtn"
    rotate: bool = True
    seed: int = 0  # seeds the rotations of layers that have none of their own

    def __post_init__(self):
        if self.bits is None:
            raise ValueError("--abits must be an integer from 2 to 16, got None")
        check_act_settings(self.bits, self.method)

    @property
    def name(self) -> str:
        return f"{self.method} A{self.bits} per token, {'after the input rotation' if self.rotate else 'no rotation'}"

    @classmethod
    def from_quant_config(cls, cfg: dict) -> "ActConfig | None":
        """The activation settings of a QuantConfig dict (None when activations stay in float)."""
        if cfg.get("abits") is None:
            return None
        return cls(int(cfg["abits"]), cfg.get("act_method", "rtn"), bool(cfg.get("act_rotate", True)),
                   int(cfg.get("seed", 0)))


def spec_to_dict(spec) -> dict:
    if isinstance(spec, PVQSpec):
        return {"codec": "pvq", "n": spec.n, "k": spec.k, "gain_levels": spec.gain_levels, "gain": spec.gain,
                "scale": spec.scale}
    return {"codec": "uniform", "bits": spec.bits, "group_size": spec.group_size}


def spec_from_dict(d: dict):
    if d.get("codec") == "pvq":
        return PVQSpec(int(d["n"]), int(d["k"]), int(d["gain_levels"]), d["gain"], d["scale"])
    if d.get("codec") == "uniform":
        return UniformSpec(int(d["bits"]), int(d["group_size"]))
    raise ValueError(f"unknown codec in layer settings: {d!r}")


def stored_config(qc) -> dict | None:
    """`qc` if it is a pvq quantization_config (a dict with quant_method "pvq"), else None."""
    return qc if isinstance(qc, dict) and qc.get("quant_method") == "pvq" else None


def check_format_version(version) -> None:
    """Refuse a format version this pvq cannot read (ValueError naming it)."""
    if not isinstance(version, int) or isinstance(version, bool):
        raise ValueError(f"format version {version!r} is not an integer (the file was not written by pvq, or was edited)")
    if version < 1:
        raise ValueError(f"format version {version!r} does not exist (versions start at 1)")
    if version > FORMAT_VERSION:
        raise ValueError(f"format version {version!r} is newer than this pvq reads ({FORMAT_VERSION}); upgrade pvq")


def quantization_config(cfg: QuantConfig, layers: dict, achieved: dict) -> dict:
    """The quantization_config a quantized model carries and config.json stores."""
    version = (SCALED_FORMAT_VERSION if any("embed_scale" in v for v in layers.values())
               else ENDS_FORMAT_VERSION if any("kind" in v for v in layers.values()) else 1)
    return {"quant_method": "pvq", "format_version": version, "config": cfg.to_dict(), "layers": layers,
            "achieved": achieved}
