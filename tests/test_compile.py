"""Compiling for accelerators that are not here (--mode=compile, docs/architecture.md §11).

On the CPU: target names, the splash kernel (in Pallas' interpreter) against the direct attention,
the layer scan against unrolled layers, the FLOP count, and the command's one-line refusals. With
the compile environment (`make compile-env`, .venv-compile): the tiny stage-2 step and chat
programs compiled by the TPU compiler and the CUDA compiler for 8 H100s, splash and cuDNN found in
the compiled HLO; skipped, with the reason, where it is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cope_jax import accelerators
from cope_jax.models.attention import causal_attention, encoder_attention, splash_attention
from cope_jax.models.common import set_scan_layers
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM
from cope_jax.models.common import set_remat
from cope_jax import compile as compile_mode
from cope_jax.training import finetune

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMPILE_PYTHON = os.path.join(ROOT, ".venv-compile", "bin", "python")
needs_compile_env = pytest.mark.skipif(not os.path.exists(COMPILE_PYTHON),
                                       reason="no compile environment (.venv-compile): run `make compile-env`")


# ---------------------------------------------------------------------------- targets


@pytest.mark.parametrize("name, chips, torus", [
    ("v5p-8", 4, (2, 2, 1)), ("v5p-16", 8, (2, 2, 2)), ("v5p-32", 16, (2, 2, 4)), ("v5p-128", 64, (4, 4, 4)),
    ("v4-8", 4, (2, 2, 1)), ("v5litepod-1", 1, (1, 1)), ("v5litepod-4", 4, (2, 2)), ("v5litepod-8", 8, (2, 4)),
    ("v6e-64", 64, (8, 8)), ("v6e-256", 256, (16, 16))])
def test_tpu_names_count_chips_and_shape_the_torus(name, chips, torus):
    target = accelerators.parse(name)
    assert (target.platform, target.chips, target.torus()) == ("tpu", chips, torus)


def test_gpu_names_and_what_fits_means():
    h100, h200 = accelerators.parse("h100-8"), accelerators.parse("h200-1")
    assert (h100.platform, h100.chips, h200.chips) == ("gpu", 8, 1)
    assert h100.usable_bytes == h100.chip.memory_bytes - 5 * 2**30  # workspaces no plan counts
    assert accelerators.parse("v5p-16").usable_bytes == 95 * 2**30  # the TPU compiler plans everything
    assert "device_memory_size: 150754820096" in accelerators.gpu_target_config(h200)
    fields = [line.split(":")[0].strip() for line in accelerators.gpu_target_config(h100).splitlines()
              if not line.startswith("#")]
    assert "collective_memory_granularity" not in fields  # unknown to the XLA in jaxlib 0.10.2


@pytest.mark.parametrize("name, says", [("v5p-6", "power of two from 8"), ("v6e-2", "1 or a power of two from 4"),
                                        ("h100-12", "multiple of 8"), ("a100-8", "accepted: v5p-N")])
def test_bad_target_names_are_one_line_with_the_accepted_forms(name, says):
    with pytest.raises(accelerators.TargetError, match=says):
        accelerators.parse(name)


def run_main(*args, python=sys.executable, timeout=900):
    return subprocess.run([python, "-m", "cope_jax.main", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_compile_mode_refusals_are_one_line():
    no_target = run_main("--config=configs/finetune.py:tiny", "--mode=compile")
    assert no_target.returncode == 2 and "--mode=compile needs --target" in no_target.stderr
    bad = run_main("--config=configs/finetune.py:tiny", "--mode=compile", "--target=tpu-8")
    assert bad.returncode == 2 and "accepted: v5p-N" in bad.stderr
    stray = run_main("--config=configs/finetune.py:tiny", "--target=h100-8", "--workdir=/tmp/x")
    assert stray.returncode == 2 and "--target only applies to --mode=compile" in stray.stderr


@pytest.mark.skipif(os.path.exists(COMPILE_PYTHON) and sys.executable == COMPILE_PYTHON, reason="this is the compile env")
def test_without_the_compiler_the_command_says_how_to_get_it():
    if accelerators.missing_compiler(accelerators.parse("v5litepod-4")) is None:
        pytest.skip("libtpu is installed in this Python")
    result = run_main("--config=configs/finetune.py:tiny", "--mode=compile", "--target=v5litepod-4")
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: the TPU compiler (libtpu) is not installed")
    assert "make compile-env" in result.stderr


# ---------------------------------------------------------------------------- kernels and layers on the CPU


def _qkv(b, t, n, kv, h, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=shape), jnp.float32) for shape in ((b, t, n, h), (b, t, kv, h), (b, t, kv, h)))


def test_splash_equals_the_direct_causal_attention_values_and_gradients():
    q, k, v = _qkv(2, 200, 4, 2, 16)  # GQA, and 200 is padded to 256 inside
    splash = lambda q, k, v: splash_attention(q, k, v, causal=True, interpret=True)  # noqa: E731
    direct = lambda q, k, v: causal_attention(q, k, v, implementation="xla")  # noqa: E731
    np.testing.assert_allclose(splash(q, k, v), direct(q, k, v), atol=2e-5)
    grads = [jax.grad(lambda *a: (f(*a) ** 2).sum(), argnums=(0, 1, 2))(q, k, v) for f in (splash, direct)]
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_splash_bidirectional_masks_its_padding():
    q, k, v = _qkv(2, 100, 4, 4, 8, seed=1)  # 100 patches padded to 128: the padding must not be attended
    out = splash_attention(q, k, v, causal=False, interpret=True)
    np.testing.assert_allclose(out, encoder_attention(q, k, v, implementation="xla"), atol=2e-5)


def _tiny_batch(config: CoPEConfig, rows=2, length=128, keyframes=2, p_steps=3):
    r = np.random.default_rng(0)
    size = config.vision.image_size
    visual = keyframes * config.tokens_per_keyframe + p_steps * config.tokens_per_p_step
    return {"ids": jnp.asarray(r.integers(0, 100, (rows, length)), jnp.int32),
            "is_visual": jnp.zeros((rows, length), bool).at[:, 5:5 + visual].set(True),
            "is_target": jnp.ones((rows, length), bool),
            "keyframes": jnp.asarray(r.integers(0, 255, (rows, keyframes, size, size, 3)), jnp.uint8),
            "mv": jnp.asarray(r.normal(size=(rows, p_steps, size, size, 2)), jnp.float32),
            "residual": jnp.asarray(r.integers(-20, 20, (rows, p_steps, size, size, 3)), jnp.int16),
            "token_source": jnp.asarray(np.tile(np.arange(visual), (rows, 1)), jnp.int32)}


@pytest.mark.parametrize("remat", ["none", "layer"])
def test_scanned_layers_give_the_unrolled_loss_and_gradients(remat):
    config = CoPEConfig.tiny()
    model = CoPEVideoLM(config, rngs=nnx.Rngs(0))
    set_remat(model, remat)
    batch = _tiny_batch(config)

    def loss_and_grads(scan):
        set_scan_layers(model, scan)
        graph, params, rest = nnx.split(model, nnx.Param, ...)
        loss = lambda p: finetune.loss_sums(nnx.merge(graph, p, rest), batch, remat=remat, chunk=64)[0]  # noqa: E731
        return jax.value_and_grad(loss)(params)

    (unrolled, g1), (scanned, g2) = loss_and_grads(False), loss_and_grads(True)
    np.testing.assert_allclose(scanned, unrolled, rtol=1e-6)
    largest = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(g1))
    for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g2)):  # float32 summation order only
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6 * largest)


def test_flop_count_sees_products_loops_and_convolutions():
    x = jnp.ones((8, 16))
    w = jnp.ones((16, 32))
    assert compile_mode.jaxpr_flops(lambda x, w: x @ w, x, w) == 2 * 8 * 16 * 32
    scanned = lambda x, w: jax.lax.scan(lambda c, _: (c @ w[:, :16], None), x, None, length=5)[0]  # noqa: E731
    assert compile_mode.jaxpr_flops(scanned, x, w) == 5 * 2 * 8 * 16 * 16
    image, kernel = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    conv = lambda a, b: jax.lax.conv_general_dilated(a, b, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))  # noqa: E731
    assert compile_mode.jaxpr_flops(conv, image, kernel) == 2 * (2 * 8 * 8 * 4) * (3 * 3 * 3)
    assert compile_mode.jaxpr_flops(jax.grad(lambda w: (x @ w).sum()), w) == 2 * (2 * 8 * 16 * 32)  # x @ w, x^T dy


def test_programs_compile_a_core_each_as_host_memory_allows(monkeypatch):
    GiB = compile_mode.GiB
    monkeypatch.setattr(os, "cpu_count", lambda: 16)
    monkeypatch.setattr(compile_mode, "available_host_bytes", lambda: 20 * GiB)
    assert compile_mode.compile_workers(5, "gpu") == 5  # 3 GiB each
    assert compile_mode.compile_workers(5, "tpu") == 1  # 14 GiB each
    monkeypatch.setattr(compile_mode, "available_host_bytes", lambda: 1 * GiB)
    assert compile_mode.compile_workers(5, "gpu") == 1  # never none
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    monkeypatch.setattr(compile_mode, "available_host_bytes", lambda: 200 * GiB)
    assert compile_mode.compile_workers(5, "tpu") == 2 and compile_mode.compile_workers(1, "tpu") == 1
    monkeypatch.undo()  # the real one: what /proc/meminfo says is available, at most the machine's memory
    assert 0 < compile_mode.available_host_bytes() <= os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def test_tpu_out_of_memory_error_becomes_the_one_line():
    message = "RESOURCE_EXHAUSTED: XLA:TPU compile permanent error. Ran out of memory in memory space hbm. " \
              "Used 76.28G of 15.75G hbm. Exceeded hbm capacity by 60.53G. ... (76.28G) exceeds available HBM (15.75G)"
    needed = compile_mode.out_of_memory(message)
    assert needed == int(76.28 * 2**30)
    line = compile_mode.misfit_line("L=8192", needed, accelerators.parse("v5litepod-4"), "the TPU compiler")
    assert line.startswith("L=8192 needs 76.3 GiB per device, a TPU v5e has 16.0")


# ---------------------------------------------------------------------------- the real compilers


def compile_tiny(target: str, *overrides: str):
    return run_main("--config=configs/finetune.py:tiny", "--mode=compile", f"--target={target}",
                    "--config.length_buckets=(512,)", *overrides, python=COMPILE_PYTHON)


@needs_compile_env
def test_tiny_stage2_and_chat_compile_for_a_tpu_with_splash_everywhere():
    result = compile_tiny("v5litepod-4")
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    assert "4 x TPU v5e" in report and "| L=512 |" in report and "| chat prefill 512 |" in report
    train_kernels = next(line for line in report.splitlines() if line.startswith("- L=512:"))
    for model in ("language_model", "vision_tower", "delta_encoder"):
        assert f"{model}: Pallas splash attention" in train_kernels, train_kernels
    assert "all-reduce" in train_kernels  # the data-parallel gradients: collectives lowered
    assert "language_model: Pallas splash attention" in next(line for line in report.splitlines()
                                                             if line.startswith("- chat prefill 512:"))


@needs_compile_env
def test_tiny_stage2_and_chat_compile_for_eight_h100s_with_cudnn():
    result = compile_tiny("h100-8", "--config.compute_dtype=bfloat16")  # cuDNN's flash kernel is half precision
    assert result.returncode == 0, result.stderr[-3000:]
    report = result.stdout
    assert "8 x H100 80GB" in report and "| L=512 |" in report
    train_kernels = next(line for line in report.splitlines() if line.startswith("- L=512:"))
    # The tiny tower and Δ-encoder have 12-wide heads, which cuDNN does not take (multiples of 8): XLA there.
    assert "language_model: cuDNN fused attention" in train_kernels, train_kernels
    assert "all-reduce" in train_kernels


@needs_compile_env
def test_a_program_that_does_not_fit_exits_1_with_one_line():
    result = run_main("--config=configs/finetune.py:paper", "--mode=compile", "--target=v5litepod-1",
                      "--config.length_buckets=(4096,)", "--config.max_seq_len=4096", python=COMPILE_PYTHON)
    assert result.returncode == 1
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and "a TPU v5e has 16.0" in last, last
