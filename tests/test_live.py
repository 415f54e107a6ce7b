"""Live and long video: the GOP-by-GOP prefix against a one-shot prefill, live GOPs against the
finished file's, `cope_jax.chat --live` on a real-time MPEG-TS stream, stalls, and a bounded cache."""

import dataclasses
import json
import os
import subprocess
import sys
import threading

import jax.numpy as jnp
import numpy as np
import pytest
from test_chat import cope_dir, delta_dir, loaded, source_dir  # noqa: F401 (fixtures)

from cope_jax import chat
from cope_jax.inference import VideoChat
from cope_jax.inference.generation import SamplingConfig, generate_from_embeddings
from cope_jax.inference.live import LiveVideoChat, Question
from cope_jax.inference.prefix import Engine, VideoPrefix
from cope_jax.video import prompt as prompts
from cope_jax.video.live import LiveStream, StepAssembler, open_options
from cope_jax.video.settings import VideoInputError
from cope_jax.video.stream import Chunk, plan_chunks, plan_video, video_batch, video_from_file
from data_pipeline import codec, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUESTION = "What happens in the video?"


@pytest.fixture(scope="module")
def stream_file(tmp_path_factory):
    """9 s of a moving square as H.264 MPEG-TS (4.5 GOPs of the checkpoint's 2 s)."""
    path = str(tmp_path_factory.mktemp("live") / "square.ts")
    synthetic.stream_mpegts(path, synthetic.moving_square(270, 112, 28, 1.5, 0.75), realtime=False)
    return path


def one_shot_answer(loaded, video, settings, question, n):
    """Greedy answer ids of the whole first prompt prefilled in one call (no prefix, no chunks)."""
    model, tokenizer, _ = loaded
    plan = plan_video(video, settings)
    cfg = model.config
    batch = video_batch([plan], [video.read(plan.steps)], cfg.tokens_per_keyframe, cfg.tokens_per_p_step, video.size)
    stream = model.encode_video(jnp.asarray(batch.keyframes), jnp.asarray(batch.mv), jnp.asarray(batch.residual),
                                jnp.asarray(batch.token_source))
    pieces = prompts.conversation_pieces([("human", question)], prompts.time_instruction(plan.duration, plan.timestamps),
                                         add_generation_prompt=True)
    tokenized = prompts.tokenize(tokenizer, pieces, int(batch.lengths[0]))
    embeds = model.merge_visual(jnp.asarray(tokenized.ids[None]), jnp.asarray(tokenized.is_visual[None]), stream)
    stop = prompts.stop_token_ids(tokenizer)
    ids = generate_from_embeddings(model.language_model, embeds, jnp.ones(embeds.shape[:2], bool),
                                   SamplingConfig(max_new_tokens=n, eos_token_id=stop))[0].tolist()
    return ids[: next((i for i, t in enumerate(ids) if t in stop), len(ids))]


@pytest.mark.parametrize("switches", [{}, {"keyframes_per_gop": 2}])
def test_chunked_prefill_answers_equal_the_one_shot_prefill(loaded, stream_file, switches):
    model, tokenizer, settings = loaded
    settings = dataclasses.replace(settings, **switches)
    video = video_from_file(stream_file, settings.preprocessing)
    assert len(list(plan_chunks(video, plan_video(video, settings)))) == 5  # 4 whole GOPs and half of one
    chat_ = VideoChat(model, tokenizer, settings, video=lambda: video, sampling=SamplingConfig(max_new_tokens=10))
    list(chat_.ask(QUESTION))
    assert chat_.last.answer_ids == one_shot_answer(loaded, video, settings, QUESTION, 10)
    assert len(chat_.last.answer_ids) >= 3


