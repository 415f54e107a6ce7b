"""Δ-encoder and stage-1 pretraining: shapes, parameter counts, overfitting, exact resume after
kill -9, 8-device step == 1-device step, clear errors for bad configs."""

import json
import os
import signal
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from conftest import assert_gradients_close, killed_run_script
from configs import pretrain as pretrain_configs
from cope_jax import sharding
from cope_jax.errors import ConfigError
from cope_jax.training import demo, metrics, optimization, pretrain
from cope_jax.models.delta_encoder.modeling import DeltaEncoder, DeltaEncoderConfig, parameter_count
from cope_jax.models.resnet.modeling import ResNetConfig

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_config(data_dir="", **overrides):
    config = pretrain_configs.get_config("tiny")
    config.data_dir = data_dir
    config.log_every_steps = 2
    config.eval_every_steps = 1000
    config.eval_max_videos = 2
    config.mesh = {"data": 1, "fsdp": 1, "tensor": 1}  # one device unless a test asks for more
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """The demo data the tiny config builds, made once for the module."""
    workdir = str(tmp_path_factory.mktemp("demo"))
    return demo.stage1_data(tiny_config(demo_clips=4), workdir)


def test_delta_encoder_shapes():
    config = DeltaEncoderConfig.tiny()
    model = DeltaEncoder(config, rngs=nnx.Rngs(0))
    out = nnx.jit(lambda m, mv, r: m(mv, r))(model, jnp.zeros((3, 64, 64, 2)), jnp.zeros((3, 64, 64, 3), jnp.int16))
    assert out.shape == (3, config.num_tokens, config.width)
    with pytest.raises(ValueError, match="DeltaEncoder expects"):
        model(jnp.zeros((3, 32, 32, 2)), jnp.zeros((3, 32, 32, 3)))


def _transformer_parameters(d, depth, mlp, queries, inputs):
    layer = 4 * (d * d + d) + (d * mlp + mlp) + (mlp * d + d) + 2 * 2 * d
    return queries * d + inputs * d + depth * layer + 2 * d


def test_paper_parameter_count_matches_an_independent_count():
    config = DeltaEncoderConfig.paper()
    model = nnx.eval_shape(lambda: DeltaEncoder(config, rngs=nnx.Rngs(0)))
    d, mlp = 1152, 4608
    resnet18_trunk = 11_176_512  # torchvision resnet18 without its fc layer
    expected = ((16 * 16 * 2 * d + d) + (d * d + d) + _transformer_parameters(d, 4, mlp, 4, 24 * 24)
                + resnet18_trunk + (512 * d + d) + _transformer_parameters(d, 4, mlp, 4, 12 * 12))
    assert parameter_count(model) == expected == 142_051_776  # docs/training.md's figure (paper: "<15M")


def test_motion_normalisation_is_per_sample_min_max():
    from cope_jax.models.delta_encoder.modeling import normalize_motion

    mv = jnp.stack([jnp.linspace(-30, 10, 2 * 4 * 4).reshape(4, 4, 2), jnp.full((4, 4, 2), 7.0)])
    out = normalize_motion(mv)
    assert float(out[0].min()) == -1 and float(out[0].max()) == 1 and not out[1].any()


def test_tiny_model_overfits_one_batch(data_dir, tmp_path):
    stage = pretrain.Stage(tiny_config(data_dir, learning_rate=3e-3, warmup_steps=1, total_steps=150), str(tmp_path))
    batch = next(iter(stage.loader))
    batch = sharding.global_batch({k: batch[k] for k in ("prev_rgb", "rgb", "mv", "residual")}, stage.mesh)
    params, opt_state = stage.params, stage.tx.init(stage.params)
    losses = []
    for _ in range(150):
        params, opt_state, step_metrics = stage.train_step(params, opt_state, stage.frozen, stage.rest, batch)
        losses.append(float(step_metrics["loss"]))
    assert losses[-1] < losses[0] / 10, (losses[0], losses[-1])


KILL_AT_STEP_4 = killed_run_script("pretrain")


def _order(workdir):
    order = {}
    for line in open(os.path.join(workdir, "data_order.jsonl")):
        entry = json.loads(line)
        order[entry["step"]] = entry["examples"]  # steps replayed after a resume overwrite the killed run's
    return order


def test_killed_run_resumes_exactly(data_dir, tmp_path):
    overrides = dict(data_dir=data_dir, total_steps=8, warmup_steps=2, checkpoint_every_steps=2, log_every_steps=2, eval_every_steps=1000,
                     eval_max_videos=1, record_data_order=True, batch_size=8, mesh={"data": 1, "fsdp": 1, "tensor": 1})
    straight_dir, killed_dir = str(tmp_path / "straight"), str(tmp_path / "killed")
    config = tiny_config(**overrides)
    straight = pretrain.train(config, straight_dir)
    result = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4, repr(overrides), killed_dir], cwd=REPO,
                            capture_output=True, text=True)
    assert result.returncode == -9, result.stderr[-2000:]
    resumed = pretrain.train(config, killed_dir)
    assert resumed["step"] == straight["step"] == 8
    for a, b in zip(jax.tree.leaves(straight["params"]), jax.tree.leaves(resumed["params"])):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6, rtol=0)
    assert _order(killed_dir) == _order(straight_dir) and sorted(_order(straight_dir)) == list(range(8))
    events = [f for f in os.listdir(os.path.join(straight_dir, "tensorboard")) if f.startswith("events.out.tfevents")]
    scalars = metrics.read_scalars(os.path.join(straight_dir, "tensorboard", events[0]))
    assert [s for s, tag, _ in scalars if tag == "train/loss"] == [2, 4, 6, 8]


