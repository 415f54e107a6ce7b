"""Qwen2 parity against transformers' PyTorch Qwen2ForCausalLM on tiny random checkpoints."""

import functools

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_close
from flax import nnx

from cope_jax.convert import from_pytorch
from cope_jax.inference.generation import SamplingConfig, generate
from cope_jax.models.attention import set_attention
from cope_jax.models.qwen2.modeling import KVCache, Qwen2Config, Qwen2ForCausalLM

# kv heads 1 / 2 / full, tied and untied, rope theta 1e4 and 1e6, odd vocab sizes.
CONFIGS = {
    "mqa_tied_theta1e4": dict(vocab_size=257, num_attention_heads=4, num_key_value_heads=1, rope_theta=1e4, tie_word_embeddings=True),
    "gqa_untied_theta1e6": dict(vocab_size=311, num_attention_heads=4, num_key_value_heads=2, rope_theta=1e6, tie_word_embeddings=False),
    "mha_untied_theta1e4": dict(vocab_size=199, num_attention_heads=2, num_key_value_heads=2, rope_theta=1e4, tie_word_embeddings=False),
}


def build_hf_qwen2(tmp_path, **overrides) -> transformers.Qwen2ForCausalLM:
    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                                      max_position_embeddings=2048, initializer_range=0.25, **overrides)
    rope_theta = overrides.get("rope_theta")
    if rope_theta is not None:
        config.rope_parameters = {"rope_type": "default", "rope_theta": rope_theta}
    model = transformers.Qwen2ForCausalLM(config).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a dropped bias or norm shows
        for name, p in model.named_parameters():
            if "norm" in name or "bias" in name:
                p.add_(0.3 * torch.randn_like(p))
    model.save_pretrained(tmp_path)
    return model


@pytest.fixture(params=list(CONFIGS), scope="module")
def qwen2_pair(request, tmp_path_factory):
    path = tmp_path_factory.mktemp(request.param)
    torch.manual_seed(1)
    hf = build_hf_qwen2(path, **CONFIGS[request.param])
    return hf, from_pytorch(str(path)), request.param


@pytest.fixture(params=["xla", "chunked"])
def attention(request, qwen2_pair):
    """Runs a parity test with each attention implementation forced; 16-token blocks so the prompts
    here span several blocks and are not multiples of the block."""
    set_attention(qwen2_pair[1], request.param, block_q=16, block_k=16)
    yield request.param
    set_attention(qwen2_pair[1], "auto")


def hf_logits(hf, ids, mask=None, positions=None):
    with torch.no_grad():
        kw = {}
        if mask is not None:
            kw["attention_mask"] = torch.tensor(np.asarray(mask), dtype=torch.long)
        if positions is not None:
            kw["position_ids"] = torch.tensor(np.asarray(positions), dtype=torch.long)
        return hf(torch.tensor(np.asarray(ids)), **kw).logits.numpy()


def test_config_is_translated(qwen2_pair):
    hf, ours, name = qwen2_pair
    assert ours.config.num_key_value_heads == hf.config.num_key_value_heads
    assert ours.config.tie_word_embeddings == hf.config.tie_word_embeddings
    assert (ours.lm_head is None) == hf.config.tie_word_embeddings
    assert ours.config.rope_theta == CONFIGS[name]["rope_theta"]


def test_logits_match(qwen2_pair, attention):
    hf, ours, _ = qwen2_pair
    ids = np.random.randint(0, hf.config.vocab_size, (2, 24))
    assert_close(ours(jnp.asarray(ids)), hf_logits(hf, ids), rtol_to_scale=1e-4, what="logits")


def test_long_prompt_logits_match(qwen2_pair, attention):
    """>= 512 tokens: short prompts hide RoPE mistakes."""
    hf, ours, _ = qwen2_pair
    ids = np.random.randint(0, hf.config.vocab_size, (1, 600))
    assert_close(ours(jnp.asarray(ids)), hf_logits(hf, ids), rtol_to_scale=1e-4, what="600-token logits")


def left_padded_batch(vocab, lengths, pad=0):
    total = max(lengths)
    ids = np.full((len(lengths), total), pad, np.int64)
    mask = np.zeros((len(lengths), total), np.int64)
    for row, length in enumerate(lengths):
        ids[row, total - length:] = np.random.randint(1, vocab, length)
        mask[row, total - length:] = 1
    return ids, mask


def test_left_padded_batch_matches(qwen2_pair, attention):
    hf, ours, _ = qwen2_pair
    ids, mask = left_padded_batch(hf.config.vocab_size, [17, 9, 13])
    positions = np.maximum(mask.cumsum(1) - 1, 0)  # what HF generate derives from the mask
    expected = hf_logits(hf, ids, mask, positions)
    actual = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert_close(actual[real], expected[real], rtol_to_scale=1e-4, what="left-padded logits")