def test_a_finished_videos_prefix_ends_with_its_time_instruction(loaded, stream_file):
    """Every first question about a finished video starts with its time instruction, so the prefix
    holds it and a question prefills only its own words, answering as a whole prefill does."""
    model, tokenizer, settings = loaded
    video = video_from_file(stream_file, settings.preprocessing)
    chat_ = VideoChat(model, tokenizer, settings, video=lambda: video, sampling=SamplingConfig(max_new_tokens=8))
    chat_.prefill_video()
    prefix = chat_.video_prefix
    plan = plan_video(video, settings)
    tail = tokenizer.decode(prefix.ids[len(prefix) - prefix.tail_tokens:])
    assert prefix.tail_tokens > 0 and tail == f"\n{prompts.time_instruction(plan.duration, plan.timestamps)}\n"
    question = chat_.fork()
    list(question.ask(QUESTION))
    own = tokenizer.decode(question.ids[len(prefix): question.last.prompt_tokens])
    assert own == f"{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert question.last.answer_ids == one_shot_answer(loaded, video, settings, QUESTION, 8)


def pipe_from(path) -> tuple[str, int]:
    """The file written into a pipe by a thread -> (FFmpeg's name for the pipe, its read end)."""
    read, write = os.pipe()

    def feed():
        with open(write, "wb") as pipe, open(path, "rb") as f:
            pipe.write(f.read())

    threading.Thread(target=feed, daemon=True).start()
    return f"pipe:{read}", read


def live_chunks(path, settings):
    """The file streamed through a pipe into LiveStream + StepAssembler -> one chunk per step read."""
    source, read = pipe_from(path)
    stream, assembler, chunks = LiveStream(source, settings.preprocessing, 20), StepAssembler(settings, "pipe"), []
    for event in stream.events():
        assert event.kind != "error", event.message
        if event.kind == "step" and (chunk := assembler.add(event.step)) is not None:
            chunks.append(chunk)
    os.close(read)
    return chunks


@pytest.mark.parametrize("switches", [{}, {"keyframes_per_gop": 2}, {"delta_mode": "keyframes_only"}])
def test_live_steps_primitives_equal_the_finished_files(loaded, stream_file, switches):
    """Each live step, as it arrives, is the finished file's: its role, time and primitives."""
    settings = dataclasses.replace(loaded[2], **switches)
    video = video_from_file(stream_file, settings.preprocessing)
    expected, live = list(plan_chunks(video, plan_video(video, settings))), live_chunks(stream_file, settings)
    assert len(expected) == 5 and all(len(chunk.steps) == 1 for chunk in live)
    assert [c.gop for c in live] == [c.gop for c in expected for _ in c.steps]
    for name in ("steps", "is_keyframe", "timestamps"):
        assert np.array_equal(np.concatenate([getattr(c, name) for c in live]),
                              np.concatenate([getattr(c, name) for c in expected])), name
    for name in ("rgb", "mv", "residual"):
        ours = np.concatenate([c.primitives[name] for c in live])
        assert np.array_equal(ours, np.concatenate([c.primitives[name] for c in expected])), name


def test_live_cli_answers_at_6_and_12_seconds_of_a_real_time_stream(cope_dir, tmp_path):  # noqa: F811
    """`data_pipeline.synthetic` plays 14 s of MPEG-TS in real time into `chat --video - --live`."""
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    source = subprocess.Popen([sys.executable, "-m", "data_pipeline.synthetic", "--seconds", "14"], cwd=ROOT,
                              stdout=subprocess.PIPE)
    done = subprocess.run([sys.executable, "-m", "cope_jax.chat", "--checkpoint", cope_dir, "--video", "-", "--live",
                           "--question", "Where is the square?", "--at", "6", "--question", "Where did it go?", "--at", "12",
                           "--max-new-tokens", "4", "--json"], cwd=ROOT, stdin=source.stdout, capture_output=True,
                          text=True, env=env, timeout=600)
    source.wait(timeout=60)
    assert done.returncode == 0, done.stderr
    answers = [json.loads(line) for line in done.stdout.splitlines()]
    assert [round(a["video_seconds"]) for a in answers] == [6, 12]
    assert all(abs(a["video_seconds"] - at) < 0.05 and a["lag_s"] >= 0 for a, at in zip(answers, (6, 12)))
    # GOPs of 2 s, 1 step per second, 1 keyframe per GOP: 6 s = 6 steps = 3 keyframes + 3 P steps.
    assert [(a["keyframes"], a["p_steps"], a["visual_tokens"]) for a in answers] == [(3, 3, 90), (6, 6, 180)]
    assert "the stream ended after 14.0s of video; 2 answers" in done.stderr


