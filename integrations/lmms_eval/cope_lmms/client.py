"""The HTTP side of the `cope_jax` lmms-eval model: request bodies, retries, errors.

Standard library only (no lmms-eval, no cope_jax), so it is tested in any environment.
The server is `python -m cope_jax.serve` (OpenAI-style POST /v1/chat/completions, GET /health).
"""

from __future__ import annotations

import http.client
import json
import os
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable

# The §7 switches the server takes as extra request fields (cope_jax/video/switches.py SWITCHES; this client runs where cope_jax is not installed).
SWITCHES = {"keyframes_per_gop": int, "delta_mode": str, "dense_frames": int, "max_gops": int}
RETRY_STATUSES = (502, 503, 504)  # a proxy in front of a (re)starting server; 500 is a bug and repeats
HINTS = {
    401: "pass api_key=... in --model_args (or set COPE_API_KEY) to the server's --api-key",
    403: "start the server with --allowed-media-path covering the task's videos",
    404: "the video must exist on the server's machine at the same path; a model name must be the one "
         "GET /v1/models lists (or leave model= out)",
}


class CopeServerError(RuntimeError):
    """The server refused or failed a request, or could not be reached."""


def root_url(base_url: str) -> str:
    """http://host:port, from a base URL given with or without /v1 (as OpenAI clients take it)."""
    url = str(base_url).strip().rstrip("/").removesuffix("/v1")
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme not in ("http", "https") or not parsed.netloc:
        raise ValueError(f"base_url must look like http://127.0.0.1:8000, got {base_url!r}")
    return url


def file_url(path: str) -> str:
    """An absolute file:// URL; '%', '?', '#' and spaces percent-encoded (the server decodes them)."""
    return "file://" + urllib.parse.quote(os.path.abspath(os.path.expanduser(path)))


def chat_body(video: str, prompt: str, *, max_tokens: int, temperature: float = 0.0, top_p: float | None = None,
              switches: dict | None = None, model: str | None = None, system_prompt: str | None = None) -> dict:
    """One question about one video file, as the server's chat completion request."""
    messages = [{"role": "system", "content": system_prompt}] if system_prompt else []
    messages.append({"role": "user", "content": [{"type": "video_url", "video_url": {"url": file_url(video)}},
                                                 {"type": "text", "text": prompt}]})
    body = {"messages": messages, "max_tokens": int(max_tokens), "temperature": float(temperature)}
    if top_p is not None:
        body["top_p"] = float(top_p)
    if model:
        body["model"] = model
    body.update({name: value for name, value in (switches or {}).items() if value is not None})
    return body


def truncate(text: str, until) -> str:
    """The text up to the first occurrence of any stop string (lmms-eval's gen_kwargs["until"])."""
    if until is None:
        return text
    stops = [until] if isinstance(until, str) else list(until)
    cut = min((text.find(s) for s in stops if s and s in text), default=len(text))
    return text[:cut]


def server_message(error: urllib.error.HTTPError) -> str:
    """The server's one-line {"error": {"message"}} or, failing that, the start of the body."""
    try:
        raw = error.read().decode("utf-8", "replace")
    except OSError:
        raw = ""
    try:
        return str(json.loads(raw)["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return " ".join(raw.split())[:300] or str(error.reason)


class Client:
    """JSON over HTTP to one server, retrying (with exponential backoff) while it cannot be reached."""

    def __init__(self, base_url: str, *, api_key: str | None = None, timeout: float = 600.0, max_retries: int = 5,
                 backoff_s: float = 1.0, sleep: Callable[[float], None] = time.sleep):
        self.root = root_url(base_url)
        self.api_key, self.timeout, self.max_retries = api_key, float(timeout), int(max_retries)
        self.backoff_s, self.sleep = float(backoff_s), sleep

    def health(self) -> dict:
        return self.call("GET", "/health")

    def chat(self, body: dict) -> dict:
        return self.call("POST", "/v1/chat/completions", body)

    def call(self, method: str, path: str, body: dict | None = None) -> dict:
        url = self.root + path
        data = None if body is None else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        for attempt in range(self.max_retries + 1):
            request = urllib.request.Request(url, data=data, headers=headers, method=method)
            try:
                with urllib.request.urlopen(request, timeout=self.timeout) as response:
                    raw = response.read()
                break
            except urllib.error.HTTPError as e:
                message = server_message(e)
                if e.code in RETRY_STATUSES and attempt < self.max_retries:
                    self.sleep(self.backoff_s * 2**attempt)
                    continue
                hint = f" ({HINTS[e.code]})" if e.code in HINTS else ""
                raise CopeServerError(f"{method} {url}: HTTP {e.code}: {message}{hint}") from None
            except TimeoutError:  # the server took the question but answered too slowly: asking again only queues it twice
                raise CopeServerError(f"{method} {url}: no answer within {self.timeout:g}s "
                                      "(raise timeout=... in --model_args)") from None
            except (urllib.error.URLError, ConnectionError, http.client.HTTPException) as e:
                reason = getattr(e, "reason", None) or e
                if attempt < self.max_retries:
                    self.sleep(self.backoff_s * 2**attempt)
                    continue
                raise CopeServerError(f"{method} {url}: cannot reach the cope_jax server after {attempt + 1} tries "
                                      f"({reason}); is `python -m cope_jax.serve --checkpoint DIR "
                                      f"--allowed-media-path DIR --port N` running there?") from None
        try:
            return json.loads(raw)
        except ValueError:
            raise CopeServerError(f"{method} {url}: the reply is not JSON: {raw[:200]!r}") from None


def answer_text(reply: dict) -> str:
    try:
        content = reply["choices"][0]["message"]["content"]
    except (KeyError, IndexError, TypeError):
        raise CopeServerError(f"the reply has no choices[0].message.content: {json.dumps(reply)[:300]}") from None
    return content or ""