def test_step_on_8_devices_equals_1_device(data_dir, tmp_path):
    """Same batch, same initial weights: the loss and every gradient agree across meshes."""
    assert jax.device_count() == 8
    results = []
    for mesh in ({"data": 1, "fsdp": 1, "tensor": 1}, {"data": 2, "fsdp": 4, "tensor": 1}):
        stage = pretrain.Stage(tiny_config(data_dir, mesh=mesh), str(tmp_path))
        local = next(iter(stage.loader))
        batch = sharding.global_batch({k: local[k] for k in ("prev_rgb", "rgb", "mv", "residual")}, stage.mesh)
        (loss, _), grads = stage.loss_and_grad(stage.params, stage.frozen, stage.rest, batch)
        if len(stage.mesh.devices.flat) == 8:
            assert {d for leaf in jax.tree.leaves(batch) for d in leaf.sharding.device_set} == set(jax.devices())
        results.append((float(loss), [np.asarray(x) for x in jax.tree.leaves(grads)]))
    (loss_1, grads_1), (loss_8, grads_8) = results
    assert loss_8 == pytest.approx(loss_1, rel=1e-5)
    for a, b in zip(grads_1, grads_8):
        np.testing.assert_allclose(b, a, atol=1e-5 * max(np.abs(a).max(), 1e-3))


