"""Stage 2: data (masks, budgets, mixtures, bad rows), optimisation (frozen, per-group rates),
sharding (8 devices = 1), exact resume after kill -9, and the exported checkpoint answering."""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
import yaml
from flax import nnx

from configs import finetune as finetune_configs
from cope_jax.errors import ConfigError
from conftest import assert_gradients_close, killed_run_script
from cope_jax import evaluation
from cope_jax.training import finetune, instruct, metrics, optimization
from cope_jax.training.demo import stage2_data
from cope_jax.video.settings import VideoSettings
from cope_jax.video.tokenizer import chatml_tokenizer
from data_pipeline import codec, preprocess, records

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ONE_DEVICE = {"data": 1, "fsdp": 1, "tensor": 1}


def tiny_config(**overrides):
    """The tiny variant at test size: 8 + 4 demo clips, a 10-step stage 1, 6 steps of stage 2."""
    config = finetune_configs.get_config("tiny")
    config.demo_clips, config.demo_eval_clips = 8, 4
    config.pretrain.total_steps, config.pretrain.warmup_steps = 10, 2
    config.pretrain.checkpoint_every_steps, config.pretrain.eval_every_steps = 10, 10
    config.pretrain.log_every_steps, config.pretrain.eval_max_videos = 5, 1
    config.total_steps, config.batch_size, config.log_every_steps = 6, 4, 2
    config.checkpoint_every_steps = 2
    config.mesh = ONE_DEVICE
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    """Demo clips + annotations and a short stage 1, made once: what tiny runs point at."""
    workdir = str(tmp_path_factory.mktemp("demo"))
    config = tiny_config()
    train_file, eval_file, data_dir = stage2_data(config, workdir)
    finetune.run_stage1(config, workdir, data_dir)
    return {"train": train_file, "eval": eval_file, "data_dir": data_dir, "stage1": os.path.join(workdir, "pretrain")}


def on_demo(demo, **overrides):
    """A tiny config reading the prepared demo data and stage 1 (no pipeline of its own)."""
    return tiny_config(annotations=demo["train"], data_dir=demo["data_dir"], delta_checkpoint=demo["stage1"],
                       run_pretrain=False, **overrides)


def settings_of(data_dir, **switches):
    return VideoSettings(preprocessing=codec.Settings.from_dict(records.read_manifest(data_dir)["settings"]), **switches)


def source_of(rows, data_dir, max_seq_len=512, **switches):
    return instruct.InstructSource(rows, data_dir, chatml_tokenizer(503), settings_of(data_dir, **switches),
                                   tokens_per_keyframe=6, tokens_per_p_step=10, max_seq_len=max_seq_len, size=64)


def row(video, *turns, **extra):
    roles = ["human", "gpt"] * len(turns)
    return {"id": video, "video": video + ".mp4", **extra,
            "conversations": [{"from": r, "value": t} for r, t in zip(roles, turns)]}


# ---------------------------------------------------------------------------- data


def test_loss_mask_decodes_to_exactly_the_assistant_turns(demo):
    video = instruct.read_annotations(demo["train"])[0]["id"]
    rows = [row(video, "<image>\nWhich way?", "B", "Are you sure?", "Yes, it moves right.")]
    source = source_of(rows, demo["data_dir"], keyframes_per_gop=1)
    example = source[0]
    tokenizer = chatml_tokenizer(503)
    supervised = tokenizer.decode(example["ids"][example["is_target"]])
    assert supervised == "B<|im_end|>Yes, it moves right.<|im_end|>"
    # Visual slots: the planned stream (1 keyframe + 11 P steps) right after "<|im_start|>user\n".
    assert example["is_visual"].sum() == 6 + 11 * 10
    text = tokenizer.decode(example["ids"][: example["length"]][~example["is_visual"][: example["length"]]])
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n\nThe video lasts for 4.00 seconds")
    assert "Which way?<|im_end|>\n<|im_start|>assistant\nB<|im_end|>\n<|im_start|>user\nAre you sure?" in text


