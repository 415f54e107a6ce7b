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


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    np.random.seed(0)