def test_a_udp_stream_ends_by_silence(loaded):
    """UDP sends no end: the run takes `stall_seconds` of silence as the end, not as a stall."""
    import socket

    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.bind(("127.0.0.1", 0))
        url = f"udp://127.0.0.1:{probe.getsockname()[1]}"
    stream = LiveStream(url, loaded[2].preprocessing, stall_seconds=3)
    sender = threading.Timer(1.0, synthetic.stream_mpegts, (url, synthetic.moving_square(90, 112, 28, 1.5, 0.75)))
    sender.start()
    events = list(stream.events())
    sender.join()
    assert events[-1].kind == "end" and "taken as the stream's end" in events[-1].message
    assert [e.step.frame_index for e in events if e.kind == "step"] == [0, 30, 60]


def test_a_growing_file_is_read_to_its_last_frame(tmp_path):
    """A file still being written (by an encoder with B-frames) is followed as it grows; when no
    data came for the timeout it ends, and the frames the decoder held for reordering still come."""
    path, frames = str(tmp_path / "recording.ts"), synthetic.moving_square(90, 112, 28, 1.5, 0.75)
    open(path, "wb").close()
    recorder = threading.Thread(target=synthetic.stream_mpegts, args=(path, frames), kwargs={"b_frames": 3})
    recorder.start()
    settings = codec.Settings(size=112, gop=60)
    url, options = open_options(path, stall_seconds=2)
    read = len(list(codec.source_frames(url, settings, options)))
    recorder.join()
    assert read == len(list(codec.source_frames(path, settings))) == 90


def run_chat(capsys, *args):
    code = chat.main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


