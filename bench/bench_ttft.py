"""Time to first token: CoPE vs dense 64 keyframes (paper §4.4, Fig. 4a).

    .venv/bin/python bench/bench_ttft.py                    # --part all: (a) measured on this CPU, (b) 7B FLOPs
    .venv/bin/python bench/bench_ttft.py --part flops       # (b) only (abstract weights, under a minute)
    .venv/bin/python bench/bench_ttft.py --part flops --flops-shapes reduced   # (b) for the CPU model of (a)
    .venv/bin/python bench/bench_ttft.py --part cpu --device gpu   # (a) at the real 7B shapes, bf16, on a GPU

The same video (a synthetic 64-second pan, 30 fps, GOP 240, fusion 30 = 8 steps per GOP, 8 GOPs)
is read four ways: the LLaVA-Video baseline (64 keyframes, 64 x 210 = 13,440 visual tokens) and
CoPE with 1, 2 and 4 keyframes per GOP (the rest P steps of 10 tokens).

(a) Measured through `cope_jax.inference.VideoChat`, the path chat and evaluation run, with
    random weights: per configuration one warm-up conversation (it compiles) and `--repeats` timed
    ones, each a fresh first turn that reads the video, encodes keyframes and P steps, prefills
    and generates exactly `--max-new-tokens` tokens (`stop_at_eos=False`). TTFT is split as
    VideoChat times it: primitives (planning + reading the preprocessed steps: JPEG decode,
    motion, residual), vision tower (+ projector, pooling), Δ-encoder, prefill. The clip is
    decoded and re-encoded into codec primitives once, before any timing (reported apart).
    On the CPU the model is reduced (float32): full-width SigLIP so400m at 384 px with
    `--vision-layers` of its 26 layers, the paper's Δ-encoder with `--delta-depth` transformer
    layers per branch (ResNet-18 trunk intact), and a Qwen2-0.5B-shaped LLM with `--llm-layers`.
    `--device gpu` uses the real LLaVA-Video-7B shapes instead, random bf16 weights created on the
    GPU (never on the host, never in fp32); without a GPU it refuses.
(b) FLOPs at the real 7B shapes, counted by XLA's cost analysis of the lowered computations on
    abstract weights (`nnx.eval_shape`; nothing is materialised): the vision tower for K
    keyframes, the Δ-encoder for P steps, and the LLM prefill over the whole prompt (logits of
    the last position only). XLA counts a loop body once, so the prefill is lowered with the
    direct ("xla") attention, which has no loop and counts the full T x T score matrix; the
    causal count (what a flash kernel that skips the future does) subtracts the masked part
    analytically. An analytic count cross-checks XLA's. `--flops-shapes reduced` counts the CPU
    model of (a) instead, to tell its FLOP mix from this CPU's speed at each part.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from common import machine  # noqa: E402
from cope_jax import accelerators, inference  # noqa: E402
from cope_jax.inference import generation  # noqa: E402
from cope_jax.inference.generation import SamplingConfig  # noqa: E402
from cope_jax.models.common import parameter_count  # noqa: E402
from cope_jax.models.cope.modeling import CoPEConfig, CoPEVideoLM, delta_for_tower  # noqa: E402
from cope_jax.models.attention import set_attention  # noqa: E402
from cope_jax.models.qwen2.modeling import KVCache, Qwen2Config  # noqa: E402
from cope_jax.models.siglip.modeling import SiglipVisionConfig  # noqa: E402
from cope_jax import compile as compile_mode  # noqa: E402 - starts no backend: --target sets it up first
from cope_jax.video import prompt as prompts  # noqa: E402
from cope_jax.video.settings import VideoSettings  # noqa: E402
from cope_jax.video.stream import Video, plan_video, video_from_file  # noqa: E402
from cope_jax.video.tokenizer import chatml_tokenizer  # noqa: E402
from data_pipeline import codec, synthetic  # noqa: E402

QUESTION = "What happens in the video? Describe the motion."
# Paper Fig. 4a (LLaVA-Video-7B vs CoPE-VideoLM-7B, one consumer GPU, 64 new tokens): TTFT, E2EL seconds.
PAPER = {"dense": (2.39, 3.78), 1: (0.33, 1.66), 2: (0.51, 1.71), 4: (0.90, 2.28)}


@dataclasses.dataclass(frozen=True)
class Setup:
    """One way of reading the video: `keyframes_per_gop` K (CoPE) or None (dense)."""

    keyframes_per_gop: int | None
    dense_frames: int

    @property
    def key(self):
        return "dense" if self.keyframes_per_gop is None else self.keyframes_per_gop

    @property
    def label(self) -> str:
        if self.keyframes_per_gop is None:
            return f"dense {self.dense_frames} kf (LLaVA-Video)"
        return f"CoPE {self.keyframes_per_gop} kf/GOP"

    def settings(self, size: int) -> VideoSettings:
        pre = codec.Settings(fps=30.0, gop=240, fusion=30, size=size)
        if self.keyframes_per_gop is None:
            return VideoSettings(preprocessing=pre, dense_frames=self.dense_frames)
        return VideoSettings(preprocessing=pre, keyframes_per_gop=self.keyframes_per_gop)


def setups(args) -> list[Setup]:
    return [Setup(None, args.dense_frames)] + [Setup(k, 0) for k in args.keyframes_per_gop]


# ---------------------------------------------------------------------------- models


def add_reduced_model_arguments(parser, where: str) -> None:
    """The reduced CPU model's sizes (`reduced_config`), the same flags in every benchmark using it."""
    parser.add_argument("--vision-layers", type=int, default=4, help=f"{where}: SigLIP layers (of 26)")
    parser.add_argument("--delta-depth", type=int, default=1, help=f"{where}: Δ-encoder transformer layers per branch (paper: 4)")
    parser.add_argument("--llm-layers", type=int, default=24, help=f"{where}: Qwen2-0.5B-shaped LLM layers (0.5B has 24)")
    parser.add_argument("--vocab", type=int, default=151936, help=f"{where}: LLM vocabulary (Qwen2-0.5B: 151936)")


