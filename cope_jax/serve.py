"""Serve a CoPE checkpoint over HTTP with an OpenAI-compatible chat API: ask about local video files.

    python -m cope_jax.serve --checkpoint ~/jax/cope-7b --allowed-media-path ~/videos

Endpoints:
  POST /v1/chat/completions   OpenAI chat completions, streamed (stream: true) or not
  GET  /v1/models             the one model served (its name: --model-name, default the checkpoint's folder)
  GET  /health                {"status": "ok", "busy", "waiting", "video_cache"}; answers while a question runs

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
whole conversation: it is rebuilt from the messages (assistant turns as sent) and prefilled anew.
Content is a string or a list of {"type": "text"} / {"type": "video_url"} parts.
Request fields: max_tokens or max_completion_tokens (default 256), temperature (default 0 =
greedy), top_p, seed (default 0), stream, and how the video is read (default: the checkpoint's,
docs/architecture.md §7): keyframes_per_gop, delta_mode (cope | zero | keyframes_only),
dense_frames, max_gops. Any other field is refused, so a misspelt switch never goes unnoticed.
The reply's usage adds to OpenAI's token counts: visual_tokens, keyframes, p_steps, and ttft_s,
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
import collections
import contextlib
import dataclasses
import difflib
import hmac
import http.server
import ipaddress
import json
import math
import os
import socket
import sys
import threading
import time
import traceback
import urllib.parse
import uuid
from collections.abc import Callable

from cope_jax import checkpoints, cli, inference
from cope_jax.errors import UserError
from cope_jax.inference import prompt as prompts
from cope_jax.inference.generation import SamplingConfig

EXIT_BAD_INPUT = 1
MAX_BODY_BYTES = 4 << 20  # a conversation is text; videos are read from disk, never uploaded
SWITCHES = {"keyframes_per_gop": int, "delta_mode": str, "dense_frames": int, "max_gops": int}
SAMPLING_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed")
REQUEST_FIELDS = ("messages", "model", "stream", "stream_options", "n", "user", *SAMPLING_FIELDS, *SWITCHES)
SYSTEM_ROLES = ("system", "developer")
ROUTES = {"/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET"}  # "developer" is the newer OpenAI name for the system message


class RequestError(UserError, ValueError):
    """A request the client can fix; `status` is the HTTP status it gets."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


# ---------------------------------------------------------------------------- requests


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """One chat completion request, checked."""

    video_url: str
    history: tuple  # ("human" | "gpt", text) turns before the question; the first carries the video
    question: str
    system: str
    switches: dict  # the §7 switches the request sets
    sampling: SamplingConfig
    seed: int
    stream: bool


def parse_body(raw: bytes) -> dict:
    try:
        body = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise RequestError(f"the body is not valid JSON ({e})") from None
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    return body


def parse_request(body: dict, default_max_tokens: int, max_tokens_limit: int) -> ChatRequest:
    unknown = [k for k in body if k not in REQUEST_FIELDS]
    if unknown:
        close = difflib.get_close_matches(unknown[0], REQUEST_FIELDS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else f"; supported: {', '.join(REQUEST_FIELDS)}"
        raise RequestError(f"unknown field {unknown[0]!r}{hint}")
    if "messages" not in body:
        raise RequestError('missing field "messages": a list of {"role", "content"} messages')
    system, video_url, turns = parse_messages(body["messages"])
    if body.get("n") not in (None, 1):
        raise RequestError(f"n must be 1 (one answer per request), got {body['n']!r}")
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise RequestError(f"stream must be true or false, got {stream!r}")
    switches = {name: _typed(body, name, kind) for name, kind in SWITCHES.items() if body.get(name) is not None}
    return ChatRequest(video_url=video_url, history=tuple(turns[:-1]), question=turns[-1][1], system=system,
                       switches=switches, sampling=parse_sampling(body, default_max_tokens, max_tokens_limit),
                       seed=_integer(body, "seed", 0, 0, 2**32 - 1), stream=bool(stream))


def parse_sampling(body: dict, default_max_tokens: int, limit: int) -> SamplingConfig:
    given = {name: body[name] for name in ("max_tokens", "max_completion_tokens") if body.get(name) is not None}
    if len(set(map(repr, given.values()))) > 1:
        raise RequestError(f"max_tokens and max_completion_tokens disagree ({given['max_tokens']} and "
                           f"{given['max_completion_tokens']}); give one")
    name = next(iter(given), "max_tokens")
    max_tokens = _integer(body, name, default_max_tokens, 1, limit)
    temperature = _number(body, "temperature", 0.0)
    top_p = _number(body, "top_p", 1.0)
    if temperature < 0:
        raise RequestError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
    if not 0 < top_p <= 1:
        raise RequestError(f"top_p must be in (0, 1], got {top_p}")
    return SamplingConfig(max_new_tokens=max_tokens, temperature=temperature, top_p=top_p)


def _typed(body: dict, name: str, kind: type):
    value = body[name]
    if kind is int:
        return _integer(body, name, None, None, None)
    if not isinstance(value, kind):
        raise RequestError(f"{name} must be a {kind.__name__}, got {value!r}")
    return value


def _integer(body: dict, name: str, default, low, high):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int):
        raise RequestError(f"{name} must be an integer, got {value!r}")
    if (low is not None and value < low) or (high is not None and value > high):
        raise RequestError(f"{name} must be in {low}..{high}, got {value}")
    return value


