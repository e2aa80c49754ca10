"""transformers integration: after `import pvq`, AutoModelForCausalLM.from_pretrained(DIR) loads a pvq directory.

Registers, through transformers' own extension points (`register_quantization_config`,
`register_quantizer`), a `PVQConfig` for `quant_method: "pvq"` and a quantizer that swaps the
quantized linears of the freshly built model for empty QuantLinear modules before the weights are
read; transformers then fills their buffers from model.safetensors like any other tensor.
The decode mode is a loading attribute:

    from pvq.hf import PVQConfig
    AutoModelForCausalLM.from_pretrained(DIR, quantization_config=PVQConfig(decode="on-the-fly"))

Importing transformers' quantizer registry takes seconds (it imports every quantizer transformers has), so
`import pvq` does not: it registers the moment transformers imports that registry, which it does before any
`from_pretrained` can run (`register_on_import`), or at once where transformers has imported it already.
This module itself imports only the standard library at the top, so that `import pvq` (and `pvq --help`)
stays quick.
"""
from __future__ import annotations

import importlib.abc
import re
import sys
import warnings

_REGISTRY = "transformers.quantizers.auto"  # where transformers keeps its quantization methods
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
    if _registered:  # importing the registry just now ran register() through register_on_import's hook
        return True
    from pathlib import Path

    import torch

    from .checkpoint import PVQFormatError, guard_name, weight_files
    from .loader import check_directory, finish_loading, read_head_rows, replace_linears
    from .models.adapters import check_supported
    from .models.streaming import renamed_on_loading
    from .modules.linear import check_decode
    from .settings import FORMAT_VERSION, check_format_version

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
            read_head_rows(model, {"config": qc.config, "layers": qc.layers})
            # transformers initializes the modules of a model it loads, and a module's init can reach into its
            # child linears (GPT-2's and Mamba's rescale out_proj.weight): while it loads, each QuantLinear has a
            # `weight`, an empty tensor marked initialized, which transformers' init functions pass over
            held = torch.empty(0)
            held._is_hf_initialized = True
            for name in qc.layers:
                model.get_submodule(name).weight = held
            # the empty guard tensors under the quantized linears' weight names are expected here, under the names
            # transformers' loader renames them to as well
            guards = renamed_on_loading(model, [guard_name(n) for n in qc.layers])
            model._keys_to_ignore_on_load_unexpected = (set(model._keys_to_ignore_on_load_unexpected or ())
                                                        | {re.escape(g) + "$" for g in guards})
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


class _ThenRegister(importlib.abc.Loader):
    """The loader of transformers' quantizer registry, registering pvq once the registry's module has run."""

    def __init__(self, loader):
        self._loader = loader

    def create_module(self, spec):
        create = getattr(self._loader, "create_module", None)
        return create(spec) if create is not None else None

    def exec_module(self, module):
        self._loader.exec_module(module)
        try:
            register()
        except Exception as exc:  # noqa: BLE001  (transformers must import whatever pvq's registration meets)
            warnings.warn(f"pvq could not register with transformers ({type(exc).__name__}: {exc}); "
                          f"from_pretrained will not load pvq directories (pvq.load still does)")

    def __getattr__(self, name):  # get_source, is_package, ...: the wrapped loader's
        return getattr(self._loader, name)


class _WatchRegistry(importlib.abc.MetaPathFinder):
    """Finds transformers' quantizer registry with the finders after it and hands back its spec with a loader that
    registers pvq after the module runs. It stays in sys.meta_path (a string comparison per import): taking it
    out would change the list under an import of another thread, and an import of the registry that fails is
    watched again when retried."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _REGISTRY or _registered:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None) if finder is not self else None
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _ThenRegister(spec.loader)
                return spec
        return None


def register_on_import() -> None:
    """Register pvq with transformers now if its quantizer registry is imported, else as soon as it is."""
    if _REGISTRY in sys.modules:
        register()
    elif not any(isinstance(f, _WatchRegistry) for f in sys.meta_path):
        sys.meta_path.insert(0, _WatchRegistry())


def __getattr__(name: str):
    # `from pvq.hf import PVQConfig` before transformers has imported its registry: register now
    if name in ("PVQConfig", "PVQHfQuantizer"):
        if not register():
            raise ImportError(f"pvq.hf.{name} needs transformers, which could not be imported")
        return globals()[name]
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["register", "register_on_import", "PVQConfig", "PVQHfQuantizer"]
