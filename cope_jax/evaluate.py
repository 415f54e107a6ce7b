"""Evaluate a CoPE checkpoint on video questions.

    python -m cope_jax.evaluate --checkpoint ~/jax/cope-7b --questions perceptiontest.jsonl \
        --videos ~/data/perceptiontest/videos --output ~/eval/pt-1kf --keyframes-per-gop 1
    python -m cope_jax.evaluate ... --records ~/data/perceptiontest/primitives   # reuse preprocessing
    python -m cope_jax.evaluate ... --delta-mode zero --output ~/eval/pt-zero    # paper App. H.3

Questions are JSONL, one per line: {"id", "video" (a path under --videos), "question",
"options": ["...", ...] for multiple choice (absent: open-ended), "answer": "B" or the answer text}.
Multiple choice is asked as lmms-eval's PerceptionTest task asks it (the options as "A. ...", then
"Answer with the option's letter from the given choices directly.") and scored by the first
option letter standing alone in the answer; open-ended answers score by normalised exact match.

Each video is read once (from --records when it is preprocessed there, else from its file) and
its shared prefix (system prompt, visual stream, time instruction) is prefilled once; its questions
then continue from that KV cache, up to --batch-size of them prefilled and decoded together.
<output>/predictions.jsonl gets one line per question as it is answered (prediction, correct,
visual tokens, TTFT), so a rerun skips what is done; <output>/results.json holds the summary. Bad
rows and videos that fail to read are listed in predictions.jsonl with their reason, counted, and
never stop the run.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from cope_jax.errors import UserError
from cope_jax.video.switches import add_switch_arguments, switches_from_args


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cope_jax.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a CoPE checkpoint (cope_jax.convert, or <workdir>/model of stage 2)")
    parser.add_argument("--questions", required=True, help="JSONL questions (see above)")
    parser.add_argument("--videos", default=".", help="the directory the questions' video paths are under (default: .)")
    parser.add_argument("--records", default="", help="preprocessing output holding (some of) the videos; those are not re-read")
    parser.add_argument("--output", required=True, help="predictions.jsonl, results.json and settings.json go here; a rerun resumes")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions on one video answered together after its shared "
                        "prefix (default %(default)s; 1: one at a time; greedy answers are the same)")
    add_switch_arguments(parser)
    parser.add_argument("--sweep", default="", help='ablation grid: "paper" (keyframes per GOP 1/2/4, zero, keyframes_only, '
                        'fusion 15/10, dense 64) or settings like "keyframes_per_gop=1;delta_mode=zero;fusion=15" -> '
                        "one subdirectory each, sweep.md (table) and sweep.png (accuracy vs visual tokens)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from cope_jax import inference  # here, not above: --help answers without importing JAX and the models
    from cope_jax.evaluation import benchmark, questions as question_file  # (same reason)

    try:
        if args.limit < 0 or args.max_new_tokens < 1 or args.batch_size < 1:
            raise UserError("--limit must be >= 0, --max-new-tokens >= 1 and --batch-size >= 1")
        sweep = benchmark.parse_sweep(args.sweep) if args.sweep else None
        questions, problems = question_file.read_questions(args.questions)
        if args.limit:
            questions = questions[: args.limit]
        if not questions:
            raise UserError(f"--questions {args.questions}: no usable question ({len(problems)} malformed lines)")
        print(f"loading {args.checkpoint} ...", file=sys.stderr, flush=True)
        model, tokenizer, settings = inference.load(args.checkpoint, **switches_from_args(args))
        started = time.perf_counter()
        common = dict(records_dir=os.path.expanduser(args.records), max_new_tokens=args.max_new_tokens, problems=problems,
                      batch_size=args.batch_size,
                      checkpoint=os.path.abspath(os.path.expanduser(args.checkpoint)))
        if sweep:
            for setting in sweep:  # every setting checked before the first one runs
                benchmark.apply_setting(settings, setting)
            rows = benchmark.run_sweep(model, tokenizer, settings, sweep, questions, os.path.expanduser(args.videos),
                             os.path.expanduser(args.output), **common)
            print(open(os.path.join(os.path.expanduser(args.output), "sweep.md")).read(), end="")
            print(f"{len(rows)} settings in {time.perf_counter() - started:.1f}s -> {args.output}/sweep.md, sweep.png")
            return 0
        results = benchmark.evaluate(model, tokenizer, settings, questions, os.path.expanduser(args.videos),
                           os.path.expanduser(args.output), **common)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"accuracy {results['accuracy']:.2%} over {results['count']} questions ({results['failed']} failed), "
          f"{results['mean_visual_tokens']:.0f} visual tokens and TTFT {results['mean_ttft_s']:.3f}s on average, "
          f"{time.perf_counter() - started:.1f}s -> {os.path.join(args.output, benchmark.RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
