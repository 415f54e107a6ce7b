"""Causal attention: the chunked (flash-style) path equals the direct XLA path, values and
gradients; long inputs never materialise a [T,S] array."""

import jax
import jax.extend.core
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from cope_jax.models.attention import causal_attention, choose_implementation
from cope_jax.models.qwen2.modeling import KVCache, Qwen2Config, Qwen2ForCausalLM

# Key slots [pad, offset + T) are valid: `pad` left padding per row (a row as long as the sequence
# is all padding), `offset` slots of earlier turns, and an empty cache tail up to S.
CASES = {
    "self_gqa": dict(batch=2, t=37, s=37, heads=4, kv_heads=2, offset=0, pads=None),
    "left_padded_mqa": dict(batch=3, t=29, s=29, heads=4, kv_heads=1, offset=0, pads=[0, 6, 29]),
    "cache_offset_mha": dict(batch=2, t=19, s=64, heads=2, kv_heads=2, offset=21, pads=[3, 0]),
    "cache_offset_per_row_slots": dict(batch=2, t=11, s=40, heads=6, kv_heads=2, offset=9, pads=[0, 12],
                                       per_row_slots=True),
}
BLOCKS = [(8, 8), (16, 5), (64, 64)]  # several blocks, T and S not multiples, one block each


def make_case(batch, t, s, heads, kv_heads, offset, pads, per_row_slots=False, head_dim=16, dtype=jnp.float32):
    """-> q, k, v and the attention keywords; both None for plain causal self-attention."""
    rng = np.random.default_rng(0)
    q = jnp.asarray(rng.normal(size=(batch, t, heads, head_dim)), dtype)
    k, v = (jnp.asarray(rng.normal(size=(batch, s, kv_heads, head_dim)), dtype) for _ in range(2))
    if pads is None and offset == 0 and s == t:
        return q, k, v, dict(query_slots=None, key_valid=None)
    slot = np.arange(s)
    key_valid = np.stack([(slot >= pad) & (slot < offset + t) for pad in (pads or [0] * batch)])
    query_slots = offset + np.arange(t, dtype=np.int32)
    if per_row_slots:
        query_slots = np.broadcast_to(query_slots, (batch, t))
    return q, k, v, dict(query_slots=jnp.asarray(query_slots), key_valid=jnp.asarray(key_valid))


def attend(implementation, blocks=(8, 8)):
    return lambda q, k, v, kw: causal_attention(q, k, v, implementation=implementation, block_q=blocks[0],
                                                block_k=blocks[1], **kw)


