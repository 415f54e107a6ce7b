"""Qwen2 decoder (HF `Qwen2ForCausalLM` semantics) in Flax NNX, with a KV cache.

Axis alphabet: B batch, T query length, S key length, N query heads, K kv heads, H head dim,
D model dim, F mlp dim, V vocab. Attribute names mirror HF so the weight map is near-identity.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from cope_jax.models.common import RMSNorm, linear, resolve_dtype, run_layers
from cope_jax.models.attention import DEFAULT_BLOCK, causal_attention
from cope_jax.sharding import initializer


SCOPE = "language_model"


@dataclasses.dataclass(frozen=True)
class Qwen2Config:
    vocab_size: int = 152064
    hidden_size: int = 3584
    intermediate_size: int = 18944
    num_hidden_layers: int = 28
    num_attention_heads: int = 28
    num_key_value_heads: int = 4
    rope_theta: float = 1_000_000.0
    rms_norm_eps: float = 1e-6
    tie_word_embeddings: bool = False
    max_position_embeddings: int = 32768

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @classmethod
    def qwen2_7b(cls) -> "Qwen2Config":
        """The LLM of LLaVA-Video-7B-Qwen2."""
        return cls()

    @classmethod
    def tiny(cls) -> "Qwen2Config":
        return cls(vocab_size=503, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                   num_attention_heads=4, num_key_value_heads=2, rope_theta=10_000.0, max_position_embeddings=2048)

    def __post_init__(self):
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_attention_heads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"num_attention_heads {self.num_attention_heads} is not a multiple of num_key_value_heads {self.num_key_value_heads}")


@struct.dataclass
class KVCache:
    """Keys/values of every layer in slot order; `key_valid` marks real (non-pad) slots.

    Slots are filled left to right (`end` is the next free slot, the same for all rows because
    prompts are left-padded); `next_position` is each row's next RoPE position.
    """

    keys: list[jax.Array]  # L x [B,S,K,H]
    values: list[jax.Array]  # L x [B,S,K,H]
    key_valid: jax.Array  # [B,S] bool
    next_position: jax.Array  # [B] int32
    end: jax.Array  # [] int32

    @classmethod
    def init(cls, config: Qwen2Config, batch: int, length: int, dtype=jnp.float32) -> "KVCache":
        shape = (batch, length, config.num_key_value_heads, config.head_dim)
        zeros = lambda: [jnp.zeros(shape, dtype) for _ in range(config.num_hidden_layers)]  # noqa: E731 (own buffers: a cache may be donated)
        return cls(keys=zeros(), values=zeros(), key_valid=jnp.zeros((batch, length), bool),
                   next_position=jnp.zeros((batch,), jnp.int32), end=jnp.zeros((), jnp.int32))

    @property
    def length(self) -> int:
        return self.key_valid.shape[1]


def rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
    """HF split-half rotary embedding, angles in fp32. x [B,T,N,H], positions [B,T]."""
    head_dim = x.shape[-1]
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B,T,H/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]
    x32 = x.astype(jnp.float32)
    first, second = jnp.split(x32, 2, axis=-1)
    rotated = jnp.concatenate([-second, first], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


class Qwen2Attention(nnx.Module):
    attention_kind = "causal"  # `attention.set_attention` finds the layers by this

    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, n, k, h = config.hidden_size, config.num_attention_heads, config.num_key_value_heads, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = linear(d, n * h, ("embed", "heads"), **kw)
        self.k_proj = linear(d, k * h, ("embed", "kv_heads"), **kw)
        self.v_proj = linear(d, k * h, ("embed", "kv_heads"), **kw)
        self.o_proj = linear(n * h, d, ("heads", "embed"), use_bias=False, **kw)
        self.config = config
        # How attention runs (`set_attention`); not in Qwen2Config, so checkpoints never store it.
        self.implementation, self.platform = "auto", None
        self.block_q = self.block_k = DEFAULT_BLOCK

    def __call__(self, x, positions, *, query_slots=None, key_valid=None, cached_kv=None, write_at=None):
        """x [B,T,D], positions [B,T]; cached_kv (k, v) each [B,S,K,H], the new keys written at slot write_at.

        query_slots None: the queries are the keys (a cache-free forward or a prefill into an empty
        cache), so attention reads only the T new keys and key_valid is [B,T] or None (unpadded).
        Else query_slots [T] or [B,T] are the queries' slots in the updated cache and key_valid is [B,S].
        """
        cfg = self.config
        b, t, _ = x.shape
        q = rope(self.q_proj(x).reshape(b, t, cfg.num_attention_heads, cfg.head_dim), positions, cfg.rope_theta)
        k = rope(self.k_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim), positions, cfg.rope_theta)
        v = self.v_proj(x).reshape(b, t, cfg.num_key_value_heads, cfg.head_dim)
        new_kv = (k, v)
        if cached_kv is not None:
            new_kv = tuple(jax.lax.dynamic_update_slice_in_dim(cached, new.astype(cached.dtype), write_at, axis=1)
                           for cached, new in zip(cached_kv, (k, v)))
        if query_slots is not None:
            k, v = new_kv
        out = causal_attention(q, k.astype(q.dtype), v.astype(q.dtype), query_slots=query_slots, key_valid=key_valid,
                               implementation=self.implementation, block_q=self.block_q, block_k=self.block_k,
                               platform=self.platform)
        return self.o_proj(out.reshape(b, t, -1)), new_kv  # out [B,T,N,H]


class Qwen2MLP(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        d, f = config.hidden_size, config.intermediate_size
        kw = dict(use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.gate_proj = linear(d, f, ("embed", "mlp"), **kw)
        self.up_proj = linear(d, f, ("embed", "mlp"), **kw)
        self.down_proj = linear(f, d, ("mlp", "embed"), **kw)

    def __call__(self, x):
        return self.down_proj(jax.nn.silu(self.gate_proj(x)) * self.up_proj(x))


class Qwen2DecoderLayer(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.self_attn = Qwen2Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)
        self.mlp = Qwen2MLP(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x, positions, **attention):
        attn_out, kv = self.self_attn(self.input_layernorm(x), positions, **attention)
        x = x + attn_out
        return x + self.mlp(self.post_attention_layernorm(x)), kv


class Qwen2Model(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.embed_tokens = nnx.Embed(
            config.vocab_size, config.hidden_size, dtype=dtype, param_dtype=param_dtype,
            embedding_init=initializer(nnx.initializers.normal(0.02), ("vocab", "embed")), rngs=rngs)
        self.layers = nnx.List([Qwen2DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
                                for _ in range(config.num_hidden_layers)])
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, param_dtype=param_dtype)


def _positions_from_mask(attention_mask: jax.Array, start: jax.Array) -> jax.Array:
    """RoPE positions for left-padded rows: count of real tokens before each token (HF generate)."""
    return start[:, None] + jnp.maximum(jnp.cumsum(attention_mask, axis=1) - 1, 0)


class Qwen2ForCausalLM(nnx.Module):
    def __init__(self, config: Qwen2Config, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        dtype, param_dtype = resolve_dtype(dtype), resolve_dtype(param_dtype)
        self.config = config
        self.dtype = dtype
        self.scan_layers = False  # `common.set_scan_layers`; not in the config, so checkpoints never store it
        self.model = Qwen2Model(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        # Tied: logits use embed_tokens' matrix and no lm_head exists (HF tie_word_embeddings).
        self.lm_head = None if config.tie_word_embeddings else linear(
            config.hidden_size, config.vocab_size, ("embed", "vocab"), use_bias=False,
            dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.model.embed_tokens(input_ids)

    def logits(self, hidden: jax.Array) -> jax.Array:
        if self.lm_head is None:
            return self.model.embed_tokens.attend(hidden).astype(jnp.float32)
        return self.lm_head(hidden).astype(jnp.float32)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """input_ids int32[B,T] (left padding marked by attention_mask) -> float32 logits [B,T,V]."""
        return self.forward(inputs_embeds=self.embed(input_ids), attention_mask=attention_mask)

    def forward(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Cache-free causal forward over embeddings [B,T,D] -> logits [B,T,V]."""
        return self.logits(self.hidden_states(inputs_embeds, attention_mask))

    def chunked_cross_entropy(self, hidden: jax.Array, labels: jax.Array, mask: jax.Array, chunk: int) -> jax.Array:
        """Sum of next-token cross-entropy over `mask` from final hidden states, computed `chunk`
        positions at a time and recomputed in the backward pass, so [B,T,V] logits never exist (at
        7B, 16k x 152k floats is 10 GB per sequence)."""
        b, t, d = hidden.shape

        @jax.checkpoint
        def chunk_loss(h, y, m):
            logits = self.logits(h)  # float32 [B,c,V]
            log_z = jax.nn.logsumexp(logits, axis=-1)
            picked = jnp.take_along_axis(logits, y[..., None], axis=-1)[..., 0]
            return jnp.sum((log_z - picked) * m)

        if t <= chunk:
            return chunk_loss(hidden, labels, mask)
        n = -(-t // chunk)
        pad = n * chunk - t
        hidden = jnp.pad(hidden, ((0, 0), (0, pad), (0, 0)))
        labels, mask = jnp.pad(labels, ((0, 0), (0, pad))), jnp.pad(mask, ((0, 0), (0, pad)))
        chunks = (hidden.reshape(b, n, chunk, d).swapaxes(0, 1), labels.reshape(b, n, chunk).swapaxes(0, 1),
                  mask.reshape(b, n, chunk).swapaxes(0, 1))
        total, _ = jax.lax.scan(lambda acc, x: (acc + chunk_loss(*x), None), jnp.zeros((), jnp.float32), chunks)
        return total

    def hidden_states(self, inputs_embeds: jax.Array, attention_mask: jax.Array | None = None, *,
                      remat: str = "none") -> jax.Array:
        """Cache-free causal forward -> final-norm hidden states [B,T,D] (training takes its loss
        from these in chunks, never materialising [B,T,V] logits).

        No mask means no left padding, which keeps the attention plain causal (cuDNN-eligible);
        right padding needs no mask either, since causality already hides it from real tokens.
        `remat` ("none", "layer", "dots"; common.REMAT_POLICIES) recomputes each layer's activations in
        the backward pass instead of keeping them: all of them, or all but the matmul outputs."""
        b, t, _ = inputs_embeds.shape
        key_valid = None if attention_mask is None else attention_mask.astype(bool)
        positions = _positions_from_mask(jnp.ones((b, t), bool) if key_valid is None else key_valid,
                                         jnp.zeros((b,), jnp.int32))

        x = inputs_embeds.astype(self.dtype)
        with jax.named_scope(SCOPE):  # names its ops in compiled programs (the compile report's kernels)
            x = run_layers(self.model.layers, x, lambda layer, h: layer(h, positions, key_valid=key_valid)[0], remat=remat,
                           scan=self.scan_layers, dtype=self.dtype)
        return self.model.norm(x)

    def forward_cached(self, inputs_embeds: jax.Array, attention_mask: jax.Array, cache: KVCache, *,
                       logits: str = "all", empty_cache: bool = False, unpadded: bool = False):
        """Appends T tokens ([B,T,D], mask [B,T]) to the cache -> (logits, new cache).

        Used for the prompt (prefill, T = prompt length) and for decoding (T = 1). Static options:
        logits "all" gives [B,T,V]; "last" gives [B,1,V], all that generation needs (a 13k-token
        prompt's logits at every position would be 8 GB). `empty_cache` promises cache.end == 0:
        attention then reads only the T new keys, not the cache's S slots. `unpadded` (with
        `empty_cache`) promises attention_mask is all True, so a GPU may take cuDNN's causal kernel.
        """
        if logits not in ("all", "last"):
            raise ValueError(f'logits must be "all" or "last", got {logits!r}')
        if unpadded and not empty_cache:
            raise ValueError("unpadded only applies to a prefill into an empty cache (empty_cache=True)")
        t = inputs_embeds.shape[1]
        attention_mask = attention_mask.astype(bool)
        positions = _positions_from_mask(attention_mask, cache.next_position)
        key_valid = jax.lax.dynamic_update_slice_in_dim(cache.key_valid, attention_mask, cache.end, axis=1)
        if empty_cache:
            attention = dict(query_slots=None, key_valid=None if unpadded else attention_mask)
        else:
            attention = dict(query_slots=cache.end + jnp.arange(t, dtype=jnp.int32), key_valid=key_valid)
        x = inputs_embeds.astype(self.dtype)
        keys, values = [], []
        with jax.named_scope(SCOPE):
            for layer, k_cache, v_cache in zip(self.model.layers, cache.keys, cache.values):
                x, (k, v) = layer(x, positions, cached_kv=(k_cache, v_cache), write_at=cache.end, **attention)
                keys.append(k)
                values.append(v)
        new_cache = KVCache(keys=keys, values=values, key_valid=key_valid,
                            next_position=cache.next_position + attention_mask.sum(axis=1, dtype=jnp.int32),
                            end=cache.end + t)
        if logits == "last":
            x = x[:, -1:]  # left padding puts every row's last token here
        return self.logits(self.model.norm(x)), new_cache
