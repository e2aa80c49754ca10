"""Evaluation and calibration data: where it lives, how it is read, how it is cut into windows.

The texts the tests and the main commands need travel with the package, compressed, in `corpora/`
(its README gives their origin, licence and sha256): `wikitext2/test.txt` (WikiText-2 raw test, rows
joined with "\n\n" as in the GPTQ perplexity protocol of Frantar et al., 2022),
`wikitext2/valid.tokenized.txt` (calibration only) and `arc_easy/{train,validation,test}.jsonl`
(Clark et al., 2018). `$PVQ_DATA` points at another copy with the same layout, uncompressed; a
file missing there is sought in the Hugging Face `datasets` originals where that package and the
hub are reachable.
"""

from __future__ import annotations

import hashlib
import io
import json
import lzma
import os
from pathlib import Path

import torch

ENV_VAR = "PVQ_DATA"
CORPORA = Path(__file__).with_name("corpora")
# relative path -> sha256 of the uncompressed file (corpora/README.md)
FILES = {
    "wikitext2/test.txt": "71fa921e51ba607b4364d8787d05f4513b41b33732dd3504ff1af8952c6e7e77",
    "wikitext2/valid.tokenized.txt": "f0737ed31fc1329026e95cb8b98e19c2a182c39c240ab909dc31abf2f8af58e8",
    "arc_easy/train.jsonl": "75d0bb9b9218278fb9cb430fc0ace63d71cfe02ca1a03d39374260c7cd7c67f7",
    "arc_easy/validation.jsonl": "e45dbcd2d8e8235af16302f4be0dd00c5d173878c583f4dfe55b70f9df07b2f8",
    "arc_easy/test.jsonl": "c9757629cb775832c3c67b4aa1425e3eda01708a2b02fa229b0c3ed1bcb70fe1",
}

# name -> {split: file inside the data folder}. "calib" deliberately never maps to the test text.
KNOWN_TEXTS = {
    "wikitext2": {
        "eval": "wikitext2/test.txt",
        "calib": "wikitext2/valid.tokenized.txt",
    },
}

_SPLITS = ("eval", "calib")


def data_dir() -> Path:
    """The folder named by $PVQ_DATA (FileNotFoundError when unset or holding none of the data files)."""
    hint = f"set {ENV_VAR} to a folder laid out like pvq's corpora/ (uncompressed): {', '.join(FILES)}"
    env = os.environ.get(ENV_VAR)
    if not env:
        raise FileNotFoundError(f"{ENV_VAR} is not set; {hint}")
    path = Path(env).expanduser()
    if path.is_dir() and any((path / rel).is_file() for rel in FILES):
        return path.resolve()
    raise FileNotFoundError(f"{ENV_VAR}={env!r} holds none of {', '.join(FILES)}; {hint}")


def _decode(raw: bytes) -> str:
    # Universal newlines on purpose: wikitext2/test.txt is stored with CRLF line ends, and reading it
    # this way gives back exactly "\n\n".join(dataset["text"]) of the Hugging Face original, which is
    # what the published perplexities were measured on.
    return io.TextIOWrapper(io.BytesIO(raw), encoding="utf-8").read()


def _read_text(path: Path) -> str:
    return _decode(path.read_bytes())


def read_data(rel: str) -> str:
    """The text of data file `rel` (a key of FILES): from $PVQ_DATA when it is set (used alone, so a wrong
    value is never silently replaced by another copy), else the copy carried in the package, checked
    against its sha256."""
    if rel not in FILES:
        raise FileNotFoundError(f"no data file {rel!r}; known: {', '.join(FILES)}")
    if os.environ.get(ENV_VAR):
        file = data_dir() / rel
        if not file.is_file():
            raise FileNotFoundError(f"{file} does not exist ({ENV_VAR} is set, so only that folder is read)")
        return _read_text(file)
    path = CORPORA / f"{rel}.xz"
    try:
        raw = lzma.decompress(path.read_bytes())
    except (OSError, lzma.LZMAError) as exc:
        raise FileNotFoundError(f"{path}: missing or damaged in the installed package ({exc}); reinstall pvq "
                                f"or set {ENV_VAR}") from None
    if hashlib.sha256(raw).hexdigest() != FILES[rel]:
        raise FileNotFoundError(f"{path}: its content does not match the recorded sha256 (a damaged install); "
                                f"reinstall pvq or set {ENV_VAR}")
    return _decode(raw)


def _from_hub(name: str, split: str) -> str | None:
    """Optional fallback to the `datasets` originals; None when unavailable (never required)."""
    try:
        import datasets  # noqa: PLC0415  (optional dependency)
    except ImportError:
        return None
    try:
        if split == "eval":
            rows = datasets.load_dataset("wikitext", "wikitext-2-raw-v1", split="test")["text"]
            return "\n\n".join(rows)
        # The calibration file is the word-level (<unk>) version of the validation split; its
        # rows already end in "\n", so joining with "" rebuilds the file's shape.
        rows = datasets.load_dataset("wikitext", "wikitext-2-v1", split="validation")["text"]
        return "".join(rows)
    except Exception:  # offline, hub down, ...: the caller reports the missing file instead
        return None