def _number(body: dict, name: str, default: float) -> float:
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise RequestError(f"{name} must be a number, got {value!r}")
    return float(value)


def parse_messages(messages) -> tuple[str, str, list[tuple[str, str]]]:
    """OpenAI messages -> (system prompt, the video's URL, [(role, text)] ending with the question)."""
    if not isinstance(messages, list) or not messages:
        raise RequestError('"messages" must be a non-empty list of {"role", "content"} messages')
    system, turns, videos = prompts.SYSTEM_PROMPT, [], []
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict) or "role" not in message:
            raise RequestError(f'{where} must be an object with "role" and "content"')
        role = message["role"]
        text, urls = message_content(message.get("content"), where)
        if role in SYSTEM_ROLES:
            if index:
                raise RequestError(f"{where}: a {role} message may only come first")
            system = text
        elif role in ("user", "assistant"):
            if not turns and role != "user":
                raise RequestError(f"{where}: the conversation must start with the user message carrying the video")
            turns.append(("human" if role == "user" else "gpt", text))
        else:
            raise RequestError(f"{where}: role {role!r} is not supported (system first, then user and assistant)")
        if urls and (role != "user" or len(turns) > 1 or len(urls) > 1):
            raise RequestError(f"{where}: only the first user message carries a video, exactly one")
        videos += urls
    if not videos:
        raise RequestError('the first user message carries no video: add {"type": "video_url", '
                           '"video_url": {"url": "file:///path/to/video.mp4"}}')
    if turns[-1][0] != "human" or not turns[-1][1].strip():
        raise RequestError("the last message must be a user message with a question (text)")
    return system, videos[0], turns


def message_content(content, where: str) -> tuple[str, list[str]]:
    """A message's content -> (its text parts joined by newlines, its video URLs)."""
    if isinstance(content, str):
        return content, []
    if not isinstance(content, list):
        raise RequestError(f'{where}: "content" must be a string or a list of parts, got {content!r}')
    texts, urls = [], []
    for part in content:
        kind = part.get("type") if isinstance(part, dict) else None
        if kind == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
        elif kind == "video_url":
            video = part.get("video_url")
            url = video.get("url") if isinstance(video, dict) else video
            if not isinstance(url, str):
                raise RequestError(f'{where}: a video_url part needs {{"video_url": {{"url": "file:///..."}}}}')
            urls.append(url)
        else:
            raise RequestError(f"{where}: content part {json.dumps(part)[:80]} is not supported: "
                               'use {"type": "text", "text": ...} or {"type": "video_url", "video_url": {"url": ...}}')
    return "\n".join(texts), urls


# ---------------------------------------------------------------------------- media


class MediaPolicy:
    """Which files requests may read: file:// URLs whose resolved real path lies under a root."""

    def __init__(self, roots):
        self.roots = tuple(os.path.realpath(os.path.expanduser(r)) for r in roots)

    def resolve(self, url: str) -> str:
        parsed = urllib.parse.urlsplit(url)
        if parsed.scheme != "file":
            raise RequestError(f"video URL {url[:80]!r}: only file:// URLs of local files are read (nothing is downloaded)")
        path = urllib.parse.unquote(parsed.path)
        if parsed.netloc not in ("", "localhost") or parsed.query or parsed.fragment or not os.path.isabs(path):
            raise RequestError(f"video URL {url[:80]!r}: expected file:///absolute/path (percent-encode '?' and '#')")
        if "\0" in path:
            raise RequestError("video URL: the path holds a NUL character")
        real = os.path.realpath(path)
        if not self.roots:
            raise RequestError("this server reads no media: start it with --allowed-media-path DIR", 403)
        if not any(os.path.commonpath([real, root]) == root for root in self.roots):
            raise RequestError(f"{path}: outside the allowed media folders ({', '.join(self.roots)})", 403)
        if not os.path.exists(real):
            raise RequestError(f"{path}: no such file", 404)
        if not os.path.isfile(real):
            raise RequestError(f"{path}: not a file")
        return real