@pytest.mark.parametrize("blocks", BLOCKS, ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_matches_xla(case, blocks):
    q, k, v, kw = make_case(**CASES[case])
    assert_close(attend("chunked", blocks)(q, k, v, kw), attend("xla")(q, k, v, kw), rtol_to_scale=1e-5,
                 what=f"{case} chunked {blocks}")


@pytest.mark.parametrize("blocks", BLOCKS[:2], ids=str)
@pytest.mark.parametrize("case", list(CASES))
def test_chunked_gradients_match_xla(case, blocks):
    q, k, v, kw = make_case(**CASES[case])
    cotangent = jnp.asarray(np.random.default_rng(1).normal(size=q.shape), jnp.float32)

    def grads(fn):
        return jax.grad(lambda q, k, v: (fn(q, k, v, kw) * cotangent).sum(), argnums=(0, 1, 2))(q, k, v)

    for name, actual, expected in zip("qkv", grads(attend("chunked", blocks)), grads(attend("xla"))):
        assert_close(actual, expected, rtol_to_scale=1e-5, what=f"{case} d{name} {blocks}")


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_queries_that_see_no_key_give_zeros(implementation):
    q, k, v, kw = make_case(**CASES["left_padded_mqa"])
    out = np.asarray(attend(implementation)(q, k, v, kw))
    assert np.isfinite(out).all()
    np.testing.assert_array_equal(out[1, :6], 0)  # left padding of row 1
    np.testing.assert_array_equal(out[2], 0)  # row 2 is all padding
    assert np.abs(out[1, 6:]).min() > 0


def test_bf16_chunked_is_close_to_fp32():
    """bf16 inputs, fp32 softmax statistics and accumulators: error at bf16 rounding, not worse."""
    q, k, v, kw = make_case(**CASES["cache_offset_mha"])
    half = [x.astype(jnp.bfloat16) for x in (q, k, v)]
    out = attend("chunked")(*half, kw)
    assert out.dtype == jnp.bfloat16
    assert_close(out.astype(jnp.float32), attend("xla")(q, k, v, kw), rtol_to_scale=2e-2, what="bf16 chunked")


def test_chunked_sharded_equals_unsharded():
    """Batch over `data`, heads over `tensor` (8 emulated devices): the block-skip predicate
    reduces over a sharded batch."""
    q, k, v, kw = make_case(batch=8, t=21, s=30, heads=4, kv_heads=2, offset=5, pads=[0, 3, 26, 0, 1, 0, 30, 2])
    mesh = jax.make_mesh((4, 2), ("data", "tensor"))
    heads = NamedSharding(mesh, PartitionSpec("data", None, "tensor"))
    rows = NamedSharding(mesh, PartitionSpec("data"))
    sharded_kw = dict(query_slots=kw["query_slots"], key_valid=jax.device_put(kw["key_valid"], rows))
    sharded = jax.jit(attend("chunked"))(*(jax.device_put(x, heads) for x in (q, k, v)), sharded_kw)
    assert_close(sharded, attend("chunked")(q, k, v, kw), rtol_to_scale=1e-5, what="sharded chunked")


def test_auto_dispatch_is_static_and_checked():
    f32 = jnp.float32
    assert choose_implementation("auto", 1, 4096, plain_causal=False, dtype=f32) == "xla"  # a decode step
    assert choose_implementation("auto", 4096, 4096, plain_causal=False, dtype=f32) == "chunked"
    assert choose_implementation("auto", 4096, 4096, plain_causal=True, dtype=jnp.bfloat16) == (
        "cudnn" if jax.default_backend() == "gpu" else "chunked")
    with pytest.raises(ValueError, match="plain causal"):
        choose_implementation("cudnn", 8, 8, plain_causal=False, dtype=jnp.bfloat16)
    with pytest.raises(ValueError, match="must be one of"):
        choose_implementation("flash", 8, 8, plain_causal=True, dtype=f32)
    q, k, v, _ = make_case(**CASES["cache_offset_mha"])
    with pytest.raises(ValueError, match="queries are the keys"):
        causal_attention(q, k, v)


def largest_intermediate(fn, *args) -> int:
    """Elements of the largest array any equation of fn's jaxpr produces, sub-jaxprs (scan, cond,
    custom_vjp) included."""

    def sizes(jaxpr):
        for eqn in jaxpr.eqns:
            yield from (int(np.prod(var.aval.shape)) for var in eqn.outvars)
            for param in eqn.params.values():
                for sub in param if isinstance(param, (tuple, list)) else (param,):
                    if isinstance(sub, jax.extend.core.ClosedJaxpr):
                        yield from sizes(sub.jaxpr)
                    elif isinstance(sub, jax.extend.core.Jaxpr):
                        yield from sizes(sub)

    return max(sizes(jax.make_jaxpr(fn)(*args).jaxpr))


def test_long_inputs_never_materialise_t_by_s():
    t = 2048
    q, k, v, kw = make_case(batch=1, t=t, s=t, heads=1, kv_heads=1, offset=0, pads=[5])
    assert largest_intermediate(lambda q, k, v: causal_attention(q, k, v, **kw), q, k, v) < t * t // 4
    assert largest_intermediate(lambda q, k, v: causal_attention(q, k, v, implementation="xla", **kw), q, k, v) >= t * t


@pytest.mark.parametrize("empty_cache", [True, False])
def test_long_prefill_has_no_t_by_s_array(empty_cache):
    """The model's prefill of a long padded prompt, traced only: no mask, scores or logits of T x S."""
    config = Qwen2Config.tiny()
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    t = 1500
    embeds = jnp.zeros((1, t, config.hidden_size))
    mask = jnp.arange(t)[None] >= 7
    cache = KVCache.init(config, 1, t + 16)

    def prefill(embeds):
        return model.forward_cached(embeds, mask, cache, logits="last", empty_cache=empty_cache)

    assert largest_intermediate(prefill, embeds) < t * t