def reduced_config(args) -> CoPEConfig:
    """The CPU model: SigLIP so400m widths at 384 px (27x27 patches -> 210 tokens per keyframe) with
    fewer layers, the paper's Δ-encoder with fewer transformer layers, a Qwen2-0.5B-shaped LLM."""
    vision = dataclasses.replace(SiglipVisionConfig.llava_video_tower(), num_hidden_layers=args.vision_layers)
    text = Qwen2Config(vocab_size=args.vocab, hidden_size=896, intermediate_size=4864,
                       num_hidden_layers=args.llm_layers, num_attention_heads=14, num_key_value_heads=2,
                       rope_theta=1_000_000.0, tie_word_embeddings=True, max_position_embeddings=32768)
    delta = dataclasses.replace(delta_for_tower(vision), depth=args.delta_depth)
    return CoPEConfig(vision=vision, text=text, delta=delta)


def model_on_device(config: CoPEConfig, dtype: str) -> CoPEVideoLM:
    """Random weights created by one jitted init on the default device, directly in `dtype`: the
    host never holds the parameters, and with dtype bfloat16 they never exist in fp32."""
    make = lambda: CoPEVideoLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0))  # noqa: E731
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    state = jax.jit(lambda: nnx.split(make())[1])()
    return nnx.merge(graphdef, state)


def require_gpu() -> None:
    try:
        jax.devices("gpu")
    except RuntimeError:
        sys.exit(f"bench_ttft.py: --device gpu needs a GPU, and JAX sees none (backend {jax.default_backend()}); "
                 "nothing was run")


def describe(config: CoPEConfig, model_or_abstract, dtype: str) -> str:
    v, t, d = config.vision, config.text, config.delta
    return (f"vision tower: SigLIP {v.hidden_size} wide, {v.num_hidden_layers} layers, {v.image_size} px "
            f"({v.patches_per_side}x{v.patches_per_side} patches, {config.tokens_per_keyframe} tokens/keyframe), "
            f"{parameter_count(model_or_abstract.vision_tower) / 1e6:.1f}M; "
            f"Δ-encoder: {d.depth} transformer layers per branch, width {d.width}, ResNet depths {d.resnet.depths}, "
            f"{parameter_count(model_or_abstract.delta_encoder) / 1e6:.1f}M; "
            f"LLM: Qwen2 hidden {t.hidden_size}, {t.num_hidden_layers} layers, {t.num_attention_heads}/"
            f"{t.num_key_value_heads} heads, MLP {t.intermediate_size}, vocab {t.vocab_size}, "
            f"{parameter_count(model_or_abstract.language_model) / 1e6:.1f}M; {dtype}")


# ---------------------------------------------------------------------------- the video