class VideoCache:
    """The last few videos turned into primitives, keyed by path, mtime, size and preprocessing
    settings, so more questions on one file skip decoding it. Videos are read one at a time."""

    def __init__(self, capacity: int, read: Callable = inference.video_from_file):
        self.capacity, self.read = capacity, read
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.lock, self.loading = threading.Lock(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, path: str, preprocessing) -> inference.Video:
        try:
            stat = os.stat(path)
        except OSError as e:
            raise RequestError(f"{path}: {e.strerror}", 404) from None
        key = (path, stat.st_mtime_ns, stat.st_size, preprocessing)
        with self.loading:
            with self.lock:
                if key in self.entries:
                    self.entries.move_to_end(key)
                    self.hits += 1
                    return self.entries[key]
            video = self.read(path, preprocessing)
            with self.lock:
                self.misses += 1
                if self.capacity:
                    self.entries[key] = video
                    while len(self.entries) > self.capacity:
                        self.entries.popitem(last=False)
            return video

    def stats(self) -> dict:
        with self.lock:
            return {"entries": len(self.entries), "hits": self.hits, "misses": self.misses}


# ---------------------------------------------------------------------------- the model


class ConversationChat(inference.VideoChat):
    """A VideoChat whose first prompt is a whole OpenAI conversation: the system prompt and the
    earlier turns (assistant answers as the client sent them) before the question."""

    def __init__(self, *args, system: str = prompts.SYSTEM_PROMPT, history=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.system, self.history = system, tuple(history)

    def _first_prompt(self, question: str, encoded) -> prompts.TokenizedPrompt:
        pieces = prompts.conversation_pieces([*self.history, ("human", question)], encoded.preamble,
                                             system=self.system, add_generation_prompt=True)
        return prompts.tokenize(self.tokenizer, pieces, encoded.visual_tokens)


class Service:
    """The model and what requests share. JAX work runs under `lock`, one request at a time."""

    def __init__(self, model, tokenizer, settings, *, name: str, media: MediaPolicy, video_cache: int = 4,
                 max_tokens: int = 256, max_tokens_limit: int = 4096, api_key: str | None = None,
                 log: Callable[[str], None] | None = None):
        self.model, self.tokenizer, self.settings, self.name = model, tokenizer, settings, name
        self.media, self.videos = media, VideoCache(video_cache)
        self.max_tokens, self.max_tokens_limit, self.api_key = max_tokens, max_tokens_limit, api_key
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.lock, self.counts_lock = threading.Lock(), threading.Lock()
        self.waiting, self.busy = 0, False

    def health(self) -> dict:
        with self.counts_lock:
            busy, waiting = self.busy, self.waiting
        return {"status": "ok", "model": self.name, "busy": busy, "waiting": waiting, "video_cache": self.videos.stats()}

    def models(self) -> dict:
        return {"object": "list", "data": [{"id": self.name, "object": "model", "created": 0, "owned_by": "cope_jax"}]}

    def request(self, body: dict) -> ChatRequest:
        if body.get("model") not in (None, self.name):
            raise RequestError(f"model {body['model']!r} is not served here; this server serves {self.name!r} "
                               "(GET /v1/models), or leave \"model\" out", 404)
        request = parse_request(body, self.max_tokens, self.max_tokens_limit)
        self.settings_for(request)  # a bad switch is refused before the video is read
        return request

    def settings_for(self, request: ChatRequest):
        settings = dataclasses.replace(self.settings, **request.switches)
        settings.check()
        return settings

    def video(self, request: ChatRequest) -> inference.Video:
        return self.videos.get(self.media.resolve(request.video_url), self.settings.preprocessing)

    @contextlib.contextmanager
    def model_turn(self):
        """Holds the model for one request; yields the seconds spent waiting for it."""
        clock = time.perf_counter()
        with self.counts_lock:
            self.waiting += 1
        try:
            self.lock.acquire()
        finally:
            with self.counts_lock:
                self.waiting -= 1
        try:
            with self.counts_lock:
                self.busy = True
            yield time.perf_counter() - clock
        finally:
            with self.counts_lock:
                self.busy = False
            self.lock.release()

    def new_chat(self, request: ChatRequest, video: inference.Video) -> ConversationChat:
        return ConversationChat(self.model, self.tokenizer, self.settings_for(request), video=lambda: video,
                                sampling=request.sampling, seed=request.seed, system=request.system,
                                history=request.history)


def finish_reason(stats, sampling: SamplingConfig) -> str:
    """OpenAI's finish_reason: length when the answer ran into max_tokens before a stop token."""
    stopped = len(stats.answer_ids) < stats.generated_tokens
    return "length" if not stopped and stats.generated_tokens >= sampling.max_new_tokens else "stop"


def usage(stats, timing: dict) -> dict:
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens, "visual_tokens": stats.visual_tokens,
            "keyframes": stats.keyframes, "p_steps": stats.p_steps,
            **{name: round(seconds, 4) for name, seconds in timing.items()}}


