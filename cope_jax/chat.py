"""Ask CoPE-VideoLM about a video.

    python -m cope_jax.chat --checkpoint ~/jax/cope-7b --video clip.mp4 --question "What happens?"
    python -m cope_jax.chat --checkpoint ~/jax/cope-7b --video clip.mp4          # multi-turn chat
    python -m cope_jax.chat --checkpoint ~/jax/cope-7b --video clip.mp4 --question "..." --json
    encoder | python -m cope_jax.chat --checkpoint ~/jax/cope-7b --video - --live \
        --question "What is on the table?" --at 6 --question "What changed?" --at 12 --json

The video (any file preprocessing reads: mp4, mkv, webm, mov, ...; B-frames, variable frame rate,
rotation) is turned into codec primitives in memory by the preprocessing code, at the settings
saved in the checkpoint; `--record DIR --video-id ID` reads one preprocessed by
`python -m data_pipeline.preprocess` instead. Keyframes go through SigLIP, the other sampled steps
through the Δ-encoder (8 Δ-tokens each), and the LLM answers from the interleaved stream.

The answer streams as it is generated and ends with a line of counts and timings: visual and text
tokens, time to first token (from the question to the first word; the first answer includes
reading the video and XLA compilation) and end-to-end latency. Without --question the chat is
interactive and keeps the KV cache between turns (an empty line or Ctrl-D ends it).

The video is prefilled one GOP at a time, so its working memory is one GOP's whatever its length.
A video longer than the model's context is refused; --max-context-tokens N keeps only the newest
GOPs that fit N tokens (system prompt kept, positions kept) and the time instruction lists what is
still seen.

Live (--live): SRC is `-` (a stream on standard input: MPEG-TS, Matroska, ...), any URL FFmpeg
opens as a stream (udp://, tcp://, rtsp://, http://, srt://) or a file still being written.
The video is preprocessed step by step as it arrives, with the checkpoint's settings; every step
joins the cached prefix, so a question prefills only its time instruction and words.
`--question Q --at S` (repeatable) asks when S seconds of video have arrived; a --question without --at, or one whose time never comes, is asked when the stream ends.
Without --question, type questions while it plays (from the terminal when the video is on
standard input). Each answer covers the video up to its question; --json prints one object per
answer with "video_seconds" (video seen when asked) and "lag_s" (how far reading was behind the
stream's real time). The run ends when the stream ends (UDP and a growing file: when no video
came for --stall-timeout seconds); any other stream that stalls that long, or breaks, ends it
with one error line, after the answers so far.

A CoPE checkpoint comes from `python -m cope_jax.convert --source <LLaVA-Video> --delta-encoder
<stage-1 workdir> --output DIR` or from stage-2 fine-tuning (<workdir>/model).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time

from cope_jax.video.switches import add_switch_arguments, switches_from_args
from cope_jax.errors import UserError

EXIT_BAD_INPUT = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cope_jax.chat", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a CoPE checkpoint directory (model.json, params/, tokenizer files)")
    source = parser.add_argument_group("the video (one of)")
    source.add_argument("--video", metavar="SRC", help="a video file, preprocessed in memory; with --live also - "
                        "(standard input) or a stream URL")
    source.add_argument("--record", metavar="DIR", help="a preprocessing output directory (with --video-id)")
    source.add_argument("--video-id", help="the video's id in --record: its path under the input root, without extension")
    parser.add_argument("--question", action="append", metavar="Q",
                        help="ask and exit (repeatable: each a first question about the video); omitted: interactive chat")
    live = parser.add_argument_group("live and long video")
    live.add_argument("--live", action="store_true", help="SRC is a stream: answer while it plays (see above)")
    live.add_argument("--at", action="append", type=float, metavar="SECONDS",
                      help="with --live, one per --question: ask when this much video has arrived")
    live.add_argument("--stall-timeout", type=float, default=10.0, metavar="SECONDS",
                      help="with --live, a stream silent this long has stalled (UDP, a growing file: has ended) "
                           "(default %(default)s)")
    live.add_argument("--max-context-tokens", type=int, metavar="N",
                      help="keep the KV cache within N tokens: the oldest GOPs leave it (default: refuse a video "
                           "beyond the model's context)")
    add_switch_arguments(parser, "how the video is read (defaults: the checkpoint's settings; paper App. H)")
    generation = parser.add_argument_group("generation")
    generation.add_argument("--max-new-tokens", type=int, default=256, help="longest answer in tokens (default %(default)s)")
    generation.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default %(default)s)")
    generation.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when --temperature > 0 (default %(default)s)")
    generation.add_argument("--seed", type=int, default=0, help="sampling seed (default %(default)s)")
    parser.add_argument("--json", action="store_true",
                        help='print one JSON object per answer instead: {"answer", "visual_tokens", "prompt_tokens", '
                             '"generated_tokens", "ttft_s", "e2el_s", "keyframes", "p_steps"}, with --live also '
                             '"video_seconds" and "lag_s" (needs --question)')
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
    if args.live and args.video is None:
        raise UsageError("--live reads --video SRC (a file, - or a stream URL), not a record")
    if args.at and not args.live:
        raise UsageError("--at needs --live (a finished file is all there when asked)")
    if args.at and len(args.at) != len(args.question or []):
        raise UsageError(f"give one --at per --question ({len(args.question or [])} questions, {len(args.at)} --at)")
    if args.at and min(args.at) < 0:
        raise UsageError(f"--at must be >= 0 seconds, got {min(args.at)}")
    if args.stall_timeout <= 0:
        raise UsageError(f"--stall-timeout must be > 0 seconds, got {args.stall_timeout}")
    if args.max_context_tokens is not None and args.max_context_tokens < 1:
        raise UsageError(f"--max-context-tokens must be >= 1, got {args.max_context_tokens}")
    streamed = args.live and (args.video == "-" or "://" in args.video or args.video.startswith("pipe:"))
    if args.video is not None and not streamed and not os.path.isfile(os.path.expanduser(args.video)):
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


def stats_json(answer: str, stats, lag_s: float | None = None) -> dict:
    """The answer's JSON object; live answers add the video seen when asked and the lag behind the stream."""
    fields = {"answer": answer, "visual_tokens": stats.visual_tokens, "prompt_tokens": stats.prompt_tokens,
              "generated_tokens": stats.generated_tokens, "ttft_s": round(stats.ttft_s, 4), "e2el_s": round(stats.e2el_s, 4),
              "keyframes": stats.keyframes, "p_steps": stats.p_steps}
    if lag_s is not None:
        fields.update(video_seconds=round(stats.video_seconds, 3), lag_s=round(lag_s, 3))
    return fields


