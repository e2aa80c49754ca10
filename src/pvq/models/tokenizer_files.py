"""Writing a tokenizer into a folder so that loading the folder gives the same tokenizer.

Some tokenizer classes rebuild parts of their tokenizer when loaded from a folder instead of reading
tokenizer.json (Qwen2's class makes its own NFC normalizer and digit-splitting pre-tokenizer). A tokenizer
transformers made from a GGUF file keeps what the file's vocabulary gave, so its folder, loaded again, would
tokenize differently. Where that happens the folder names the class that reads tokenizer.json as it is."""
from __future__ import annotations

import json
from pathlib import Path


def save_tokenizer(tokenizer, folder: str | Path) -> None:
    """`tokenizer.save_pretrained(folder)`, then make sure `AutoTokenizer.from_pretrained(folder)` rebuilds the
    same backend; where it would not, tokenizer_config.json names transformers' class that reads tokenizer.json as
    it is instead of the tokenizer's class."""
    folder = Path(folder)
    tokenizer.save_pretrained(str(folder))
    backend = getattr(tokenizer, "backend_tokenizer", None)
    config = folder / "tokenizer_config.json"
    if backend is None or not (folder / "tokenizer.json").is_file() or not config.is_file():
        return  # a slow tokenizer, or one saved some other way: nothing to compare
    wanted = backend.to_str()
    if _reloaded(folder) in (None, wanted):
        return
    settings = json.loads(config.read_text())
    settings["tokenizer_class"] = _verbatim()
    settings.pop("auto_map", None)
    config.write_text(json.dumps(settings, indent=2, sort_keys=True, ensure_ascii=False) + "\n")


def _reloaded(folder: Path) -> str | None:
    """The backend AutoTokenizer builds from `folder`, serialized; None where it cannot load it (a tokenizer whose
    code comes with the model: its class is left as it is)."""
    from transformers import AutoTokenizer

    try:
        backend = getattr(AutoTokenizer.from_pretrained(str(folder)), "backend_tokenizer", None)
    except Exception:
        return None
    return None if backend is None else backend.to_str()


def _verbatim() -> str:
    """The name transformers saves its class for a tokenizer that is exactly its tokenizer.json under (special
    tokens from the config): "TokenizersBackend" in transformers 5, which keeps PreTrainedTokenizerFast as its alias.
    A folder written from such a tokenizer names it too, so a run from a cached conversion writes the same bytes."""
    from transformers import PreTrainedTokenizerFast

    return PreTrainedTokenizerFast.__name__
