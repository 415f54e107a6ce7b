"""Autoregressive generation over a Qwen2 KV cache: one jitted prefill, one jitted decode step.

Prompts are batched with left padding (`attention_mask` marks real tokens), so every row's next
token lands in the same cache slot. Greedy when `temperature == 0`, else temperature / top-k /
top-p sampling.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cope_jax.models.qwen2.modeling import KVCache, Qwen2ForCausalLM


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64
    temperature: float = 0.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    eos_token_id: int | tuple[int, ...] | None = None
    pad_token_id: int = 0

    def __post_init__(self):
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")


def choose_next_token(logits: jax.Array, rng: jax.Array, sampling: SamplingConfig) -> jax.Array:
    """logits [B,V] -> token ids [B]."""
    if sampling.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / sampling.temperature
    if sampling.top_k:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][:, -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        sorted_logits = jnp.sort(logits, axis=-1)[:, ::-1]
        cumulative = jnp.cumsum(jax.nn.softmax(sorted_logits, axis=-1), axis=-1)
        # Keep the smallest set whose mass reaches top_p (always at least the best token).
        cutoff_index = jnp.sum(cumulative < sampling.top_p, axis=-1, keepdims=True)
        cutoff = jnp.take_along_axis(sorted_logits, cutoff_index, axis=-1)
        logits = jnp.where(logits < cutoff, -jnp.inf, logits)
    return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


@functools.partial(jax.jit, static_argnums=(0, 5, 7, 8))
def prefill(graphdef, state, inputs_embeds, attention_mask, cache, sampling, rng, empty_cache, unpadded):
    """Appends a prompt (or a later turn) to the cache -> (next token [B], cache); logits only at
    the last position. `empty_cache` / `unpadded`: see Qwen2ForCausalLM.forward_cached."""
    model = nnx.merge(graphdef, state)
    logits, cache = model.forward_cached(inputs_embeds, attention_mask, cache, logits="last", empty_cache=empty_cache,
                                         unpadded=unpadded)
    return choose_next_token(logits[:, -1], rng, sampling), cache


def _append_chunk(graphdef, state, inputs_embeds, attention_mask, cache):
    """Appends one chunk of a long prompt (a GOP's tokens, or a fixed count) to the cache and
    computes no logits: a prompt of any length prefills in working memory of one chunk beside the
    cache (an 8-hour video at 1 keyframe per GOP is ~1.0M tokens)."""
    model = nnx.merge(graphdef, state)
    return model.forward_cached(inputs_embeds, attention_mask, cache, logits="last")[1]


# The cache updated in place (donated: a prefix's own) or copied (a cache others still hold).
append_chunk = jax.jit(_append_chunk, static_argnums=0, donate_argnums=4)
append_chunk_copy = jax.jit(_append_chunk, static_argnums=0)


@functools.partial(jax.jit, static_argnums=(0, 4), donate_argnums=(3,))
def decode_step(graphdef, state, token, cache, sampling, rng):
    """Feeds the tokens [B] chosen last -> (next tokens [B], cache)."""
    model = nnx.merge(graphdef, state)
    embeds = model.embed(token[:, None])
    logits, cache = model.forward_cached(embeds, jnp.ones_like(token[:, None], bool), cache)
    return choose_next_token(logits[:, -1], rng, sampling), cache


def generate_from_embeddings(model: Qwen2ForCausalLM, inputs_embeds: jax.Array, attention_mask: jax.Array,
                             sampling: SamplingConfig, rng: jax.Array | None = None) -> np.ndarray:
    """inputs_embeds [B,T,D] (left-padded) -> generated ids int32[B, max_new_tokens].

    Rows that emitted EOS are filled with `pad_token_id` afterwards; the loop stops early once
    every row is done.
    """
    b, t, _ = inputs_embeds.shape
    rng = jax.random.key(0) if rng is None else rng
    graphdef, state = nnx.split(model)
    cache = KVCache.init(model.config, b, t + sampling.max_new_tokens, model.dtype)
    eos = np.atleast_1d(np.asarray(() if sampling.eos_token_id is None else sampling.eos_token_id, np.int32))
    rng, step_rng = jax.random.split(rng)
    unpadded = bool(np.asarray(attention_mask).all())  # static: lets a GPU prefill take cuDNN
    token, cache = prefill(graphdef, state, inputs_embeds, attention_mask, cache, sampling, step_rng, True, unpadded)
    tokens = [np.asarray(token)]
    done = np.isin(tokens[-1], eos)
    for _ in range(sampling.max_new_tokens - 1):
        if done.all():
            break
        rng, step_rng = jax.random.split(rng)
        token, cache = decode_step(graphdef, state, token, cache, sampling, step_rng)
        tokens.append(np.where(done, sampling.pad_token_id, np.asarray(token)))
        done |= np.isin(tokens[-1], eos)
    out = np.full((b, sampling.max_new_tokens), sampling.pad_token_id, np.int32)
    out[:, : len(tokens)] = np.stack(tokens, axis=1)
    return out


def generate(model: Qwen2ForCausalLM, input_ids, attention_mask=None, sampling: SamplingConfig | None = None,
             rng: jax.Array | None = None) -> np.ndarray:
    """Token prompts int32[B,T] (left-padded; mask 1 = real) -> generated ids [B, max_new_tokens]."""
    input_ids = jnp.asarray(input_ids, jnp.int32)
    attention_mask = jnp.ones_like(input_ids, bool) if attention_mask is None else jnp.asarray(attention_mask, bool)
    return generate_from_embeddings(model, model.embed(input_ids), attention_mask, sampling or SamplingConfig(), rng)
