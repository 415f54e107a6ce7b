"""Attention for every model: the LLM's causal attention over a KV cache, and the encoders'
(SigLIP, the Δ-encoder's query transformers) bidirectional attention, each on its platform's kernel.

Axis alphabet: B batch, T queries, S keys, N query heads, K kv heads, G = N / K query heads per kv
head, H head dim. Query t of row b sits at cache slot `query_slots[b, t]` and sees key s iff
`key_valid[b, s]` and `s <= query_slots[b, t]`; a query that sees no key (left padding) returns
zeros. The implementations, chosen statically from shapes, dtype and platform:

- "xla": `jax.nn.dot_product_attention` with a [B,1,T,S] mask; the cheapest for decode steps and
  short prompts.
- "chunked": flash-attention style in pure JAX (Dao et al. 2022, Rabe & Staats 2021): query blocks
  x key blocks with an online softmax in fp32, key blocks in the causal future skipped at run
  time, and a custom VJP that recomputes the blocks, so forward and backward peak memory are
  O(block_q * block_k) per head plus O(T) residuals. Any backend.
- "cudnn": cuDNN's fused causal kernel on GPUs; only for plain causal self-attention (the queries
  are the keys, no padding), which the caller states by passing neither `query_slots` nor
  `key_valid`.
- "splash": Pallas splash attention on TPUs, likewise only for plain causal self-attention.

"auto" takes each platform's kernel where it applies (GPU: cuDNN for bf16/fp16; TPU: splash),
else "xla" for small and "chunked" for long inputs. The platform is the default backend's unless
`set_attention(..., platform=)` names another (compiling for a TPU or GPU from a CPU host).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

IMPLEMENTATIONS = ("auto", "xla", "chunked", "cudnn", "splash")
PLATFORMS = ("cpu", "gpu", "tpu")
DEFAULT_BLOCK = 512
# T*S per batch-head at or below which "auto" takes the direct path: a 1k x 1k fp32 score matrix
# is 4 MiB per head, less than the loop overhead of the chunked path is worth.
SMALL_ATTENTION = 2**20
# Finite, so exp(MASK_VALUE - MASK_VALUE) in a row that has seen no key yet is 1, never NaN.
MASK_VALUE = -0.7 * float(np.finfo(np.float32).max)


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, query_slots: jax.Array | None = None,
                     key_valid: jax.Array | None = None, implementation: str = "auto",
                     block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK,
                     platform: str | None = None) -> jax.Array:
    """q [B,T,N,H], k and v [B,S,K,H] -> [B,T,N,H] (GQA natively: N = K * G, k/v never repeated).

    query_slots int32 [T] or [B,T]: each query's slot among the keys; None means query t is key t
    (S == T). key_valid bool [B,S]: real keys; None means all. Block sizes are for "chunked".
    platform: whose kernel "auto" takes (None: the default backend's).
    """
    b, t = q.shape[:2]
    s = k.shape[1]
    if query_slots is None and s != t:
        raise ValueError(f"without query_slots the queries are the keys, but T={t} and S={s}")
    plain_causal = query_slots is None and key_valid is None
    implementation = choose_implementation(implementation, t, s, plain_causal=plain_causal, dtype=q.dtype,
                                           platform=platform)
    if implementation == "cudnn":
        return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="cudnn")
    if implementation == "splash":
        return splash_attention(q, k, v, causal=True)
    if implementation == "xla" and plain_causal:
        return jax.nn.dot_product_attention(q, k, v, is_causal=True)
    query_slots = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32) if query_slots is None else query_slots, (b, t))
    key_valid = jnp.ones((b, s), bool) if key_valid is None else key_valid
    if implementation == "xla":
        return _xla_attention(q, k, v, query_slots, key_valid)
    return _chunked_attention(q, k, v, query_slots, key_valid, block_q, block_k)


def choose_implementation(implementation: str, t: int, s: int, *, plain_causal: bool, dtype,
                          platform: str | None = None) -> str:
    """Resolves "auto" from static facts: the platform's kernel (cuDNN for half-precision on a
    GPU, splash on a TPU) for plain causal attention, else the direct path while T*S is small and
    the chunked path beyond."""
    check_implementation(implementation)
    if implementation in ("cudnn", "splash") and not plain_causal:
        raise ValueError(f"{implementation} attention needs plain causal self-attention: no query_slots, no key_valid")
    if implementation != "auto":
        return implementation
    kernel = platform_kernel(platform, dtype)
    if plain_causal and kernel:
        return kernel
    return "xla" if t * s <= SMALL_ATTENTION else "chunked"


def platform_kernel(platform: str | None, dtype) -> str | None:
    """The fused attention kernel "auto" takes on `platform` (None: the default backend), if any.
    cuDNN's flash kernel takes only fp16/bf16."""
    platform = platform or jax.default_backend()
    if platform == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "splash" if platform == "tpu" else None