def test_a_stalled_stream_gives_one_line_and_the_answers_so_far(cope_dir, stream_file, capsys):  # noqa: F811
    """4 s of the stream arrive, then nothing: the question at 3 s is answered, the one at 8 s is not."""
    data = open(stream_file, "rb").read()
    read, write = os.pipe()
    written = threading.Event()

    def feed():
        os.write(write, data[: len(data) * 4 // 9])
        written.wait(30)  # the writer stays, silent, until the test ends
        os.close(write)

    threading.Thread(target=feed, daemon=True).start()
    try:
        code, out, err = run_chat(capsys, "--checkpoint", cope_dir, "--video", f"pipe:{read}", "--live",
                                  "--question", "What happens?", "--at", "3", "--question", "And then?", "--at", "8",
                                  "--stall-timeout", "3", "--max-new-tokens", "3", "--json")
    finally:
        written.set()
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, err
    assert "stalled" in errors[0] and "1 of 2 questions answered" in errors[0]
    assert [json.loads(line)["video_seconds"] for line in out.splitlines()] == [3.0]


def corrupted_after(data: bytes, fraction: float) -> bytes:
    """The stream with the H.264 payload of its TS packets after `fraction` scrambled (packet and
    PES headers kept): the decoder meets corrupt slices, as after a broken link."""
    data, rng = bytearray(data), np.random.default_rng(0)
    for at in range(int(len(data) * fraction) // 188 * 188, len(data) - 187, 188):
        if not data[at + 1] & 0x40:  # not the first packet of a PES
            data[at + 100: at + 188] = rng.integers(0, 256, 88, np.uint8).tobytes()
    return bytes(data)


def test_a_broken_stream_gives_one_line_and_the_answers_so_far(cope_dir, stream_file, capsys):  # noqa: F811
    read, write = os.pipe()

    def feed():
        with open(write, "wb") as pipe:
            pipe.write(corrupted_after(open(stream_file, "rb").read(), 1 / 3))

    threading.Thread(target=feed, daemon=True).start()
    code, out, err = run_chat(capsys, "--checkpoint", cope_dir, "--video", f"pipe:{read}", "--live", "--question",
                              "What happens?", "--at", "1", "--question", "And then?", "--at", "100", "--stall-timeout", "5",
                              "--max-new-tokens", "2", "--json")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1, err
    assert "corrupt stream near" in errors[0] and "1 of 2 questions answered" in errors[0]
    assert len(out.splitlines()) == 1


def test_typed_questions_are_answered_about_the_video_so_far(cope_dir, stream_file, monkeypatch, capsys):  # noqa: F811
    """Without --question, lines typed while the stream plays are questions; an empty line stops
    asking. The stream starts once the question was typed, which is then answered at the first step."""
    import io

    typed = threading.Event()

    class Keyboard(io.StringIO):
        def __next__(self):
            line = super().__next__()
            typed.set()
            return line

    read, write = os.pipe()

    def feed():
        typed.wait(120)
        with open(write, "wb") as pipe, open(stream_file, "rb") as f:
            pipe.write(f.read())

    threading.Thread(target=feed, daemon=True).start()
    monkeypatch.setattr(sys, "stdin", Keyboard("What happens?\n\nNot asked.\n"))
    code, out, err = run_chat(capsys, "--checkpoint", cope_dir, "--video", f"pipe:{read}", "--live", "--max-new-tokens", "3")
    assert code == 0, err
    assert out.count("you> What happens?") == 1 and "Not asked" not in out and out.count(" TTFT ") == 1
    assert "1 answer" in err and "Type a question" in err


# ---------------------------------------------------------------------------- bounded context


def synthetic_chunks(seconds: int, size: int, gop_steps: int = 2, seed: int = 0, per_step: bool = False):
    """`seconds` of random primitives, one step per second, GOPs of `gop_steps` steps (1 keyframe):
    a chunk per GOP (a file's), or per step (a live stream's)."""
    rng = np.random.default_rng(seed)
    primitives = {"rgb": rng.integers(0, 256, (gop_steps, size, size, 3), np.uint8),
                  "mv": rng.normal(0, 2, (gop_steps, size, size, 2)).astype(np.float32),
                  "residual": rng.integers(-20, 20, (gop_steps, size, size, 3)).astype(np.int16)}
    keyframe = np.arange(gop_steps) == 0
    for start in range(0, seconds, gop_steps):
        steps = np.arange(start, start + gop_steps, dtype=np.int32)
        parts = [slice(i, i + 1) for i in range(gop_steps)] if per_step else [slice(None)]
        for part in parts:
            yield Chunk(steps[part], keyframe[part], steps[part].astype(np.float32),
                        {name: value[part] for name, value in primitives.items()}, gop=start // gop_steps)


def test_max_context_tokens_keeps_a_60_minute_video_within_its_bound(loaded):
    """3,600 steps (1,800 GOPs of 30 tokens = 54,000 visual tokens) into a 600-token cache."""
    model, tokenizer, settings = loaded
    bound = 600
    prefix = VideoPrefix(Engine(model), tokenizer, max_tokens=bound, source="synthetic")
    lengths = set()
    for chunk in synthetic_chunks(3600, model.config.vision.image_size):
        prefix.append(chunk)
        lengths.add(prefix.cache.length)
        assert len(prefix) <= bound and int(prefix.cache.end) == len(prefix)
    prefix.seconds = 3600.0
    assert lengths == {bound}  # the cache never grew: one compiled shape
    assert prefix.evicted["gops"] == 1800 - len(prefix.held) and prefix.visual_tokens == 30 * len(prefix.held)
    assert int(prefix.cache.next_position[0]) == prefix.header_tokens + 1800 * 30  # positions kept
    kept = prefix.timestamps
    assert kept[-1] == 3599 and kept[0] == 3600 - len(kept)  # the newest GOPs stay
    chat_ = VideoChat(model, tokenizer, settings, sampling=SamplingConfig(max_new_tokens=4), max_context_tokens=bound,
                      prefix=prefix)
    list(chat_.ask(QUESTION))
    assert len(chat_.ids) <= bound and chat_.cache.length == bound
    instruction = prompts.time_instruction(3600.0, chat_.prefix.timestamps)
    assert instruction in tokenizer.decode([t for t, v in zip(chat_.ids, chat_.is_visual) if not v])
    assert f"{len(chat_.prefix.timestamps)} frames" in instruction and chat_.prefix.timestamps[-1] == 3599


def test_a_bounded_live_prefix_lets_whole_gops_go(loaded):
    """Steps arrive one by one; when the bound is reached the oldest GOP leaves whole (its keyframe
    and its P steps), so the cache always starts with a keyframe, and what is kept equals a file's
    GOP chunks appended under the same bound."""
    model, tokenizer, _ = loaded
    engine, size = Engine(model), model.config.vision.image_size
    per_step = VideoPrefix(engine, tokenizer, max_tokens=200, source="synthetic")  # a few GOPs of 4 steps
    for chunk in synthetic_chunks(40, size, gop_steps=4, per_step=True):
        per_step.append(chunk)
        assert len(per_step) <= 200 and per_step.held[0].keyframes == 1
    per_gop = VideoPrefix(engine, tokenizer, max_tokens=200, source="synthetic")
    for chunk in synthetic_chunks(40, size, gop_steps=4):
        per_gop.append(chunk)
    assert per_step.evicted == per_gop.evicted and per_step.evicted["gops"] > 0
    assert np.array_equal(per_step.timestamps, per_gop.timestamps) and per_step.ids == per_gop.ids
    np.testing.assert_allclose(np.asarray(per_step.cache.keys[0]), np.asarray(per_gop.cache.keys[0]), atol=1e-5)
    gop_tokens = per_gop.visual_tokens // len(per_gop.held)
    too_small = VideoPrefix(engine, tokenizer, max_tokens=per_gop.header_tokens + gop_tokens - 1, source="synthetic")
    with pytest.raises(VideoInputError, match="cannot hold .* raise it"):  # never a P step without its keyframe
        for chunk in synthetic_chunks(8, size, gop_steps=4, per_step=True):
            too_small.append(chunk)
    assert too_small.held[0].keyframes == 1 and too_small.evicted["gops"] == 0


def test_a_fork_that_grows_its_cache_leaves_the_prefix_usable(loaded):
    """A live question's fork may outgrow the cache it shares (then it updates its own in place);
    the prefix it came from goes on growing afterwards."""
    model, tokenizer, _ = loaded
    prefix = VideoPrefix(Engine(model), tokenizer, source="synthetic")  # 256 slots
    chunks = synthetic_chunks(40, model.config.vision.image_size)  # GOPs of 30 tokens
    for _ in range(7):
        prefix.append(next(chunks))
    fork = prefix.fork()
    fork.append(next(chunks))  # 22 + 8 x 30 > 256: the fork's first step grows its cache
    assert fork.cache.length > prefix.cache.length == 256
    prefix.append(next(chunks))
    assert len(prefix) == prefix.header_tokens + 240 == int(prefix.cache.end)
    assert len(fork) == fork.header_tokens + 240 == int(fork.cache.end)


def test_growing_an_own_cache_frees_its_old_layers_and_a_shared_one_is_kept(loaded):
    """Growing copies layer by layer and frees the old arrays (peak: one layer twice, not the whole
    cache), unless a fork still shares them."""
    model, tokenizer, _ = loaded
    prefix = VideoPrefix(Engine(model), tokenizer, source="synthetic")  # 256 slots
    chunks = synthetic_chunks(40, model.config.vision.image_size)
    for _ in range(7):
        prefix.append(next(chunks))
    shared, fork = prefix.cache, prefix.fork()
    fork.append(next(chunks))  # grows a copy: the prefix's arrays live on
    assert not any(k.is_deleted() for k in shared.keys) and fork.cache.length > 256
    own = fork.cache
    fork.make_room(fork.cache.length)  # its own cache now: grown in place
    assert all(k.is_deleted() and v.is_deleted() for k, v in zip(own.keys, own.values))
    fork.append(next(chunks))
    assert len(fork) == fork.header_tokens + 270 == int(fork.cache.end)


@pytest.mark.parametrize("mode", ["full", "duration"])
def test_a_live_question_prefills_only_its_time_instruction_and_words(loaded, stream_file, mode):
    """The steps are in the prefix when a question comes: it prefills its time instruction (LLaVA-
    Video's or the short one) and its words, and nothing else."""
    model, tokenizer, settings = loaded
    settings = dataclasses.replace(settings, time_instruction=mode)
    source, read = pipe_from(stream_file)
    live = LiveVideoChat(model, tokenizer, settings, LiveStream(source, settings.preprocessing, 20),
                         sampling=SamplingConfig(max_new_tokens=2))
    asked = []
    outcome = live.run([Question(QUESTION, at=5.0)], lambda q, chat, pieces, lag: asked.append(("".join(pieces), chat)))
    os.close(read)
    assert outcome.error is None and outcome.answered == 1
    chat_ = asked[0][1]
    prefix = live.prefix  # grown to the end since; the question's fork held the first 5 steps
    assert (chat_.last.keyframes, chat_.last.p_steps, chat_.last.video_seconds) == (3, 2, 5.0)
    visual = chat_.last.visual_tokens
    own = tokenizer.decode(chat_.ids[prefix.header_tokens + visual: chat_.last.prompt_tokens])
    instruction = prompts.time_instruction(5.0, [0.0, 1.0, 2.0, 3.0, 4.0], mode)
    assert own == f"\n{instruction}\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert ("located at" in own) == (mode == "full")


def test_a_video_beyond_the_context_is_refused_with_one_line(cope_dir, stream_file, monkeypatch, capsys):  # noqa: F811
    monkeypatch.setattr(Engine, "context", property(lambda self: 150))  # the clip: 22 header + 150 visual tokens
    code, out, err = run_chat(capsys, "--checkpoint", cope_dir, "--video", stream_file, "--question", QUESTION, "--json")
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and out == "", err
    assert "exceed the model's context of 150 tokens" in errors[0] and "--max-context-tokens" in errors[0]
    code, out, err = run_chat(capsys, "--checkpoint", cope_dir, "--video", stream_file, "--question", QUESTION, "--json",
                              "--max-context-tokens", "160", "--max-new-tokens", "2")
    assert code == 0, err
    result = json.loads(out)
    assert result["prompt_tokens"] + 2 <= 160 and 0 < result["visual_tokens"] < 150


def test_bounded_and_unbounded_answers_agree_when_the_video_fits(loaded, stream_file):
    model, tokenizer, settings = loaded
    video = video_from_file(stream_file, settings.preprocessing)
    answers = []
    for bound in (None, 4096):
        chat_ = VideoChat(model, tokenizer, settings, video=lambda: video, sampling=SamplingConfig(max_new_tokens=6),
                          max_context_tokens=bound)
        answers.append("".join(chat_.ask(QUESTION)))
        assert chat_.prefix.evicted["gops"] == 0
    assert answers[0] == answers[1]


def test_live_refuses_dense_frames(loaded):
    model, tokenizer, settings = loaded
    with pytest.raises(VideoInputError, match="dense-frames"):
        LiveVideoChat(model, tokenizer, dataclasses.replace(settings, dense_frames=4), stream=None)