# ---------------------------------------------------------------------------- HTTP


class Handler(http.server.BaseHTTPRequestHandler):
    """One connection. Routes, reads the body, maps errors to JSON and logs one line per request."""

    server_version = "cope_jax"
    protocol_version = "HTTP/1.1"
    timeout = 300  # seconds a silent client may hold its connection

    def do_GET(self):
        self._serve({"/health": self._health, "/v1/models": self._models})

    def do_POST(self):
        self._serve({"/v1/chat/completions": self._chat_completions})

    def _serve(self, routes: dict) -> None:
        self.arrived, self.status, self.notes, self.streaming = time.perf_counter(), 0, "", False
        self.body_read = self.command != "POST"
        path = urllib.parse.urlsplit(self.path).path.rstrip("/") or "/"
        service: Service = self.server.service
        try:
            if path not in routes:
                if path in ROUTES:
                    raise RequestError(f"{path} takes {ROUTES[path]}, not {self.command}", 405)
                raise RequestError(f"{self.command} {path}: not found (routes: {', '.join(ROUTES)})", 404)
            if path != "/health":
                self._check_key(service.api_key)
            routes[path]()
        except RequestError as e:
            self._error(e.status, str(e))
        except UserError as e:
            self._error(400, str(e))
        except (BrokenPipeError, ConnectionResetError, TimeoutError):
            self.notes, self.close_connection = " client went away", True
        except Exception as e:  # a bug: the client gets one line, the log the traceback, the server goes on
            traceback.print_exc(file=sys.stderr)
            self._error(500, f"internal server error ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             "the server log has the traceback")
        finally:
            service.log(f"{self.client_address[0]} {self.command} {path} {self.status or '-'} "
                        f"{time.perf_counter() - self.arrived:.2f}s{self.notes}")

    def _check_key(self, key: str | None) -> None:
        given = self.headers.get("Authorization", "")
        if key and not hmac.compare_digest(given.encode(), f"Bearer {key}".encode()):
            raise RequestError("missing or wrong API key: send 'Authorization: Bearer <the server's --api-key>'", 401)

    # -- routes

    def _health(self) -> None:
        self._json(200, self.server.service.health())

    def _models(self) -> None:
        self._json(200, self.server.service.models())

    def _chat_completions(self) -> None:
        service: Service = self.server.service
        request = service.request(parse_body(self._body()))
        video = service.video(request)
        with service.model_turn() as queued:
            chat = service.new_chat(request, video)
            pieces = chat.ask(request.question)
            try:
                first = next(pieces, "")  # the prefill: a bad video is still a 4xx here, before any byte is sent
                first_at = time.perf_counter()
                reply = Reply(service.name, self._write_event if request.stream else None)
                if request.stream:
                    self._start_events()
                text = reply.add(first) + "".join(reply.add(piece) for piece in pieces)
            finally:
                pieces.close()
        stats, ended = chat.last, time.perf_counter()
        timing = {"ttft_s": first_at - self.arrived, "e2el_s": ended - self.arrived, "queue_s": queued}
        self.notes = f" visual={stats.visual_tokens} ttft={timing['ttft_s']:.2f}s generated={stats.generated_tokens}"
        if request.stream:
            reply.finish(finish_reason(stats, request.sampling), usage(stats, timing))
        else:
            self._json(200, reply.message(text, finish_reason(stats, request.sampling), usage(stats, timing)))

    # -- reading and writing

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding"):
            raise RequestError("chunked request bodies are not supported: send Content-Length", 411)
        try:
            length = int(self.headers.get("Content-Length", ""))
        except ValueError:
            raise RequestError("the request needs a Content-Length header with the body's size", 411) from None
        if not 0 <= length <= MAX_BODY_BYTES:
            raise RequestError(f"the body is {length} bytes; at most {MAX_BODY_BYTES} (videos are read from disk, "
                               "not uploaded)", 413)
        body = self.rfile.read(length)
        self.body_read = True
        return body

    def _json(self, status: int, payload: dict) -> None:
        data = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        if not self.body_read:  # an unread body would be taken for the next request on this connection
            self.send_header("Connection", "close")
        self.end_headers()
        self.wfile.write(data)
        self.status = status

    def _error(self, status: int, message: str) -> None:
        message = " ".join(message.split())  # one line
        self.notes += f" error: {message}"
        kind = "invalid_request_error" if status < 500 else "server_error"
        payload = {"error": {"message": message, "type": kind}}
        if self.streaming:  # the headers are out: the error becomes the stream's last event
            with contextlib.suppress(OSError):
                self._write_event(payload)
            self.close_connection = True
        else:
            self._json(status, payload)
        self.status = status

    def _start_events(self) -> None:
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Cache-Control", "no-cache")
        self.send_header("Connection", "close")  # the stream ends when the connection does
        self.end_headers()
        self.close_connection, self.streaming, self.status = True, True, 200

    def _write_event(self, payload) -> None:
        data = payload if isinstance(payload, str) else json.dumps(payload)
        self.wfile.write(f"data: {data}\n\n".encode())
        self.wfile.flush()

    def log_request(self, code="-", size="-") -> None:
        pass  # `_serve` logs one line per request with what it did

    def log_message(self, format, *args) -> None:
        self.server.service.log(f"{self.client_address[0]} {format % args}")


class Reply:
    """An answer in OpenAI's shapes: chunks while it streams (`send` given), or one message."""

    def __init__(self, model: str, send: Callable | None):
        self.id, self.created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        self.model, self.send, self.started = model, send, False

    def _chunk(self, delta: dict, finish: str | None = None, **extra) -> dict:
        return {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "delta": delta, "finish_reason": finish}], **extra}

    def add(self, text: str) -> str:
        if self.send is not None:
            if not self.started:
                self.send(self._chunk({"role": "assistant", "content": ""}))
                self.started = True
            if text:
                self.send(self._chunk({"content": text}))
        return text

    def finish(self, reason: str, counts: dict) -> None:
        self.send(self._chunk({}, reason, usage=counts))
        self.send("[DONE]")

    def message(self, text: str, reason: str, counts: dict) -> dict:
        return {"id": self.id, "object": "chat.completion", "created": self.created, "model": self.model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": reason}],
                "usage": counts}