def load_model(args, log):
    from cope_jax import checkpoints, inference  # here, not above: --help answers without importing JAX

    log(f"loading {args.checkpoint} ...")
    model, tokenizer, settings = inference.load(args.checkpoint, **switches_from_args(args))
    delta = checkpoints.read_meta(os.path.abspath(os.path.expanduser(args.checkpoint))).get("delta_encoder", {})
    if delta.get("random") and settings.delta_mode == "cope" and not settings.dense_frames:
        log("NOTE: this checkpoint's Δ-encoder is RANDOM (converted without --delta-encoder): P steps carry no information")
    return model, tokenizer, settings


def sampling_from(args):
    from cope_jax.inference.generation import SamplingConfig  # here, not above: --help answers without importing JAX

    return SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p)


def open_chat(args, log):
    from cope_jax import inference  # here, not above: --help answers without importing JAX
    from cope_jax.video.stream import video_from_file, video_from_records  # (same reason)

    model, tokenizer, settings = load_model(args, log)
    if args.video is not None:
        load_video = lambda: video_from_file(args.video, settings.preprocessing)  # noqa: E731
    else:
        load_video = lambda: video_from_records(os.path.expanduser(args.record), args.video_id)  # noqa: E731
    return inference.VideoChat(model, tokenizer, settings,
                               video=announced(load_video, args.video or args.video_id, settings.preprocessing, log),
                               sampling=sampling_from(args), seed=args.seed, max_context_tokens=args.max_context_tokens)


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
    print_answer(chat, chat.ask(question), as_json)