def check_implementation(implementation: str) -> None:
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"attention implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")


def set_attention(model: nnx.Module, implementation: str, *, platform: str | None = None,
                  block_q: int = DEFAULT_BLOCK, block_k: int = DEFAULT_BLOCK) -> None:
    """Chooses how every attention layer inside `model` runs: the LLM's causal layers
    (`causal_attention`) and the encoders' (`encoder_attention`). `platform` ("cpu", "gpu", "tpu";
    None: the default backend) is whose kernel "auto" takes. Static: the next jit call recompiles.
    Block sizes are the chunked path's."""
    check_implementation(implementation)
    if platform is not None and platform not in PLATFORMS:
        raise ValueError(f"attention platform must be one of {PLATFORMS}, got {platform!r}")
    layers = [module for _, module in nnx.iter_modules(model) if getattr(module, "attention_kind", None)]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layers")
    for layer in layers:
        layer.implementation, layer.platform, layer.block_q, layer.block_k = implementation, platform, block_q, block_k


def encoder_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, implementation: str = "auto",
                      platform: str | None = None) -> jax.Array:
    """Bidirectional attention of the encoders (SigLIP, the Δ-encoder's query transformers):
    q, k, v [B,P,N,H] -> [B,P,N,H]. "auto" takes the platform's kernel; "chunked" means the direct
    path here (a few hundred patches need no blocking)."""
    check_implementation(implementation)
    if implementation == "auto":
        implementation = platform_kernel(platform, q.dtype) or "xla"
        if implementation == "cudnn" and q.shape[-1] % 8:  # cuDNN needs head dims in multiples of 8
            implementation = "xla"
    if implementation == "cudnn":
        return _cudnn_encoder_attention(q, k, v)
    if implementation == "splash":
        return splash_attention(q, k, v, causal=False)
    return jax.nn.dot_product_attention(q, k, v)


def _cudnn_encoder_attention(q, k, v):
    """cuDNN's flash kernel trains only on even sequence lengths (SigLIP has 729 patches): the
    sequence is padded to a multiple of 8 and the padding masked off as keys by their count."""
    b, p = q.shape[:2]
    pad = [(0, 0), (0, -p % 8), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad) for x in (q, k, v))
    lengths = jnp.full((b,), p, jnp.int32)
    out = jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths, implementation="cudnn")
    return out[:, :p]


# ---------------------------------------------------------------------------- splash (TPU)