class Server(http.server.ThreadingHTTPServer):
    """A thread per connection (health answers while a question runs); `service` does the work."""

    daemon_threads = True

    def __init__(self, service: Service, host: str = "127.0.0.1", port: int = 8000):
        if ":" in host:
            self.address_family = socket.AF_INET6
        self.service = service
        super().__init__((host, port), Handler)

    @property
    def port(self) -> int:
        return self.server_address[1]


def make_server(service: Service, host: str = "127.0.0.1", port: int = 8000) -> Server:
    """A bound server (port 0: any free port, see `.port`); `serve_forever()` runs it."""
    try:
        return Server(service, host, port)
    except OSError as e:
        raise UserError(f"cannot listen on {host}:{port} ({e.strerror or e})") from None


# ---------------------------------------------------------------------------- the CLI


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
    cli.add_switch_arguments(parser, "how videos are read when a request does not say (default: the checkpoint's settings)")
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


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def load_service(args, log) -> Service:
    switches = cli.switches_from_args(args)
    directory = os.path.abspath(os.path.expanduser(args.checkpoint))
    log(f"loading {directory} ...")
    model, tokenizer, settings = inference.load(directory, **switches)
    if checkpoints.read_meta(directory).get("delta_encoder", {}).get("random"):
        log("NOTE: this checkpoint's Δ-encoder is RANDOM (converted without --delta-encoder): P steps carry no information")
    return Service(model, tokenizer, settings, name=args.model_name or os.path.basename(directory),
                   media=MediaPolicy(args.allowed_media_path), video_cache=args.video_cache, max_tokens=args.max_tokens,
                   max_tokens_limit=args.max_tokens_limit, api_key=args.api_key or None, log=log)


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
