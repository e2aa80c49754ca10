"""The output head and the input embedding table quantized too (--head-bits, --embed-bits): in a small model they
are most of the file. Tiny random models: what is saved loads the same everywhere, the head is calibrated on its
own inputs, a lookup decodes only the rows it returns, and what pvq cannot quantize is refused in one line."""
import json

import pytest
import torch

import pvq  # noqa: F401  (registers pvq with transformers)
from pvq import api, checkpoint, loader
from pvq.cli import main as cli
from pvq.models.adapters import blocks, head_hessian
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.modules.dense import StoredEmbedding
from pvq.modules.embedding import HeadRows, QuantEmbedding
from pvq.modules.linear import QuantLinear
from pvq.runtime import native
from pvq.settings import QuantConfig

IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(0))


def _quantized(tied: bool, method="pvq-gptq", **ends):
    model = tiny_model("llama", intermediate_size=96, tie_word_embeddings=tied)
    cfg = QuantConfig(method=method, bits=3.25, nsamples=4, seqlen=32, **ends)
    summary = api.quantize(model, cfg, IDS if cfg.uses_data else None, progress=False)
    return model, summary


def _logits(model):
    with torch.no_grad():
        return model(IDS).logits


def _loads_everywhere(path, ref, embedding):
    """pvq.load (both decode modes) and transformers' from_pretrained give the in-memory model's logits, with an
    embedding of this class."""
    from transformers import AutoModelForCausalLM

    for decode in ("once", "on-the-fly"):
        loaded, _ = loader.load(path, decode=decode)
        assert isinstance(loaded.get_input_embeddings(), embedding)
        torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=1e-5)
    hf = AutoModelForCausalLM.from_pretrained(path)
    assert isinstance(hf.get_input_embeddings(), embedding)
    torch.testing.assert_close(_logits(hf), ref, rtol=0, atol=1e-5)


@pytest.mark.parametrize("tied", [True, False])
def test_a_quantized_head_and_embedding_load_as_they_were_made(tmp_path, tied):
    model, summary = _quantized(tied, head_bits=4.25, embed_bits=4.25)
    assert isinstance(model.get_output_embeddings(), QuantLinear)
    assert isinstance(model.get_input_embeddings(), QuantEmbedding)
    ends = summary["ends"]
    assert set(ends) == {"head", "embedding"} and all(4.0 < e["bits_per_weight"] <= 4.25 for e in ends.values())
    assert summary["layers"] == 14 and summary["bits_per_weight"] <= 3.25  # the blocks' linears alone, as before
    ref = _logits(model)
    checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    stored = json.loads((tmp_path / "q" / "config.json").read_text())
    assert stored["quantization_config"]["format_version"] == 2  # a reader of version 1 would misbuild them
    assert not stored.get("tie_word_embeddings")
    _loads_everywhere(tmp_path / "q", ref, QuantEmbedding)


def test_the_ends_make_the_file_smaller(tmp_path):
    dense, _ = _quantized(True)
    small, _ = _quantized(True, head_bits=4.25, embed_bits=4.25)
    checkpoint.save(dense, tiny_tokenizer(), tmp_path / "dense")
    checkpoint.save(small, tiny_tokenizer(), tmp_path / "small")
    vocab, hidden = 256, 64
    saved = checkpoint.weights_bytes(tmp_path / "dense") - checkpoint.weights_bytes(tmp_path / "small")
    # one float16 table out, two tables of about 4.2 bits in
    assert saved == pytest.approx(vocab * hidden * (2 - 2 * 4.2 / 8), rel=0.05)


def test_the_head_is_calibrated_on_the_final_norms_outputs():
    model = tiny_model("llama", intermediate_size=96)
    with torch.no_grad():
        out = model(IDS, output_hidden_states=True)
        last = model.model.layers[-1](out.hidden_states[-2], position_embeddings=model.model.rotary_emb(
            out.hidden_states[-2], torch.arange(IDS.shape[1])[None]))
        last = last[0] if isinstance(last, tuple) else last
        x = model.model.norm(last).reshape(-1, 64).double()
    h = head_hessian(model, last, IDS, batch=3)
    torch.testing.assert_close(h, x.T @ x / x.shape[0], rtol=1e-4, atol=1e-6)
    assert len(blocks(model)) == 2  # the blocks ran as themselves again afterwards
    torch.testing.assert_close(_logits(model), out.logits)


def test_a_calibrated_head_errs_less_in_its_inputs_metric_than_one_rounded_without_data():
    calibrated, s_cal = _quantized(False, head_bits=3.25)
    rounded, _ = _quantized(False, method="pvq", head_bits=3.25)
    model = tiny_model("llama", intermediate_size=96)
    with torch.no_grad():
        hidden = model(IDS, output_hidden_states=True).hidden_states[-1]  # after the final norm in Llama
    x = hidden.reshape(-1, 64)
    w = model.lm_head.weight.detach()

    def err(q):
        return ((x @ (q.lm_head.weight_in_original_basis() - w).T).norm() / (x @ w.T).norm()).item()
    assert err(calibrated) < 0.9 * err(rounded)


