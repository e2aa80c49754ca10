"""A family whose code comes with its checkpoint (transformers' trust_remote_code): refused without consent, and
with it quantized (streamed or whole), saved with that code, and loaded by pvq and by transformers."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM

import pvq  # noqa: F401  (registers pvq with transformers)
from pvq.checkpoint import PVQFormatError
from pvq.cli import main as cli
from pvq.loader import load
from pvq.models.loading import ModelLoadError, is_remote_code, load_model, tiny_model, tiny_tokenizer

# a family transformers does not know: a Llama under another name, its classes in the checkpoint's own files
CONFIG = '''from transformers import LlamaConfig


class TinyRemoteConfig(LlamaConfig):
    model_type = "pvq_tiny_remote"
'''
# its blocks are a class of its own: a Ray worker can unpickle them only once it has imported this code
MODELING = '''from torch import nn
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from .configuration_tiny_remote import TinyRemoteConfig


class TinyRemoteDecoderLayer(LlamaDecoderLayer):
    pass


class TinyRemoteForCausalLM(LlamaForCausalLM):
    config_class = TinyRemoteConfig
    _no_split_modules = ["TinyRemoteDecoderLayer"]

    def __init__(self, config):
        super().__init__(config)
        self.model.layers = nn.ModuleList(TinyRemoteDecoderLayer(config, i) for i in range(config.num_hidden_layers))
'''
CODE = {"configuration_tiny_remote.py": CONFIG, "modeling_tiny_remote.py": MODELING}
ARGS = ["--method", "pvq-gptq", "--bits", "4.25", "--nsamples", "2", "--seqlen", "32", "--no-progress"]
IDS = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(3))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """A tiny Llama saved as the remote-code family above, and its logits."""
    src = tmp_path_factory.mktemp("remote") / "src"
    model = tiny_model("llama")
    model.save_pretrained(src)
    tiny_tokenizer().save_pretrained(src)
    cfg = json.loads((src / "config.json").read_text())
    cfg.update(model_type="pvq_tiny_remote", architectures=["TinyRemoteForCausalLM"],
               auto_map={"AutoConfig": "configuration_tiny_remote.TinyRemoteConfig",
                         "AutoModelForCausalLM": "modeling_tiny_remote.TinyRemoteForCausalLM"})
    (src / "config.json").write_text(json.dumps(cfg))
    for name, text in CODE.items():
        (src / name).write_text(text)
    with torch.no_grad():
        return src, model(IDS).logits


def test_without_consent_the_checkpoints_code_is_refused_with_the_option_named(source):
    src, _ = source
    with pytest.raises(ModelLoadError, match="--trust-remote-code"):
        load_model(str(src))


@torch.no_grad()
def test_a_trusted_family_is_quantized_streamed_or_whole_and_loads_with_its_code(source, tmp_path, capsys):
    src, want = source
    model, _ = load_model(str(src), trust_remote_code=True)
    assert is_remote_code(model) and torch.equal(model(IDS).logits, want)
    assert cli(["quantize", str(src), *ARGS, "--trust-remote-code", "-o", str(tmp_path / "s")]) == 0
    assert "no family pvq has tested" in capsys.readouterr().err
    assert cli(["quantize", str(src), *ARGS, "--trust-remote-code", "--no-stream", "-o", str(tmp_path / "w")]) == 0
    out = tmp_path / "s"
    files = sorted(f.name for f in out.iterdir())
    assert files == sorted(f.name for f in (tmp_path / "w").iterdir()) and set(CODE) <= set(files)
    assert all((out / f).read_bytes() == (tmp_path / "w" / f).read_bytes() for f in files)
    assert json.loads((out / "config.json").read_text())["auto_map"]["AutoModelForCausalLM"].endswith("ForCausalLM")
    with pytest.raises(PVQFormatError, match="trust_remote_code=True"):
        load(out)
    q, tok = load(out, decode="once", trust_remote_code=True)
    assert type(q).__name__ == "TinyRemoteForCausalLM" and tok is not None
    got = q(IDS).logits
    assert (got - want).abs().max() < 0.5 * want.abs().max()  # quantized: close to the source, not equal
    hf = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert (hf(IDS).logits - got).abs().max() < 1e-4
    assert cli(["generate", str(out), "hello", "--max-new-tokens", "2", "--trust-remote-code"]) == 0


def test_a_trusted_family_runs_on_workers_to_the_same_bytes(source, tmp_path, monkeypatch):
    """Each Ray worker imports the checkpoint's code as it starts: the Hessian method's blocks travel to them
    (instances of the code's own block class), the data-free method's workers read the folder themselves."""
    pytest.importorskip("ray")
    from pvq import distributed

    # no worker opens the folder ahead of its tasks (which imports the code too): the start-up import alone
    monkeypatch.setattr(distributed.Pool, "warm", lambda self, source: None)
    src, _ = source
    for method in (ARGS, ["--method", "pvq", "--bits", "4.25", "--no-progress"]):
        assert cli(["quantize", str(src), *method, "--trust-remote-code", "-o", str(tmp_path / "one")]) == 0
        assert cli(["quantize", str(src), *method, "--trust-remote-code", "--workers", "2",
                    "-o", str(tmp_path / "two")]) == 0
        files = sorted(f.name for f in (tmp_path / "one").iterdir())
        assert files == sorted(f.name for f in (tmp_path / "two").iterdir())
        assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes() for f in files)
        for d in ("one", "two"):
            shutil.rmtree(tmp_path / d)
