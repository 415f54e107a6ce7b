"""Evaluation throughput: questions per second with and without the shared video prefix and batching.

    .venv/bin/python bench/bench_evaluate.py                  # ~3 minutes on 2 cores
    .venv/bin/python bench/bench_evaluate.py --videos 2 --questions-per-video 8

`cope_jax.evaluate` reads each video once and prefills its shared prefix (system prompt, visual
stream, time instruction) once; every question on it then prefills only its own words. Without
sharing, each question prefills its whole prompt. With batching (the default), a video's questions
also prefill their own words and decode together. All three runs answer the same questions with the same
model (the CPU model of bench_ttft.py: SigLIP at full width with fewer layers, the paper's
Δ-encoder with fewer layers, a Qwen2-0.5B-shaped LLM; random weights, fp32) after one warm-up run
that compiles every shape, and the answers are checked to be identical.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_ttft import make_clip, model_on_device, reduced_config  # noqa: E402
from common import machine  # noqa: E402

from cope_jax.evaluation import benchmark, questions as question_file  # noqa: E402
from cope_jax.video.settings import VideoSettings  # noqa: E402
from cope_jax.video.tokenizer import chatml_tokenizer  # noqa: E402
from data_pipeline import codec  # noqa: E402

QUESTIONS = ["Which way does the camera move?", "What is in the scene?", "Is anything moving?",
             "How long is the video?", "What colour dominates?", "Is it indoors?", "Is the camera still?",
             "What happens at the end?"]


def write_questions(path: str, videos: int, per_video: int) -> None:
    with open(path, "w") as f:
        for v in range(videos):
            for q in range(per_video):
                f.write(json.dumps({"id": f"v{v}q{q}", "video": f"clip{v}.mp4", "question": QUESTIONS[q % len(QUESTIONS)],
                                    "options": ["left", "right", "up", "down"], "answer": "B"}) + "\n")


MODES = {"batched": dict(share_prefix=True, batch_size=8), "shared": dict(share_prefix=True, batch_size=1),
         "alone": dict(share_prefix=False, batch_size=1)}
LABELS = {"batched": "shared per video, questions batched (`cope_jax.evaluate`)",
          "shared": "shared per video, one question at a time (`--batch-size 1`)", "alone": "whole prompt per question"}


def run(model, tokenizer, settings, questions, directory: str, output: str, mode: str, max_new_tokens: int) -> tuple[float, list]:
    started = time.perf_counter()
    benchmark.evaluate(model, tokenizer, settings, questions, directory, output, max_new_tokens=max_new_tokens,
                      progress=False, **MODES[mode])
    seconds = time.perf_counter() - started
    predictions = [json.loads(line) for line in open(os.path.join(output, benchmark.PREDICTIONS))]
    return seconds, sorted((p["id"], p["prediction"]) for p in predictions)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", type=int, default=3)
    p.add_argument("--questions-per-video", type=int, default=4)
    p.add_argument("--seconds", type=float, default=16.0, help="clip length (16: 2 GOPs of 8 steps at the defaults)")
    p.add_argument("--keyframes-per-gop", type=int, default=4, help="4: what CoPE-VideoLM is fine-tuned with (App. C)")
    p.add_argument("--max-new-tokens", type=int, default=8)
    p.add_argument("--vision-layers", type=int, default=4)
    p.add_argument("--delta-depth", type=int, default=1)
    p.add_argument("--llm-layers", type=int, default=24)
    p.add_argument("--vocab", type=int, default=151936)
    args = p.parse_args(argv)
    config = reduced_config(args)
    model = model_on_device(config, "float32")
    tokenizer = chatml_tokenizer(400)
    settings = VideoSettings(preprocessing=codec.Settings(size=config.vision.image_size), keyframes_per_gop=args.keyframes_per_gop)
    with tempfile.TemporaryDirectory() as work:
        for v in range(args.videos):
            make_clip(os.path.join(work, f"clip{v}.mp4"), args.seconds, 384)
        write_questions(os.path.join(work, "q.jsonl"), args.videos, args.questions_per_video)
        questions, _ = question_file.read_questions(os.path.join(work, "q.jsonl"))
        results = {}
        for mode in MODES:  # warm-up: compiles every shape each path uses
            run(model, tokenizer, settings, questions[: args.questions_per_video], work,
                os.path.join(work, f"warm-{mode}"), mode, args.max_new_tokens)
        for mode in MODES:
            results[mode] = run(model, tokenizer, settings, questions, work, os.path.join(work, f"out-{mode}"), mode,
                                args.max_new_tokens)
        assert results["batched"][1] == results["shared"][1] == results["alone"][1], "answers differ between modes"
        visual = json.load(open(os.path.join(work, "out-batched", benchmark.RESULTS)))["mean_visual_tokens"]
    n = len(questions)
    print(f"machine: {machine()}")
    print(f"model: reduced CoPE (SigLIP 1152 wide x {args.vision_layers} layers, Δ-encoder depth {args.delta_depth}, "
          f"Qwen2-0.5B shapes x {args.llm_layers} layers), fp32; {args.videos} videos x {args.questions_per_video} questions, "
          f"{visual:.0f} visual tokens per video ({args.keyframes_per_gop} keyframes per GOP), {args.max_new_tokens} new tokens")
    print(f"| prefill | seconds ({n} questions) | questions/s |\n|---|---|---|")
    for mode in MODES:
        print(f"| {LABELS[mode]} | {results[mode][0]:.1f} | {n / results[mode][0]:.3f} |")
    print(f"speed-up over whole prompts: shared {results['alone'][0] / results['shared'][0]:.2f}x, "
          f"batched {results['alone'][0] / results['batched'][0]:.2f}x; answers identical")

if __name__ == "__main__":
    main()