def make_clip(path: str, seconds: float, size: int) -> str:
    """A known-motion clip: the scene pans 1 px per frame to the right (H.264, 30 fps)."""
    frames = synthetic.pan(int(round(seconds * 30)), size, size, dx=1, dy=0, seed=0)
    return synthetic.write(path, frames, fps=30)


def planned_video(seconds: float, size: int) -> Video:
    """The step structure of the clip without decoding it (for the FLOP count): one step per
    second, a GOP every 8 steps, exactly what preprocessing gives the clip."""
    steps = int(round(seconds))
    fields = dict(video_id="planned", source="planned", fps=30.0, gop=240, fusion=30, size=size,
                  is_gop_start=np.arange(steps) % 8 == 0, timestamps=np.arange(steps, dtype=np.float32), read=None)
    if "seconds" in {f.name for f in dataclasses.fields(Video)}:
        fields["seconds"] = float(steps)  # resampled frames / fps
    return Video(**fields)


def prompt_length(tokenizer, video: Video, settings: VideoSettings, config: CoPEConfig):
    """(keyframes, P steps, visual tokens, prompt tokens) exactly as VideoChat builds the first turn."""
    plan = plan_video(video, settings)
    visual = plan.num_keyframes * config.tokens_per_keyframe + plan.num_p_steps * config.tokens_per_p_step
    preamble = prompts.time_instruction(plan.duration, plan.timestamps, settings.time_instruction)
    pieces = prompts.conversation_pieces([("human", QUESTION)], preamble, add_generation_prompt=True)
    return plan.num_keyframes, plan.num_p_steps, visual, len(prompts.tokenize(tokenizer, pieces, visual))


# ---------------------------------------------------------------------------- (a) measured


def one_conversation(model, tokenizer, settings, video, max_new_tokens: int) -> inference.TurnStats:
    chat = inference.VideoChat(model, tokenizer, settings, video=lambda: video,
                               sampling=SamplingConfig(max_new_tokens=max_new_tokens), stop_at_eos=False)
    for _ in chat.ask(QUESTION):
        pass
    stats = chat.last
    if stats.generated_tokens != max_new_tokens:
        raise RuntimeError(f"generated {stats.generated_tokens} tokens, expected {max_new_tokens}")
    return stats


def measure(model, tokenizer, setup: Setup, video, args) -> dict:
    settings = setup.settings(video.size)
    first = one_conversation(model, tokenizer, settings, video, args.max_new_tokens)
    runs = [one_conversation(model, tokenizer, settings, video, args.max_new_tokens) for _ in range(args.repeats)]
    median = lambda f: statistics.median(f(r) for r in runs)  # noqa: E731
    row = dict(setup=setup.label, key=setup.key, keyframes=first.keyframes, p_steps=first.p_steps,
               visual_tokens=first.visual_tokens, prompt_tokens=first.prompt_tokens,
               ttft_s=median(lambda r: r.ttft_s), e2el_s=median(lambda r: r.e2el_s),
               first_ttft_s=first.ttft_s, runs=[dataclasses.asdict(r) | {"answer_ids": None} for r in runs])
    for name in ("primitives_s", "vision_s", "delta_s", "prefill_s"):
        row[name] = median(lambda r: r.timings[name])
    row["decode_s"] = row["e2el_s"] - row["ttft_s"]
    print(f"  {setup.label}: TTFT {row['ttft_s']:.2f} s (first run, compiling: {first.ttft_s:.1f} s), "
          f"E2EL {row['e2el_s']:.2f} s, {row['visual_tokens']} visual tokens", flush=True)
    return row


def part_measured(args, tokenizer) -> dict:
    if args.device == "gpu":
        require_gpu()
        config, dtype = CoPEConfig.llava_video_7b(), "bfloat16"
        model = model_on_device(config, dtype)
    else:
        config, dtype = reduced_config(args), "float32"
        model = model_on_device(config, dtype)
    print(f"(a) model: {describe(config, model, dtype)}", flush=True)
    with tempfile.TemporaryDirectory() as work:
        started = time.perf_counter()
        path = make_clip(os.path.join(work, "pan.mp4"), args.seconds, args.clip_size)
        made = time.perf_counter() - started
        started = time.perf_counter()
        video = video_from_file(path, codec.Settings(fps=30.0, gop=240, fusion=30,
                                                               size=config.vision.image_size))
        preprocess_s = time.perf_counter() - started
    print(f"(a) clip: {args.seconds:g} s pan at {args.clip_size}x{args.clip_size}, written in {made:.1f} s; "
          f"decoded and re-encoded into {len(video.timestamps)} steps of codec primitives once in {preprocess_s:.1f} s "
          "(not part of any TTFT below)", flush=True)
    rows = [measure(model, tokenizer, setup, video, args) for setup in setups(args)]
    dense = rows[0]
    for row in rows:
        row["ttft_ratio"] = row["ttft_s"] / dense["ttft_s"]
        row["e2el_ratio"] = row["e2el_s"] / dense["e2el_s"]
    return dict(device=jax.devices()[0].device_kind, backend=jax.default_backend(), dtype=dtype,
                model=describe(config, model, dtype), preprocess_s=preprocess_s, rows=rows)


