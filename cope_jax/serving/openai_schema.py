"""The OpenAI chat-completions wire format: a request's JSON -> a checked `ChatRequest`, and an
answer -> OpenAI's reply shapes (one message, or chunks while it streams). Pure functions and data:
no model, no HTTP server."""

from __future__ import annotations

import dataclasses
import difflib
import json
import math
import time
import uuid
from collections.abc import Callable

from cope_jax.errors import UserError
from cope_jax.inference.generation import SamplingConfig
from cope_jax.video import prompt as prompts
from cope_jax.video.switches import SWITCHES

MAX_BODY_BYTES = 4 << 20  # a conversation is text; videos are read from disk, never uploaded
SAMPLING_FIELDS = ("max_tokens", "max_completion_tokens", "temperature", "top_p", "seed")
REQUEST_FIELDS = ("messages", "model", "stream", "stream_options", "n", "user", *SAMPLING_FIELDS, *SWITCHES)
SYSTEM_ROLES = ("system", "developer")  # "developer" is the newer OpenAI name for the system message


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


# ---------------------------------------------------------------------------- replies


def finish_reason(stats, sampling: SamplingConfig) -> str:
    """OpenAI's finish_reason: length when the answer ran into max_tokens before a stop token."""
    stopped = len(stats.answer_ids) < stats.generated_tokens
    return "length" if not stopped and stats.generated_tokens >= sampling.max_new_tokens else "stop"


def usage(stats, timing: dict, prefix_reused: bool = False) -> dict:
    """OpenAI's usage counts, with the video's (visual tokens, steps), whether the video's prefilled
    prefix was reused from an earlier request, and the timings."""
    return {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.generated_tokens,
            "total_tokens": stats.prompt_tokens + stats.generated_tokens, "visual_tokens": stats.visual_tokens,
            "keyframes": stats.keyframes, "p_steps": stats.p_steps, "prefix_reused": prefix_reused,
            **{name: round(seconds, 4) for name, seconds in timing.items()}}


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
