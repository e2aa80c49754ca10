"""Evaluation and calibration data: where it lives, how it is read, how it is cut into windows.

The data is never shipped with the package. It is read from a folder laid out like
`../shared/data` (see its README): `wikitext2/test.txt` (WikiText-2 raw test, rows joined with
"\\n\\n" as in the GPTQ perplexity protocol of Frantar et al., 2022), `wikitext2/valid.tokenized.txt`
(calibration only) and `arc_easy/{train,validation,test}.jsonl` (Clark et al., 2018).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

ENV_VAR = "PVQ_DATA"

# Files whose presence marks a folder as a data folder; any one is enough, so a user may
# bring only the part they need (say, ARC without WikiText).
_MARKER_FILES = (
    "wikitext2/test.txt",
    "wikitext2/valid.tokenized.txt",
    "arc_easy/test.jsonl",
)

# name -> {split: file inside the data folder}. "calib" deliberately never maps to the test text.
KNOWN_TEXTS = {
    "wikitext2": {
        "eval": "wikitext2/test.txt",
        "calib": "wikitext2/valid.tokenized.txt",
    },
}

_SPLITS = ("eval", "calib")


def _is_data_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in _MARKER_FILES)


def data_dir() -> Path:
    """The folder holding the evaluation data.

    Order: $PVQ_DATA (used alone when set, so a wrong value is never silently replaced by
    another copy), then `../shared/data` from the current directory, then from the repository
    root (the parent of `src/`).
    """
    hint = (
        f"set {ENV_VAR} to a folder holding wikitext2/test.txt, wikitext2/valid.tokenized.txt "
        "and arc_easy/test.jsonl (the layout of the project's shared/data)"
    )
    env = os.environ.get(ENV_VAR)
    if env:
        path = Path(env).expanduser()
        if _is_data_dir(path):
            return path.resolve()
        raise FileNotFoundError(f"{ENV_VAR}={env!r} holds none of {', '.join(_MARKER_FILES)}; {hint}")

    repo_root = Path(__file__).resolve().parents[2]  # src/pvq/data.py -> <repo>
    candidates = [Path.cwd() / ".." / "shared" / "data", repo_root / ".." / "shared" / "data"]
    for path in candidates:
        if _is_data_dir(path):
            return path.resolve()
    tried = ", ".join(str(p.resolve()) for p in candidates)
    raise FileNotFoundError(f"no evaluation data folder found (tried {tried}); {hint}")


def _read_text(path: Path) -> str:
    # Text mode with universal newlines on purpose: the shared copy of wikitext2/test.txt is
    # stored with CRLF line ends, and reading it this way gives back exactly
    # "\n\n".join(dataset["text"]) of the Hugging Face original, which is what the published
    # perplexities were measured on.
    with open(path, encoding="utf-8") as f:
        return f.read()


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
    rel = KNOWN_TEXTS[name_or_path][split]
    try:
        file = data_dir() / rel
        if file.is_file():
            return _read_text(file)
        problem: Exception = FileNotFoundError(f"{file} does not exist")
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
    # The corpus is far longer than model_max_length; silence the one-off "sequence too long"
    # warning by asking for no truncation explicitly and no length check.
    ids = tokenizer(text, return_tensors="pt", truncation=False, verbose=False).input_ids
    return ids[0].to(torch.long)  # [n_tokens]


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
    path = data_dir() / "arc_easy" / f"{split}.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path} does not exist (splits: train, validation, test)")
    rows = []
    with open(path, encoding="utf-8") as f:
        for line in f:
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
