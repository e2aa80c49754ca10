"""KL divergence and top-1 agreement against the unquantized model (eval/divergence.py, `pvq eval --kl`)."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from pvq import api
from pvq.cli import main as cli
from pvq.data import resolve_text
from pvq.eval.divergence import divergence
from pvq.eval.perplexity import perplexity
from pvq.models.loading import tiny_model, tiny_tokenizer
from pvq.settings import QuantConfig

TEXT = resolve_text("wikitext2", "eval")[:20000]


@torch.no_grad()
def test_divergence_is_the_mean_kl_and_agreement_over_the_perplexity_windows():
    tok = tiny_tokenizer()
    ref = tiny_model("llama")
    model = tiny_model("llama")
    api.quantize(model, QuantConfig(method="rtn", bits=2.25), progress=False)
    got = divergence(model, ref, tok, TEXT, seqlen=64, windows=3, progress=False)
    ids = tok(TEXT, return_tensors="pt").input_ids[0]
    kl, agree = [], []
    for w in range(3):
        batch = ids[w * 64:(w + 1) * 64][None]
        lq, lp = model(batch).logits[0, :-1].log_softmax(-1), ref(batch).logits[0, :-1].log_softmax(-1)
        kl.append(F.kl_div(lq, lp, log_target=True, reduction="none").sum(-1))
        agree.append(lq.argmax(-1) == lp.argmax(-1))
    assert got["kl"] == pytest.approx(float(torch.cat(kl).mean()), rel=1e-5) and got["kl"] > 1e-3
    assert got["top1_agree"] == pytest.approx(float(torch.cat(agree).float().mean()))
    assert 0 < got["top1_agree"] < 1 and got["predicted"] == 3 * 63
    assert got["ppl"] == perplexity(model, tok, TEXT, seqlen=64, windows=3, progress=False)["ppl"]
    assert got["ref_ppl"] == perplexity(ref, tok, TEXT, seqlen=64, windows=3, progress=False)["ppl"]
    same = divergence(ref, ref, tok, TEXT, seqlen=64, windows=2, progress=False)
    assert abs(same["kl"]) < 1e-7 and same["top1_agree"] == 1.0


def test_a_reference_with_another_vocabulary_is_one_clear_line():
    with pytest.raises(ValueError, match="do not share a vocabulary"):
        divergence(tiny_model("llama"), tiny_model("llama", vocab_size=300), tiny_tokenizer(), TEXT, seqlen=64,
                   windows=1, progress=False)


def test_cli_eval_kl(tmp_path, capsys):
    tiny_model("llama").save_pretrained(tmp_path / "hf")
    tiny_tokenizer().save_pretrained(tmp_path / "hf")
    q = tmp_path / "q"
    assert cli(["quantize", str(tmp_path / "hf"), "--method", "pvq", "--bits", "3.25", "-o", str(q), "--no-progress"]) == 0
    capsys.readouterr()
    assert cli(["eval", str(q), "--kl", str(tmp_path / "hf"), "--windows", "1", "--json", "--no-progress"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert res["kl"] > 0 and 0 <= res["top1_agree"] <= 1 and math.isfinite(res["ppl"]) and math.isfinite(res["ref_ppl"])
    assert cli(["eval", str(q), "--windows", "1", "--json", "--no-progress"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["ppl"] == res["ppl"]
    # a reference of another shape (a larger model of the family, as SmolLM2-360M's quantized model against the
    # default reference, SmolLM2-135M, whose vocabulary it shares) is refused before any window runs
    tiny_model("llama", num_hidden_layers=3).save_pretrained(tmp_path / "deeper")
    tiny_tokenizer().save_pretrained(tmp_path / "deeper")
    capsys.readouterr()
    assert cli(["eval", str(q), "--kl", str(tmp_path / "deeper"), "--windows", "1", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "not the model" in err and "num_hidden_layers 3 against 2" in err and len(err.strip().splitlines()) == 1
