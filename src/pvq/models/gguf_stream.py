"""A GGUF file read one tensor at a time, under the model's tensor names, for streaming.

transformers loads a GGUF by dequantizing every tensor into one dict before building the model,
so the float model must fit in memory. This reader gives what streaming.materialize asks of a
checkpoint reader instead: each tensor read from the file with plain reads when its block's turn
comes (the gguf library maps the file, and the pages a read touches would count in the process's
memory until it ends), dequantized by the gguf library, and converted as transformers converts it
(its GGUF-to-model name map, and the family's tensor processor: llama's q/k rows are permuted back,
gemma's norms shifted by one), so a streamed model gets the same floats as a whole load.
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .streaming import CheckpointError, NotStreamable

# tensor processors that split or merge tensors (mixture-of-experts families): not one tensor for one
_MERGING = ("Qwen2MoeTensorProcessor", "GptOssTensorProcessor", "MiniMaxM2TensorProcessor")


class _Stored(NamedTuple):
    """Where a tensor lies in the file and how to read it back: all a reader keeps of the parsed file (its
    metadata fields, the vocabulary among them, are hundreds of thousands of objects that each garbage
    collection between blocks would walk)."""
    offset: int
    n_bytes: int
    dtype: np.dtype
    shape: tuple
    kind: object  # the gguf library's quantization type


class GGUFCheckpointReader:
    """The tensors of a GGUF file by the model's names (after `follow(model)`); same interface as
    streaming.CheckpointReader: `folder` (here the file), `files` and `stored` for messages, `in`, `get`."""

    def __init__(self, path: Path):
        from gguf import GGUFReader
        from transformers.modeling_gguf_pytorch_utils import read_field

        self.folder = self.path = Path(path)
        try:
            parsed = GGUFReader(str(self.path))
        except Exception as exc:  # not a GGUF file, truncated header, ...
            raise CheckpointError(f"{self.path}: not a readable GGUF file ({exc})") from None
        arch = read_field(parsed, "general.architecture")
        self._arch = arch[0] if arch else ""
        self._tensors = {t.name: _Stored(int(t.data_offset), int(t.n_bytes), t.data.dtype, tuple(t.data.shape),
                                         t.tensor_type) for t in parsed.tensors}
        self.files = {name: self.path for name in self._tensors}
        self.stored: dict[str, str] = {}
        self._processor = None

    def follow(self, model) -> None:
        """Name the tensors as `model` does, through transformers' GGUF name map for its family."""
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                               get_gguf_hf_weights_map)

        processor_class = TENSOR_PROCESSORS.get(self._arch, TensorProcessor)
        if processor_class.__name__ in _MERGING:
            raise NotStreamable(f"{self.path}: transformers splits or merges this family's tensors on loading")
        self._processor = processor_class(config=model.config.to_dict())
        # transformers walks every submodule and builds the family's whole name map again for each (400
        # times for SmolLM2, 9 s): the same map each time, so it is built once while the walk runs
        build = gguf.get_tensor_name_map
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(build)
        try:
            mapping = get_gguf_hf_weights_map(model, self._processor)  # GGUF name -> model name
        except NotImplementedError as exc:
            raise NotStreamable(f"{self.path}: {exc}") from None
        finally:
            gguf.get_tensor_name_map = build
        self.stored = {hf: g for g, hf in mapping.items() if g in self._tensors}

    def __contains__(self, name: str) -> bool:
        return name in self.stored

    def where(self, name: str) -> str:
        """Where the model's tensor `name` is stored, for messages."""
        return f"{self.path}: tensor {self.stored[name]}"

    def get(self, name: str) -> torch.Tensor:
        from gguf import dequantize

        if name not in self.stored:
            raise CheckpointError(f"{self.path}: tensor {name} is not in the GGUF file")
        gname = self.stored[name]
        t = self._tensors[gname]
        try:
            with open(self.path, "rb") as f:
                f.seek(t.offset)
                raw = f.read(t.n_bytes)
            if len(raw) != t.n_bytes:
                raise ValueError("the file ends inside the tensor (truncated)")
            data = np.frombuffer(raw, dtype=t.dtype).reshape(t.shape)
            weights = dequantize(data, t.kind)
        except (OSError, ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {gname}: {exc}") from None
        weights = self._processor.process(weights=weights, name=gname, tensor_key_mapping={},
                                          parsed_parameters={"tensors": {}}).weights
        return torch.from_numpy(np.copy(weights))
