"""8 emulated CPU devices, a 4x2 fsdp x tensor mesh: sharded == unsharded, nothing large replicated."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cope_jax import checkpoints, sharding
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM
from cope_jax.models.qwen2.modeling import Qwen2Config, Qwen2ForCausalLM

pytestmark = pytest.mark.skipif(jax.device_count() < 8, reason="needs XLA_FLAGS=--xla_force_host_platform_device_count=8")


@pytest.fixture(scope="module")
def mesh():
    return sharding.make_mesh({"data": 1, "fsdp": 4, "tensor": 2})


def test_logical_rules_map_and_fall_back_to_replication(mesh):
    assert sharding.logical_to_spec(("embed", "mlp"), (64, 128), mesh) == jax.sharding.PartitionSpec("fsdp", "tensor")
    # 3 kv-head columns cannot split 2 ways: replicated rather than an error.
    assert sharding.logical_to_spec(("embed", "kv_heads"), (64, 3), mesh) == jax.sharding.PartitionSpec("fsdp", None)
    assert sharding.logical_to_spec(None, (5,), mesh) == jax.sharding.PartitionSpec()


def test_make_mesh_validates_shapes():
    with pytest.raises(ValueError, match="needs 6 devices"):
        sharding.make_mesh({"fsdp": 3, "tensor": 2})
    assert sharding.make_mesh({"data": -1, "tensor": 2}).shape == {"data": 4, "tensor": 2}


def test_qwen2_sharded_forward_equals_unsharded(mesh):
    config = Qwen2Config.tiny()
    factory = lambda: Qwen2ForCausalLM(config, rngs=nnx.Rngs(0))  # noqa: E731
    plain = factory()
    sharded = sharding.create_sharded(factory, mesh)  # born sharded, no full copy first
    assert sharding.replicated_large_weights(sharded, min_size=1024) == []
    kernel = sharded.model.layers[0].mlp.up_proj.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    ids = jnp.asarray(np.random.randint(0, config.vocab_size, (4, 16)))
    expected = np.asarray(plain(ids))
    actual = jax.jit(lambda m, x: m(x))(sharded, ids)
    np.testing.assert_allclose(np.asarray(actual), expected, atol=1e-5, rtol=1e-5)


def test_cope_keyframes_sharded_equals_unsharded(mesh):
    factory = lambda: CoPEVideoLM(CoPEConfig.tiny(), rngs=nnx.Rngs(1))  # noqa: E731
    plain, sharded = factory(), sharding.create_sharded(factory, mesh)
    assert sharding.replicated_large_weights(sharded, min_size=1024) == []
    frames = jnp.asarray(np.random.randn(4, 70, 70, 3), jnp.float32)
    actual = jax.jit(lambda m, f: m.encode_keyframes(f))(sharded, frames)
    np.testing.assert_allclose(np.asarray(actual), np.asarray(plain.encode_keyframes(frames)), atol=1e-5, rtol=1e-5)


def test_checkpoint_restores_across_device_counts(mesh, tmp_path):
    """Written from 8 devices, restored onto 1, and back onto the 4x2 mesh."""
    factory = lambda: Qwen2ForCausalLM(Qwen2Config.tiny(), rngs=nnx.Rngs(2))  # noqa: E731
    sharded = sharding.create_sharded(factory, mesh)
    checkpoints.save(str(tmp_path / "ck"), sharded)
    single = checkpoints.load(str(tmp_path / "ck"))
    assert len(single.model.layers[0].mlp.up_proj.kernel[...].sharding.device_set) == 1
    resharded = checkpoints.load(str(tmp_path / "ck"), mesh=mesh)
    assert sharding.replicated_large_weights(resharded, min_size=1024) == []
    for restored in (single, resharded):  # the weights themselves come back bit for bit
        for (path, a), (_, b) in zip(nnx.to_flat_state(nnx.state(sharded)), nnx.to_flat_state(nnx.state(restored))):
            np.testing.assert_array_equal(np.asarray(a.get_value()), np.asarray(b.get_value()), err_msg=str(path))
    ids = jnp.asarray([[1, 2, 3, 4]])
    np.testing.assert_allclose(np.asarray(single(ids)), np.asarray(sharded(ids)), atol=1e-5)
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(resharded, ids)), np.asarray(single(ids)), atol=1e-5)


def test_from_pytorch_places_weights_on_mesh(mesh, tmp_path):
    import torch
    import transformers

    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=96, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                      num_attention_heads=4, num_key_value_heads=2)
    transformers.Qwen2ForCausalLM(config).save_pretrained(tmp_path)
    from cope_jax.convert import from_pytorch

    model = from_pytorch(str(tmp_path), mesh=mesh)
    assert sharding.replicated_large_weights(model, min_size=1024) == []
    unsharded = from_pytorch(str(tmp_path))
    ids = jnp.asarray([[5, 6, 7]])
    np.testing.assert_allclose(np.asarray(jax.jit(lambda m, x: m(x))(model, ids)), np.asarray(unsharded(ids)), atol=1e-5)
