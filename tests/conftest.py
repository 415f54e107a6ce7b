"""Test setup: 8 emulated CPU devices (sharding tests), fp32 matmuls, shared helpers."""

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import torch  # noqa: E402

jax.config.update("jax_default_matmul_precision", "float32")
torch.set_num_threads(2)


def assert_close(actual, expected, *, rtol_to_scale: float, what: str = "") -> None:
    """|actual - expected| <= rtol_to_scale * max|expected| everywhere (docs/architecture.md §6 'relative to the scale')."""
    actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    scale = max(np.abs(expected).max(), 1e-12)
    error = np.abs(actual - expected).max()
    assert error <= rtol_to_scale * scale, f"{what}: max error {error:.3g} > {rtol_to_scale} x scale {scale:.3g}"


def assert_gradients_close(actual, expected, *, rtol_to_largest: float = 1e-5) -> None:
    """Two gradient trees agree leaf by leaf within rtol_to_largest x the largest |expected| of the
    whole tree: some gradients are ~0 (float noise), so each is compared to the largest, not to itself."""
    actual, expected = ([np.asarray(x) for x in jax.tree.leaves(tree)] for tree in (actual, expected))
    scale = max(np.abs(e).max() for e in expected)
    for a, e in zip(actual, expected, strict=True):
        np.testing.assert_allclose(a, e, atol=rtol_to_largest * scale)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)


def killed_run_script(stage: str) -> str:
    """A `python -c` script: runs configs/<stage>.py:tiny with the overrides in argv[1] (a dict
    literal) in the workdir argv[2], and dies by SIGKILL right after step 4's checkpoint commits."""
    return f"""
import os, signal, sys
from configs import {stage} as configs
from cope_jax import checkpoints
from cope_jax.training import {stage} as stage
save = checkpoints.Checkpoints.save
def save_then_die(self, step, *args, **kwargs):
    saved = save(self, step, *args, **kwargs)
    if step == 4:
        self.wait()
        os.kill(os.getpid(), signal.SIGKILL)
    return saved
checkpoints.Checkpoints.save = save_then_die
config = configs.get_config("tiny")
for key, value in eval(sys.argv[1]).items():
    config[key] = value
stage.train(config, sys.argv[2])
"""
