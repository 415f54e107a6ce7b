"""Live and long video: ingestion speed, question latency mid-stream, prefix reuse, memory vs length.

    .venv/bin/python bench/bench_live.py                                   # everything (hours: the 60-minute memory run)
    .venv/bin/python bench/bench_live.py --parts flops live                # (1) FLOPs + (1)-(3) measured, 128 s video
    .venv/bin/python bench/bench_live.py --parts memory --minutes 1 10     # (4) only, shorter lengths
    .venv/bin/python bench/bench_live.py --seconds 24 --minutes 0.5 1 --max-new-tokens 4   # a quick check

Settings are the paper's preprocessing (30 fps, GOP 240, fusion 30 = 8 steps per GOP, 384 px) with
1 keyframe per GOP (the other 7 steps P steps): one GOP = 210 + 7 x 10 = 280 visual tokens per 8 s.
The model is bench_ttft.py's REDUCED CPU model (full-width SigLIP so400m at 384 px with
--vision-layers layers, the paper's Δ-encoder with --delta-depth transformer layers per branch, a
Qwen2-0.5B-shaped LLM with --llm-layers layers; random weights, float32), with its RoPE context raised
to --context-tokens so an hour of video (126k tokens) is not refused. The video is synthetic (a
textured square moving over a still background, 384 x 384, 30 fps), encoded once to an H.264
MPEG-TS file before any timing (frames made one at a time, so an hour costs no memory).

(1) ingestion ("live" part): the TS file is written into a pipe as fast as possible and read as
    `pipe:N` by `video.live.LiveStream` (decode, canonical MPEG-4 re-encode with motion vectors, a
    step per second, in its own thread) feeding `inference.LiveVideoChat` (each step as it arrives:
    stored as a record with the step before it and read back; then `VideoPrefix.append`: a keyframe
    through SigLIP and its 210 tokens, or a P step through the Δ-encoder and its 10 tokens, prefilled
    onto the KV cache). One question is asked
    mid-stream (--ask-at) and its answer time is taken out of the ingestion wall time. A first run
    compiles every shape (reported as "first run"); the second is timed. Split: the model
    (`prefix.timings`: batching, vision, Δ-encoder, prefill), step assembly on the consumer thread,
    and the rest (waiting for the codec thread). The codec chain alone (LiveStream + StepAssembler, no
    model) is timed separately, as is its rate. Goal: >= 1.0 s of video per wall second.
    ("flops" part) FLOPs per second of video at the real LLaVA-Video-7B shapes: one GOP = 1 keyframe
    through SigLIP (26 layers) + 7 P steps through the Δ-encoder (paper sizes) + the LLM (Qwen2-7B)
    appending 280 tokens onto a cache of P tokens, counted by XLA's cost analysis of the lowered
    computations on abstract weights (as bench_ttft.py does: direct attention, no loops; the cache
    attention is counted at two cache lengths to get its slope, then made causal analytically),
    divided by 8 s; against an H100's dense bf16 peak (989 TFLOP/s, NVIDIA's H100 SXM datasheet).
(2) the question asked mid-stream: its TTFT (fork the prefix, which holds every step that has
    arrived, prefill time instruction + question, first token) against a whole prefill of the same finished
    file: a fresh `VideoChat.ask` reading the file (`video_from_file`: decode + re-encode), encoding
    and prefilling it all. Both warm (after one run that compiled), once per --time-instruction mode
    (the live question asked once per mode at the same moment). Goal: ratio <= 0.05.
(3) second question against the first on the same video: through `cope_jax.serve`'s service over
    loopback HTTP (the second request reuses the prefix the first left in the server's LRU; TTFT =
    usage.ttft_s, from the request's arrival), and in-process: first = the fresh `VideoChat.ask` of
    (2); second = `fork()` of a chat after `prefill_video()`, asked a different question.
(4) ("memory" part) peak memory against video length: per --minutes value a FRESH subprocess builds
    the model, ingests the whole video through the live path (pipe -> LiveStream -> LiveVideoChat, no
    question; the feeder pauses while more than --queue-gops GOPs of events wait in the stream's
    queue, so the unbounded queue does not hold the video when the codec outruns the model) and
    reports its peak RSS (VmHWM, reset through /proc/self/clear_refs after the random init and again
    after the first GOP, whose compiles are shown apart), the KV cache bytes (`prefix.nbytes()`, the
    allocated cache) and peak - cache = working memory (the model's weights included; the RSS before
    ingesting is shown). Expected: working memory flat, cache linear. Progress goes to stderr. The
    60-minute run is long on a 2-core CPU with the 24-layer LLM (108k frames to preprocess, 450 GOPs
    whose prefill attends to a cache of up to 126k tokens: hours) and needs roughly 7 GiB (3 GiB of
    cache at 131,072 slots); with --llm-layers 2 it took 54 minutes here, beside other work.

Every part runs the measured work in a subprocess of its own (the parent prints the tables), so the
parent never holds a model and each RSS is its own. Timings on a shared 2-core machine vary by 2x
from run to run: rerun on a quiet one before quoting them.

LLaVA-Video's time instruction ("full") lists every step's timestamp (about 7 tokens per second of
video) and changes as the video grows, so every question prefills it: a live question's TTFT then
grows with the video, and the (2) ratio cannot fall far below (time-instruction tokens) / (visual +
time-instruction tokens). "duration" states the length and step count only (a few dozen tokens).
"""

from __future__ import annotations

