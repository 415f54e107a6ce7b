"""Ask CoPE-VideoLM about a video.

    python -m cope_jax.chat --checkpoint ~/jax/cope-7b --video clip.mp4 --question "What happens?"
    python -m cope_jax.chat --checkpoint ~/jax/cope-7b --video clip.mp4          # multi-turn chat
    python -m cope_jax.chat --checkpoint ~/jax/cope-7b --video clip.mp4 --question "..." --json

The video (any file preprocessing reads: mp4, mkv, webm, mov, ...; B-frames, variable frame rate,
rotation) is turned into codec primitives in memory by the preprocessing code, at the settings
saved in the checkpoint; `--record DIR --video-id ID` reads one preprocessed by
`python -m data_pipeline.preprocess` instead. Keyframes go through SigLIP, the other sampled steps
through the Δ-encoder (8 Δ-tokens each), and the LLM answers from the interleaved stream.

The answer streams as it is generated and ends with a line of counts and timings: visual and text
tokens, time to first token (from the question to the first word; the first answer includes
reading the video and XLA compilation) and end-to-end latency. Without --question the chat is
interactive and keeps the KV cache between turns (an empty line or Ctrl-D ends it).

A CoPE checkpoint comes from `python -m cope_jax.convert --source <LLaVA-Video> --delta-encoder
<stage-1 workdir> --output DIR` or from stage-2 fine-tuning (<workdir>/model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from cope_jax.video.switches import add_switch_arguments, switches_from_args
from cope_jax.errors import UserError

EXIT_BAD_INPUT = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cope_jax.chat", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a CoPE checkpoint directory (model.json, params/, tokenizer files)")
    source = parser.add_argument_group("the video (one of)")
    source.add_argument("--video", help="a video file, preprocessed in memory")
    source.add_argument("--record", metavar="DIR", help="a preprocessing output directory (with --video-id)")
    source.add_argument("--video-id", help="the video's id in --record: its path under the input root, without extension")
    parser.add_argument("--question", help="ask once and exit; omitted: interactive multi-turn chat")
    add_switch_arguments(parser, "how the video is read (defaults: the checkpoint's settings; paper App. H)")
    generation = parser.add_argument_group("generation")
    generation.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default %(default)s)")
    generation.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)")
    generation.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when --temperature > 0 (default %(default)s)")
    generation.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help='print exactly one JSON object instead: {"answer", "visual_tokens", "prompt_tokens", '
                             '"generated_tokens", "ttft_s", "e2el_s", "keyframes", "p_steps"} (needs --question)')
    return parser


class UsageError(UserError, ValueError):
    pass


def check_arguments(args) -> None:
    if (args.video is None) == (args.record is None):
        raise UsageError("give either --video FILE or --record DIR --video-id ID")
    if args.record is not None and not args.video_id:
        raise UsageError("--record needs --video-id")
    if args.json and args.question is None:
        raise UsageError("--json needs --question (the interactive chat has no single answer)")
    if args.video is not None and not os.path.isfile(os.path.expanduser(args.video)):
        raise UsageError(f"--video {args.video}: no such file")
    if not os.path.isdir(os.path.expanduser(args.checkpoint)):
        raise UsageError(f"--checkpoint {args.checkpoint}: no such directory")
    if args.max_new_tokens < 1:
        raise UsageError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError(f"--temperature must be >= 0 and --top-p in (0, 1], got {args.temperature} and {args.top_p}")


def stats_line(stats) -> str:
    text_tokens = stats.prompt_tokens - stats.visual_tokens
    video = f" ({stats.keyframes} keyframes, {stats.p_steps} P steps)" if stats.visual_tokens else ""
    return (f"[{stats.visual_tokens} visual + {text_tokens} text tokens{video} · {stats.generated_tokens} generated · "
            f"TTFT {stats.ttft_s:.2f}s · E2EL {stats.e2el_s:.2f}s]")


def stats_json(answer: str, stats) -> dict:
    return {"answer": answer, "visual_tokens": stats.visual_tokens, "prompt_tokens": stats.prompt_tokens,
            "generated_tokens": stats.generated_tokens, "ttft_s": round(stats.ttft_s, 4), "e2el_s": round(stats.e2el_s, 4),
            "keyframes": stats.keyframes, "p_steps": stats.p_steps}


def open_chat(args, log):
    from cope_jax import checkpoints, inference  # here, not above: --help answers without importing JAX
    from cope_jax.inference.generation import SamplingConfig  # (same reason)
    from cope_jax.video.stream import video_from_file, video_from_records  # (same reason)

    switches = switches_from_args(args)
    log(f"loading {args.checkpoint} ...")
    model, tokenizer, settings = inference.load(args.checkpoint, **switches)
    delta = checkpoints.read_meta(os.path.abspath(os.path.expanduser(args.checkpoint))).get("delta_encoder", {})
    if delta.get("random") and settings.delta_mode == "cope" and not settings.dense_frames:
        log("NOTE: this checkpoint's Δ-encoder is RANDOM (converted without --delta-encoder): P steps carry no information")
    if args.video is not None:
        load_video = lambda: video_from_file(args.video, settings.preprocessing)  # noqa: E731
    else:
        load_video = lambda: video_from_records(os.path.expanduser(args.record), args.video_id)  # noqa: E731
    sampling = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)
    return inference.VideoChat(model, tokenizer, settings,
                               video=announced(load_video, args.video or args.video_id, settings.preprocessing, log),
                               sampling=sampling, seed=args.seed)


def announced(load_video, name: str, expected, log):
    """The video loader, saying what it does (a long video takes a while to turn into primitives)
    and when a record was preprocessed otherwise than the checkpoint expects."""

    def load():
        started = time.perf_counter()
        log(f"reading {name} (decode, canonical re-encode, motion vectors) ...")
        video = load_video()
        log(f"{name}: {len(video.timestamps)} steps, {video.duration:.1f}s of video, read in {time.perf_counter() - started:.1f}s")
        ours = (video.fps, video.gop, video.fusion)
        if ours != (expected.fps, expected.gop, expected.fusion):
            log(f"NOTE: {name} was preprocessed with fps {video.fps}, gop {video.gop}, fusion {video.fusion}; the "
                f"checkpoint expects {expected.fps}, {expected.gop}, {expected.fusion} (other fusions: paper App. H.5)")
        return video

    return load


def answer_once(chat, question: str, as_json: bool) -> None:
    pieces = []
    for text in chat.ask(question):
        pieces.append(text)
        if not as_json:
            print(text, end="", flush=True)
    if as_json:
        print(json.dumps(stats_json("".join(pieces), chat.last)))
    else:
        print(f"\n{stats_line(chat.last)}", flush=True)


def interactive(chat) -> None:
    print("Ask about the video (an empty line or Ctrl-D ends the chat).", file=sys.stderr)
    while True:
        try:
            question = input("you> ").strip()
        except EOFError:
            print(file=sys.stderr)
            return
        if not question:
            return
        print("cope> ", end="", flush=True)
        answer_once(chat, question, as_json=False)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        check_arguments(args)
        chat = open_chat(args, log)
        if args.question is not None:
            answer_once(chat, args.question, args.json)
        else:
            interactive(chat)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
