"""The CoPE token stream (docs/architecture.md §7): keyframes and P steps in time order, the switches, token
counts against the sampler and the paper's Tab. H.5, batching, and the prompt template."""


import jax.numpy as jnp
import numpy as np
import pytest
from conftest import assert_close
from flax import nnx

from cope_jax.video import prompt as prompts
from cope_jax.video.settings import VideoInputError, VideoSettings
from cope_jax.video.stream import Video, plan_video, video_batch
from cope_jax.video.tokenizer import chatml_tokenizer
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM
from data_pipeline import codec, sampler

SIZE = 70  # CoPEConfig.tiny(): 5x5 patches -> 3x3 pooled + newlines = 12 tokens per keyframe


def fake_video(num_steps: int, steps_per_gop: int = 8, size: int = SIZE, fusion: int = 30, seed: int = 0) -> Video:
    """A Video whose primitives are random arrays (the model does not care where they come from)."""
    rng = np.random.default_rng(seed)
    data = {"rgb": rng.integers(0, 256, (num_steps, size, size, 3), dtype=np.uint8),
            "mv": rng.normal(0, 8, (num_steps, size, size, 2)).astype(np.float32),
            "residual": rng.integers(-60, 60, (num_steps, size, size, 3)).astype(np.int16)}
    is_gop_start = np.arange(num_steps) % steps_per_gop == 0
    data["mv"][is_gop_start] = 0
    data["residual"][is_gop_start] = 0
    read = lambda steps: {k: v[np.asarray(steps)] for k, v in data.items()}  # noqa: E731
    return Video(video_id=f"v{seed}", source=f"fake{seed}.mp4", fps=30.0, gop=steps_per_gop * fusion, fusion=fusion,
                 size=size, is_gop_start=is_gop_start, timestamps=np.arange(num_steps, dtype=np.float32) * fusion / 30,
                 read=read, seconds=num_steps * fusion / 30)


def settings(**switches) -> VideoSettings:
    return VideoSettings(preprocessing=codec.Settings(size=SIZE), **switches)


@pytest.fixture(scope="module")
def model():
    return CoPEVideoLM(CoPEConfig.tiny(), rngs=nnx.Rngs(0))


@nnx.jit(static_argnames="zero_delta")
def encode_video(model, keyframes, mv, residual, token_source, zero_delta=False):
    return model.encode_video(keyframes, mv, residual, token_source, zero_delta)


def encode(model, videos, video_settings, **slots):
    """Videos -> (stream [B,L,D], batch, plans) through the host layout and encode_video."""
    plans = [plan_video(v, video_settings) for v in videos]
    cfg = model.config
    batch = video_batch(plans, [v.read(p.steps) for v, p in zip(videos, plans)], cfg.tokens_per_keyframe,
                        cfg.tokens_per_p_step, SIZE, **slots)
    stream = encode_video(model, batch.keyframes, batch.mv, batch.residual, batch.token_source,
                          zero_delta=video_settings.delta_mode == "zero")
    return np.asarray(stream), batch, plans


def test_every_step_a_keyframe_equals_the_dense_keyframe_path(model):
    """Op by op (eager, so both run the same kernels): the stream is the dense tokens, bit for bit."""
    video = fake_video(12)
    plan = plan_video(video, settings(dense_frames=12))
    assert plan.is_keyframe.all() and list(plan.steps) == list(range(12))
    cfg = model.config
    batch = video_batch([plan], [video.read(plan.steps)], cfg.tokens_per_keyframe, cfg.tokens_per_p_step, SIZE)
    stream = model.encode_video(jnp.asarray(batch.keyframes), jnp.asarray(batch.mv), jnp.asarray(batch.residual),
                                jnp.asarray(batch.token_source))
    dense = model.encode_keyframes((jnp.asarray(video.read(range(12))["rgb"], jnp.float32) / 255 - 0.5) / 0.5)
    np.testing.assert_array_equal(np.asarray(stream[0]), np.asarray(dense).reshape(-1, dense.shape[-1]))


def test_dense_frames_spread_uniformly_like_llava_video(model):
    plan = plan_video(fake_video(100), settings(dense_frames=8))
    np.testing.assert_array_equal(plan.steps, np.linspace(0, 99, 8).astype(int))
    assert plan_video(fake_video(5), settings(dense_frames=64)).steps.tolist() == [0, 1, 2, 3, 4]


