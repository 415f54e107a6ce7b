"""Qwen2 parity against transformers' PyTorch Qwen2ForCausalLM on tiny random checkpoints."""

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from conftest import assert_close

from cope_jax.convert import from_pytorch
from cope_jax.generation import SamplingConfig, generate

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


def test_logits_match(qwen2_pair):
    hf, ours, _ = qwen2_pair
    ids = np.random.randint(0, hf.config.vocab_size, (2, 24))
    assert_close(ours(jnp.asarray(ids)), hf_logits(hf, ids), rtol_to_scale=1e-4, what="logits")


def test_long_prompt_logits_match(qwen2_pair):
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


def test_left_padded_batch_matches(qwen2_pair):
    hf, ours, _ = qwen2_pair
    ids, mask = left_padded_batch(hf.config.vocab_size, [17, 9, 13])
    positions = np.maximum(mask.cumsum(1) - 1, 0)  # what HF generate derives from the mask
    expected = hf_logits(hf, ids, mask, positions)
    actual = np.asarray(ours(jnp.asarray(ids), jnp.asarray(mask)))
    real = mask.astype(bool)
    assert_close(actual[real], expected[real], rtol_to_scale=1e-4, what="left-padded logits")


def test_greedy_generation_matches_hf_generate(qwen2_pair):
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
    from flax import nnx

    from cope_jax.models.qwen2.modeling import Qwen2Config, Qwen2ForCausalLM

    model = Qwen2ForCausalLM(Qwen2Config.tiny(), rngs=nnx.Rngs(0))
    ids = np.array([[5, 6, 7]])
    free_run = generate(model, ids, sampling=SamplingConfig(max_new_tokens=8))
    eos = int(free_run[0, 2])
    stopped = generate(model, ids, sampling=SamplingConfig(max_new_tokens=8, eos_token_id=eos, pad_token_id=-1))
    first = int(np.argmax(free_run[0] == eos))
    np.testing.assert_array_equal(stopped[0, : first + 1], free_run[0, : first + 1])
    assert (stopped[0, first + 1:] == -1).all()