import argparse
import dataclasses
import http.client
import json
import os
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from bench_ttft import add_reduced_model_arguments, describe, lowered_flops, model_on_device, reduced_config  # noqa: E402
from common import machine  # noqa: E402
from cope_jax.inference.prefix import Engine  # noqa: E402
from cope_jax.inference.session import VideoChat  # noqa: E402
from cope_jax.inference.generation import SamplingConfig  # noqa: E402
from cope_jax.inference.live import LiveVideoChat, Question  # noqa: E402
from cope_jax.models.attention import set_attention  # noqa: E402
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM  # noqa: E402
from cope_jax.models.qwen2.modeling import KVCache  # noqa: E402
from cope_jax.serving.http import make_server  # noqa: E402
from cope_jax.serving.service import MediaPolicy, Service  # noqa: E402
from cope_jax.video import prompt as prompts  # noqa: E402
from cope_jax.video.live import LiveStream, StepAssembler  # noqa: E402
from cope_jax.video.settings import VideoSettings  # noqa: E402
from cope_jax.video.stream import video_from_file  # noqa: E402
from cope_jax.video.switches import TIME_INSTRUCTIONS  # noqa: E402
from cope_jax.video.tokenizer import chatml_tokenizer  # noqa: E402
from data_pipeline import codec, synthetic  # noqa: E402

FPS, GOP, FUSION = 30, 240, 30
STEPS_PER_GOP = GOP // FUSION  # 8 steps = 8 s per GOP
GOP_SECONDS = GOP / FPS
H100_BF16_DENSE = 989e12  # NVIDIA H100 SXM datasheet: 989 TFLOPS dense BF16 Tensor Core (1,979 with sparsity)
QUESTION = "What happens in the video? Describe the motion."
SECOND_QUESTION = "Where is the square at the end of the video?"
LIVE_QUESTION = "What is happening right now?"


COMPILES = {"s": 0.0, "n": 0}  # XLA backend compiles so far in this process


def _count_compile(event: str, duration: float, **_) -> None:
    if event == "/jax/core/compile/backend_compile_duration":
        COMPILES["s"] += duration
        COMPILES["n"] += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compiled_since(snapshot: dict) -> dict:
    return dict(compile_s=COMPILES["s"] - snapshot["s"], compiles=COMPILES["n"] - snapshot["n"])


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- the video


class SquareFrames:
    """`synthetic.moving_square`'s clip (textured square over a still background, bouncing off the
    edges), made one frame at a time: an hour of 384 px frames would be 48 GB as a list."""

    def __init__(self, num_frames: int, size: int, dx: float = 1.5, dy: float = 0.75, seed: int = 1):
        self.num_frames, self.size, self.dx, self.dy = num_frames, size, dx, dy
        self.side = size // 4
        self.background = synthetic.texture(size, size, seed=seed)
        self.square = synthetic.texture(self.side, self.side, seed=seed + 1) // 2 + 128

    def __len__(self) -> int:
        return self.num_frames

    def __getitem__(self, i: int) -> np.ndarray:
        if not 0 <= i < self.num_frames:
            raise IndexError(i)
        limit = self.size - self.side

        def bounce(position: int) -> int:  # as synthetic.moving_square reflects at the edges
            position %= 2 * limit
            return position if position <= limit else 2 * limit - position

        y, x = bounce(round(8 + self.dy * i)), bounce(round(8 + self.dx * i))
        frame = self.background.copy()
        frame[y:y + self.side, x:x + self.side] = self.square
        return frame

    def __iter__(self):
        return (self[i] for i in range(self.num_frames))


def encode_stream(path: str, seconds: float, size: int) -> dict:
    """The synthetic clip as an H.264 MPEG-TS file (what a live encoder would send), made once."""
    started = time.perf_counter()
    synthetic.stream_mpegts(path, SquareFrames(int(round(seconds * FPS)), size), fps=FPS, gop=GOP, realtime=False)
    return dict(path=path, seconds=seconds, bytes=os.path.getsize(path), encode_s=time.perf_counter() - started)


def video_settings(args) -> VideoSettings:
    """The paper's preprocessing, 1 keyframe per GOP; every GOP of a file read (no uniform GOP sampling)."""
    return VideoSettings(preprocessing=codec.Settings(fps=float(FPS), gop=GOP, fusion=FUSION, size=args.size),
                         keyframes_per_gop=1, max_gops=10**9, time_instruction=args.time_instruction[0])


class PipeFeed:
    """The file written into a pipe as fast as the reader takes it; read as `source` ("pipe:N").
    `wait` (optional) is asked before each 64 KiB block and pauses the writer while it is true."""

    def __init__(self, path: str):
        self.path = path
        self.read, self.write = os.pipe()
        self.source = f"pipe:{self.read}"
        self.wait = None
        self.thread = threading.Thread(target=self._feed, daemon=True)

    def start(self, wait=None) -> "PipeFeed":
        self.wait = wait
        self.thread.start()
        return self

    def _feed(self) -> None:
        try:
            with open(self.write, "wb") as pipe, open(self.path, "rb") as f:
                while block := f.read(1 << 16):
                    while self.wait is not None and self.wait():
                        time.sleep(0.02)
                    pipe.write(block)
        except BrokenPipeError:
            pass

    def close(self) -> None:
        self.thread.join(timeout=10)
        try:
            os.close(self.read)
        except OSError:
            pass


def proc_status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (Linux: 5 > /proc/self/clear_refs); False where it cannot."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def mib(n_bytes: float) -> float:
    return n_bytes / 2**20


def timed_method(obj, name: str, totals: dict, key: str) -> None:
    """Wraps obj.name (an instance attribute shadowing the method) to add its wall time to totals[key]."""
    method = getattr(obj, name)

    def wrapper(*a, **k):
        clock = time.perf_counter()
        try:
            return method(*a, **k)
        finally:
            totals[key] = totals.get(key, 0.0) + time.perf_counter() - clock

    setattr(obj, name, wrapper)