def test_p_step_layout_is_motion_row_newline_residual_row_newline(model):
    video = fake_video(8)
    stream, _, plans = encode(model, [video], settings(keyframes_per_gop=1))
    tk, tp = model.config.tokens_per_keyframe, model.config.tokens_per_p_step
    assert tp == 10 and stream.shape[1] == tk + 7 * tp
    primitives = video.read([3])
    delta = nnx.jit(lambda m, mv, r: m.delta_encoder(mv, r))(model, primitives["mv"], primitives["residual"])[0]  # [8, d]
    projected = np.asarray(model.mm_projector(delta))
    newline = np.asarray(model.image_newline[...])
    expected = np.concatenate([projected[:4], newline[None], projected[4:], newline[None]])
    step3 = stream[0, tk + 2 * tp: tk + 3 * tp]  # steps 1, 2 come first
    assert_close(step3, expected, rtol_to_scale=1e-5, what="P step 3 tokens")


def test_zero_mode_zeroes_only_the_delta_encoder_output(model):
    video = fake_video(16)
    cope, _, plans = encode(model, [video], settings(keyframes_per_gop=2))
    zero, _, _ = encode(model, [video], settings(keyframes_per_gop=2, delta_mode="zero"))
    assert cope.shape == zero.shape
    is_key = np.concatenate([np.full(12 if k else 10, k) for k in plans[0].is_keyframe])
    np.testing.assert_array_equal(cope[0, is_key], zero[0, is_key])  # keyframes untouched
    projected_zero = np.asarray(model.mm_projector(jnp.zeros((8, model.config.delta.width))))
    newline = np.asarray(model.image_newline[...])
    p_step = np.concatenate([projected_zero[:4], newline[None], projected_zero[4:], newline[None]])
    assert_close(zero[0, ~is_key].reshape(-1, 10, zero.shape[-1]), np.broadcast_to(p_step, (12, 10, zero.shape[-1])),
                 rtol_to_scale=1e-6, what="zeroed P steps")
    assert not np.allclose(cope[0, ~is_key], zero[0, ~is_key])


def test_keyframes_only_drops_exactly_the_p_steps(model):
    video = fake_video(16)
    cope, _, plans = encode(model, [video], settings(keyframes_per_gop=2))
    only, _, only_plans = encode(model, [video], settings(keyframes_per_gop=2, delta_mode="keyframes_only"))
    is_key = np.concatenate([np.full(12 if k else 10, k) for k in plans[0].is_keyframe])
    np.testing.assert_array_equal(only[0], cope[0, is_key])
    np.testing.assert_array_equal(only_plans[0].steps, plans[0].steps[plans[0].is_keyframe])


def test_batch_of_two_videos_equals_each_alone(model):
    long, short = fake_video(20, seed=1), fake_video(9, seed=2)
    video_settings = settings(keyframes_per_gop=2)
    batch_stream, batch, _ = encode(model, [long, short], video_settings, keyframe_slots=8, p_step_slots=24)
    assert batch.keyframes.shape[0] == 8 and batch.mv.shape[0] == 24  # padded slots
    for row, video in enumerate([long, short]):
        alone, _, _ = encode(model, [video], video_settings)
        length = batch.lengths[row]
        assert length == alone.shape[1]
        assert_close(batch_stream[row, :length], alone[0], rtol_to_scale=1e-6, what=f"video {row}")
        assert not batch_stream[row, length:].any()  # padding is the zero row


@pytest.mark.parametrize("keyframes_per_gop,fusion,per_gop", [
    (1, 30, 280), (2, 30, 480), (4, 30, 880),
    # Tab. H.5's token counts (880 / 1760 / 2640 per GOP at fusion 30 / 15 / 10) are half the steps
    # as keyframes, although its caption says 1 keyframe per GOP; the counts are what we check.
    (8, 15, 1760), (12, 10, 2640), (1, 15, 360), (1, 10, 440)])
def test_token_counts_equal_the_sampler_and_the_paper(keyframes_per_gop, fusion, per_gop):
    config = CoPEConfig.llava_video_7b()
    assert (config.tokens_per_keyframe, config.tokens_per_p_step) == (210, 10)
    steps_per_gop = 240 // fusion
    video = fake_video(3 * steps_per_gop + 2, steps_per_gop, size=16, fusion=fusion)  # 3 full GOPs + a partial one
    plan = plan_video(video, settings(keyframes_per_gop=keyframes_per_gop))
    batch = video_batch([plan], [video.read(plan.steps)], 210, 10, 16)
    expected = sampler.sample_steps(video.is_gop_start, steps_per_gop, keyframes_per_gop).tokens()
    assert batch.lengths[0] == expected == 3 * per_gop + sampler.token_count(1, 1)


