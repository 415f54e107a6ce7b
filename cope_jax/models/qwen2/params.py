"""HF Qwen2 -> cope_jax Qwen2ForCausalLM: config translation and the weight map."""

from __future__ import annotations

import re

from cope_jax.models.qwen2.modeling import Qwen2Config
from cope_jax.weights import ConversionError, Rule, ignore, linear_kernel, with_prefix

# Relative to the decoder (`model.` in HF Qwen2ForCausalLM); composites add their prefixes.
DECODER_RULES = [
    Rule(r"embed_tokens\.weight", "embed_tokens.embedding"),
    Rule(r"layers\.(\d+)\.self_attn\.([qkvo])_proj\.weight", r"layers.\1.self_attn.\2_proj.kernel", linear_kernel),
    Rule(r"layers\.(\d+)\.self_attn\.([qkv])_proj\.bias", r"layers.\1.self_attn.\2_proj.bias"),
    Rule(r"layers\.(\d+)\.mlp\.(gate|up|down)_proj\.weight", r"layers.\1.mlp.\2_proj.kernel", linear_kernel),
    Rule(r"layers\.(\d+)\.(input_layernorm|post_attention_layernorm)\.weight", r"layers.\1.\2.weight"),
    Rule(r"norm\.weight", "norm.weight"),
    ignore(r"layers\.(\d+)\.self_attn\.rotary_emb\.inv_freq", "recomputed from rope_theta"),
    ignore(r"rotary_emb\.inv_freq", "recomputed from rope_theta"),
]


def lm_head_rule(source_key: str, target_prefix: str, config: Qwen2Config) -> Rule:
    if config.tie_word_embeddings:
        return ignore(re.escape(source_key), "tie_word_embeddings: logits use embed_tokens")
    return Rule(re.escape(source_key), target_prefix + "lm_head.kernel", linear_kernel)


def rules(config: Qwen2Config, source_prefix: str = "", target_prefix: str = "") -> list[Rule]:
    """HF Qwen2ForCausalLM keys (under `source_prefix`) -> our tree (under `target_prefix`)."""
    return (with_prefix(DECODER_RULES, source_prefix + "model.", target_prefix + "model.")
            + [lm_head_rule(source_prefix + "lm_head.weight", target_prefix, config)])


def config_from_hf(hf: dict, source: str) -> Qwen2Config:
    """HF Qwen2Config dict -> Qwen2Config; refuses features we do not implement."""
    if hf.get("use_sliding_window"):
        raise ConversionError(f"{source}: use_sliding_window=true is not supported")
    if hf.get("hidden_act", "silu") != "silu":
        raise ConversionError(f"{source}: hidden_act {hf['hidden_act']!r} is not supported (Qwen2 uses silu)")
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type != "default":
        raise ConversionError(f"{source}: rope type {rope_type!r} is not supported (only default RoPE)")
    heads = hf["num_attention_heads"]
    if hf.get("head_dim") not in (None, hf["hidden_size"] // heads):
        raise ConversionError(f"{source}: head_dim {hf['head_dim']} != hidden_size / num_attention_heads")
    try:
        return Qwen2Config(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_hidden_layers=hf["num_hidden_layers"], num_attention_heads=heads,
            num_key_value_heads=hf.get("num_key_value_heads") or heads,
            rope_theta=float(rope.get("rope_theta", hf.get("rope_theta", 10000.0))),
            rms_norm_eps=hf.get("rms_norm_eps", 1e-6), tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            max_position_embeddings=hf.get("max_position_embeddings", 32768))
    except KeyError as e:
        raise ConversionError(f"{source}: Qwen2 config lacks {e.args[0]!r}") from None
    except ValueError as e:
        raise ConversionError(f"{source}: {e}") from None