# ---------------------------------------------------------------------------- (1) FLOPs at 7B


def part_flops(args) -> dict:
    """FLOPs of one GOP at the LLaVA-Video-7B shapes (abstract weights, XLA cost analysis)."""
    config = CoPEConfig.llava_video_7b()
    abstract = nnx.eval_shape(lambda: CoPEVideoLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    size, spec = config.vision.image_size, jax.ShapeDtypeStruct
    p_steps = STEPS_PER_GOP - 1
    tokens = config.tokens_per_keyframe + p_steps * config.tokens_per_p_step

    vision, loops = lowered_flops(lambda s, f: nnx.merge(graphdef, s).keyframe_token_table(f), state,
                                  spec((1, size, size, 3), jnp.uint8))
    assert not loops, "the vision tower has a loop: XLA's count would be wrong"
    delta, loops = lowered_flops(lambda s, mv, r: nnx.merge(graphdef, s).p_step_token_table(mv, r), state,
                                 spec((p_steps, size, size, 2), jnp.float32), spec((p_steps, size, size, 3), jnp.int16))
    assert not loops, "the Δ-encoder has a loop: XLA's count would be wrong"

    direct = nnx.merge(*nnx.split(abstract.language_model))
    set_attention(direct, "xla")  # no loop: XLA counts every (query, cache slot) score
    lm_graphdef, lm_state = nnx.split(direct)

    def append(s, embeds, slots: int):  # what VideoPrefix.append prefills: 280 tokens onto a cache of `slots`
        lm = nnx.merge(lm_graphdef, s)
        cache = KVCache.init(lm.config, 1, slots, embeds.dtype)
        return lm.forward_cached(embeds, jnp.ones(embeds.shape[:2], bool), cache, logits="last")[1]

    embeds = spec((1, tokens, config.text.hidden_size), jnp.float32)
    counts = {}
    for slots in (tokens, tokens + 8192):
        counts[slots], loops = lowered_flops(lambda s, e, n=slots: append(s, e, n), lm_state, embeds)
        assert not loops, "the direct-attention append has a loop: XLA's count would be wrong"
    (s1, x1), (s2, x2) = sorted(counts.items())
    slope = (x2 - x1) / (s2 - s1)  # FLOPs per cache slot attended by all `tokens` queries
    text = config.text
    # An append keeps only the cache: the last layer's attention output and MLP are dead code (jit drops
    # them, here and in VideoPrefix.append), so L - 1 layers' scores count.
    analytic_slope = 4 * tokens * text.num_attention_heads * text.head_dim * (text.num_hidden_layers - 1)
    linear = x1 - slope * s1  # weights (and the last position's logits, which the prefix drops)
    header = len(prompts.tokenize(chatml_tokenizer(), prompts.video_header_pieces(prompts.SYSTEM_PROMPT)))

    def llm_at(position: float) -> float:
        """The append's FLOPs after `position` cached tokens, causal: each new token sees the cache and
        the new tokens up to itself (what a kernel that skips the future computes)."""
        return linear + slope * (position + (tokens + 1) / 2)

    rows = []
    for label, gops in [("first GOP (empty cache)", 1)] + [(f"mean over {m:g} min", max(1, round(m * 60 / GOP_SECONDS)))
                                                           for m in args.minutes]:
        mean_position = header + tokens * (gops - 1) / 2
        llm = llm_at(mean_position)
        per_gop = vision + delta + llm
        rows.append(dict(label=label, gops=gops, mean_cache_tokens=mean_position, vision=vision, delta=delta, llm=llm,
                         per_gop=per_gop, per_second=per_gop / GOP_SECONDS,
                         h100_fraction=per_gop / GOP_SECONDS / H100_BF16_DENSE))
        log(f"flops: {label}: {per_gop / GOP_SECONDS / 1e12:.3f} TFLOP per second of video")
    return dict(model=describe(config, abstract, "abstract"), tokens_per_gop=tokens, header_tokens=header,
                slope_xla=slope, slope_analytic=analytic_slope, linear=linear, rows=rows)


def flops_table(r: dict) -> str:
    tf = lambda x: f"{x / 1e12:.3f}"  # noqa: E731
    lines = [f"One GOP = 1 keyframe + {STEPS_PER_GOP - 1} P steps = {r['tokens_per_gop']} tokens per {GOP_SECONDS:g} s. "
             f"LLM append: {tf(r['linear'])} TFLOPs of weights + {r['slope_xla'] / 1e9:.3f} GFLOPs per cached token "
             f"attended (XLA; analytic {r['slope_analytic'] / 1e9:.3f}: QKᵀ and PV of all layers but the last, whose "
             "output an append does not use and jit drops, as in `VideoPrefix.append`).", "",
             "| where in the video | mean cached tokens | SigLIP, 1 kf (TFLOPs) | Δ-encoder, 7 P (TFLOPs) | LLM append, causal (TFLOPs) "
             "| per GOP (TFLOPs) | **per second of video (TFLOP/s)** | of an H100's 989 TFLOP/s dense bf16 |",
             "|---|---|---|---|---|---|---|---|"]
    for row in r["rows"]:
        lines.append(f"| {row['label']} | {row['mean_cache_tokens']:,.0f} | {tf(row['vision'])} | {tf(row['delta'])} "
                     f"| {tf(row['llm'])} | {tf(row['per_gop'])} | **{tf(row['per_second'])}** | {row['h100_fraction']:.3%} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- the measured parts (child)


def build_model(args):
    config = reduced_config(args)
    config = dataclasses.replace(config, text=dataclasses.replace(config.text, max_position_embeddings=args.context_tokens))
    started = time.perf_counter()
    model = model_on_device(config, "float32")
    jax.block_until_ready(nnx.state(model))  # the init runs asynchronously: RSS after it, not before
    log(f"model built in {time.perf_counter() - started:.1f} s: {describe(config, model, 'float32')}")
    return config, model


def codec_alone(feed_path: str, settings: VideoSettings, stall: float) -> dict:
    """LiveStream + StepAssembler on the pipe, no model: the codec chain's own rate."""
    feed = PipeFeed(feed_path)
    stream = LiveStream(feed.source, settings.preprocessing, stall)
    feed.start()
    assembler, started, frames, steps, chunks, assemble_s = StepAssembler(settings, "pipe"), time.perf_counter(), 0, 0, 0, 0.0
    for event in stream.events():
        if event.kind == "error":
            raise RuntimeError(event.message)
        if event.kind == "frames":
            frames = event.frames
        elif event.kind == "step":
            steps += 1
            clock = time.perf_counter()
            chunks += assembler.add(event.step) is not None
            assemble_s += time.perf_counter() - clock
    wall = time.perf_counter() - started
    feed.close()
    return dict(video_s=frames / FPS, wall_s=wall, steps=steps, chunks=chunks, assemble_s=assemble_s, rate=frames / FPS / wall)


def live_run(model, engine, tokenizer, settings, path: str, args, label: str) -> dict:
    """One live ingestion of the file through a pipe with one question at --ask-at."""
    started = time.perf_counter()  # the prefix's header prefill (in the constructor) counts as model time
    feed = PipeFeed(path)
    stream = LiveStream(feed.source, settings.preprocessing, args.stall_seconds)
    live = LiveVideoChat(model, tokenizer, settings, stream, sampling=SamplingConfig(max_new_tokens=args.max_new_tokens),
                         engine=engine)
    consumer = {}
    timed_method(live.assembler, "add", consumer, "assemble_s")
    answers = []
    ask = live._ask

    def ask_counting_compiles(*a, **k):  # once per time instruction; the question's own compiles (a new prompt shape)
        for mode in args.time_instruction:
            live.settings = dataclasses.replace(settings, time_instruction=mode)
            snapshot = dict(COMPILES)
            ask(*a, **k)
            answers[-1].update(compiled_since(snapshot), mode=mode)
        live.settings = settings

    live._ask = ask_counting_compiles

    def on_answer(question, chat, pieces, lag_s):
        text = "".join(pieces)
        stats = chat.last
        answers.append(dict(question=question.text, at=question.at, ttft_s=stats.ttft_s, e2el_s=stats.e2el_s,
                            keyframes=stats.keyframes, p_steps=stats.p_steps, visual_tokens=stats.visual_tokens,
                            prompt_tokens=stats.prompt_tokens, video_seconds=stats.video_seconds, lag_s=lag_s,
                            answer_chars=len(text),
                            text_tokens=stats.prompt_tokens - stats.visual_tokens - live.prefix.header_tokens))

    cpu_started, run_compiles = time.process_time(), dict(COMPILES)
    feed.start()
    outcome = live.run([Question(LIVE_QUESTION, at=args.ask_at)], on_answer)
    wall = time.perf_counter() - started
    feed.close()
    if outcome.error:
        raise RuntimeError(outcome.error)
    answer_s = sum(a["e2el_s"] for a in answers)
    timings = dict(live.prefix.timings)
    model_s = sum(timings.values())
    ingest_wall = wall - answer_s
    row = dict(label=label, video_s=outcome.seconds, wall_s=wall, answer_s=answer_s, ingest_wall_s=ingest_wall,
               rate=outcome.seconds / ingest_wall, timings=timings, model_s=model_s,
               assemble_s=consumer.get("assemble_s", 0.0), waiting_s=ingest_wall - model_s - consumer.get("assemble_s", 0.0),
               model_rate=outcome.seconds / model_s, keyframes=live.prefix.keyframes, p_steps=live.prefix.p_steps,
               cache_tokens=len(live.prefix), cache_bytes=live.prefix.nbytes(), answers=answers,
               load=os.getloadavg()[0], cpu_s=time.process_time() - cpu_started, **compiled_since(run_compiles))
    if not answers:
        raise RuntimeError("the live question was not answered")
    log(f"live ({label}): {row['video_s']:.0f} s of video in {ingest_wall:.1f} s of ingestion = {row['rate']:.2f}x real time "
        f"(model {model_s:.1f} s, {row['compile_s']:.1f} s compiling); question at {args.ask_at:g} s over "
        f"{answers[0]['keyframes']} kf + {answers[0]['p_steps']} P: TTFT "
        + ", ".join(f"{a['ttft_s']:.2f} s ({a['mode']}, {a.get('compile_s', 0):.1f} s compiling)" for a in answers))
    return row


def whole_and_reuse(model, engine, tokenizer, settings, path: str, args) -> dict:
    """(2)/(3): a fresh VideoChat.ask reading the finished file, and a fork of a prefilled chat."""
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens)
    read = lambda: video_from_file(path, settings.preprocessing)  # noqa: E731
    new_chat = lambda mode=settings.time_instruction: VideoChat(  # noqa: E731
        model, tokenizer, dataclasses.replace(settings, time_instruction=mode), video=read, sampling=sampling,
        stop_at_eos=False, engine=engine)

    def ask(chat, question):
        snapshot = dict(COMPILES)
        for _ in chat.ask(question):
            pass
        chat.last.compiled = compiled_since(snapshot)
        return chat.last

    log("whole prefill: warm-up (compiles): prefill_video() + one fork per question")
    clock = time.perf_counter()
    base = new_chat()
    base.prefill_video()
    warm_first = ask(base.fork(), QUESTION)
    ask(base.fork(), SECOND_QUESTION)
    for mode in args.time_instruction[1:]:  # the other modes' time instructions compile their own lengths
        ask(new_chat(mode), QUESTION)
    warm_s = time.perf_counter() - clock
    fresh = {}
    for mode in args.time_instruction:
        log(f"whole prefill: timed fresh VideoChat.ask ({mode} time instruction)")
        fresh[mode] = ask(new_chat(mode), QUESTION), os.getloadavg()[0]
    first, first_load = fresh[settings.time_instruction]
    log(f"whole prefill: TTFT {first.ttft_s:.2f} s; timed reused prefix (VideoChat.fork)")
    second = ask(base.fork(), SECOND_QUESTION)
    log(f"reused prefix: TTFT {second.ttft_s:.3f} s")
    pick = lambda s: dict(text_tokens=s.prompt_tokens - s.visual_tokens - base.prefix.header_tokens, ttft_s=s.ttft_s, e2el_s=s.e2el_s, timings=dict(s.timings), keyframes=s.keyframes,  # noqa: E731
                          p_steps=s.p_steps, visual_tokens=s.visual_tokens, prompt_tokens=s.prompt_tokens,
                          video_seconds=s.video_seconds, **s.compiled)
    return dict(first=pick(first) | dict(load=first_load), second=pick(second) | dict(load=os.getloadavg()[0]), warm_up_s=warm_s, warm_first_ttft_s=warm_first.ttft_s,
                prefix_tokens=len(base.prefix), fresh={mode: pick(stats) | dict(load=load) for mode, (stats, load) in fresh.items()})


def server_questions(model, tokenizer, settings, path: str, args) -> dict:
    """(3) through `cope_jax.serve`'s service: two requests on the finished file, the second on the
    prefix the first left in the server's LRU. TTFTs are the replies' usage.ttft_s (request arrival
    to first token). One warm-up pair compiles; touching the file then makes the timed first a miss."""
    service = Service(model, tokenizer, settings, name="bench", media=MediaPolicy([os.path.dirname(path)]),
                      log=lambda line: None)
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"file://{os.path.abspath(path)}"

    def request(question):
        body = {"messages": [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                                          {"type": "text", "text": question}]}],
                "max_tokens": args.max_new_tokens}
        connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=3600)
        connection.request("POST", "/v1/chat/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
        reply = json.loads(connection.getresponse().read())
        connection.close()
        return reply["usage"]

    try:
        log("server: warm-up pair (compiles)")
        request(QUESTION), request(SECOND_QUESTION)
        os.utime(path)  # a new modification time: the timed first request prefills afresh
        log("server: timed first and second request")
        first, second = request(QUESTION), request(SECOND_QUESTION)
    finally:
        server.shutdown()
        server.server_close()
    return dict(first=first, second=second, cache=service.health()["prefix_cache"])


def rss_note(stage: str, notes: list) -> None:
    notes.append(dict(stage=stage, rss_mib=proc_status_kib("VmRSS") / 1024, peak_mib=proc_status_kib("VmHWM") / 1024))
    log(f"memory after {stage}: RSS {notes[-1]['rss_mib']:,.0f} MiB, peak so far {notes[-1]['peak_mib']:,.0f} MiB")


def child_measured(args) -> dict:
    settings = video_settings(args)
    tokenizer = chatml_tokenizer()
    notes = []
    config, model = build_model(args)
    engine = Engine(model)
    rss_note("building the model (random init)", notes)
    reset_peak()
    path = args.stream_file
    log(f"codec chain alone on {args.seconds:g} s")
    codec_row = codec_alone(path, settings, args.stall_seconds)
    log(f"codec chain alone: {codec_row['rate']:.1f}x real time")
    rss_note("the codec chain alone", notes)
    first = live_run(model, engine, tokenizer, settings, path, args, "first run (compiles)")
    rss_note("the first live run", notes)
    timed = live_run(model, engine, tokenizer, settings, path, args, "timed")
    rss_note("the timed live run", notes)
    whole = whole_and_reuse(model, engine, tokenizer, settings, path, args)
    rss_note("the whole prefills and forks", notes)
    served = server_questions(model, tokenizer, settings, path, args)
    rss_note("the server's requests", notes)
    return dict(model=describe(config, model, "float32"), codec=codec_row, live_first=first, live=timed, whole=whole,
                server=served, memory=notes)


def child_memory(args) -> dict:
    settings = video_settings(args)
    tokenizer = chatml_tokenizer()
    config, model = build_model(args)
    engine = Engine(model)
    build_peak = proc_status_kib("VmHWM") * 1024  # the random init's temporaries: not the ingestion's
    reset_peak()
    rss_before = proc_status_kib("VmRSS") * 1024
    feed = PipeFeed(args.stream_file)
    stream = LiveStream(feed.source, settings.preprocessing, args.stall_seconds)
    live = LiveVideoChat(model, tokenizer, settings, stream, engine=engine)
    limit = args.queue_gops * STEPS_PER_GOP * (FUSION + 1)  # a step's events: `fusion` frames + the step
    depth = {"max": 0}

    def backlog() -> bool:
        size = stream.queue.qsize()
        depth["max"] = max(depth["max"], size)
        return size > limit

    total_gops = int(args.minutes_child * 60 // GOP_SECONDS)
    started = time.perf_counter()
    append = live.prefix.append
    progress = {"steps": 0, "gops": 0, "last": started}

    def logged_append(chunk):  # one step at a time
        append(chunk)
        progress["steps"] += 1
        if progress["steps"] % STEPS_PER_GOP:
            return
        progress["gops"] += 1
        if progress["gops"] == 1:  # the first GOP compiles every encoder and the prefill: its peak apart
            progress["first_peak"] = proc_status_kib("VmHWM") * 1024
            progress["steady_from"] = reset_peak()
        now = time.perf_counter()
        if now - progress["last"] > args.progress_every or progress["gops"] == total_gops:
            progress["last"] = now
            log(f"memory {args.minutes_child:g} min: GOP {progress['gops']}/{total_gops}, "
                f"{progress['gops'] * GOP_SECONDS / 60:.1f} min of video in {now - started:.0f} s, "
                f"cache {len(live.prefix):,} tokens / {mib(live.prefix.nbytes()):,.0f} MiB, "
                f"RSS {proc_status_kib('VmRSS') / 1024:,.0f} MiB, peak {proc_status_kib('VmHWM') / 1024:,.0f} MiB")

    live.prefix.append = logged_append
    feed.start(wait=backlog)
    outcome = live.run([], lambda *a: None)
    wall = time.perf_counter() - started
    feed.close()
    if outcome.error:
        raise RuntimeError(outcome.error)
    steady = proc_status_kib("VmHWM") * 1024
    first = progress.get("first_peak", steady)
    if not progress.get("steady_from"):  # no reset: one peak for the whole run
        first = steady = max(first, steady)
    cache = live.prefix.nbytes()
    return dict(minutes=args.minutes_child, video_s=outcome.seconds, wall_s=wall, rate=outcome.seconds / wall,
                gops=progress["gops"], cache_tokens=len(live.prefix), cache_slots=int(live.prefix.cache.length),
                cache_bytes=cache, peak_bytes=max(first, steady), first_gop_peak_bytes=first, steady_peak_bytes=steady,
                end_rss_bytes=proc_status_kib("VmRSS") * 1024, build_peak_bytes=build_peak,
                rss_before_bytes=rss_before, working_bytes=steady - cache,
                max_queue_events=depth["max"], timings=dict(live.prefix.timings))


# ---------------------------------------------------------------------------- tables


def live_tables(m: dict) -> str:
    c, rows = m["codec"], [m["live_first"], m["live"]]
    lines = ["| run | video (s) | ingestion wall (s) | **× real time** | model: batch / SigLIP / Δ / prefill (s) | model (s) "
             "| model alone × real time | step assembly (s) | waiting for the stream (s) | cache tokens | process CPU (s) "
             "| XLA compiling (s) | load average after |", "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        t = r["timings"]
        lines.append(f"| live, {r['label']} | {r['video_s']:.0f} | {r['ingest_wall_s']:.1f} | **{r['rate']:.2f}** "
                     f"| {t['primitives_s']:.1f} / {t['vision_s']:.1f} / {t['delta_s']:.1f} / {t['prefill_s']:.1f} "
                     f"| {r['model_s']:.1f} | {r['model_rate']:.2f} | {r['assemble_s']:.1f} | {r['waiting_s']:.1f} "
                     f"| {r['cache_tokens']:,} | {r['cpu_s']:.0f} | {r['compile_s']:.1f} | {r['load']:.1f} |")
    lines.append(f"| codec chain alone (LiveStream + StepAssembler, no model) | {c['video_s']:.0f} | {c['wall_s']:.1f} "
                 f"| **{c['rate']:.2f}** | – | – | – | {c['assemble_s']:.1f} | – | – | – | – | – |")
    rate = m["live"]["rate"]
    lines += ["", f"Ingestion (timed run): **{rate:.2f}× real time** against the goal ≥ 1.0: "
              f"{'met' if rate >= 1.0 else 'NOT met'}. The question's answer "
              f"({m['live']['answer_s']:.1f} s) is taken out of the wall time."]
    return "\n".join(lines)


def question_table(m: dict) -> str:
    whole = m["whole"]["fresh"]
    row = lambda a, what: (f"| live, {what}, {a['mode']} time instruction, asked at {a['at']:g} s mid-stream (fork + "  # noqa: E731
                           f"time instruction + question) | {a['video_seconds']:.1f} | {a['keyframes']} + {a['p_steps']} "
                           f"| {a['prompt_tokens']:,} | {a['text_tokens']:,} | **{a['ttft_s']:.3f}** | {a.get('compile_s', 0):.1f} "
                           f"| lag behind the stream when asked {a['lag_s']:.1f} s |")
    lines = ["| question | video covered (s) | kf + P | prompt tokens | of which text (time instruction + question) "
             "| TTFT (s) | of which XLA compiling (s) | split |", "|---|---|---|---|---|---|---|---|"]
    lines += [row(a, "first run") for a in m["live_first"]["answers"]] + [row(a, "timed run") for a in m["live"]["answers"]]
    for mode, first in whole.items():
        t = first["timings"]
        lines.append(f"| whole prefill, {mode} time instruction: fresh `VideoChat.ask` on the finished file "
                     f"| {first['video_seconds']:.1f} | {first['keyframes']} + {first['p_steps']} | {first['prompt_tokens']:,} "
                     f"| {first['text_tokens']:,} | **{first['ttft_s']:.2f}** | {first.get('compile_s', 0):.1f} "
                     f"| reading + batching {t.get('primitives_s', 0):.2f}, SigLIP {t.get('vision_s', 0):.2f}, "
                     f"Δ {t.get('delta_s', 0):.2f}, prefill {t.get('prefill_s', 0):.2f} |")
    lines += ["", "Each step joins the prefix as it arrives, so the video is in the cache when the question comes; "
              "a question whose prompt length is new compiles its prefill (the first run)."]
    for live in m["live"]["answers"]:
        ratio = live["ttft_s"] / whole[live["mode"]]["ttft_s"]
        lines.append(f"\nLive TTFT / whole prefill, {live['mode']} time instruction (timed run) = **{ratio:.4f}** "
                     f"against the goal ≤ 0.05: {'met' if ratio <= 0.05 else 'NOT met'}.")
    lines.append(f"\nLoad average (1 min) after the live run {m['live']['load']:.1f}, after the whole prefills "
                 + ", ".join(f"{w['load']:.1f}" for w in whole.values())
                 + f" ({os.cpu_count()} cores): above the core count the times are inflated by other work.")
    return "\n".join(lines)


def reuse_table(m: dict) -> str:
    first, second = m["whole"]["first"], m["whole"]["second"]
    ratio = second["ttft_s"] / first["ttft_s"]
    return "\n".join([
        "| question | how | prompt tokens prefilled | TTFT (s) | of which XLA compiling (s) |", "|---|---|---|---|---|",
        f"| first | fresh `VideoChat.ask` (reads, encodes and prefills the video) | {first['prompt_tokens']:,} "
        f"| {first['ttft_s']:.2f} | {first.get('compile_s', 0):.1f} |",
        f"| second | reused prefix (VideoChat.fork): `fork()` after `prefill_video()`, another question "
        f"| {second['prompt_tokens'] - m['whole']['prefix_tokens']:,} of {second['prompt_tokens']:,} (what follows the prefix) "
        f"| {second['ttft_s']:.3f} | {second.get('compile_s', 0):.1f} |",
        "", f"Second / first = **{ratio:.4f}** (load average after each: {first['load']:.1f}, {second['load']:.1f}).",
        "", server_table(m["server"])])


def server_table(r: dict) -> str:
    first, second = r["first"], r["second"]
    ratio = second["ttft_s"] / first["ttft_s"]
    row = lambda name, u: (f"| {name} | {u['prefix_reused']} | {u['prompt_tokens']:,} | {u['visual_tokens']:,} "  # noqa: E731
                           f"| {u['ttft_s']:.3f} | {u['e2el_s']:.3f} |")
    return "\n".join([
        "Through `cope_jax.serve` (its service and HTTP layer in this process, a loopback connection):", "",
        "| request | usage.prefix_reused | prompt tokens | visual tokens | TTFT (s, arrival to first token) | E2EL (s) |",
        "|---|---|---|---|---|---|", row("first on the file", first), row("second on the file", second), "",
        f"Server second / first = **{ratio:.4f}** against the goal <= 0.05: {'met' if ratio <= 0.05 else 'NOT met'} "
        f"(prefix cache after: {r['cache']['entries']} entries, {r['cache']['bytes'] / 2**20:,.0f} MiB, "
        f"{r['cache']['hits']} hits)."])


def memory_table(rows: list[dict]) -> str:
    g = lambda b: f"{mib(b):,.0f}"  # noqa: E731
    lines = ["| video | GOPs ingested (s) | cache tokens (slots) | KV cache (MiB) | RSS before ingesting (MiB) "
             "| peak in the 1st GOP (compiles) (MiB) | **peak after it (MiB)** | **peak after it − cache = working (MiB)** "
             "| RSS at the end (MiB) | max queued events | wall (s) | × real time |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['minutes']:g} min | failed: {r['error']} |||||||||||")
            continue
        lines.append(f"| {r['minutes']:g} min | {r['gops']} ({r['gops'] * GOP_SECONDS:g}) | {r['cache_tokens']:,} "
                     f"({r['cache_slots']:,}) | {g(r['cache_bytes'])} | {g(r['rss_before_bytes'])} | {g(r['first_gop_peak_bytes'])} "
                     f"| **{g(r['steady_peak_bytes'])}** | **{g(r['working_bytes'])}** | {g(r['end_rss_bytes'])} "
                     f"| {r['max_queue_events']:,} | {r['wall_s']:.0f} | {r['rate']:.2f} |")
    ok = [r for r in rows if "error" not in r]
    if ok:
        lines += ["", "Peak while building the model (random init, before the reset): "
                  + ", ".join(f"{r['minutes']:g} min {g(r['build_peak_bytes'])} MiB" for r in ok) + "."]
    if len(ok) >= 2:
        a, b = ok[0], ok[-1]
        lines += ["", f"From {a['minutes']:g} to {b['minutes']:g} min: cache ×{b['cache_bytes'] / a['cache_bytes']:.1f} "
                  f"(GOPs ×{b['gops'] / a['gops']:.1f}), working memory {g(a['working_bytes'])} → {g(b['working_bytes'])} MiB "
                  f"({(b['working_bytes'] - a['working_bytes']) / 2**20:+,.0f}). The cache is allocated in doubling steps, so its "
                  "bytes follow the slots, not the tokens; growing it copies one layer at a time and frees the old "
                  "layer (`prefix.grow_cache`)."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- main


def run_child(args, kind: str, stream_file: str, extra: list[str]) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as f:
        out = f.name
    command = [sys.executable, os.path.abspath(__file__), *args.argv, "--child", kind, "--child-out", out,
               "--stream-file", stream_file, *extra]
    started = time.perf_counter()
    done = subprocess.run(command)
    try:
        if done.returncode != 0:
            return dict(error=f"exit status {done.returncode}", wall_s=time.perf_counter() - started)
        with open(out) as f:
            return json.load(f)
    finally:
        os.unlink(out)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 1)[1])
    p.add_argument("--parts", nargs="+", choices=("flops", "live", "memory"), default=["flops", "live", "memory"],
                   help="flops: (1) FLOPs per second of video at 7B; live: (1) ingestion, (2) live question, (3) reused "
                        "prefix, measured; memory: (4) peak memory per --minutes")
    p.add_argument("--seconds", type=float, default=128.0, help="video of the live part (s; a multiple of 8 is whole GOPs)")
    p.add_argument("--ask-at", type=float, help="when the live question is asked (s of video; default: --seconds - 4, "
                   "the middle of the last GOP)")
    p.add_argument("--minutes", type=float, nargs="+", default=[1.0, 10.0, 60.0], help="(4) video lengths, one fresh "
                   "process each (also the FLOP averages)")
    p.add_argument("--size", type=int, default=384, help="side of the synthetic video and the tower's input (384)")
    p.add_argument("--max-new-tokens", type=int, default=16, help="tokens generated per answer")
    add_reduced_model_arguments(p, "reduced model")
    p.add_argument("--context-tokens", type=int, default=131072, help="the reduced LLM's context (RoPE "
                   "max_position_embeddings; 60 min at 1 kf/GOP = 126k tokens, beyond Qwen2's 32k)")
    p.add_argument("--time-instruction", nargs="+", choices=TIME_INSTRUCTIONS, default=["full", "duration"],
                   help="(2) the live question and the whole prefill, once per mode (full: LLaVA-Video's, every step's "
                        "timestamp, ~7 tokens per second of video; duration: its length only); the first mode is "
                        "also the rest's (default: %(default)s)")
    p.add_argument("--queue-gops", type=float, default=2.0, help="(4) the feeder pauses while more than this many GOPs "
                   "of events wait in the stream's queue")
    p.add_argument("--stall-seconds", type=float, default=600.0, help="LiveStream's stall timeout")
    p.add_argument("--progress-every", type=float, default=30.0, help="(4) seconds between progress lines on stderr")
    p.add_argument("--work-dir", help="where the TS files go (default: a temporary directory)")
    p.add_argument("--json", help="also write every number to this JSON file")
    p.add_argument("--child", choices=("measured", "memory"), help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--stream-file", help=argparse.SUPPRESS)
    p.add_argument("--minutes-child", type=float, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.argv = [a for a in (sys.argv[1:] if argv is None else argv)]
    args.time_instruction = list(dict.fromkeys(args.time_instruction))  # each mode once
    if args.ask_at is None:
        args.ask_at = max(1.0, args.seconds - GOP_SECONDS / 2)
    if args.seconds <= 0 or not 0 < args.ask_at <= args.seconds or any(m <= 0 for m in args.minutes):
        p.error("--seconds and --minutes must be positive and --ask-at within the video")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.child:
        result = child_measured(args) if args.child == "measured" else child_memory(args)
        with open(args.child_out, "w") as f:
            json.dump(result, f, default=float)
        return 0
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    started = time.perf_counter()
    results = {"machine": machine(), "argv": args.argv, "date": time.strftime("%Y-%m-%d")}
    work = args.work_dir or tempfile.mkdtemp(prefix="bench_live_")
    os.makedirs(work, exist_ok=True)
    try:
        if "flops" in args.parts:
            log("(1) FLOPs at the LLaVA-Video-7B shapes (abstract weights)")
            results["flops"] = part_flops(args)
        if "live" in args.parts:
            clip = encode_stream(os.path.join(work, f"live_{args.seconds:g}s.ts"), args.seconds, args.size)
            log(f"live clip: {args.seconds:g} s, {clip['bytes'] / 2**20:.1f} MiB MPEG-TS, encoded in {clip['encode_s']:.1f} s")
            results["clip"] = clip
            results["measured"] = run_child(args, "measured", clip["path"], [])
            if "error" in results["measured"]:
                print(f"the measured part failed: {results['measured']['error']}", flush=True)
            os.unlink(clip["path"])
        if "memory" in args.parts:
            results["memory"] = []
            for minutes in args.minutes:
                clip = encode_stream(os.path.join(work, f"memory_{minutes:g}min.ts"), minutes * 60, args.size)
                log(f"memory {minutes:g} min: clip {clip['bytes'] / 2**20:.1f} MiB, encoded in {clip['encode_s']:.1f} s")
                row = run_child(args, "memory", clip["path"], ["--minutes-child", str(minutes)])
                row.setdefault("minutes", minutes)
                results["memory"].append(row)
                os.unlink(clip["path"])
    finally:
        if not args.work_dir:
            for name in os.listdir(work):
                os.unlink(os.path.join(work, name))
            os.rmdir(work)
    results["wall_s"] = time.perf_counter() - started
    print()
    print(f"machine: {results['machine']}; {results['date']}; command: bench/bench_live.py {' '.join(args.argv)}\n")
    if "flops" in results:
        print(f"### (1) FLOPs per second of video at the real 7B shapes\n\n{results['flops']['model']}\n")
        print(flops_table(results["flops"]) + "\n")
    m = results.get("measured")
    if m and "error" not in m:
        print(f"Reduced CPU model: {m['model']}; settings: {FPS} fps, GOP {GOP}, fusion {FUSION}, {args.size} px, "
              f"1 keyframe per GOP; {args.seconds:g} s synthetic video fed through a pipe as fast as possible.\n")
        print(f"### (1) Ingestion speed, live path\n\n{live_tables(m)}\n")
        print(f"### (2) Question mid-stream vs whole prefill\n\n{question_table(m)}\n")
        print(f"### (3) Second question vs first on the same video\n\n{reuse_table(m)}\n")
        print("Memory of this process: " + "; ".join(f"after {n['stage']} RSS {n['rss_mib']:,.0f} MiB (peak {n['peak_mib']:,.0f})"
                                                   for n in m["memory"]) + ".\n")
    if "memory" in results:
        print(f"### (4) Peak memory vs video length (fresh process each, live path)\n\n{memory_table(results['memory'])}\n")
    print(f"wall time {results['wall_s']:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)
    failed = (m and "error" in m) or any("error" in r for r in results.get("memory", []))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
