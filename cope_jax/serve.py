"""Serve a CoPE checkpoint over HTTP with an OpenAI-compatible chat API: ask about local video files.

    python -m cope_jax.serve --checkpoint ~/jax/cope-7b --allowed-media-path ~/videos

Endpoints:
  POST /v1/chat/completions   OpenAI chat completions, streamed (stream: true) or not
  GET  /v1/models             the one model served (its name: --model-name, default the checkpoint's folder)
  GET  /health                {"status": "ok", "busy", "waiting", "video_cache", "prefix_cache"}; answers while a question runs

Ask with curl:

  curl http://127.0.0.1:8000/v1/chat/completions -H 'Content-Type: application/json' -d '{
    "messages": [{"role": "user", "content": [
      {"type": "video_url", "video_url": {"url": "file:///home/me/videos/clip.mp4"}},
      {"type": "text", "text": "What happens in the video?"}]}],
    "max_tokens": 128, "keyframes_per_gop": 1}'

or with the openai Python client (pip install openai, in any environment):

  from openai import OpenAI
  client = OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")  # or --api-key's value
  reply = client.chat.completions.create(
      model="cope-7b", max_tokens=128,
      messages=[{"role": "user", "content": [
          {"type": "video_url", "video_url": {"url": "file:///home/me/videos/clip.mp4"}},
          {"type": "text", "text": "What happens in the video?"}]}],
      extra_body={"keyframes_per_gop": 1, "delta_mode": "cope"})
  print(reply.choices[0].message.content, reply.usage)

Messages: an optional "system" message first (it replaces the default "You are a helpful
assistant."), then user and assistant messages ending with a user message. The first user message
carries exactly one video as a file:// URL; no other message may carry one. Each request holds the
whole conversation: it is rebuilt from the messages (assistant turns as sent). The video's prefix
(system turn, user header, visual tokens, prefilled one GOP at a time) is kept for later requests
in an LRU of --prefix-cache-gb, keyed by the resolved file, its size and modification time, the
switches and the system prompt: a later request on the same video prefills only its own tokens
and answers exactly what a fresh prefill answers.
Content is a string or a list of {"type": "text"} / {"type": "video_url"} parts.
Request fields: max_tokens or max_completion_tokens (default 256), temperature (default 0 =
greedy), top_p, seed (default 0), stream, and how the video is read (default: the checkpoint's,
docs/architecture.md §7): keyframes_per_gop, delta_mode (cope | zero | keyframes_only),
dense_frames, max_gops, time_instruction (full | duration | none). Any other field is refused, so
a misspelt switch never goes unnoticed.
The reply's usage adds to OpenAI's token counts: visual_tokens, keyframes, p_steps, prefix_reused
(whether the video's prefix came from the cache), and ttft_s,
e2el_s, queue_s (seconds from the request's arrival to the first and the last token, and the part
spent waiting for the model; the first question on a video includes reading it, and the first of
each prompt shape includes XLA compilation).

Security: the server binds to 127.0.0.1 unless --host says otherwise (it warns then: there are no
accounts, only --api-key). It reads only file:// videos whose resolved path (symlinks and ".."
followed) lies under an --allowed-media-path; without one it refuses every video. A bad request
(malformed JSON, a missing or unknown field, a path outside the allowed folders, a missing or
undecodable video, a switch out of range) gets a 4xx JSON error {"error": {"message", "type"}} of
one line, and the server keeps serving. One model serves one question at a time; requests queue.

Built on the standard library's http.server (ThreadingHTTPServer), so serving adds no dependency.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys

from cope_jax.errors import UserError
from cope_jax.serving.http import make_server
from cope_jax.serving.service import load_service
from cope_jax.video.switches import add_switch_arguments

EXIT_BAD_INPUT = 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cope_jax.serve", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a CoPE checkpoint directory (model.json, params/, tokenizer files)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default %(default)s: this machine only; 0.0.0.0 exposes the server)")
    parser.add_argument("--port", type=int, default=8000, help="default %(default)s; 0 picks a free port")
    parser.add_argument("--allowed-media-path", action="append", default=[], metavar="DIR",
                        help="a folder whose videos (subfolders included) requests may read; repeatable. "
                             "Default: none, so every video is refused")
    parser.add_argument("--model-name", help="the model's name in /v1/models and replies (default: the checkpoint's folder name)")
    parser.add_argument("--api-key", default=os.environ.get("COPE_API_KEY"),
                        help="require 'Authorization: Bearer KEY' on /v1/* (default: $COPE_API_KEY, else no key)")
    parser.add_argument("--max-tokens", type=int, default=256, help="answer length when a request gives none (default %(default)s)")
    parser.add_argument("--max-tokens-limit", type=int, default=4096,
                        help="the longest answer a request may ask for; the KV cache is sized by it (default %(default)s)")
    parser.add_argument("--video-cache", type=int, default=4, help="videos kept decoded in memory (default %(default)s)")
    parser.add_argument("--prefix-cache-gb", type=float, default=4.0,
                        help="KV-cache memory kept for recent videos' prefilled prefixes, least recently used out "
                             "first; 0 keeps none (default %(default)s)")
    add_switch_arguments(parser, "how videos are read when a request does not say (default: the checkpoint's settings)")
    return parser


def check_arguments(args) -> None:
    if not os.path.isdir(os.path.expanduser(args.checkpoint)):
        raise UserError(f"--checkpoint {args.checkpoint}: no such directory")
    for folder in args.allowed_media_path:
        if not os.path.isdir(os.path.expanduser(folder)):
            raise UserError(f"--allowed-media-path {folder}: no such directory")
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    if not 1 <= args.max_tokens <= args.max_tokens_limit:
        raise UserError(f"--max-tokens must be in 1..--max-tokens-limit ({args.max_tokens_limit}), got {args.max_tokens}")
    if args.video_cache < 0:
        raise UserError(f"--video-cache must be >= 0, got {args.video_cache}")
    if not args.prefix_cache_gb >= 0:
        raise UserError(f"--prefix-cache-gb must be >= 0, got {args.prefix_cache_gb}")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def warn_about_exposure(args, log) -> None:
    if not is_loopback(args.host):
        log(f"WARNING: --host {args.host} is not loopback: anyone who can reach this machine can ask questions"
            + (" (with the API key)" if args.api_key else " (no --api-key: anyone at all)")
            + " and make the server read the videos under the allowed media folders")
    if not args.allowed_media_path:
        log("WARNING: no --allowed-media-path: every request with a video is refused")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    log = (lambda message: print(message, file=sys.stderr, flush=True))
    try:
        check_arguments(args)
        warn_about_exposure(args, log)
        service = load_service(args, log)
        server = make_server(service, args.host, args.port)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_BAD_INPUT
    host = f"[{args.host}]" if ":" in args.host else args.host
    log(f"serving {service.name!r} on http://{host}:{server.port} (POST /v1/chat/completions, GET /v1/models, "
        f"GET /health); media from: {', '.join(service.media.roots) or 'nowhere'}; Ctrl-C stops")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        log("stopped")
    finally:
        server.server_close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
