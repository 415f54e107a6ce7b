"""The HTTP layer: the standard library's http.server (ThreadingHTTPServer) turning requests into
`Service` calls and writing JSON replies or server-sent events."""

from __future__ import annotations

import contextlib
import hmac
import http.server
import json
import socket
import sys
import time
import traceback
import urllib.parse

from cope_jax.errors import UserError
from cope_jax.serving.openai_schema import MAX_BODY_BYTES, Reply, RequestError, finish_reason, parse_body, usage
from cope_jax.serving.service import Service

ROUTES = {"/v1/chat/completions": "POST", "/v1/models": "GET", "/health": "GET"}


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
        key = service.prefix_key(request)
        video = None if key in service.prefixes else service.video(request)  # read before waiting for the model
        with service.model_turn() as queued:
            chat = service.new_chat(request, key, video)
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
            service.keep_prefix(key, chat)
        stats, ended = chat.last, time.perf_counter()
        timing = {"ttft_s": first_at - self.arrived, "e2el_s": ended - self.arrived, "queue_s": queued}
        self.notes = (f" visual={stats.visual_tokens} ttft={timing['ttft_s']:.2f}s generated={stats.generated_tokens}"
                      f" prefix={'reused' if chat.prefix_reused else 'new'}")
        counts = usage(stats, timing, chat.prefix_reused)
        if request.stream:
            reply.finish(finish_reason(stats, request.sampling), counts)
        else:
            self._json(200, reply.message(text, finish_reason(stats, request.sampling), counts))

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