def test_greedy_generation_matches_hf_generate(qwen2_pair, attention):
    """32 greedy tokens through our KV cache equal HF generate, token for token, in a padded batch."""
    hf, ours, _ = qwen2_pair
    ids, mask = left_padded_batch(hf.config.vocab_size, [12, 7])
    with torch.no_grad():
        expected = hf.generate(torch.tensor(ids), attention_mask=torch.tensor(mask), max_new_tokens=32, min_new_tokens=32,
                               do_sample=False, pad_token_id=0)[:, ids.shape[1]:].numpy()
    actual = generate(ours, ids, mask, SamplingConfig(max_new_tokens=32))
    np.testing.assert_array_equal(actual, expected)


def test_sampling_is_seeded_and_respects_top_k(qwen2_pair):
    import jax

    _, ours, _ = qwen2_pair
    ids = np.random.randint(1, 100, (2, 5))
    sampling = SamplingConfig(max_new_tokens=6, temperature=1.0, top_k=1)
    # top_k=1 sampling is greedy whatever the key.
    np.testing.assert_array_equal(generate(ours, ids, sampling=sampling, rng=jax.random.key(3)),
                                  generate(ours, ids, sampling=SamplingConfig(max_new_tokens=6)))
    free = SamplingConfig(max_new_tokens=6, temperature=1.5)
    a = generate(ours, ids, sampling=free, rng=jax.random.key(1))
    np.testing.assert_array_equal(a, generate(ours, ids, sampling=free, rng=jax.random.key(1)))


def test_generation_stops_at_eos():
    model = Qwen2ForCausalLM(Qwen2Config.tiny(), rngs=nnx.Rngs(0))
    ids = np.array([[5, 6, 7]])
    free_run = generate(model, ids, sampling=SamplingConfig(max_new_tokens=8))
    eos = int(free_run[0, 2])
    stopped = generate(model, ids, sampling=SamplingConfig(max_new_tokens=8, eos_token_id=eos, pad_token_id=-1))
    first = int(np.argmax(free_run[0] == eos))
    np.testing.assert_array_equal(stopped[0, : first + 1], free_run[0, : first + 1])
    assert (stopped[0, first + 1:] == -1).all()


@pytest.mark.parametrize("implementation", ["xla", "chunked"])
def test_cached_turns_match_forward(implementation):
    """A left-padded first turn into an empty cache, then a second turn after it (queries offset
    into a longer cache), equal one cache-free forward over both turns; "last" logits equal the
    last row of "all"."""
    config = Qwen2Config.tiny()
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    set_attention(model, implementation, block_q=4, block_k=4)
    first, first_mask = left_padded_batch(config.vocab_size, [14, 9])
    second = np.random.randint(1, config.vocab_size, (2, 11))
    ids, mask = np.concatenate([first, second], 1), np.concatenate([first_mask, np.ones_like(second)], 1)
    forward = nnx.jit(lambda model, ids, mask: model(ids, mask))
    expected = np.asarray(forward(model, jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)

    @functools.partial(nnx.jit, static_argnames=("logits", "empty_cache"))
    def run(model, ids, mask, cache, logits="all", empty_cache=False):
        return model.forward_cached(model.embed(ids), mask, cache, logits=logits, empty_cache=empty_cache)

    def feed(ids, mask, cache, **kw):
        return run(model, jnp.asarray(ids), jnp.asarray(mask), cache, **kw)

    empty = KVCache.init(config, 2, 32)
    logits, cache = feed(first, first_mask, empty)
    for kw in (dict(empty_cache=True), dict(logits="last"), dict(logits="last", empty_cache=True)):
        again, _ = feed(first, first_mask, empty, **kw)
        assert_close(again, logits[:, -1:] if kw.get("logits") else logits, rtol_to_scale=1e-5, what=f"first turn {kw}")
    second_logits, _ = feed(second, np.ones_like(second), cache)
    last, _ = feed(second, np.ones_like(second), cache, logits="last")
    assert last.shape == (2, 1, config.vocab_size)
    assert_close(last, second_logits[:, -1:], rtol_to_scale=1e-5, what="last logits")
    actual = np.concatenate([np.asarray(logits), np.asarray(second_logits)], 1)
    assert_close(actual[real], expected[real], rtol_to_scale=1e-5, what="two cached turns")


def test_forward_cached_checks_its_static_options():
    config = Qwen2Config.tiny()
    model = Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))
    embeds, mask, cache = jnp.zeros((1, 3, config.hidden_size)), jnp.ones((1, 3), bool), KVCache.init(config, 1, 4)
    with pytest.raises(ValueError, match="logits must be"):
        model.forward_cached(embeds, mask, cache, logits="first")
    with pytest.raises(ValueError, match="empty_cache"):
        model.forward_cached(embeds, mask, cache, unpadded=True)
    with pytest.raises(ValueError, match="must be one of"):
        set_attention(model, "flash")