SPLASH_ALIGN = 128  # splash tiles sequences in blocks of 128 or more


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, causal: bool, interpret: bool = False) -> jax.Array:
    """q [B,T,N,H], k and v [B,T,K,H] -> [B,T,N,H] through Pallas splash attention (TPU; `interpret`
    runs the same kernel in Python on any backend, for tests). Sequences are padded to a multiple
    of 128: a causal query never sees the padding after it; bidirectional padding is a second
    segment that real queries do not see. Under a mesh (`jax.set_mesh`) the kernel runs per shard
    (shard_map: rows over data x fsdp, heads over tensor), since XLA cannot partition a Pallas call."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as masks

    b, t, n, h = q.shape
    length = -(-t // SPLASH_ALIGN) * SPLASH_ALIGN
    block = next(size for size in (512, 256, 128) if length % size == 0)
    pad = [(0, 0), (0, length - t), (0, 0), (0, 0)]
    q, k, v = (jnp.pad(x, pad).swapaxes(1, 2) for x in (q * jnp.asarray(h**-0.5, q.dtype), k, v))  # [B,N|K,L,H]
    segments = jnp.broadcast_to((jnp.arange(length) >= t).astype(jnp.int32), (b, length))

    def per_shard(q, k, v, segments):
        mask = (masks.CausalMask((length, length)) if causal else masks.FullMask((length, length)))
        sizes = splash.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                                  block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
        kernel = splash.make_splash_mha(masks.MultiHeadMask([mask] * q.shape[1]), block_sizes=sizes, head_shards=1,
                                        q_seq_shards=1, interpret=interpret)
        ids = None if causal else splash.SegmentIds(q=segments, kv=segments)
        return jax.vmap(kernel)(q, k, v, segment_ids=ids)

    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty:
        rows = tuple(a for a in ("data", "fsdp") if mesh.shape.get(a, 1) > 1)
        rows = rows if rows and b % np.prod([mesh.shape[a] for a in rows]) == 0 else ()
        heads = "tensor" if mesh.shape.get("tensor", 1) > 1 and n % mesh.shape["tensor"] == k.shape[1] % mesh.shape["tensor"] == 0 else None
        spec = jax.sharding.PartitionSpec(rows or None, heads)
        per_shard = jax.shard_map(per_shard, in_specs=(spec, spec, spec, jax.sharding.PartitionSpec(rows or None)),
                                  out_specs=spec, check_vma=False)
    return per_shard(q, k, v, segments).swapaxes(1, 2)[:, :t]


def _xla_attention(q, k, v, query_slots, key_valid):
    visible = key_valid[:, None, :] & (jnp.arange(k.shape[1]) <= query_slots[:, :, None])  # [B,T,S]
    out = jax.nn.dot_product_attention(q, k, v, mask=visible[:, None])
    # XLA gives a query that sees nothing the mean of all values; zeros agree with "chunked".
    return jnp.where(visible.any(-1)[:, :, None, None], out, 0)


def _chunked_attention(q, k, v, query_slots, key_valid, block_q, block_k):
    b, t, n, h = q.shape
    kv_heads = k.shape[2]
    block_q, block_k = min(block_q, t), min(block_k, k.shape[1])
    q_blocks = _split_blocks(q.reshape(b, t, kv_heads, n // kv_heads, h), block_q, 0)  # [nq,B,bq,K,G,H]
    slot_blocks = _split_blocks(query_slots, block_q, -1)  # [nq,B,bq]; padding queries see nothing
    k_blocks, v_blocks = _split_blocks(k, block_k, 0), _split_blocks(v, block_k, 0)  # [nk,B,bk,K,H]
    valid_blocks = _split_blocks(key_valid, block_k, False)  # [nk,B,bk]
    out = _flash(q_blocks, k_blocks, v_blocks, slot_blocks, valid_blocks)  # [nq,B,bq,K,G,H]
    return jnp.moveaxis(out, 0, 1).reshape(b, -1, n, h)[:, :t]


def _split_blocks(x, size, fill):
    """[B,L,...] -> [ceil(L/size),B,size,...], the tail padded with `fill`."""
    pad = -x.shape[1] % size
    x = jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=fill)
    return jnp.moveaxis(x.reshape(x.shape[0], -1, size, *x.shape[2:]), 1, 0)


def _is_visible(q_slots, k_valid, key_start):
    """Whether any query of the block sees any key of the block: the rest of the pair is skipped."""
    return (key_start <= q_slots.max()) & k_valid.any()


def _block_scores(q, k, q_slots, k_valid, key_start):
    """q [B,bq,K,G,H], k [B,bk,K,H] -> scaled scores [B,K,G,bq,bk] fp32 (MASK_VALUE where hidden), visible mask."""
    scores = jnp.einsum("bqkgh,bskh->bkgqs", q, k, preferred_element_type=jnp.float32) * q.shape[-1] ** -0.5
    key_slots = key_start + jnp.arange(k.shape[1])
    visible = (k_valid[:, None, :] & (key_slots <= q_slots[:, :, None]))[:, None, None]  # [B,1,1,bq,bk]
    return jnp.where(visible, scores, MASK_VALUE), visible


def _key_starts(k_blocks):
    return jnp.arange(k_blocks.shape[0]) * k_blocks.shape[2]


@jax.custom_vjp
def _flash(q_blocks, k_blocks, v_blocks, slot_blocks, valid_blocks):
    return _flash_forward(q_blocks, k_blocks, v_blocks, slot_blocks, valid_blocks)[0]


def _flash_forward(q_blocks, k_blocks, v_blocks, slot_blocks, valid_blocks):
    """-> out [nq,B,bq,K,G,H], log-sum-exp of each query's scores [nq,B,K,G,bq] (for the backward)."""

    def query_block(_, xs):
        q, q_slots = xs
        b, bq, kv_heads, g, h = q.shape

        def key_block(carry, ys):
            k, v, k_valid, key_start = ys
            return jax.lax.cond(_is_visible(q_slots, k_valid, key_start), update, lambda c, *_: c,
                                carry, k, v, k_valid, key_start), None

        def update(carry, k, v, k_valid, key_start):
            row_max, row_sum, acc = carry  # [B,K,G,bq], [B,K,G,bq], [B,K,G,bq,H] fp32
            scores, visible = _block_scores(q, k, q_slots, k_valid, key_start)
            new_max = jnp.maximum(row_max, scores.max(-1))
            p = jnp.where(visible, jnp.exp(scores - new_max[..., None]), 0)  # hidden keys weigh exactly 0
            rescale = jnp.exp(row_max - new_max)
            acc = acc * rescale[..., None] + jnp.einsum("bkgqs,bskh->bkgqh", p.astype(v.dtype), v,
                                                         preferred_element_type=jnp.float32)
            return new_max, row_sum * rescale + p.sum(-1), acc

        init = (jnp.full((b, kv_heads, g, bq), MASK_VALUE, jnp.float32), jnp.zeros((b, kv_heads, g, bq), jnp.float32),
                jnp.zeros((b, kv_heads, g, bq, h), jnp.float32))
        key_xs = (k_blocks, v_blocks, valid_blocks, _key_starts(k_blocks))
        (row_max, row_sum, acc), _ = jax.lax.scan(key_block, init, key_xs)
        row_sum = jnp.where(row_sum > 0, row_sum, 1)  # a query that saw no key: acc is 0, output 0
        out = jnp.einsum("bkgqh->bqkgh", acc / row_sum[..., None]).astype(q.dtype)
        return None, (out, row_max + jnp.log(row_sum))

    _, (out, logsumexp) = jax.lax.scan(query_block, None, (q_blocks, slot_blocks))
    return out, logsumexp


