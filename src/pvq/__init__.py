"""pvq: post-training LLM quantization with Pyramid Vector Quantization.

Importing pvq registers the "pvq" quantization method with transformers (when it is installed; pvq.hf does it
the moment transformers imports its quantizer registry, which every from_pretrained does first), so
`transformers.AutoModelForCausalLM.from_pretrained(DIR)` loads a directory written by `pvq quantize`
(`AutoModelForImageTextToText` for a vision-language family without a causal-LM class: models/classes.py).
"""
__version__ = "0.1.0"


def load(path, dtype=None, decode="auto", weight_dtype=None):
    """Load a pvq directory: (model, tokenizer). Short form of pvq.loader.load.

    decode="once" decodes each quantized linear on first use and keeps it; decode="on-the-fly"
    keeps only the packed codes resident and decodes inside every forward (see pvq.modules.linear);
    "auto" (default) is on-the-fly where the native kernel builds, else once."""
    import torch

    from .loader import load as _load

    return _load(path, dtype or torch.float32, decode=decode, weight_dtype=weight_dtype)


def _register() -> None:
    from .hf import register_on_import

    register_on_import()


_register()