def test_over_budget_drops_gops_uniformly_never_the_answer(demo, tmp_path):
    """4 GOPs of 3 steps (gop 30, fusion 10): a budget for 2 keeps 2 (first and last) and the whole
    answer; a budget below one GOP skips the row with its reason."""
    clip = os.path.join(os.path.dirname(demo["data_dir"]), "demo_videos", instruct.read_annotations(demo["train"])[0]["video"])
    data_dir = str(tmp_path / "gop30")
    assert preprocess.main(["--videos", clip, "--output", data_dir, "--size", "64", "--gop", "30", "--fusion", "10",
                            "--num-shards", "1", "--workers", "1", "--quiet"]) == 0
    video_id = os.path.splitext(os.path.basename(clip))[0]
    answer = "The camera moves to the right, slowly and steadily."
    rows = [row(video_id, "<image>\nWhere does it go?", answer)]
    full = source_of(rows, data_dir, max_seq_len=4096, keyframes_per_gop=1).examples[0]
    assert (full.max_gops, full.keyframes, full.p_steps) == (4, 4, 8)
    per_gop = 6 + 2 * 10
    budget = full.tokens - 2 * per_gop - 10  # room for 2 GOPs (the time instruction shrinks too)
    source = source_of(rows, data_dir, max_seq_len=budget, keyframes_per_gop=1)
    kept = source.examples[0]
    assert kept.max_gops == 2 and kept.keyframes == 2 and kept.tokens <= budget
    example = source[0]
    assert chatml_tokenizer(503).decode(example["ids"][example["is_target"]]) == answer + "<|im_end|>"
    assert "0.00s,0.33s,0.67s,3.00s,3.33s,3.67s" in chatml_tokenizer(503).decode(example["ids"][: example["length"]])
    both = rows + [row(video_id, "<image>\nQ?", "A")]
    one_gop = source_of(both, data_dir, max_seq_len=4096, keyframes_per_gop=1, max_gops=1).examples
    assert [e.max_gops for e in source_of(both, data_dir, max_seq_len=one_gop[0].tokens, keyframes_per_gop=1).examples] == [1, 1]
    short = source_of(both, data_dir, max_seq_len=one_gop[1].tokens, keyframes_per_gop=1)
    assert [e.row for e in short.examples] == [1]
    assert "tokens even with one GOP" in short.skipped[0]["reason"]


def test_rows_that_cannot_train_are_listed_with_reasons(demo):
    video = instruct.read_annotations(demo["train"])[0]["id"]
    rows = [row(video, "<image>\nQ?", "A"),
            row("not/there", "<image>\nQ?", "A"),
            row(video, "Q without placeholder?", "A"),
            row(video, "<image>\nQ?", "A", "dangling question"),
            {"id": "x", "video": video + ".mp4", "conversations": [{"from": "gpt", "value": "<image>\nA"}]},
            {"id": "y", "video": video + ".mp4", "conversations": []},
            "not an object",
            row(video, "<image>\nQ?", "A", extra=1)]
    source = source_of([dict(r, _file="f.json") if isinstance(r, dict) else {"_bad": r, "_file": "f.json"} for r in rows],
                       demo["data_dir"], keyframes_per_gop=1)
    assert len(source) == 2
    reasons = {entry["row"]: entry["reason"] for entry in source.skipped}
    assert "'not/there' is not in the preprocessing output" in reasons[1]
    assert "exactly one <image> placeholder" in reasons[2]
    assert "ends without an answer" in reasons[3]
    assert "must alternate" in reasons[4]
    assert reasons[5] == "no 'conversations' list"
    assert reasons[6].startswith("not a JSON object")


