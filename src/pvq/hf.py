"""transformers integration: after `import pvq`, AutoModelForCausalLM.from_pretrained(DIR) loads a pvq directory.

Registers, through transformers' own extension points (`register_quantization_config`,
`register_quantizer`), a `PVQConfig` for `quant_method: "pvq"` and a quantizer that swaps the
quantized linears of the freshly built model for empty QuantLinear modules before the weights are
read; transformers then fills their buffers from model.safetensors like any other tensor.
The decode mode is a loading attribute:

    from pvq.hf import PVQConfig
    AutoModelForCausalLM.from_pretrained(DIR, quantization_config=PVQConfig(decode="on-the-fly"))
"""
from __future__ import annotations

import re
from pathlib import Path

import torch

from .checkpoint import PVQFormatError, guard_name, weight_files
from .loader import check_directory, finish_loading, replace_linears
from .models.adapters import check_supported
from .modules.linear import DECODE_MODES, check_decode
from .settings import FORMAT_VERSION, check_format_version

_registered = False


def register() -> bool:
    """Register pvq with transformers (idempotent). False when transformers is not installed."""
    global _registered, PVQConfig, PVQHfQuantizer
    if _registered:
        return True
    try:
        from transformers.quantizers import auto
        from transformers.quantizers.base import HfQuantizer
        from transformers.utils.quantization_config import QuantizationConfigMixin
    except ImportError:
        return False

    class PVQConfig(QuantizationConfigMixin):
        """quantization_config of a pvq directory (written by `pvq quantize`), plus how to run it."""

        def __init__(self, format_version: int = FORMAT_VERSION, config: dict | None = None, layers: dict | None = None,
                     achieved: dict | None = None, decode: str = "auto", weight_dtype: str | None = None, **kwargs):
            self.quant_method = "pvq"
            self.format_version = format_version
            self.config = config or {}
            self.layers = layers or {}
            self.achieved = achieved or {}
            self.decode = decode
            self.weight_dtype = weight_dtype
            self.post_init()

        def post_init(self):
            try:
                check_format_version(self.format_version)
            except ValueError as exc:
                raise ValueError(f"pvq quantization_config: {exc}") from None
            check_decode(self.decode)
            if self.weight_dtype not in (None, "float32", "bfloat16", "float16"):
                raise ValueError(f"weight_dtype must be float32, bfloat16 or float16, got {self.weight_dtype!r}")

        def get_loading_attributes(self) -> dict:
            return {"decode": self.decode, "weight_dtype": self.weight_dtype}

        def to_dict(self) -> dict:
            # what is written back to config.json: the stored format, not how it was last run
            # (without the checksums: a directory transformers writes holds its own bytes, not pvq's)
            return {"quant_method": "pvq", "format_version": self.format_version, "config": self.config,
                    "layers": self.layers, "achieved": self.achieved}

    class PVQHfQuantizer(HfQuantizer):
        """Loads pre-quantized pvq directories (quantizing happens in `pvq quantize`, with calibration)."""

        requires_calibration = True

        def validate_environment(self, *args, **kwargs):
            if not self.pre_quantized:
                raise ValueError("pvq quantizes with `pvq quantize` (it needs calibration data); "
                                 "from_pretrained only loads directories it wrote")

        def _process_model_before_weight_loading(self, model, checkpoint_files=None, **kwargs):
            check_supported(model)
            qc = self.quantization_config
            wd = getattr(torch, qc.weight_dtype) if qc.weight_dtype else model.dtype
            replace_linears(model, qc.layers, decode=qc.decode, weight_dtype=wd)
            # transformers initializes the modules of a model it loads, and a module's init can reach into its
            # child linears (GPT-2's and Mamba's rescale out_proj.weight): while it loads, each QuantLinear has a
            # `weight`, an empty tensor marked initialized, which transformers' init functions pass over
            held = torch.empty(0)
            held._is_hf_initialized = True
            for name in qc.layers:
                model.get_submodule(name).weight = held
            # the empty guard tensors under the quantized linears' weight names are expected here
            model._keys_to_ignore_on_load_unexpected = (set(model._keys_to_ignore_on_load_unexpected or ())
                                                        | {re.escape(guard_name(n)) + "$" for n in qc.layers})
            # transformers leaves a tensor missing from the file uninitialized and loads a changed one
            # silently: check the directory it reads as pvq.load does, before it reads it
            files = [Path(f) for f in checkpoint_files or ()]
            where = files[0].parent if files else Path(str(model.config.name_or_path))
            if (where / "config.json").is_file():
                expected = sorted(f.name for f in weight_files(where))
                if files and sorted(f.name for f in files) != expected:
                    raise PVQFormatError(f"{where}: pvq wrote {', '.join(expected)}, transformers would read "
                                         f"{', '.join(f.name for f in files)}")
                check_directory(model, where, qc.layers)
            return model

        def _process_model_after_weight_loading(self, model, **kwargs):
            for name in self.quantization_config.layers:
                del model.get_submodule(name).weight
            finish_loading(model, {"config": self.quantization_config.config})
            return model

        def is_serializable(self, *args, **kwargs):
            return True

        @property
        def is_trainable(self) -> bool:
            return False

    auto.register_quantization_config("pvq")(PVQConfig)
    auto.register_quantizer("pvq")(PVQHfQuantizer)
    # let from_pretrained(..., quantization_config=PVQConfig(decode=...)) override how the stored model runs
    if hasattr(auto, "LOADING_ATTRIBUTES_CONFIG_TYPES"):
        auto.LOADING_ATTRIBUTES_CONFIG_TYPES = (*auto.LOADING_ATTRIBUTES_CONFIG_TYPES, PVQConfig)
    _registered = True
    return True


PVQConfig = None  # set by register()
PVQHfQuantizer = None
__all__ = ["register", "PVQConfig", "PVQHfQuantizer", "DECODE_MODES"]
