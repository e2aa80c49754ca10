"""pvq: post-training LLM quantization with Pyramid Vector Quantization."""
__version__ = "0.1.0"


def load(path, dtype=None):
    """Load a pvq directory: (model, tokenizer). Short form of pvq.io.load."""
    import torch

    from .io import load as _load

    return _load(path, dtype or torch.float32)
