"""The model side of the server: which videos requests may read (`MediaPolicy`), the decoded videos
they share (`VideoCache`), the prefilled video prefixes they share (`PrefixCache`), a chat over a
whole OpenAI conversation (`ConversationChat`), and `Service`, the model and what requests share;
`load_service` builds one from a checkpoint."""

from __future__ import annotations

import collections
import contextlib
import os
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable

from cope_jax import checkpoints, inference
from cope_jax.video import prompt as prompts
from cope_jax.video.stream import Video, video_from_file
from cope_jax.video.switches import switches_from_args
from cope_jax.serving.openai_schema import ChatRequest, RequestError, parse_request


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

    def __init__(self, capacity: int, read: Callable = video_from_file):
        self.capacity, self.read = capacity, read
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.lock, self.loading = threading.Lock(), threading.Lock()
        self.hits = self.misses = 0

    def get(self, path: str, preprocessing) -> Video:
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


class PrefixCache:
    """Recent videos' prefixes (system turn, user header, visual tokens in a KV cache), least
    recently used first out, within `max_bytes` of cache arrays. Key: the resolved file, its size
    and modification time, the reading settings (switches) and the system prompt, so an edited
    file or another switch is prefilled afresh. A request on a kept prefix prefills only its own
    tokens; what it answers equals a fresh prefill's (tests/test_serve.py)."""

    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.entries: collections.OrderedDict = collections.OrderedDict()
        self.lock = threading.Lock()
        self.hits = self.misses = 0

    @staticmethod
    def key(path: str, settings, system: str) -> tuple:
        try:
            stat = os.stat(path)
        except OSError as e:
            raise RequestError(f"{path}: {e.strerror}", 404) from None
        return (path, stat.st_size, stat.st_mtime_ns, settings, system)

    def __contains__(self, key) -> bool:
        with self.lock:
            return key in self.entries

    def get(self, key):
        """A fork of the kept prefix (the kept one never changes), or None."""
        with self.lock:
            prefix = self.entries.get(key)
            if prefix is None:
                self.misses += 1
                return None
            self.entries.move_to_end(key)
            self.hits += 1
            return prefix.fork()

    def put(self, key, prefix) -> None:
        """Keeps `prefix` (a prefix larger than the whole budget is not kept)."""
        size = prefix.nbytes()
        with self.lock:
            if size > self.max_bytes or key in self.entries:
                return
            self.entries[key] = prefix
            while self._bytes() > self.max_bytes:
                self.entries.popitem(last=False)

    def _bytes(self) -> int:
        return sum(prefix.nbytes() for prefix in self.entries.values())

    def stats(self) -> dict:
        with self.lock:
            return {"entries": len(self.entries), "bytes": self._bytes(), "hits": self.hits, "misses": self.misses}


# ---------------------------------------------------------------------------- the model


class ConversationChat(inference.VideoChat):
    """A VideoChat whose first prompt is a whole OpenAI conversation: the system prompt and the
    earlier turns (assistant answers as the client sent them) before the question."""

    def __init__(self, *args, system: str = prompts.SYSTEM_PROMPT, history=(), **kwargs):
        super().__init__(*args, **kwargs)
        self.system, self.history = system, tuple(history)

    def _first_prompt(self, question: str, preamble: str, visual_tokens: int) -> prompts.TokenizedPrompt:
        pieces = prompts.conversation_pieces([*self.history, ("human", question)], preamble,
                                             system=self.system, add_generation_prompt=True)
        return prompts.tokenize(self.tokenizer, pieces, visual_tokens)


class Service:
    """The model and what requests share. JAX work runs under `lock`, one request at a time."""

    def __init__(self, model, tokenizer, settings, *, name: str, media: MediaPolicy, video_cache: int = 4,
                 prefix_cache_gb: float = 4.0, max_tokens: int = 256, max_tokens_limit: int = 4096,
                 api_key: str | None = None, log: Callable[[str], None] | None = None):
        self.model, self.tokenizer, self.settings, self.name = model, tokenizer, settings, name
        self.media, self.videos = media, VideoCache(video_cache)
        self.prefixes, self.engine = PrefixCache(int(prefix_cache_gb * 2**30)), inference.Engine(model)
        self.max_tokens, self.max_tokens_limit, self.api_key = max_tokens, max_tokens_limit, api_key
        self.log = log or (lambda line: print(line, file=sys.stderr, flush=True))
        self.lock, self.counts_lock = threading.Lock(), threading.Lock()
        self.waiting, self.busy = 0, False

    def health(self) -> dict:
        with self.counts_lock:
            busy, waiting = self.busy, self.waiting
        return {"status": "ok", "model": self.name, "busy": busy, "waiting": waiting, "video_cache": self.videos.stats(),
                "prefix_cache": self.prefixes.stats()}

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
        return self.settings.with_switches(**request.switches)

    def video(self, request: ChatRequest) -> Video:
        return self.videos.get(self.media.resolve(request.video_url), self.settings.preprocessing)

    def prefix_key(self, request: ChatRequest) -> tuple:
        return PrefixCache.key(self.media.resolve(request.video_url), self.settings_for(request), request.system)

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

    def new_chat(self, request: ChatRequest, key: tuple, video: Video | None) -> ConversationChat:
        """A chat on the video's kept prefix when there is one (`chat.prefix_reused`), else on the
        video (read now if it was not read before: its prefix left the cache meanwhile)."""
        prefix = self.prefixes.get(key)
        chat = ConversationChat(self.model, self.tokenizer, self.settings_for(request),
                                video=lambda: video if video is not None else self.video(request),
                                sampling=request.sampling, seed=request.seed, system=request.system,
                                history=request.history, engine=self.engine, prefix=prefix)
        chat.prefix_reused = prefix is not None
        return chat

    def keep_prefix(self, key: tuple, chat: ConversationChat) -> None:
        if not chat.prefix_reused and chat.video_prefix is not None:
            self.prefixes.put(key, chat.video_prefix)


def load_service(args, log) -> Service:
    switches = switches_from_args(args)
    directory = os.path.abspath(os.path.expanduser(args.checkpoint))
    log(f"loading {directory} ...")
    model, tokenizer, settings = inference.load(directory, **switches)
    if checkpoints.read_meta(directory).get("delta_encoder", {}).get("random"):
        log("NOTE: this checkpoint's Δ-encoder is RANDOM (converted without --delta-encoder): P steps carry no information")
    return Service(model, tokenizer, settings, name=args.model_name or os.path.basename(directory),
                   media=MediaPolicy(args.allowed_media_path), video_cache=args.video_cache,
                   prefix_cache_gb=args.prefix_cache_gb, max_tokens=args.max_tokens,
                   max_tokens_limit=args.max_tokens_limit, api_key=args.api_key or None, log=log)