def test_paper_headline_token_ratio_64_seconds():
    """64 s at 1 step/s: dense 64 keyframes = 13,440 tokens; 1 keyframe/GOP = 8 x 280 = 2,240 (16.7%)."""
    video = fake_video(64, size=16)
    plans = {k: plan_video(video, settings(keyframes_per_gop=k)) for k in (1, 2, 4)}
    counts = {k: sampler.token_count(p.num_keyframes, p.num_p_steps) for k, p in plans.items()}
    dense = plan_video(video, settings(dense_frames=64))
    assert sampler.token_count(dense.num_keyframes, 0) == 13_440
    assert counts == {1: 2_240, 2: 3_840, 4: 7_040}
    assert counts[1] / 13_440 <= 0.17


def test_settings_are_checked():
    with pytest.raises(ValueError, match="keyframes_per_gop must be in 1..8"):
        settings(keyframes_per_gop=9).check()
    with pytest.raises(ValueError, match="delta_mode"):
        settings(delta_mode="off").check()
    roundtrip = VideoSettings.from_dict(settings(keyframes_per_gop=2).to_dict())
    assert roundtrip == settings(keyframes_per_gop=2)


def test_merge_visual_places_the_stream_at_the_placeholder_slots(model):
    visual = jnp.arange(2 * 3 * 64, dtype=jnp.float32).reshape(2, 3, 64)
    ids = jnp.asarray([[5, 0, 0, 0, 7, 8], [1, 5, 0, 0, 9, 9]])
    is_visual = jnp.asarray([[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]], bool)
    merged = np.asarray(model.merge_visual(ids, is_visual, visual))
    np.testing.assert_array_equal(merged[0, 1:4], visual[0])
    np.testing.assert_array_equal(merged[1, 2:4], visual[1, :2])
    np.testing.assert_array_equal(merged[0, 4], np.asarray(model.language_model.embed(jnp.asarray(7))))


# ---------------------------------------------------------------------------- prompt


def test_time_instruction_is_llava_videos():
    assert prompts.time_instruction(3.0, [0.0, 1.0, 2.0]) == (
        "The video lasts for 3.00 seconds, and 3 frames are uniformly sampled from it. These frames are located at "
        "0.00s,1.00s,2.00s.Please answer the following questions related to this video.")


def test_the_duration_time_instruction_leaves_out_the_steps_times_and_none_says_nothing():
    assert prompts.time_instruction(3.0, [0.0, 1.0, 2.0], "duration") == (
        "The video lasts for 3.00 seconds, and 3 frames are uniformly sampled from it. "
        "Please answer the following questions related to this video.")
    assert prompts.time_instruction(3.0, [0.0, 1.0, 2.0], "none") == ""
    with pytest.raises(ValueError, match="one of full, duration, none, got 'short'"):
        prompts.time_instruction(3.0, [0.0], "short")


def test_time_instruction_settings_take_the_modes_and_old_checkpoints_booleans():
    assert VideoSettings(time_instruction=True).time_instruction == "full"
    assert VideoSettings.from_dict({"time_instruction": False}).time_instruction == "none"
    assert VideoSettings().with_switches(time_instruction="duration").time_instruction == "duration"
    with pytest.raises(VideoInputError, match="time_instruction must be one of full, duration, none, got 'short'"):
        VideoSettings().with_switches(time_instruction="short")


def test_conversation_renders_qwen_1_5_chatml():
    pieces = prompts.conversation_pieces([("human", "What happens?"), ("gpt", "A dog runs."), ("human", "Why?")],
                                         "TIME", add_generation_prompt=True)
    assert "".join(p.text for p in pieces) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\n<image>\nTIME\nWhat happens?<|im_end|>\n"
        "<|im_start|>assistant\nA dog runs.<|im_end|>\n"
        "<|im_start|>user\nWhy?<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert [p.text for p in pieces if p.target] == ["A dog runs.<|im_end|>"]
    no_time = prompts.conversation_pieces([("human", "Q")], "")
    assert "".join(p.text for p in no_time).endswith("user\n<image>\nQ<|im_end|>\n")


def test_tokenized_prompt_marks_visual_slots_and_supervises_only_answers():
    tokenizer = chatml_tokenizer()
    pieces = prompts.conversation_pieces([("human", "What happens?"), ("gpt", "a helpful")], "")
    tokenized = prompts.tokenize(tokenizer, pieces, visual_tokens=7)
    assert tokenized.is_visual.sum() == 7 and not tokenized.ids[tokenized.is_visual].any()
    supervised = tokenizer.decode(tokenized.ids[tokenized.is_target].tolist())
    assert supervised == "a helpful<|im_end|>"
    assert set(prompts.stop_token_ids(tokenizer)) == {tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.eos_token_id}