def test_json_jsonl_and_yaml_mixture(tmp_path):
    rows = [row(f"v{i}", "<image>\nQ?", "A") for i in range(10)]
    (tmp_path / "a.json").write_text(json.dumps(rows))
    (tmp_path / "b.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    mixture = {"datasets": [{"json_path": "a.json", "sampling_strategy": "first:3"},
                            {"json_path": "b.jsonl", "sampling_strategy": "end:20%"},
                            {"json_path": "a.json", "sampling_strategy": "random:4"},
                            {"json_path": "b.jsonl"}]}
    (tmp_path / "mix.yaml").write_text(yaml.safe_dump(mixture))
    ids = [r["id"] for r in instruct.read_annotations(str(tmp_path / "mix.yaml"), seed=1)]
    assert ids[:3] == ["v0", "v1", "v2"] and ids[3:5] == ["v8", "v9"]
    assert len(set(ids[5:9])) == 4 and ids[5:9] == sorted(ids[5:9]) and ids[9:] == [f"v{i}" for i in range(10)]
    assert ids == [r["id"] for r in instruct.read_annotations(str(tmp_path / "mix.yaml"), seed=1)]
    both = instruct.read_annotations(f"{tmp_path / 'a.json'},{tmp_path / 'b.jsonl'}")
    assert len(both) == 20
    (tmp_path / "bad.yaml").write_text(yaml.safe_dump({"datasets": [{"json_path": "a.json", "sampling_strategy": "some:3"}]}))
    with pytest.raises(instruct.AnnotationError, match=r"bad.yaml: datasets\[0\] sampling_strategy 'some:3'"):
        instruct.read_annotations(str(tmp_path / "bad.yaml"))
    (tmp_path / "broken.json").write_text("[{")
    with pytest.raises(instruct.AnnotationError, match="broken.json: not valid JSON"):
        instruct.read_annotations(str(tmp_path / "broken.json"))


# ---------------------------------------------------------------------------- config


@pytest.mark.parametrize("overrides,message", [
    ({"batch_size": 0}, "config.batch_size must be > 0"),
    ({"grad_accum_steps": 3}, "not divisible by config.grad_accum_steps 3"),
    ({"remat": "everything"}, "config.remat must be one of none, layer, dots"),
    ({"trainable": ["(unclosed"]}, "config.trainable: bad regex '(unclosed'"),
    ({"learning_rates": [("^a", -1.0)]}, "config.learning_rates entries must be (regex, rate > 0)"),
    ({"length_buckets": (128,)}, "the largest must be >= config.max_seq_len 512"),
    ({"init_checkpoint": "/nonexistent/ckpt"}, "config.init_checkpoint /nonexistent/ckpt: no such directory"),
    ({"annotations": "x.json"}, "config.annotations and config.data_dir go together"),
])
def test_bad_config_values_are_named(overrides, message, tmp_path):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace(")", r"\)")):
        finetune.Stage(tiny_config(**overrides), str(tmp_path / "work"))
    assert not os.path.exists(tmp_path / "work")  # nothing written before the config is valid


def test_all_config_problems_are_reported_together(tmp_path):
    with pytest.raises(ConfigError) as error:
        finetune.check_config(tiny_config(batch_size=0, remat="x", warmup_ratio=2.0))
    assert "config.batch_size" in str(error.value) and "config.remat" in str(error.value) and "warmup_ratio" in str(error.value)


# ---------------------------------------------------------------------------- optimisation


def test_frozen_parameters_carry_no_state_and_group_rates_apply(demo, tmp_path):
    """After one step: the tower (frozen) is untouched and has no optimizer state; Adam's first
    update is +-lr per element, so each group's largest change is its own rate."""
    config = on_demo(demo, frozen=["^vision_tower/"], learning_rate=1e-4,
                     learning_rates=[("^language_model/", 1e-3)], warmup_ratio=0.0, grad_clip_norm=1e9)
    stage = finetune.Stage(config, str(tmp_path))
    before = {optimization.path_name(p): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(nnx.state(stage.model(), nnx.Param))}
    assert not any(name.startswith("vision_tower/") for name, _ in _flat(stage.params))
    opt_state = optimization.init_optimizer_state(stage.tx, stage.params, stage.mesh)
    assert sum(x.size for x in jax.tree.leaves(opt_state)) <= 2 * sum(x.size for x in jax.tree.leaves(stage.params)) + 16
    params, _, _ = stage.step(stage.params, opt_state, next(iter(stage.loader)))
    after = {optimization.path_name(p): np.asarray(v.get_value())
             for p, v in nnx.to_flat_state(nnx.state(nnx.merge(stage.graph, params, stage.frozen, stage.rest), nnx.Param))}
    change = {name: np.abs(after[name] - before[name]).max() for name in before}
    assert max(v for k, v in change.items() if k.startswith("vision_tower/")) == 0
    assert max(v for k, v in change.items() if k.startswith("language_model/")) == pytest.approx(1e-3, rel=0.02)
    assert max(v for k, v in change.items() if k.startswith("delta_encoder/")) == pytest.approx(1e-4, rel=0.02)