def test_gradient_accumulation_equals_one_big_batch(data_dir, tmp_path):
    """Four micro-batches of 2 pairs give the 8-pair step's loss, gradient norm and gradients."""
    metrics_by_steps = []
    for accumulation in (1, 4):
        stage = pretrain.Stage(tiny_config(data_dir, grad_accum_steps=accumulation), str(tmp_path / str(accumulation)))
        local = next(iter(stage.loader))
        if accumulation == 4:  # the summed gradients themselves (an Adam update of float-noise gradients is noise)
            batch = sharding.global_batch({k: local[k] for k in ("prev_rgb", "rgb", "mv", "residual")}, stage.mesh)
            _, grads = stage.loss_and_grad(stage.params, stage.frozen, stage.rest, batch)
            _, summed = jax.jit(lambda p: optimization.accumulate_gradients(
                stage.loss_and_grad, p, (stage.frozen, stage.rest), batch, 4))(stage.params)
            assert_gradients_close(jax.tree.map(lambda g: g / 4, summed), grads)
        metrics_by_steps.append(stage.step(stage.params, stage.tx.init(stage.params), local)[2])
    for name in ("loss", "copy_loss", "grad_norm"):
        assert float(metrics_by_steps[1][name]) == pytest.approx(float(metrics_by_steps[0][name]), rel=1e-5), name


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 0}, "config.batch_size must be > 0"),
    ({"grad_accum_steps": 0}, "config.grad_accum_steps must be an integer >= 1"),
    ({"grad_accum_steps": 3}, "not divisible by config.grad_accum_steps 3"),
    ({"batch_size": 8, "grad_accum_steps": 4, "mesh": {"data": 4, "fsdp": 1, "tensor": 1}},
     "config.batch_size / config.grad_accum_steps = 2 is not divisible by the data x fsdp devices"),
    ({"batch_size": 6, "mesh": {"data": 4, "fsdp": 1, "tensor": 1}}, "not divisible"),
    ({"siglip_checkpoint": "/nonexistent/siglip"}, "config.siglip_checkpoint /nonexistent/siglip: no such directory"),
    ({"resnet_checkpoint": "/nonexistent/resnet"}, "config.resnet_checkpoint /nonexistent/resnet: no such directory"),
    ({"warmup_steps": 5000}, "warmup_steps"),
    ({"compute_dtype": "float16"}, "compute_dtype"),
])
def test_bad_config_values_are_named(data_dir, tmp_path, overrides, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        pretrain.train(tiny_config(data_dir, **overrides), str(tmp_path))


def test_cli_reports_bad_config_in_one_line(tmp_path):
    result = subprocess.run([sys.executable, "-m", "cope_jax.main", "--config=configs/pretrain.py:tiny",
                             f"--workdir={tmp_path}", "--config.data_dir=/nonexistent/data"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines()[-1] == "error: config.data_dir /nonexistent/data: no such directory"


def test_unknown_variant_is_refused():
    with pytest.raises(ValueError, match="unknown variant"):
        pretrain_configs.get_config("huge")


def test_resnet_trunk_from_a_converted_checkpoint(data_dir, tmp_path):
    from cope_jax import checkpoints
    from cope_jax.models.resnet.modeling import ResNet

    trunk = ResNet(ResNetConfig.tiny(), rngs=nnx.Rngs(7))
    checkpoints.save(str(tmp_path / "resnet"), trunk)
    stage = pretrain.Stage(tiny_config(data_dir, resnet_checkpoint=str(tmp_path / "resnet")), str(tmp_path))
    model = nnx.merge(stage.graph, stage.params, stage.frozen, stage.rest)
    np.testing.assert_array_equal(np.asarray(model.delta_encoder.residual_trunk.conv1.kernel[...]), np.asarray(trunk.conv1.kernel[...]))


def _run_until_sigterm(flags, at_line):
    """Runs the CLI, sends SIGTERM once `at_line` is logged; returns the step it saved."""
    process = subprocess.Popen([sys.executable, "-m", "cope_jax.main", *flags], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    seen = []
    for line in process.stdout:
        seen.append(line)
        if line.startswith(at_line):
            process.send_signal(signal.SIGTERM)
            break
    output = "".join(seen) + process.communicate(timeout=300)[0]
    assert process.returncode == 0 and "SIGTERM: saving step" in output, output[-2000:]
    return int(output.split("SIGTERM: saving step ")[1].split()[0]), output


def test_sigterm_saves_and_checkpoints_move_between_1_and_8_devices(data_dir, tmp_path):
    """SIGTERM mid-run exits cleanly with a checkpoint of that step. A run written on 1 device
    resumes on 8 (and is stopped the same way), and `--mode=eval` restores that 8-device
    checkpoint on 1 device."""
    workdir = str(tmp_path / "run")
    flags = [f"--workdir={workdir}", "--config=configs/pretrain.py:tiny", f"--config.data_dir={data_dir}",
             "--config.log_every_steps=1", "--config.eval_every_steps=100000", "--config.eval_max_videos=1",
             "--config.total_steps=100000", "--config.checkpoint_every_steps=100000"]
    first, _ = _run_until_sigterm([*flags, "--config.mesh.data=1"], "step 3/")
    assert first >= 3 and os.path.isdir(os.path.join(workdir, "checkpoints", str(first)))
    second, output = _run_until_sigterm([*flags, "--config.mesh.data=8"], f"step {first + 2}/")
    assert f"resumed from step {first}" in output and second >= first + 2
    result = subprocess.run([sys.executable, "-m", "cope_jax.main", *flags, "--config.mesh.data=1", "--mode=eval"],
                            cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"evaluating step {second}" in result.stdout and "next-frame retrieval" in result.stdout, result.stdout[-2000:]


def test_frozen_siglip_from_a_converted_hf_checkpoint(data_dir, tmp_path):
    """The target tower comes from `python -m cope_jax.convert` output of an HF SiglipVisionModel,
    and its tokens are what the HF module computes."""
    import torch
    import transformers

    from cope_jax import convert

    hf_config = transformers.SiglipVisionConfig(image_size=64, patch_size=16, hidden_size=48, intermediate_size=96,
                                                num_hidden_layers=2, num_attention_heads=4)
    torch.manual_seed(0)
    hf = transformers.SiglipVisionModel(hf_config).eval()
    hf.save_pretrained(tmp_path / "hf")
    assert convert.main(["--source", str(tmp_path / "hf"), "--output", str(tmp_path / "jax")]) == 0
    stage = pretrain.Stage(tiny_config(data_dir, siglip_checkpoint=str(tmp_path / "jax")), str(tmp_path / "work"))
    rgb = next(iter(stage.loader))["rgb"][:2]
    ours = np.asarray(stage.siglip_tokens(stage.params, stage.frozen, stage.rest, rgb))
    pixels = torch.from_numpy((rgb.astype(np.float32) / 255 - 0.5) / 0.5).permute(0, 3, 1, 2)
    with torch.no_grad():
        reference = hf(pixel_values=pixels).last_hidden_state.numpy()
    np.testing.assert_allclose(ours, reference, atol=1e-4 * np.abs(reference).max())


def test_loader_is_deterministic_with_worker_processes(data_dir):
    from data_pipeline import loaders

    source = loaders.PairSource(data_dir)
    batches = []
    for workers in (2, 2, 0):  # grain batches inside each worker: the order depends on the worker count
        iterator = iter(loaders.pair_loader(source, global_batch_size=4, seed=3, workers=workers))
        batches.append([np.stack([b["video"], b["step"]], 1).tolist() for b in (next(iterator) for _ in range(5))])
    assert batches[0] == batches[1]
    all_pairs = sorted(map(tuple, source.pairs.tolist()))
    seen = [tuple(p) for batch in batches[0] for p in batch]
    assert len(set(seen)) == len(seen) and set(seen) <= set(all_pairs)  # a permutation: no repeats within an epoch