@pytest.mark.skipif(native.kernel() is None, reason="rows are picked by the native kernel")
def test_an_on_the_fly_lookup_decodes_only_the_rows_it_returns(tmp_path, monkeypatch):
    model, _ = _quantized(False, method="pvq", embed_bits=4.25)
    checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    loaded, _ = loader.load(tmp_path / "q", decode="on-the-fly")
    emb = loaded.get_input_embeddings()
    dec = emb.runner.decoder
    asked = []
    real = dec.decode_rows
    monkeypatch.setattr(dec, "decode_rows", lambda r0, r1, out=None: asked.append((r0, r1)) or real(r0, r1, out))
    ids = torch.tensor([[5, 3, 5, 200]])
    rows = emb(ids)
    assert sorted(asked) == [(3, 4), (5, 6), (200, 201)]
    assert emb.runner.kept is None
    whole = emb.runner.rot.to_original(emb.packed.dequantize(torch.float32))
    torch.testing.assert_close(rows[0], whole[ids[0]], rtol=0, atol=1e-5)
    with pytest.raises(IndexError, match="token id 256 is outside the embedding table of 256 rows"):
        emb(torch.tensor([1, 256]))


def test_a_tied_models_embedding_reads_the_rows_of_its_quantized_head(tmp_path):
    from safetensors.torch import load_file

    model, summary = _quantized(True, head_bits=4.25, embed_bits="head")
    assert summary["ends"]["embedding"] == {"layer": "model.embed_tokens", "reads": "lm_head"}
    emb, head = model.get_input_embeddings(), model.get_output_embeddings()
    assert isinstance(emb, HeadRows) and int(head.seeds[1]) == -1  # rows that decode alone
    torch.testing.assert_close(emb(IDS[0]), head.weight_in_original_basis()[IDS[0]], rtol=0, atol=1e-5)
    ref = _logits(model)
    checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    assert not [k for k in load_file(tmp_path / "q" / "model.safetensors") if "embed" in k]  # one table stored
    _loads_everywhere(tmp_path / "q", ref, HeadRows)
    two, _ = _quantized(True, head_bits=4.25, embed_bits=4.25)
    checkpoint.save(two, tiny_tokenizer(), tmp_path / "two")
    saved = checkpoint.weights_bytes(tmp_path / "two") - checkpoint.weights_bytes(tmp_path / "q")
    assert saved == pytest.approx(256 * 64 * 4.2 / 8, rel=0.05)
    with pytest.raises(ValueError, match="--embed-bits head: this model's input embedding and output head are two"):
        _quantized(False, head_bits=4.25, embed_bits="head")
    with pytest.raises(ValueError, match="--embed-bits head reads the rows of the quantized head: give --head-bits"):
        QuantConfig(embed_bits="head")


def test_only_the_head_of_a_tied_pair(tmp_path):
    model, summary = _quantized(True, head_bits=4.25)
    assert set(summary["ends"]) == {"head"}
    emb = model.get_input_embeddings()
    assert type(emb) is torch.nn.Embedding and emb.weight.dtype == torch.float32
    ref = _logits(model)
    checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    loaded, _ = loader.load(tmp_path / "q")
    assert isinstance(loaded.get_input_embeddings(), StoredEmbedding)  # the dense one still kept in float16
    torch.testing.assert_close(_logits(loaded), ref, rtol=0, atol=1e-5)