def print_answer(chat, pieces, as_json: bool, lag_s: float | None = None) -> None:
    """Streams an answer's text and its counts line, or prints its JSON object once it ends."""
    answer = []
    for text in pieces:
        answer.append(text)
        if not as_json:
            print(text, end="", flush=True)
    if as_json:
        print(json.dumps(stats_json("".join(answer), chat.last, lag_s)), flush=True)
    else:
        live = "" if lag_s is None else f" [{chat.last.video_seconds:.1f}s of video, {lag_s:.2f}s behind the stream]"
        print(f"\n{stats_line(chat.last)}{live}", flush=True)


def answer_questions(chat, questions: list[str], as_json: bool) -> None:
    """One question: this conversation. Several: each a first question on the video's shared prefix."""
    if len(questions) == 1:
        return answer_once(chat, questions[0], as_json)
    chat.prefill_video()
    for question in questions:
        if not as_json:
            print(f"you> {question}\ncope> ", end="", flush=True)
        answer_once(chat.fork(), question, as_json)


def run_live(args, log) -> int:
    """--live: reads the stream, answering each question when it is due."""
    from cope_jax.inference.live import LiveVideoChat, Question  # here, not above: --help answers without importing JAX
    from cope_jax.video.live import LiveStream  # (same reason)

    model, tokenizer, settings = load_model(args, log)
    stream = LiveStream(args.video, settings.preprocessing, args.stall_timeout)
    live = LiveVideoChat(model, tokenizer, settings, stream, sampling=sampling_from(args),
                         max_context_tokens=args.max_context_tokens, seed=args.seed)
    questions = [Question(q, at) for q, at in zip(args.question or [], args.at or [None] * len(args.question or []))]
    if not questions:
        typed_questions(stream, args.video == "-", log)
    log(f"reading {args.video} as a live stream ...")

    def on_answer(question, chat, pieces, lag):
        if not args.json:
            print(f"[{live.seconds:.1f}s] you> {question.text}\ncope> ", end="", flush=True)
        print_answer(chat, pieces, args.json, lag)

    outcome = live.run(questions, on_answer)
    if outcome.error:
        print(f"error: {outcome.error}; {outcome.answered} of {outcome.asked} questions answered", file=sys.stderr)
        return EXIT_BAD_INPUT
    log(f"{args.video}: the stream ended{f' ({outcome.note})' if outcome.note else ''} after {outcome.seconds:.1f}s of video; "
        f"{outcome.answered} answer{'' if outcome.answered == 1 else 's'}")
    return 0


def typed_questions(stream, video_on_stdin: bool, log) -> None:
    """Questions typed while the stream plays join its events (from the terminal when the video
    itself comes on standard input); an empty line or Ctrl-D stops asking, not the stream."""
    from cope_jax.video.live import Event  # here, not above: --help answers without importing JAX

    try:
        lines = open("/dev/tty") if video_on_stdin else sys.stdin
    except OSError:
        log("NOTE: no terminal to type questions on (the video is on standard input): give --question")
        return

    def read():
        for line in lines:
            if not line.strip():
                return
            stream.queue.put(Event("question", message=line.strip()))

    log("Type a question at any time; it is answered about the video so far (an empty line stops asking).")
    threading.Thread(target=read, name="typed-questions", daemon=True).start()


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
        if args.live:
            return run_live(args, log)
        chat = open_chat(args, log)
        if args.question is not None:
            answer_questions(chat, args.question, args.json)
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