def _flat(state):
    return [(optimization.path_name(p), v) for p, v in nnx.to_flat_state(state)]


def test_8_devices_fsdp_x_tensor_equal_1_device(demo, tmp_path):
    assert jax.device_count() == 8
    results = []
    for mesh in (ONE_DEVICE, {"data": 1, "fsdp": 4, "tensor": 2}):
        stage = finetune.Stage(on_demo(demo, mesh=mesh, batch_size=8), str(tmp_path / str(len(results))))
        batch = stage.device_batch(next(iter(stage.loader)))
        (loss, count), grads = stage.loss_and_grad(stage.params, stage.frozen, stage.rest, batch)
        if len(stage.mesh.devices.flat) == 8:
            sharded = [x for x in jax.tree.leaves(stage.params) if not x.sharding.is_fully_replicated]
            assert sharded, "no parameter is sharded on the 8-device mesh"
            # Adam's two moments of every sharded parameter are sharded like it (never replicated).
            opt_state = optimization.init_optimizer_state(stage.tx, stage.params, stage.mesh)
            moments = [x for x in jax.tree.leaves(opt_state) if not x.sharding.is_fully_replicated]
            assert len(moments) == 2 * len(sharded)
        results.append((float(loss), float(count), jax.device_get(grads)))
    (loss_1, count_1, grads_1), (loss_8, count_8, grads_8) = results
    assert count_8 == count_1 and loss_8 == pytest.approx(loss_1, rel=1e-5)
    assert_gradients_close(grads_8, grads_1)


def test_gradient_accumulation_equals_one_big_batch(demo, tmp_path):
    outputs = []
    for accumulation in (1, 2):
        stage = finetune.Stage(on_demo(demo, grad_accum_steps=accumulation), str(tmp_path / str(accumulation)))
        local = next(iter(stage.loader))
        if accumulation == 2:  # the summed gradients themselves (an Adam update of float-noise gradients is noise)
            batch = stage.device_batch(local)
            (total, count), grads = stage.loss_and_grad(stage.params, stage.frozen, stage.rest, batch)
            (total_2, count_2), grads_2 = jax.jit(lambda p: optimization.accumulate_gradients(
                stage.loss_and_grad, p, (stage.frozen, stage.rest), batch, 2))(stage.params)
            assert float(count_2) == float(count) and float(total_2) == pytest.approx(float(total), rel=1e-5)
            assert_gradients_close(grads_2, grads)
        opt_state = optimization.init_optimizer_state(stage.tx, stage.params, stage.mesh)
        _, _, step_metrics = stage.step(stage.params, opt_state, local)
        outputs.append((float(step_metrics["loss"]), float(step_metrics["grad_norm"])))
    assert outputs[1][0] == pytest.approx(outputs[0][0], rel=1e-5)
    assert outputs[1][1] == pytest.approx(outputs[0][1], rel=1e-5)


# ---------------------------------------------------------------------------- runs


KILL_AT_STEP_4 = killed_run_script("finetune")


def _losses(workdir):
    events = [f for f in os.listdir(os.path.join(workdir, "tensorboard"))]
    out = {}
    for name in sorted(events):
        for step, tag, value in metrics.read_scalars(os.path.join(workdir, "tensorboard", name)):
            if tag == "train/loss":
                out[step] = value
    return out