def resolve_text(name_or_path: str, split: str) -> str:
    """Return a corpus as one string.

    `name_or_path` is either a path to a text file (read whole, `split` ignored) or a known
    name: "wikitext2" gives the raw test text for split "eval" and the validation text for
    split "calib"; "arc-easy" (calib only) the ARC-Easy train questions with their answers.
    Several joined by "+" (e.g. "wikitext2+arc-easy") give their concatenation.
    """
    if split not in _SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {', '.join(_SPLITS)}")
    if "+" in name_or_path and not Path(name_or_path).expanduser().is_file():
        # a mix such as "wikitext2+arc-easy": the texts joined; windows are drawn across all of them
        return "\n\n".join(resolve_text(part, split) for part in name_or_path.split("+"))
    path = Path(name_or_path).expanduser()
    if path.is_file():
        return _read_text(path)
    if name_or_path == "arc-easy":
        if split != "calib":
            raise ValueError("arc-easy is evaluated as accuracy (pvq eval --arc-easy), not as a text")
        return arc_easy_text("train")
    if name_or_path not in KNOWN_TEXTS:
        raise ValueError(
            f"{name_or_path!r} is neither a text file nor a known corpus; "
            f"known names: {', '.join(sorted(KNOWN_TEXTS) + ['arc-easy'])}"
        )
    try:
        return read_data(KNOWN_TEXTS[name_or_path][split])
    except FileNotFoundError as exc:
        problem = exc
    text = _from_hub(name_or_path, split)
    if text is None:
        raise FileNotFoundError(f"cannot read {name_or_path} ({split}): {problem}")
    return text


def encode_text(tokenizer, text: str) -> torch.Tensor:
    """Tokenize a whole corpus once -> LongTensor [n_tokens].

    The tokenizer's own special-token rule applies once, at the very start of the stream (a BOS
    for tokenizers that add one, nothing for SmolLM2's), as in the GPTQ protocol, which
    tokenizes "\\n\\n".join(test) in one call. Windows cut later carry no extra BOS.
    """
    key = _encoding_key(tokenizer, text)
    if key is not None and key in _ENCODED:
        return _ENCODED[key].clone()  # a copy: a caller writing into its ids leaves the next one's alone
    # The corpus is far longer than model_max_length; silence the one-off "sequence too long"
    # warning by asking for no truncation explicitly and no length check.
    ids = tokenizer(text, return_tensors="pt", truncation=False, verbose=False).input_ids[0].to(torch.long)
    if key is not None:
        while len(_ENCODED) >= _ENCODED_KEPT:
            del _ENCODED[next(iter(_ENCODED))]
        _ENCODED[key] = ids.clone()
    return ids  # [n_tokens]


# The last corpora tokenized (a calibration text and an evaluation text): a process that quantizes or
# evaluates again (a sweep, the allocation's probes, the tests) reads WikiText-2's ~2.5 M tokens in
# about 2 s on 2 cores each time otherwise. Keyed by the tokenizer's whole serialized state (vocabulary,
# normalizer, special-token rule) and the text's digest, so a changed tokenizer never reuses ids.
_ENCODED: dict[tuple, torch.Tensor] = {}
_ENCODED_KEPT = 2


def _encoding_key(tokenizer, text: str) -> tuple | None:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:  # a slow (Python) tokenizer: no serialized state to compare; not kept
        return None
    state = hashlib.sha256(backend.to_str().encode()).hexdigest()
    return type(tokenizer).__qualname__, state, hashlib.sha256(text.encode()).hexdigest()


def calibration_batches(tokenizer, text: str, nsamples: int, seqlen: int, seed: int) -> torch.Tensor:
    """`nsamples` random windows of `seqlen` tokens from `text` -> LongTensor [nsamples, seqlen].

    Windows start at uniformly drawn offsets (they may overlap), as in GPTQ's calibration
    loader; the same seed gives the same batches, independent of the global RNG.
    """
    if nsamples < 1 or seqlen < 1:
        raise ValueError(f"nsamples and seqlen must be positive, got {nsamples} and {seqlen}")
    ids = encode_text(tokenizer, text)  # [n_tokens]
    n = ids.numel()
    if n < seqlen + 1:
        raise ValueError(f"calibration text has {n} tokens; need at least seqlen + 1 = {seqlen + 1}")
    gen = torch.Generator().manual_seed(seed)
    # High bound n - seqlen (exclusive) matches GPTQ's randint(0, n - seqlen - 1) (inclusive).
    starts = torch.randint(0, n - seqlen, (nsamples,), generator=gen)  # [nsamples]
    offsets = torch.arange(seqlen)  # [seqlen]
    return ids[starts[:, None] + offsets[None, :]]  # [nsamples, seqlen]


def load_arc_easy(split: str = "test", limit: int | None = None) -> list[dict]:
    """ARC-Easy rows: dicts with `question`, `choices` {`text`, `label`} and `answerKey`."""
    if f"arc_easy/{split}.jsonl" not in FILES:
        raise FileNotFoundError(f"no ARC-Easy split {split!r} (splits: train, validation, test)")
    rows = []
    for line in read_data(f"arc_easy/{split}.jsonl").splitlines():
        if limit is not None and len(rows) >= limit:
            break
        if line.strip():
            rows.append(json.loads(line))
    return rows


def arc_easy_text(split: str = "train") -> str:
    """ARC-Easy questions with their correct answers as plain text, for calibration (never the test split)."""
    rows = load_arc_easy(split)
    parts = []
    for r in rows:
        answer = r["choices"]["text"][r["choices"]["label"].index(r["answerKey"])]
        parts.append(f"Question: {r['question']}\nAnswer: {answer}")
    return "\n\n".join(parts)
