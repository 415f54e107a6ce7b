"""HF SigLIP vision -> cope_jax SiglipVisionModel: config translation and the weight map."""

from __future__ import annotations

import dataclasses
import re

from cope_jax.models.siglip.modeling import SiglipVisionConfig
from cope_jax.weights import ConversionError, Rule, conv_kernel, ignore, linear_kernel, with_prefix

# Relative to HF's `vision_model.`.
TOWER_RULES = [
    Rule(r"embeddings\.patch_embedding\.weight", "embeddings.patch_embedding.kernel", conv_kernel),
    Rule(r"embeddings\.patch_embedding\.bias", "embeddings.patch_embedding.bias"),
    Rule(r"embeddings\.position_embedding\.weight", "embeddings.position_embedding"),
    Rule(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.weight", r"encoder.layers.\1.self_attn.\2_proj.kernel", linear_kernel),
    Rule(r"encoder\.layers\.(\d+)\.self_attn\.(q|k|v|out)_proj\.bias", r"encoder.layers.\1.self_attn.\2_proj.bias"),
    Rule(r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.weight", r"encoder.layers.\1.mlp.\2.kernel", linear_kernel),
    Rule(r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.bias", r"encoder.layers.\1.mlp.\2.bias"),
    Rule(r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.weight", r"encoder.layers.\1.\2.scale"),
    Rule(r"encoder\.layers\.(\d+)\.(layer_norm1|layer_norm2)\.bias", r"encoder.layers.\1.\2.bias"),
    ignore(r"embeddings\.position_ids", "buffer: arange(num_patches)"),
    ignore(r"head\..*", "attention-pooling head; last_hidden_state does not use it"),
]


def rules(config: SiglipVisionConfig, source_prefix: str, target_prefix: str = "", source_layers: int | None = None) -> list[Rule]:
    """Tower rules under `source_prefix` (e.g. 'vision_model.').

    When the model keeps fewer layers than the source has (LLaVA drops the last one), the extra
    source layers and the post-layernorm are ignored explicitly.
    """
    tower = list(TOWER_RULES)
    if config.use_post_layernorm:
        tower += [Rule(r"post_layernorm\.weight", "post_layernorm.scale"), Rule(r"post_layernorm\.bias", "post_layernorm.bias")]
    else:
        tower.append(ignore(r"post_layernorm\..*", "the tower's output is taken before post-layernorm"))
    if source_layers is not None and source_layers > config.num_hidden_layers:
        dropped = "|".join(str(i) for i in range(config.num_hidden_layers, source_layers))
        tower.insert(0, ignore(rf"encoder\.layers\.({dropped})\..*", "layers after the selected feature layer"))
    return with_prefix(tower, source_prefix, target_prefix)


def count_layers(keys: list[str], source_prefix: str) -> int:
    pattern = re.compile(re.escape(source_prefix) + r"encoder\.layers\.(\d+)\.")
    found = {int(m.group(1)) for k in keys if (m := pattern.match(k))}
    return max(found) + 1 if found else 0


def config_from_hf(hf: dict, source: str, **overrides) -> SiglipVisionConfig:
    if hf.get("hidden_act", "gelu_pytorch_tanh") != "gelu_pytorch_tanh":
        raise ConversionError(f"{source}: SigLIP hidden_act {hf['hidden_act']!r} is not supported")
    defaults = SiglipVisionConfig()
    fields = {f.name for f in dataclasses.fields(SiglipVisionConfig)} - {"use_post_layernorm"}
    try:
        return SiglipVisionConfig(**{name: hf.get(name, getattr(defaults, name)) for name in fields}, **overrides)
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