def test_killed_run_resumes_exactly_and_its_checkpoint_answers_through_chat(demo, tmp_path):
    config = on_demo(demo, record_data_order=True, eval_delta_modes=("cope",), eval_max_questions=1)
    overrides = {k: config[k] for k in ("annotations", "data_dir", "delta_checkpoint", "run_pretrain", "record_data_order",
                                         "total_steps", "batch_size", "log_every_steps", "checkpoint_every_steps",
                                         "demo_clips", "demo_eval_clips")}
    overrides["mesh"] = ONE_DEVICE
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    finetune.train(config, straight)
    run = subprocess.run([sys.executable, "-c", KILL_AT_STEP_4, repr(overrides), killed], cwd=REPO,
                         capture_output=True, text=True)
    assert run.returncode == -9, run.stderr[-2000:]
    assert not os.path.exists(os.path.join(killed, "model"))
    resumed = finetune.train(config, killed)
    assert resumed["step"] == 6
    straight_losses, resumed_losses = _losses(straight), _losses(killed)
    assert sorted(straight_losses) == [2, 4, 6]
    for step in (2, 4, 6):
        assert resumed_losses[step] == straight_losses[step]
    assert [json.loads(line)["examples"] for line in open(os.path.join(straight, "data_order.jsonl"))] == \
        [e for _, e in sorted({json.loads(line)["step"]: json.loads(line)["examples"]
                               for line in open(os.path.join(killed, "data_order.jsonl"))}.items())]
    video_id = instruct.read_annotations(demo["eval"])[0]["id"]
    chat = subprocess.run([sys.executable, "-m", "cope_jax.chat", "--checkpoint", os.path.join(killed, "model"),
                           "--record", demo["data_dir"], "--video-id", video_id, "--question", "Which way?",
                           "--max-new-tokens", "2", "--json"], cwd=REPO, capture_output=True, text=True)
    assert chat.returncode == 0, chat.stderr[-2000:]
    answer = json.loads(chat.stdout)
    assert answer["keyframes"] == 1 and answer["p_steps"] == 11 and answer["visual_tokens"] == 116
    meta = json.load(open(os.path.join(killed, "model", "model.json")))
    assert meta["step"] == 6 and meta["video"]["keyframes_per_gop"] == 1 and meta["delta_encoder"]["random"] is False


def test_cli_bad_value_is_one_line_and_eval_without_checkpoint_refuses(demo, tmp_path):
    base = [sys.executable, "-m", "cope_jax.main", "--config=configs/finetune.py:tiny", f"--workdir={tmp_path / 'w'}"]
    result = subprocess.run([*base, "--config.remat=all"], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and result.stderr.strip().splitlines() == [
        "error: config.remat must be one of none, layer, dots, got 'all'"]
    flags = [f"--config.annotations={demo['train']}", f"--config.data_dir={demo['data_dir']}",
             f"--config.delta_checkpoint={demo['stage1']}", "--config.run_pretrain=False", "--mode=eval"]
    result = subprocess.run([*base, *flags], cwd=REPO, capture_output=True, text=True)
    assert result.returncode == 1 and "no checkpoint to evaluate" in result.stderr.strip().splitlines()[-1]


def test_remat_policies_give_the_same_loss_and_gradients(demo, tmp_path):
    """Remat per layer of the tower (trained here), the Δ-encoder and the LLM changes memory, not values."""
    results = {}
    for remat in ("none", "layer", "dots"):
        stage = finetune.Stage(on_demo(demo, remat=remat, frozen=[]), str(tmp_path / remat))
        batch = stage.device_batch(next(iter(stage.loader)))
        (loss, _), grads = stage.loss_and_grad(stage.params, stage.frozen, stage.rest, batch)
        results[remat] = (float(loss), [np.asarray(g) for g in jax.tree.leaves(grads)])
    scale = max(np.abs(g).max() for g in results["none"][1])
    for remat in ("layer", "dots"):
        assert results[remat][0] == pytest.approx(results["none"][0], rel=1e-6)
        for a, b in zip(results["none"][1], results[remat][1]):
            np.testing.assert_allclose(b, a, atol=1e-6 * scale)


def test_mesh_and_evaluator_mistakes_stop_the_run_before_anything_is_written(tmp_path):
    uneven = tiny_config(mesh={"data": 3, "fsdp": 1, "tensor": 1})  # a batch of 4 does not split over 3 devices
    with pytest.raises(ConfigError, match=r"= 4 is not divisible by the data x fsdp devices \(3\)"):
        finetune.train(uneven, str(tmp_path / "w"))
    assert not (tmp_path / "w").exists()
    with pytest.raises(ConfigError, match="'retrieval' cannot evaluate a finetune run"):
        evaluation.for_config(tiny_config(evaluators=("retrieval",)))