def measured_table(result: dict) -> str:
    lines = ["| configuration | kf + P | visual tokens | prompt tokens | primitives (s) | vision (s) | Δ-encoder (s) "
             "| prefill (s) | TTFT (s) | TTFT / dense | E2EL (s) | E2EL / dense | paper TTFT / dense | paper E2EL / dense "
             "| 1st run TTFT (s, compiles) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    paper_dense = PAPER["dense"]
    for r in result["rows"]:
        paper = PAPER.get(r["key"])
        paper_cols = (f"{paper[0] / paper_dense[0]:.3f} | {paper[1] / paper_dense[1]:.3f}" if paper else "– | –")
        lines.append(f"| {r['setup']} | {r['keyframes']} + {r['p_steps']} | {r['visual_tokens']:,} | {r['prompt_tokens']:,} "
                     f"| {r['primitives_s']:.2f} | {r['vision_s']:.2f} | {r['delta_s']:.2f} | {r['prefill_s']:.2f} "
                     f"| {r['ttft_s']:.2f} | **{r['ttft_ratio']:.3f}** | {r['e2el_s']:.2f} | {r['e2el_ratio']:.3f} "
                     f"| {paper_cols} | {r['first_ttft_s']:.1f} |")
    return "\n".join(lines)


# ---------------------------------------------------------------------------- (b) FLOPs


def lowered_flops(fn, *args) -> tuple[float, bool]:
    """XLA's FLOP count of fn's lowered computation, and whether it holds a loop or a conditional
    (whose bodies XLA counts once, so the count would be wrong)."""
    lowered = jax.jit(fn).lower(*args)
    analysis = lowered.cost_analysis()
    analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
    text = lowered.as_text()
    return float(analysis["flops"]), ("stablehlo.while" in text or "stablehlo.case" in text)


def analytic_prefill(text: Qwen2Config, tokens: int) -> dict:
    """Matmul FLOPs of a prefill of `tokens` tokens with the logits of the last one only."""
    d, n, k, h, f, layers = (text.hidden_size, text.num_attention_heads, text.num_key_value_heads, text.head_dim,
                             text.intermediate_size, text.num_hidden_layers)
    weights = layers * (d * n * h + 2 * d * k * h + n * h * d + 3 * d * f)
    return dict(linear=2 * tokens * weights + 2 * d * text.vocab_size,
                attention_full=layers * 4 * tokens * tokens * n * h,  # QK^T and PV over every (query, key)
                attention_causal=layers * 4 * n * h * tokens * (tokens + 1) // 2)  # key <= query only


def part_flops(args, tokenizer) -> dict:
    config = CoPEConfig.llava_video_7b() if args.flops_shapes == "7b" else reduced_config(args)
    abstract = nnx.eval_shape(lambda: CoPEVideoLM(config, rngs=nnx.Rngs(0)))
    graphdef, state = nnx.split(abstract)
    size = config.vision.image_size
    video = planned_video(args.seconds, size)
    spec = jax.ShapeDtypeStruct

    def vision(s, frames):
        return nnx.merge(graphdef, s).keyframe_token_table(frames)

    def delta(s, mv, residual):
        return nnx.merge(graphdef, s).p_step_token_table(mv, residual)

    lm_graphdef, lm_state = nnx.split(abstract.language_model)
    direct = nnx.merge(lm_graphdef, lm_state)
    set_attention(direct, "xla")
    direct_graphdef = nnx.graphdef(direct)

    def prefill(s, embeds, graph=direct_graphdef):
        lm = nnx.merge(graph, s)
        cache = KVCache.init(lm.config, 1, embeds.shape[1], embeds.dtype)
        logits, _ = lm.forward_cached(embeds, jnp.ones(embeds.shape[:2], bool), cache, logits="last",
                                      empty_cache=True, unpadded=True)
        return logits.argmax(-1)

    rows = []
    for setup in setups(args):
        keyframes, p_steps, visual, prompt = prompt_length(tokenizer, video, setup.settings(size), config)
        vision_flops = delta_flops = 0.0
        if keyframes:
            vision_flops, loops = lowered_flops(vision, state, spec((keyframes, size, size, 3), jnp.uint8))
            assert not loops, "the vision tower has a loop: XLA's count would be wrong"
        if p_steps:
            delta_flops, loops = lowered_flops(delta, state, spec((p_steps, size, size, 2), jnp.float32),
                                               spec((p_steps, size, size, 3), jnp.int16))
            assert not loops, "the Δ-encoder has a loop: XLA's count would be wrong"
        prefill_xla, loops = lowered_flops(prefill, lm_state, spec((1, prompt, config.text.hidden_size), jnp.float32))
        assert not loops, "the direct-attention prefill has a loop: XLA's count would be wrong"
        analytic = analytic_prefill(config.text, prompt)
        prefill_causal = prefill_xla - analytic["attention_full"] + analytic["attention_causal"]
        # The same without LLaVA-Video's time instruction (64 timestamps are most of the text).
        short = prompt_length(tokenizer, video, dataclasses.replace(setup.settings(size), time_instruction="none"), config)[3]
        short_xla, _ = lowered_flops(prefill, lm_state, spec((1, short, config.text.hidden_size), jnp.float32))
        short_analytic = analytic_prefill(config.text, short)
        short_causal = short_xla - short_analytic["attention_full"] + short_analytic["attention_causal"]
        rows.append(dict(setup=setup.label, key=setup.key, keyframes=keyframes, p_steps=p_steps, visual_tokens=visual,
                         prompt_tokens=prompt, vision=vision_flops, delta=delta_flops, prefill_xla=prefill_xla,
                         prefill_causal=prefill_causal, analytic=analytic,
                         ttft=vision_flops + delta_flops + prefill_causal,
                         ttft_full_attention=vision_flops + delta_flops + prefill_xla,
                         short_prompt_tokens=short, ttft_short=vision_flops + delta_flops + short_causal))
        print(f"  {setup.label}: {rows[-1]['ttft'] / 1e12:.1f} TFLOPs to the first token", flush=True)
    dense = rows[0]
    for row in rows:
        row["ratio"] = row["ttft"] / dense["ttft"]
        row["ratio_full_attention"] = row["ttft_full_attention"] / dense["ttft_full_attention"]
        row["ratio_short"] = row["ttft_short"] / dense["ttft_short"]
    # What the product's own prefill path (chunked attention, scan + cond) looks like to XLA.
    chunked_graphdef = nnx.graphdef(abstract.language_model)
    chunked, _ = lowered_flops(lambda s, e: prefill(s, e, chunked_graphdef), lm_state,
                               spec((1, dense["prompt_tokens"], config.text.hidden_size), jnp.float32))
    return dict(shapes=args.flops_shapes, model=describe(config, abstract, "abstract"), rows=rows,
                chunked_dense_prefill=chunked)


def flops_table(result: dict) -> str:
    tf = lambda x: f"{x / 1e12:,.1f}"  # noqa: E731
    lines = ["| configuration | kf + P | visual tokens | prompt tokens | vision tower (TFLOPs) | Δ-encoder (TFLOPs) "
             "| prefill, causal (TFLOPs) | TTFT total (TFLOPs) | **TTFT FLOPs / dense** | same, full T² attention "
             "| same, no time instruction (prompt tokens) | paper TTFT / dense (measured) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    paper_dense = PAPER["dense"][0]
    for r in result["rows"]:
        paper = PAPER.get(r["key"])
        paper_col = f"{paper[0] / paper_dense:.3f}" if paper else "–"
        lines.append(f"| {r['setup']} | {r['keyframes']} + {r['p_steps']} | {r['visual_tokens']:,} | {r['prompt_tokens']:,} "
                     f"| {tf(r['vision'])} | {tf(r['delta'])} | {tf(r['prefill_causal'])} | {tf(r['ttft'])} "
                     f"| **{r['ratio']:.3f}** | {r['ratio_full_attention']:.3f} "
                     f"| {r['ratio_short']:.3f} ({r['short_prompt_tokens']:,}) | {paper_col} |")
    lines += ["", "LLM prefill cross-check (XLA, direct attention, full T x T scores, vs analytic matmul count):", "",
              "| configuration | prompt tokens | XLA (TFLOPs) | analytic: linear + full attention (TFLOPs) | XLA / analytic "
              "| attention share of the causal prefill |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        a = r["analytic"]
        analytic_full = a["linear"] + a["attention_full"]
        lines.append(f"| {r['setup']} | {r['prompt_tokens']:,} | {tf(r['prefill_xla'])} | {tf(analytic_full)} "
                     f"| {r['prefill_xla'] / analytic_full:.4f} | {a['attention_causal'] / (a['linear'] + a['attention_causal']):.1%} |")
    dense = result["rows"][0]
    lines += ["", f"The product's prefill path (chunked attention: scan over key blocks inside a scan over query blocks, "
              f"lax.cond skipping future blocks) lowered for the dense prompt counts {tf(result['chunked_dense_prefill'])} "
              f"TFLOPs: XLA counts each loop body once, so its attention is missing (direct path: "
              f"{tf(dense['prefill_xla'])})."]
    return "\n".join(lines)


# ---------------------------------------------------------------------------- (c) compiled for a target


def part_target(args, tokenizer) -> dict:
    """The 7B inference programs compiled for one chip of --target by that chip's own compiler
    (`--mode=compile`'s machinery): per setup the vision tower over its keyframes, the Δ-encoder
    over its P steps, the LLM prefill of the whole prompt and one decode step, bf16 weights, the
    platform's attention kernels; with --video-hours, the long video's LLM prefill appended
    --chunk-tokens at a time to a cache that holds all of it (`generation.append_chunk`)."""
    target = accelerators.parse(args.target)
    device = accelerators.devices(target)[0]
    config = CoPEConfig.llava_video_7b()
    dtype = jnp.bfloat16
    model = nnx.eval_shape(lambda: CoPEVideoLM(config, dtype=dtype, param_dtype=dtype, rngs=nnx.Rngs(0)))
    set_attention(model, "auto", platform=target.platform)
    on_chip = lambda tree: compile_mode.on_device(tree, device)  # noqa: E731
    spec = lambda shape, dt: on_chip(jax.ShapeDtypeStruct(shape, dt))  # noqa: E731
    graph, state = nnx.split(model)
    state = on_chip(state)
    lm_graph, lm_state = nnx.split(model.language_model)
    lm_state = on_chip(lm_state)
    size, width = config.vision.image_size, config.text.hidden_size
    weights = compile_mode.per_device_bytes(lm_state)  # the LLM programs read all of the language model
    sampling = SamplingConfig()
    rng = on_chip(jax.eval_shape(lambda: jax.random.key(0)))
    vision = jax.jit(lambda s, frames: nnx.merge(graph, s).keyframe_token_table(frames))
    delta = jax.jit(lambda s, mv, residual: nnx.merge(graph, s).p_step_token_table(mv, residual))

    def programs_for(label, keyframes, p_steps, prompt):
        frames = spec((keyframes, size, size, 3), jnp.uint8)
        mv, residual = spec((p_steps, size, size, 2), jnp.float32), spec((p_steps, size, size, 3), jnp.int16)
        cache = on_chip(jax.eval_shape(lambda: KVCache.init(config.text, 1, prompt + args.max_new_tokens, dtype)))
        embeds, mask = spec((1, prompt, width), dtype), spec((1, prompt), jnp.bool_)
        token = spec((1,), jnp.int32)
        inputs = compile_mode.per_device_bytes((cache, embeds))
        # The encoders read a fraction of the weights (the compiler's argument size tells which): not counted up front.
        encoders = [compile_mode.Program(f"{label}: vision tower, {keyframes} keyframes", lambda: vision.lower(state, frames),
                                         0, 0, compile_mode.per_device_bytes(frames))]
        if p_steps:  # the dense baseline has none
            encoders.append(compile_mode.Program(f"{label}: Δ-encoder, {p_steps} P steps",
                                                 lambda: delta.lower(state, mv, residual), 0, 0,
                                                 compile_mode.per_device_bytes((mv, residual))))
        return encoders + [compile_mode.Program(f"{label}: LLM prefill, {prompt:,} tokens", lambda: generation.prefill.lower(
                    lm_graph, lm_state, embeds, mask, cache, sampling, rng, True, True), weights, 0, inputs),
                compile_mode.Program(f"{label}: decode step", lambda: generation.decode_step.lower(
                    lm_graph, lm_state, token, cache, sampling, rng), weights, 0, inputs)]

    programs = []
    video = planned_video(args.seconds, size)
    for setup in setups(args):
        keyframes, p_steps, _, prompt = prompt_length(tokenizer, video, setup.settings(size), config)
        programs += programs_for(setup.label, keyframes, p_steps, prompt)
    long_video = None
    if args.video_hours:
        # LLaVA-Video's time instruction lists every sampled timestamp (28,800 for 8 hours): left out here.
        settings = dataclasses.replace(Setup(1, 0).settings(size), max_gops=10**9, time_instruction="none")
        keyframes, p_steps, visual, prompt = prompt_length(tokenizer, planned_video(args.video_hours * 3600, size), settings,
                                                           config)
        chunks = -(-prompt // args.chunk_tokens)
        cache = on_chip(jax.eval_shape(lambda: KVCache.init(config.text, 1, chunks * args.chunk_tokens, dtype)))
        embeds, mask = spec((1, args.chunk_tokens, width), dtype), spec((1, args.chunk_tokens), jnp.bool_)
        cache_bytes = compile_mode.per_device_bytes(cache)
        long_video = dict(hours=args.video_hours, keyframes=keyframes, p_steps=p_steps, visual_tokens=visual,
                          prompt_tokens=prompt, chunk_tokens=args.chunk_tokens, chunks=chunks, cache_bytes=cache_bytes)
        programs.append(compile_mode.Program(
            f"{args.video_hours:g} h video, 1 kf/GOP: prefill chunk of {args.chunk_tokens:,} into a {chunks * args.chunk_tokens:,}-slot cache",
            lambda: generation.append_chunk.lower(lm_graph, lm_state, embeds, mask, cache),
            compile_mode.per_device_bytes(lm_state), 0, cache_bytes + compile_mode.per_device_bytes(embeds)))
    rows = list(compile_mode.compile_all(programs, None, target, compile_mode.compile_workers(len(programs), target.platform)))
    if long_video:
        row = rows[-1]
        fixed = row["total"] - long_video["cache_bytes"]  # weights, one chunk's working memory
        long_video["total_bytes"] = row["total"]
        long_video["hours_that_fit"] = args.video_hours * (target.usable_bytes - fixed) / long_video["cache_bytes"]
    return dict(target=target.name, chip=target.chip.name, chip_bytes=target.chip.memory_bytes,
                usable_bytes=target.usable_bytes, rows=rows, long_video=long_video)


def target_table(result: dict) -> str:
    g = lambda n: f"{n / 2**30:.1f}"  # noqa: E731
    lines = [f"One {result['chip']} ({g(result['chip_bytes'])} GiB; programs must stay within {g(result['usable_bytes'])}):", "",
             "| program | weights read | inputs (cache, prompt, frames) | compiler temporaries | total (GiB) | fits | compile (s) "
             "| attention kernels |", "|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        kernels = "; ".join(f"{m}: {', '.join(compile_mode_kernel_names(k))}" for m, k in r.get("kernels", {}).items() if k) or "–"
        weights = r["arguments"] - r["batch"] if "arguments" in r else r["params"]  # jit drops the weights a program never reads
        lines.append(f"| {r['label']} | {g(weights)} | {g(r['batch'])} | {g(r.get('temporaries', 0))} | **{g(r['total'])}** "
                     f"| {'no' if 'failure' in r else 'yes'} | {r['compile_s']:.0f} | {kernels} |")
    long_video = result.get("long_video")
    if long_video:
        lines += ["", f"{long_video['hours']:g} hours at 1 keyframe per GOP: {long_video['keyframes']:,} keyframes + "
                  f"{long_video['p_steps']:,} P steps = {long_video['visual_tokens']:,} visual tokens, {long_video['prompt_tokens']:,} "
                  f"prompt tokens; KV cache {long_video['cache_bytes'] / 1e9:.1f} GB; prefilled in {long_video['chunks']:,} chunks of "
                  f"{long_video['chunk_tokens']:,}: {g(long_video['total_bytes'])} GiB in all by the compiler's plan; the cache "
                  f"that fits this chip holds {long_video['hours_that_fit']:.1f} hours."]
    return "\n".join(lines)


def compile_mode_kernel_names(kernels: dict) -> list[str]:
    return [f"{compile_mode.KERNEL_NAMES[k]} x{n}" for k, n in kernels.items()]


# ---------------------------------------------------------------------------- main


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog=__doc__.split("\n\n", 2)[2])
    p.add_argument("--part", choices=("cpu", "flops", "all"), default="all",
                   help="cpu: (a) measured latency (on --device); flops: (b) XLA FLOP count at the 7B shapes; all: both")
    p.add_argument("--device", choices=("cpu", "gpu"), default="cpu",
                   help="cpu: reduced fp32 model on this CPU; gpu: the real 7B shapes in bf16 on a GPU (refuses without one)")
    p.add_argument("--seconds", type=float, default=64.0, help="length of the synthetic clip (64: 8 GOPs of 8 steps)")
    p.add_argument("--clip-size", type=int, default=384, help="side of the synthetic clip in pixels (preprocessing "
                   "scales it to the tower's 384)")
    p.add_argument("--dense-frames", type=int, default=64, help="keyframes of the dense LLaVA-Video baseline")
    p.add_argument("--keyframes-per-gop", type=int, nargs="+", default=[1, 2, 4], help="CoPE settings to measure")
    p.add_argument("--max-new-tokens", type=int, default=64, help="tokens generated per answer (E2EL)")
    p.add_argument("--repeats", type=int, default=1, help="timed runs per configuration after one warm-up (median)")
    add_reduced_model_arguments(p, "(a) on the CPU")
    p.add_argument("--flops-shapes", choices=("7b", "reduced"), default="7b",
                   help="(b) counts the LLaVA-Video-7B shapes, or the reduced CPU model of (a) (same layer options)")
    p.add_argument("--target", help="(c) compile the 7B inference programs for one chip of this accelerator instead "
                   "(h100-1, h200-1, v5p-8, v6e-1, ...; run it with .venv-compile/bin/python, see `make compile-env`)")
    p.add_argument("--video-hours", type=float, default=0.0, help="(c) also the LLM prefill of a video this long at 1 "
                   "keyframe per GOP, appended in chunks (the paper's §4.4 long-video case: 8)")
    p.add_argument("--chunk-tokens", type=int, default=4096, help="(c) tokens appended to the cache per prefill chunk")
    p.add_argument("--json", help="also write every number to this JSON file")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.max_new_tokens < 1 or args.seconds <= 0:
        p.error("--repeats, --max-new-tokens and --seconds must be positive")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.target:
        return main_target(args)
    if args.device == "gpu" and args.part in ("cpu", "all"):
        require_gpu()
    print(f"machine: {machine()}; load average at start {os.getloadavg()[0]:.2f}", flush=True)
    tokenizer = chatml_tokenizer()
    started = time.perf_counter()
    results = {"machine": machine(), "argv": sys.argv[1:]}
    if args.part in ("cpu", "all"):
        print(f"(a) measured on {args.device}: warm-up + {args.repeats} timed run(s) per configuration", flush=True)
        results["measured"] = part_measured(args, tokenizer)
    if args.part in ("flops", "all"):
        shapes = "LLaVA-Video-7B shapes" if args.flops_shapes == "7b" else "reduced CPU model's shapes"
        print(f"(b) FLOPs at the {shapes} (XLA cost analysis, abstract weights)", flush=True)
        results["flops"] = part_flops(args, tokenizer)
    results["wall_s"] = time.perf_counter() - started
    print()
    if "measured" in results:
        m = results["measured"]
        print(f"### (a) measured: {m['device']} ({m['backend']}), {m['dtype']}\n\n{m['model']}\n")
        print(measured_table(m) + "\n")
    if "flops" in results:
        shapes = "the real 7B shapes" if args.flops_shapes == "7b" else "the reduced CPU model's shapes"
        print(f"### (b) FLOPs at {shapes}\n\n{results['flops']['model']}\n")
        print(flops_table(results["flops"]) + "\n")
    print(f"wall time {results['wall_s']:.0f} s; load average at the end {os.getloadavg()[0]:.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1, default=float)


def main_target(args) -> int:
    try:
        accelerators.parse(args.target)
    except accelerators.TargetError as e:
        raise SystemExit(f"error: {e}") from None
    accelerators.compile_environment()
    print(f"machine: {machine()}; compiling for {args.target} (no such device here)", flush=True)
    result = part_target(args, chatml_tokenizer())
    print("\n" + target_table(result))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=float)
    return 1 if any("failure" in r for r in result["rows"]) else 0


if __name__ == "__main__":
    sys.exit(main())
