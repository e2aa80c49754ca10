"""safetensors files read and written one tensor at a time, with plain reads and writes.

The safetensors library maps a whole file into memory and the pages it touches count in the
process's resident memory until the file is closed; for checkpoints larger than memory pvq reads each
tensor's bytes itself (the format is an 8-byte header length, a JSON header, then the raw data) and
writes files the same way, so memory holds one tensor at a time. `write` gives the bytes
`safetensors.torch.save_file` gives for the same tensors (tests/test_streaming.py checks it).
"""
from __future__ import annotations

import json
import struct
from pathlib import Path

import torch

DTYPES = {"BOOL": torch.bool, "U8": torch.uint8, "I8": torch.int8, "I16": torch.int16, "I32": torch.int32,
          "I64": torch.int64, "F16": torch.float16, "BF16": torch.bfloat16, "F32": torch.float32,
          "F64": torch.float64}
NAMES = {v: k for k, v in DTYPES.items()}
_CHUNK = 1 << 24


class Entry:
    """One tensor of a file: dtype, shape and where its bytes are."""

    def __init__(self, path: Path, dtype: torch.dtype, shape: tuple, start: int, end: int):
        self.path, self.dtype, self.shape, self.start, self.end = path, dtype, shape, start, end

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def chunks(self):
        with open(self.path, "rb") as f:
            f.seek(self.start)
            left = self.nbytes
            while left:
                data = f.read(min(left, _CHUNK))
                if not data:
                    raise ValueError(f"{self.path}: the file ends inside a tensor (truncated)")
                left -= len(data)
                yield data

    def read(self) -> torch.Tensor:
        buf = bytearray(self.nbytes)
        view, at = memoryview(buf), 0
        for data in self.chunks():
            view[at:at + len(data)] = data
            at += len(data)
        if not buf:
            return torch.empty(self.shape, dtype=self.dtype)
        return torch.frombuffer(buf, dtype=self.dtype).reshape(self.shape)


def entries(path: str | Path) -> dict[str, Entry]:
    """The tensors of a safetensors file, in the file's order, from its header alone (ValueError if it is
    not a whole safetensors file)."""
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: too short for a safetensors file")
        n = struct.unpack("<Q", head)[0]
        if n > min(size - 8, 100 << 20):
            raise ValueError(f"{path}: header length {n} does not fit the file (truncated?)")
        try:
            header = json.loads(f.read(n))
        except (ValueError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path}: the header is not JSON ({exc})") from None
    out, base = {}, 8 + n
    if not isinstance(header, dict):
        raise ValueError(f"{path}: the header is not a JSON object")
    for name, e in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype = DTYPES[e["dtype"]]
            shape = tuple(int(s) for s in e["shape"])
            b, end = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: tensor {name} has a malformed header entry") from None
        numel = 1
        for s in shape:
            numel *= s
        if min(shape, default=0) < 0 or end - b != numel * torch.empty(0, dtype=dtype).element_size() or b < 0 \
                or base + end > size:
            raise ValueError(f"{path}: tensor {name} does not fit the file (truncated or damaged)")
        out[name] = Entry(path, dtype, shape, base + b, base + end)
    at = base  # as the format requires: the tensors tile the data, no gap, no overlap, nothing after
    for e in sorted(out.values(), key=lambda e: (e.start, e.end)):
        if e.start != at:
            raise ValueError(f"{path}: the tensors' byte ranges overlap or leave gaps (damaged header)")
        at = e.end
    if at != size:
        raise ValueError(f"{path}: {size - at} bytes after the last tensor (damaged or not a safetensors file)")
    return out


def _order(items: dict[str, tuple[torch.dtype, tuple]]) -> list[str]:
    """The order safetensors writes tensors in (its own rule: by dtype, then name), asked of the library
    itself with one element per tensor."""
    from safetensors.torch import save

    raw = save({k: torch.zeros(1, dtype=d) for k, (d, _) in items.items()})
    n = struct.unpack("<Q", raw[:8])[0]
    return [k for k in json.loads(raw[8:8 + n]) if k != "__metadata__"]


def write(path: str | Path, items: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file of `items` {name: tensor, or Entry of another file}, one at a time."""
    meta = {k: (v.dtype, tuple(v.shape)) for k, v in items.items()}
    header, at = ({"__metadata__": metadata} if metadata else {}), 0
    order = _order(meta)
    for k in order:
        dtype, shape = meta[k]
        n = (items[k].nbytes if isinstance(items[k], Entry) else items[k].numel() * items[k].element_size())
        header[k] = {"dtype": NAMES[dtype], "shape": list(shape), "data_offsets": [at, at + n]}
        at += n
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for k in order:
            v = items[k]
            if isinstance(v, Entry):
                for data in v.chunks():
                    f.write(data)
            elif v.numel():
                f.write(memoryview(v.detach().contiguous().reshape(-1).view(torch.uint8).numpy()))
