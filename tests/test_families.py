"""Every tested family (models.loading.SUPPORTED_MODEL_TYPES) found, quantized, saved, loaded and run.

Tiny random models built from each family's transformers config: blocks and linears are discovered
(models/adapters.py), so this is what proves a family works, not a table entry."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

import pvq  # noqa: F401  (registers pvq with transformers)
from pvq import api
from pvq.checkpoint import save
from pvq.loader import load
from pvq.models.adapters import block_linear_names, blocks_path, check_supported, set_module
from pvq.models.loading import SUPPORTED_MODEL_TYPES, tiny_model, tiny_tokenizer
from pvq.modules.linear import Rotations
from pvq.settings import QuantConfig
from pvq.transforms.rotate import layer_seeds, rotate_weight

EXTRA = {"gemma2": {"sliding_window": 8}, "mistral": {"sliding_window": 8}}  # windows shorter than IDS


def family_model(mt: str):
    return tiny_model(mt, **EXTRA.get(mt, {}))


IDS = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))


class _Rotated(nn.Module):
    """A linear run as pvq runs it, in its rotated basis, but unquantized: y = ((x R_in) W'^T) R_out^T + b."""

    def __init__(self, lin: nn.Linear, seeds):
        super().__init__()
        self.rot = Rotations(lin.out_features, lin.in_features, seeds)  # what QuantLinear runs
        self.w = rotate_weight(lin.weight.detach().float(), seeds)
        self.bias = lin.bias

    def forward(self, x):
        y = self.rot.out_of(F.linear(self.rot.into(x), self.w))
        return y if self.bias is None else y + self.bias


@pytest.mark.parametrize("mt", SUPPORTED_MODEL_TYPES)
@torch.no_grad()
def test_rotated_unquantized_gives_the_original_logits(mt):
    model = family_model(mt)
    ref = model(IDS).logits
    for name, lin in block_linear_names(model):
        set_module(model, name, _Rotated(lin, layer_seeds(0, name, True)))
    assert (model(IDS).logits - ref).abs().max() < 1e-3


@pytest.mark.parametrize("method", ["rtn", "pvq", "pvq-gptq"])
@pytest.mark.parametrize("mt", SUPPORTED_MODEL_TYPES)
@torch.no_grad()
def test_family_quantize_save_load_generate(mt, method, tmp_path):
    from transformers import AutoModelForCausalLM

    model = family_model(mt)
    linears = len(block_linear_names(model))
    assert linears >= 2 * 4  # attention in and out, MLP in and out, per block
    cfg = QuantConfig(method=method, bits=4.25, nsamples=4, seqlen=32)
    summary = api.quantize(model, cfg, IDS if cfg.uses_data else None, progress=False)
    assert summary["layers"] == linears
    want = model(IDS).logits
    save(model, tiny_tokenizer(), tmp_path)
    loaded, _ = load(tmp_path, decode="once")
    assert torch.equal(loaded(IDS).logits, want)
    hf = AutoModelForCausalLM.from_pretrained(tmp_path)
    assert (hf(IDS).logits - want).abs().max() < 1e-4
    out = hf.generate(IDS[:1, :8], max_new_tokens=4, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 12)


@pytest.mark.parametrize("mt,why", [("gpt2", "Conv1D"), ("qwen2_moe", "fused experts")])
def test_unhandled_family_is_one_clear_line(mt, why):
    small = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=256)
    config = AutoConfig.for_model(mt, **small, **(
        {"num_experts": 4, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32} if mt == "qwen2_moe" else {}))
    model = AutoModelForCausalLM.from_config(config)
    with pytest.raises(ValueError, match=f"unsupported architecture '{mt}'.*{why}"):
        check_supported(model)


def test_blocks_are_found_where_each_family_keeps_them():
    assert blocks_path(family_model("gpt_neox")) == "gpt_neox.layers"
    assert blocks_path(family_model("llama")) == "model.layers"


@torch.no_grad()
def test_each_block_is_calibrated_with_its_own_mask():
    """gemma2 alternates sliding-window and full attention: the captured call arguments of block 1 are
    the full causal mask, not block 0's sliding one, and running the blocks with them gives the model."""
    from pvq.models.adapters import blocks, capture_block_inputs, run_block

    model = family_model("gemma2")
    hidden, kwargs = capture_block_inputs(model, IDS)
    assert len(kwargs) == 2
    m0, m1 = kwargs[0]["attention_mask"], kwargs[1]["attention_mask"]
    assert m0 is not None and m1 is not None and not torch.equal(m0, m1)  # 32 tokens > window 8
    for block, kw in zip(blocks(model), kwargs):
        hidden = run_block(block, hidden, kw)
    want = model(IDS, output_hidden_states=True).hidden_states[-1]
    assert (model.model.norm(hidden) - want).abs().max() < 1e-4
