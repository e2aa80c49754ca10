"""A GGUF file read one tensor at a time, under the model's tensor names, for streaming.

transformers loads a GGUF by dequantizing every tensor into one dict before building the model,
so the float model must fit in memory. This reader gives what streaming.materialize asks of a
checkpoint reader instead: each tensor read from the file with plain reads when its block's turn
comes (the gguf library maps the file, and the pages a read touches would count in the process's
memory until it ends), dequantized by the gguf library, and converted as transformers converts it
(its GGUF-to-model name map, and the family's tensor processor: llama's q/k rows are permuted back,
gemma's norms shifted by one), so a streamed model gets the same floats as a whole load. A mixture of
experts is read an expert at a time into the linears pvq splits it into: an expert's rows of a stored 3-D
tensor are contiguous in the file, quantized or not, so one expert is read and dequantized, never the whole
stack (two stacks, gate and up, where transformers merges them into one tensor).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

from .streaming import CheckpointError, NotStreamable, expert_slices, fused_names

# tensor processors that split a stored tensor into several of the model's (one per expert, under names this
# transformers' models no longer have): not streamed
_SPLITTING = ("GptOssTensorProcessor",)
# the two stored tensors a fused gate/up experts tensor is merged from (Qwen2/3-MoE, MiniMax-M2), in the order
# transformers' tensor processors place them along its dimension 1
_MERGED = ("ffn_gate_exps", "ffn_up_exps")


class _Names:
    """A model as transformers' GGUF name map walks it (its config, its state dict's names, its children), from a
    list of names: the map is built from the names a model has before pvq splits its experts."""

    def __init__(self, config, names):
        self.config, self._names = config, list(names)

    def state_dict(self):
        return dict.fromkeys(self._names)

    def named_children(self):
        children = {}
        for name in self._names:
            head, dot, rest = name.partition(".")
            if dot:
                children.setdefault(head, []).append(rest)
        return [(head, _Names(self.config, rest)) for head, rest in children.items()]


class _Stored(NamedTuple):
    """Where a tensor lies in the file and how to read it back: all a reader keeps of the parsed file (its
    metadata fields, the vocabulary among them, are hundreds of thousands of objects that each garbage
    collection between blocks would walk)."""
    offset: int
    n_bytes: int
    dtype: np.dtype
    shape: tuple  # as the gguf library gives the data (a quantized row in bytes)
    kind: object  # the gguf library's quantization type
    dims: tuple  # the tensor's own shape (elements)


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
                                         t.tensor_type, tuple(int(d) for d in reversed(t.shape)))
                         for t in parsed.tensors}
        self.files = {name: self.path for name in self._tensors}
        self.stored: dict[str, list[str]] = {}
        self._processor = None  # transformers' tensor processor for the family (its older GGUF path)
        self._converters: dict[str, object] | None = None  # or the conversion of each tensor (its newer path)

    def follow(self, model) -> None:
        """Name the tensors as `model` does (its experts already split, where it has them), through transformers'
        GGUF name map for its family; each split expert's linear is read as its rows of the stored 3-D tensors
        (of both, gate then up, where transformers merges two into one)."""
        import gguf
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                               get_gguf_hf_weights_map)

        if _conversions_for(self._arch) is not None:
            return self._follow_conversions(model)
        processor_class = TENSOR_PROCESSORS.get(self._arch, TensorProcessor)
        if processor_class.__name__ in _SPLITTING:
            raise NotStreamable(f"{self.path}: transformers splits this family's tensors on loading")
        self._processor = processor_class(config=model.config.to_dict())
        # transformers walks every submodule and builds the family's whole name map again for each (400
        # times for SmolLM2, 9 s): the same map each time, so it is built once while the walk runs
        build = gguf.get_tensor_name_map
        gguf.get_tensor_name_map = functools.lru_cache(maxsize=None)(build)
        try:
            mapping = get_gguf_hf_weights_map(_Names(model.config, fused_names(model)), self._processor)
        except NotImplementedError as exc:
            raise NotStreamable(f"{self.path}: {exc}") from None
        finally:
            gguf.get_tensor_name_map = build
        stored: dict[str, list[str]] = {}
        for g, hf in mapping.items():  # GGUF name -> model name (a stacked experts tensor's without ".weight")
            g = g if g in self._tensors else f"{g}.weight"
            if g in self._tensors:
                stored.setdefault(hf, []).append(g)
        for hf, names in stored.items():
            if len(names) > 1:
                kinds = [n.rsplit(".", 2)[-2] for n in names]
                if sorted(kinds) != sorted(_MERGED):
                    raise NotStreamable(f"{self.path}: tensors {', '.join(names)} make one tensor {hf}")
                names.sort(key=lambda n: _MERGED.index(n.rsplit(".", 2)[-2]))
        self.stored = stored
        self.slices = {name: where for name, where in expert_slices(model).items() if where[0] in stored}

    def _follow_conversions(self, model) -> None:
        """follow() for a family transformers reads through its conversion mapping (renamings, then at most one
        converter per tensor: the ops that undo llama.cpp's transforms, run here on each tensor as it is read)."""
        from transformers.core_model_loading import WeightConverter, WeightRenaming, rename_source_key

        mapping = _conversions_for(self._arch)(model.config)
        renamings = [t for t in mapping if isinstance(t, WeightRenaming)]
        converters = [t for t in mapping if isinstance(t, WeightConverter)]
        by_pattern = {pattern: c for c in converters for pattern in c.source_patterns}
        stored: dict[str, list[str]] = {}
        matched = {}  # GGUF name -> the converter's source pattern it matched
        self._converters = {}
        for g in self._tensors:
            name, matched[g] = rename_source_key(g, renamings, converters)
            stored.setdefault(name, []).append(g)
            if matched[g] is not None:
                self._converters[name] = by_pattern[matched[g]]
        for name, names in stored.items():
            converter = self._converters.get(name)
            if len(names) > 1 and converter is None:
                raise NotStreamable(f"{self.path}: tensors {', '.join(names)} are all named {name}")
            if len(names) > 1:  # a converter's sources, in its order
                names.sort(key=lambda g: converter.source_patterns.index(matched[g]))
        self.stored = stored
        self.slices = {name: where for name, where in expert_slices(model).items() if where[0] in stored}
        for fused, flat in {where[0]: where[3] for where in self.slices.values()}.items():
            if flat:  # read per expert below as rows of a 3-D tensor
                raise NotStreamable(f"{self.path}: {fused} stacks its experts in a 2-D tensor")
            ops = getattr(self._converters.get(fused), "operations", [])
            if any(type(op).__name__ not in ("ConcatenateRows", "Concatenate") for op in ops):
                raise NotStreamable(f"{self.path}: {fused} is converted on loading in a way not read per expert")

    def __contains__(self, name: str) -> bool:
        return name in self.stored or name in self.slices

    def where(self, name: str) -> str:
        """Where the model's tensor `name` is stored, for messages."""
        if name in self.slices:
            fused, e, _, _ = self.slices[name]
            return f"{self.path}: tensor {' and '.join(self.stored[fused])}, expert {e}"
        return f"{self.path}: tensor {' and '.join(self.stored[name])}"

    def get(self, name: str) -> torch.Tensor:
        if name in self.slices:  # one expert's rows of each stored 3-D tensor: the rest is never read
            fused, e, transposed, _ = self.slices[name]
            t = torch.cat([self._read(g, e) for g in self.stored[fused]], dim=0)
            return t.T.contiguous() if transposed else t
        if name not in self.stored:
            raise CheckpointError(f"{self.path}: tensor {name} is not in the GGUF file")
        tensors = [self._read(g) for g in self.stored[name]]
        converter = (self._converters or {}).get(name)
        if converter is not None:  # as transformers' loader runs it: sources by pattern, each op in turn
            collected = {pattern: [t] for pattern, t in zip(converter.source_patterns, tensors)}
            for op in converter.operations:
                collected = op.convert(collected, source_patterns=converter.source_patterns,
                                       target_patterns=converter.target_patterns, full_layer_name=name,
                                       config=None, model=None, missing_keys=None)
            (out,) = collected.values()
            return (out[0] if isinstance(out, list) else out).to(torch.float32)
        return torch.cat(tensors, dim=1) if len(tensors) > 1 else tensors[0]

    def _read(self, gname: str, expert: int | None = None) -> torch.Tensor:
        """The stored tensor `gname` (or its first dimension's entry `expert`: an expert's rows are contiguous
        in the file, quantized or not) as values: on transformers' older path dequantized by the gguf library
        and converted by the family's tensor processor, on its newer one unpacked by transformers (get runs the
        converter)."""
        from gguf import dequantize

        t = self._tensors[gname]
        offset, n_bytes, shape = t.offset, t.n_bytes, t.shape
        try:
            if expert is not None:
                if len(shape) != 3 or n_bytes % shape[0] or not 0 <= expert < shape[0]:
                    raise ValueError(f"no expert {expert} in a tensor of stored shape {list(shape)}")
                n_bytes //= shape[0]
                offset, shape = offset + expert * n_bytes, shape[1:]
            with open(self.path, "rb") as f:
                f.seek(offset)
                raw = f.read(n_bytes)
            if len(raw) != n_bytes:
                raise ValueError("the file ends inside the tensor (truncated)")
            if self._converters is not None:  # dequantized as transformers' newer path does it
                return _values(raw, t, t.dims[1:] if expert is not None else t.dims)
            data = np.frombuffer(raw, dtype=t.dtype).reshape(shape)
            weights = dequantize(data, t.kind)
        except (OSError, ValueError, NotImplementedError) as exc:
            raise CheckpointError(f"{self.path}: cannot read tensor {gname}: {exc}") from None
        weights = self._processor.process(weights=weights, name=gname, tensor_key_mapping={},
                                          parsed_parameters={"tensors": {}}).weights
        return torch.from_numpy(np.copy(weights))


def _conversions_for(arch: str):
    """transformers' builder of the conversion mapping for a GGUF architecture it reads through its newer path
    (Qwen3.5, LFM2 in 5.x), or None (its older path: a tensor processor, or a transformers without it)."""
    try:
        from transformers.integrations.gguf.gguf_conversion_mapping import GGUF_ARCHS
    except ImportError:
        return None
    return GGUF_ARCHS.get(arch)


def _values(raw: bytes, t: _Stored, dims: tuple) -> torch.Tensor:
    """A tensor's bytes as values: float types as stored (the converters' ops round back to them, as on a whole
    load), block types unpacked to float32 by transformers' own dequantizer."""
    from gguf import GGMLQuantizationType as Q
    from transformers.integrations.gguf.dequant import GGML_BLOCK
    from transformers.integrations.gguf.kernels import dequantize_blocks

    floats = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
    data = torch.frombuffer(bytearray(raw), dtype=floats.get(t.kind, torch.uint8))
    if t.kind in floats:
        return data.reshape(dims)
    if int(t.kind) not in GGML_BLOCK:
        raise ValueError(f"transformers cannot unpack GGUF type {t.kind!r}")
    rows = int(np.prod(dims[:-1], dtype=np.int64))
    return dequantize_blocks(data.reshape(rows, -1), int(t.kind), rows, dims[-1], torch.float32).reshape(dims)
