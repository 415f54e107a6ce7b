"""LLaVA-Video checkpoints -> CoPEVideoLM: the LLaVA-NeXT `llava_qwen` layout and HF LlavaOnevision.

Both describe the same network (SigLIP tower + mlp2x_gelu projector + image_newline + Qwen2);
only key prefixes and the way the kept vision depth is stated differ.
"""

from __future__ import annotations

import dataclasses
import re

from cope_jax.models.cope.modeling import CoPEConfig, POOL_MODES, delta_for_tower
from cope_jax.models.qwen2 import params as qwen2_params
from cope_jax.models.siglip import params as siglip_params
from cope_jax.models.siglip.modeling import SiglipVisionConfig
from cope_jax.weights import ConversionError, Rule, linear_kernel, with_prefix

# Key prefixes of each layout: (language model, lm_head owner, vision tower, projector, newline).
LAYOUTS = {
    "llava_next": dict(text="", vision="model.vision_tower.vision_tower.vision_model.",
                       projector=("model.mm_projector.0.", "model.mm_projector.2."), newline="model.image_newline"),
    # transformers 4.52-4.57 kept `vision_model.` under the tower; 5.x state dicts drop it.
    "hf_onevision": dict(text="", vision=("model.vision_tower.vision_model.", "model.vision_tower."),
                         projector=("model.multi_modal_projector.linear_1.", "model.multi_modal_projector.linear_2."),
                         newline="model.image_newline"),
    # Hub files (transformers < 4.52) nest `vision_model.`; transformers 5 writes these names without it.
    "hf_onevision_legacy": dict(text="language_model.", vision=("vision_tower.vision_model.", "vision_tower."),
                                projector=("multi_modal_projector.linear_1.", "multi_modal_projector.linear_2."),
                                newline="image_newline"),
}


def _text_rules(layout: str, config: CoPEConfig) -> list[Rule]:
    if layout == "hf_onevision":  # transformers >= 4.52: model.language_model.* + top-level lm_head
        return (with_prefix(qwen2_params.DECODER_RULES, "model.language_model.", "language_model.model.")
                + [qwen2_params.lm_head_rule("lm_head.weight", "language_model.", config.text)])
    return qwen2_params.rules(config.text, LAYOUTS[layout]["text"], "language_model.")


def rules(layout: str, config: CoPEConfig, source_vision_prefix: str, source_vision_layers: int) -> list[Rule]:
    names = LAYOUTS[layout]
    projector = []
    for source, target in zip(names["projector"], ("mm_projector.linear_1.", "mm_projector.linear_2.")):
        projector += [Rule(re.escape(source + "weight"), target + "kernel", linear_kernel),
                      Rule(re.escape(source + "bias"), target + "bias")]
    return (_text_rules(layout, config)
            + siglip_params.rules(config.vision, source_vision_prefix, "vision_tower.", source_vision_layers)
            + projector + [Rule(re.escape(names["newline"]), "image_newline")])


def detect_layout(hf: dict, keys: list[str]) -> str:
    if hf.get("model_type") == "llava_qwen" or any(k.startswith("model.mm_projector.") for k in keys):
        return "llava_next"
    if any(k.startswith("language_model.model.") for k in keys):
        return "hf_onevision_legacy"
    return "hf_onevision"


def vision_prefix(layout: str, keys: list[str]) -> str:
    candidates = LAYOUTS[layout]["vision"]
    candidates = (candidates,) if isinstance(candidates, str) else candidates
    for prefix in candidates:
        if any(k.startswith(prefix + "encoder.layers.") for k in keys):
            return prefix
    return candidates[0]


def _pool_mode(mode: str, source: str) -> str:
    if mode not in POOL_MODES:
        raise ConversionError(f"{source}: mm_spatial_pool_mode {mode!r} is not supported (choose {POOL_MODES})")
    return mode


def config_from_llava_next(hf: dict, source: str, source_vision_layers: int) -> CoPEConfig:
    """LLaVA-NeXT `llava_qwen` config.json: Qwen2 fields + mm_* fields (+ optional vision_config)."""
    if hf.get("mm_projector_type", "mlp2x_gelu") != "mlp2x_gelu":
        raise ConversionError(f"{source}: mm_projector_type {hf['mm_projector_type']!r} is not supported (mlp2x_gelu only)")
    if hf.get("mm_newline_position", "grid") != "grid":
        raise ConversionError(f"{source}: mm_newline_position {hf['mm_newline_position']!r} is not supported (LLaVA-Video uses 'grid')")
    if "vision_config" in hf:
        described = siglip_params.config_from_hf(hf["vision_config"], source, use_post_layernorm=False)
    elif "siglip" in str(hf.get("mm_vision_tower", "")).lower():
        described = SiglipVisionConfig.so400m_patch14_384()
    else:
        raise ConversionError(f"{source}: vision tower {hf.get('mm_vision_tower')!r} is not supported (SigLIP only)")
    # LLaVA-NeXT's SigLipVisionTower builds the full tower from its hub name and deletes the last
    # layer, so the checkpoint holds one layer fewer than a config describing the full tower; a
    # config that already describes the kept tower is fine too: the checkpoint's layers decide.
    described_layers = described.num_hidden_layers
    if source_vision_layers not in (described_layers - 1, described_layers):
        raise ConversionError(f"{source}: vision config has {described_layers} layers (LLaVA keeps "
                              f"{described_layers - 1}) but the checkpoint holds {source_vision_layers}")
    vision = dataclasses.replace(described, num_hidden_layers=source_vision_layers, use_post_layernorm=False)
    return CoPEConfig(vision=vision, text=qwen2_params.config_from_hf(hf, source),
                      pool_mode=_pool_mode(hf.get("mm_spatial_pool_mode", "bilinear"), source),
                      pool_stride=int(hf.get("mm_spatial_pool_stride", 2)), delta=delta_for_tower(vision))


def config_from_onevision(hf: dict, source: str, source_vision_layers: int) -> CoPEConfig:
    """HF LlavaOnevision config: the kept depth comes from vision_feature_layer (hidden_states index)."""
    if hf.get("vision_feature_select_strategy", "full") != "full":
        raise ConversionError(f"{source}: vision_feature_select_strategy {hf['vision_feature_select_strategy']!r} "
                              "is not supported (LLaVA-Video uses 'full')")
    if hf.get("projector_hidden_act", "gelu") != "gelu" or not hf.get("multimodal_projector_bias", True):
        raise ConversionError(f"{source}: only the mlp2x_gelu projector (exact gelu, with biases) is supported")
    layer = hf.get("vision_feature_layer", -1)
    if not isinstance(layer, int):
        raise ConversionError(f"{source}: vision_feature_layer {layer!r} must be a single layer index")
    described = siglip_params.config_from_hf(hf.get("vision_config", {}), source)
    total = described.num_hidden_layers
    keep = total + 1 + layer if layer < 0 else layer  # hidden_states[0] is the embeddings
    if not 1 <= keep <= total or source_vision_layers != total:
        raise ConversionError(f"{source}: vision_feature_layer {layer} with {total} configured layers "
                              f"({source_vision_layers} in the checkpoint) selects no valid layer")
    text = dict(hf.get("text_config", {}))
    text.setdefault("tie_word_embeddings", hf.get("tie_word_embeddings", False))
    vision = dataclasses.replace(described, num_hidden_layers=keep, use_post_layernorm=False)
    return CoPEConfig(vision=vision, text=qwen2_params.config_from_hf(text, source), pool_mode="bilinear",
                      pool_stride=2, delta=delta_for_tower(vision))
