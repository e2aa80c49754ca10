"""Which transformers class builds a model from its config: the causal LM, or, for a family that has none
(Qwen2.5-VL, Qwen3-VL, Mistral 3, LLaVA, ...: a language model fed by a vision tower), the image-text-to-text
model, whose forward on text alone is its language model's and whose blocks are found the same way
(adapters: the list under `get_decoder()`)."""
from __future__ import annotations


# families whose causal LM is the language model alone, where the model is of no use without its vision tower:
# Llama 3.2 Vision's language model has cross-attention layers that read only the image (on text they are
# skipped), so its causal LM is Llama 3.1's text model; built with the tower, as the checkpoint holds it
WITH_TOWER = frozenset({"mllama"})


def auto_class(config):
    """The transformers Auto class for `config`: AutoModelForCausalLM where it knows the family, else
    AutoModelForImageTextToText where that does, else AutoModelForCausalLM (whose error names the family);
    AutoModelForImageTextToText for WITH_TOWER's."""
    from transformers import AutoModelForCausalLM, AutoModelForImageTextToText
    from transformers.models.auto.modeling_auto import (MODEL_FOR_CAUSAL_LM_MAPPING_NAMES,
                                                        MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES)

    mt = getattr(config, "model_type", None)
    with_tower = mt not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or mt in WITH_TOWER
    if with_tower and mt in MODEL_FOR_IMAGE_TEXT_TO_TEXT_MAPPING_NAMES:
        return AutoModelForImageTextToText
    return AutoModelForCausalLM
