"""Every registered model kind saves and loads with `cope_jax.checkpoints`, and a directory that
is not a checkpoint gives one line, wherever a config points at one."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cope_jax import checkpoints
from cope_jax.models import KINDS
from cope_jax.models.cope.modeling import CoPEConfig
from cope_jax.models.delta_encoder.modeling import DeltaEncoderConfig
from cope_jax.models.qwen2.modeling import Qwen2Config
from cope_jax.models.resnet.modeling import ResNetConfig
from cope_jax.models.siglip.modeling import SiglipVisionConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = {"qwen2": Qwen2Config.tiny(), "siglip_vision": SiglipVisionConfig.tiny(), "resnet": ResNetConfig.tiny(),
        "cope": CoPEConfig.tiny(), "delta_encoder": DeltaEncoderConfig.tiny()}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_every_kind_saves_and_loads(kind, tmp_path):
    module_class, _ = KINDS[kind]
    module = module_class(TINY[kind], rngs=nnx.Rngs(3))
    checkpoints.save(str(tmp_path / kind), module, source="test")
    loaded = checkpoints.load(str(tmp_path / kind))
    assert type(loaded) is module_class and loaded.config == module.config
    saved, restored = nnx.to_flat_state(nnx.state(module)), nnx.to_flat_state(nnx.state(loaded))
    assert [p for p, _ in saved] == [p for p, _ in restored]
    for (path, a), (_, b) in zip(saved, restored):
        np.testing.assert_array_equal(np.asarray(b.get_value()), np.asarray(a.get_value()), err_msg=str(path))


def test_a_directory_that_is_not_a_checkpoint_is_one_line(tmp_path):
    (tmp_path / "not-a-checkpoint").mkdir()
    result = subprocess.run([sys.executable, "-m", "cope_jax.main", "--config=configs/pretrain.py:tiny",
                             f"--workdir={tmp_path / 'work'}", f"--config.siglip_checkpoint={tmp_path / 'not-a-checkpoint'}"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f"error: {tmp_path / 'not-a-checkpoint'}: not a cope_jax checkpoint (no model.json; convert with python -m cope_jax.convert)"]


def test_a_training_checkpoint_that_does_not_match_the_run_is_one_line(tmp_path):
    """Resuming with other learning-rate groups (or a checkpoint of an older layout) changes the
    optimizer state's tree: refused with one line naming the step, not an orbax traceback."""
    import optax

    params = {"w": jnp.ones((2, 2))}
    written = optax.chain(optax.clip_by_global_norm(1.0), optax.adamw(1e-3)).init(params)
    grouped = optax.chain(optax.clip_by_global_norm(1.0),
                          optax.multi_transform({"default": optax.adamw(1e-3)}, {"w": "default"})).init(params)
    saved = checkpoints.Checkpoints(str(tmp_path), keep=2, every=1)
    saved.save(1, params, written, force=True)
    saved.close()
    resumed = checkpoints.Checkpoints(str(tmp_path), keep=2, every=1)
    np.testing.assert_array_equal(resumed.restore(1, params, written)[0]["w"], params["w"])
    with pytest.raises(checkpoints.CheckpointError, match=r"checkpoints/1: does not match this run .*new workdir"):
        resumed.restore(1, params, grouped)
    resumed.close()