def test_cli_quantizes_the_ends_and_info_reports_them(tmp_path, capsys):
    src = tmp_path / "hf"
    tiny_model("llama", intermediate_size=96, tie_word_embeddings=True).save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    assert cli(["quantize", str(src), "--method", "pvq", "--bits", "3.25", "--head-bits", "4", "--embed-bits", "3",
                "-o", str(tmp_path / "q"), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["info", str(tmp_path / "q"), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["ends"]["head"]["layer"] == "lm_head" and info["ends"]["embedding"]["layer"] == "model.embed_tokens"
    assert info["ends"]["embedding"]["bits_per_weight"] <= 3.0 < info["ends"]["head"]["bits_per_weight"] <= 4.0
    assert info["bits_per_weight"] <= 3.25
    assert cli(["info", str(tmp_path / "q")]) == 0
    assert "input embeddings model.embed_tokens: quantized" in capsys.readouterr().out


@pytest.mark.parametrize("option", ["--embed-bits", "--head-bits"])
def test_what_pvq_cannot_quantize_is_refused_in_one_line(tmp_path, capsys, option):
    src = tmp_path / "hf"
    tiny_model("biogpt").save_pretrained(src)  # its embedding scales the rows it returns by a float of its own
    tiny_tokenizer().save_pretrained(src)
    rc = cli(["quantize", str(src), "--method", "pvq", option, "4", "-o", str(tmp_path / "q"), "--no-progress"])
    err = capsys.readouterr().err
    if option == "--embed-bits":
        assert rc != 0 and "--embed-bits: this model's input embedding is BioGptScaledWordEmbedding" in err
        assert "Traceback" not in err and not (tmp_path / "q").exists()
    else:
        assert rc == 0
    with pytest.raises(ValueError, match="--head-bits must be a number above 0"):
        QuantConfig(head_bits=0)
    assert cli(["quantize", str(src), "--embed-bits", "rows", "-o", str(tmp_path / "q")]) != 0
    assert "--embed-bits: must be a number above 0 and at most 64, or head, got 'rows'" in capsys.readouterr().err
    for ends in ({"head_bits": 4}, {"embed_bits": 4}):
        with pytest.raises(ValueError, match="--finetune model tunes the whole model with its head and embeddings"):
            QuantConfig(**ends, finetune="model")


@pytest.mark.parametrize("embed_bits", [4.25, "head"])
def test_from_pretrained_in_bfloat16_looks_rows_up_in_bfloat16(tmp_path, embed_bits):
    from transformers import AutoModelForCausalLM

    model, _ = _quantized(True, method="pvq", embed_bits=embed_bits, head_bits=4.25 if embed_bits == "head" else None)
    checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "q", dtype=torch.bfloat16)
    assert hf.get_input_embeddings()(IDS).dtype == torch.bfloat16
    assert torch.isfinite(_logits(hf)).all()


@pytest.mark.parametrize("embed_bits", [4.25, "head"])
def test_a_scaled_embedding_keeps_its_factor(tmp_path, embed_bits):
    """Gemma 3 multiplies its embedding's rows by sqrt(hidden) (its factor rounded to the table's dtype): a
    quantized table, its own or the head's rows, returns them scaled the same, in memory and loaded; the file is
    format version 3 (a reader of 2 would leave the factor out), and it refuses a model that scales otherwise."""
    model = tiny_model("gemma3_text", tie_word_embeddings=True)
    emb = model.get_input_embeddings()
    factor = emb.scalar_embed_scale
    assert type(emb).__name__ == "Gemma3TextScaledWordEmbedding" and factor == model.config.hidden_size ** 0.5
    table = emb.weight.detach().clone()
    cfg = QuantConfig(method="pvq-gptq", bits=3.25, nsamples=4, seqlen=32, embed_bits=embed_bits,
                      head_bits=4.25 if embed_bits == "head" else None)
    api.quantize(model, cfg, IDS, progress=False)
    emb = model.get_input_embeddings()
    assert isinstance(emb, HeadRows if embed_bits == "head" else QuantEmbedding) and emb.embed_scale == factor
    rows = emb(IDS[0])
    assert (rows - table[IDS[0]] * factor).norm() < 0.2 * (table[IDS[0]] * factor).norm()  # quantized at ~4 bits
    unscaled = (emb.head if embed_bits == "head" else emb).weight_in_original_basis()[IDS[0]]
    torch.testing.assert_close(rows, unscaled * factor, rtol=1e-6, atol=1e-6)
    ref = _logits(model)
    checkpoint.save(model, tiny_tokenizer(), tmp_path / "q")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["quantization_config"]["format_version"] == 3
    assert [v["embed_scale"] for v in config["quantization_config"]["layers"].values() if "embed_scale" in v] == [factor]
    _loads_everywhere(tmp_path / "q", ref, type(emb))
    for v in config["quantization_config"]["layers"].values():
        if "embed_scale" in v:
            v["embed_scale"] = 2.0
    del config["quantization_config"]["checksums"]  # as if written so, not edited after
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(checkpoint.PVQFormatError, match="scales its rows by .*, but the file was quantized from one that scales them by 2.0"):
        loader.load(tmp_path / "q")


def test_a_library_call_is_refused_before_any_block_is_quantized():
    model = tiny_model("biogpt")
    with pytest.raises(ValueError, match="--embed-bits: this model's input embedding is BioGptScaledWordEmbedding"):
        api.quantize(model, QuantConfig(method="pvq-gptq", embed_bits=4, nsamples=4, seqlen=32), IDS, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())


def test_a_scaled_embedding_that_does_more_than_scale_is_refused_before_the_blocks(monkeypatch):
    model = tiny_model("gemma3_text")
    emb = model.get_input_embeddings()
    monkeypatch.setattr(type(emb), "forward", lambda self, ids: torch.nn.functional.embedding(ids, self.weight) * 8 + 1)
    with pytest.raises(ValueError, match="Gemma3TextScaledWordEmbedding does not return its rows times 8"):
        api.quantize(model, QuantConfig(method="pvq-gptq", embed_bits=4, nsamples=4, seqlen=32), IDS, progress=False)
    assert not any(isinstance(m, QuantLinear) for m in model.modules())