def _flash_fwd(q_blocks, k_blocks, v_blocks, slot_blocks, valid_blocks):
    out, logsumexp = _flash_forward(q_blocks, k_blocks, v_blocks, slot_blocks, valid_blocks)
    return out, (q_blocks, k_blocks, v_blocks, slot_blocks, valid_blocks, out, logsumexp)


def _flash_bwd(residuals, d_out):
    """Recomputes each visible block's probabilities from the saved log-sum-exp (FlashAttention-2
    backward): outer loop over key blocks yields dk, dv; dq accumulates across it in fp32."""
    q_blocks, k_blocks, v_blocks, slot_blocks, valid_blocks, out, logsumexp = residuals
    # sum_h dO * O = sum_s P * dP per query: the softmax Jacobian's diagonal term.
    d_out_dot_out = jnp.einsum("nbqkgh,nbqkgh->nbkgq", d_out.astype(jnp.float32), out.astype(jnp.float32))
    scale = q_blocks.shape[-1] ** -0.5

    def key_block(d_q, xs):
        k, v, k_valid, key_start = xs

        def query_block(carry, ys):
            index, q_slots = ys[0], ys[2]
            return jax.lax.cond(_is_visible(q_slots, k_valid, key_start), update, lambda c, *_: c, carry, *ys), None

        def update(carry, index, q, q_slots, d_o, lse, do_o):
            d_k, d_v, d_q = carry
            scores, visible = _block_scores(q, k, q_slots, k_valid, key_start)
            p = jnp.where(visible, jnp.exp(scores - lse[..., None]), 0)  # [B,K,G,bq,bk]
            d_v = d_v + jnp.einsum("bkgqs,bqkgh->bskh", p.astype(d_o.dtype), d_o, preferred_element_type=jnp.float32)
            d_p = jnp.einsum("bqkgh,bskh->bkgqs", d_o, v, preferred_element_type=jnp.float32)
            d_s = (p * (d_p - do_o[..., None]) * scale).astype(q.dtype)
            d_k = d_k + jnp.einsum("bkgqs,bqkgh->bskh", d_s, q, preferred_element_type=jnp.float32)
            d_q_block = jnp.einsum("bkgqs,bskh->bqkgh", d_s, k, preferred_element_type=jnp.float32)
            return d_k, d_v, d_q.at[index].add(d_q_block)

        zeros = jnp.zeros(k.shape, jnp.float32)
        indices = jnp.arange(q_blocks.shape[0])
        (d_k, d_v, d_q), _ = jax.lax.scan(query_block, (zeros, zeros, d_q),
                                          (indices, q_blocks, slot_blocks, d_out, logsumexp, d_out_dot_out))
        return d_q, (d_k.astype(k.dtype), d_v.astype(v.dtype))

    d_q, (d_k, d_v) = jax.lax.scan(key_block, jnp.zeros(q_blocks.shape, jnp.float32),
                                   (k_blocks, v_blocks, valid_blocks, _key_starts(k_blocks)))
    return d_q.astype(q_blocks.dtype), d_k, d_v, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)
