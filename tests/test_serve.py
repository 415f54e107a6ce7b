"""`python -m cope_jax.serve` over a tiny CoPE checkpoint and a real camera clip: answers equal
`VideoChat`'s, streaming, the §7 switches, whole conversations, bad requests (4xx, one line, the
server goes on), a crash (500), concurrency, /health while a question runs, the API key, the CLI."""

import http.client
import json
import os
import shutil
import threading
import time

import pytest
from test_chat import CAMERA_CLIP, cope_dir, delta_dir, source_dir  # noqa: F401 - the checkpoint fixtures

from cope_jax import inference, serve
from cope_jax.video import prompt as prompts
from cope_jax.video.stream import video_from_file
from cope_jax.inference.generation import SamplingConfig
from cope_jax.serving.http import make_server
from cope_jax.serving.service import ConversationChat, MediaPolicy, Service

QUESTION = "What happens in the video?"


@pytest.fixture(scope="module")
def loaded(cope_dir):  # noqa: F811
    return inference.load(cope_dir)


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """An allowed folder (the clip, a text file, a symlink out) and a folder outside it."""
    root, outside = tmp_path_factory.mktemp("media"), tmp_path_factory.mktemp("outside")
    shutil.copy(CAMERA_CLIP, root / "clip.mp4")
    shutil.copy(CAMERA_CLIP, outside / "clip.mp4")
    (root / "notes.mp4").write_text("this is not a video")
    os.symlink(outside / "clip.mp4", root / "escape.mp4")
    return root, outside


def start(service):
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


@pytest.fixture(scope="module")
def service(loaded, media):
    logs = []
    service = Service(*loaded, name="tiny-cope", media=MediaPolicy([str(media[0])]), log=logs.append)
    service.logs = logs
    return service


@pytest.fixture(scope="module")
def server(service):
    server = start(service)
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture(scope="module")
def clip(media):
    return f"file://{media[0] / 'clip.mp4'}"


def request(server, method, path, body=None, headers=None):
    """-> (status, the parsed JSON reply or the raw text)."""
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=120)
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
    response = connection.getresponse()
    text = response.read().decode()
    connection.close()
    try:
        return response.status, json.loads(text)
    except json.JSONDecodeError:
        return response.status, text


def ask(server, url, question=QUESTION, **fields):
    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},
                                             {"type": "text", "text": question}]}]
    return request(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 8, **fields})


def direct_chat(loaded, n=8, chat_class=inference.VideoChat, **kwargs):
    model, tokenizer, settings = loaded
    video = video_from_file(CAMERA_CLIP, settings.preprocessing)
    return chat_class(model, tokenizer, settings, video=lambda: video, sampling=SamplingConfig(max_new_tokens=n), **kwargs)


# ---------------------------------------------------------------------------- answers


def test_an_answer_equals_video_chats_with_openai_fields(server, loaded, clip):
    status, reply = ask(server, clip)
    assert status == 200, reply
    chat = direct_chat(loaded)
    expected = "".join(chat.ask(QUESTION))
    assert reply["object"] == "chat.completion" and reply["model"] == "tiny-cope" and reply["id"].startswith("chatcmpl-")
    (choice,) = reply["choices"]
    assert choice["message"] == {"role": "assistant", "content": expected} and choice["index"] == 0
    stats = chat.last
    assert choice["finish_reason"] == ("length" if len(stats.answer_ids) == stats.generated_tokens == 8 else "stop")
    usage = reply["usage"]
    assert (usage["visual_tokens"], usage["keyframes"], usage["p_steps"]) == (80, 3, 2)
    assert (usage["prompt_tokens"], usage["completion_tokens"]) == (stats.prompt_tokens, stats.generated_tokens)
    assert usage["total_tokens"] == stats.prompt_tokens + stats.generated_tokens
    assert 0 <= usage["queue_s"] <= usage["ttft_s"] <= usage["e2el_s"]


def test_a_stream_adds_up_to_the_same_answer_and_ends_with_usage_and_done(server, clip):
    _, whole = ask(server, clip)
    status, text = ask(server, clip, stream=True)
    assert status == 200
    events = [line.removeprefix("data: ") for line in text.split("\n\n") if line]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert all(c["object"] == "chat.completion.chunk" and c["id"] == chunks[0]["id"] for c in chunks)
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in chunks) == whole["choices"][0]["message"]["content"]
    assert [c["choices"][0]["finish_reason"] for c in chunks[:-1]] == [None] * (len(chunks) - 1)
    assert chunks[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    usage = {k: v for k, v in chunks[-1]["usage"].items() if not k.endswith("_s")}
    assert usage == {k: v for k, v in whole["usage"].items() if not k.endswith("_s")}


def test_switches_change_the_visual_tokens(server, clip):
    counts = {}
    for name, switches in {"cope": {}, "keyframes_only": {"delta_mode": "keyframes_only"},
                           "dense": {"dense_frames": 4}}.items():
        status, reply = ask(server, clip, max_tokens=1, **switches)
        assert status == 200, reply
        counts[name] = tuple(reply["usage"][k] for k in ("visual_tokens", "keyframes", "p_steps"))
    assert counts == {"cope": (80, 3, 2), "keyframes_only": (60, 3, 0), "dense": (80, 4, 0)}


def test_a_whole_conversation_with_a_system_prompt_is_rebuilt(server, loaded, clip):
    system, earlier, question = "You answer in one word.", "A car drives.", "Which direction?"
    messages = [{"role": "system", "content": system},
                {"role": "user", "content": [{"type": "text", "text": QUESTION},
                                             {"type": "video_url", "video_url": {"url": clip}}]},
                {"role": "assistant", "content": [{"type": "text", "text": earlier}]},
                {"role": "user", "content": question}]
    status, reply = request(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 4})
    assert status == 200, reply
    history = [("human", QUESTION), ("gpt", earlier)]
    chat = direct_chat(loaded, n=4, chat_class=ConversationChat, system=system, history=history)
    answer = "".join(chat.ask(question))
    plan = chat.plan
    pieces = prompts.conversation_pieces([*history, ("human", question)], prompts.time_instruction(plan.duration, plan.timestamps),
                                         system=system, add_generation_prompt=True)
    expected = prompts.tokenize(loaded[1], pieces, 80)
    assert chat.ids[: len(expected)] == expected.ids.tolist() and chat.last.prompt_tokens == len(expected)
    assert reply["choices"][0]["message"]["content"] == answer and reply["usage"]["prompt_tokens"] == len(expected)


# ---------------------------------------------------------------------------- bad requests


def bad_request(case, clip, root, outside):
    messages = lambda url: [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": url}},  # noqa: E731
                                                         {"type": "text", "text": QUESTION}]}]
    good = {"messages": messages(clip)}
    return {
        "malformed JSON": b'{"messages": [',
        "not an object": b"[1, 2]",
        "no messages": {"max_tokens": 4},
        "outside the root": {"messages": messages(f"file://{outside}/clip.mp4")},
        "dot-dot": {"messages": messages(f"file://{root}/../{outside.name}/clip.mp4")},
        "symlink out": {"messages": messages(f"file://{root}/escape.mp4")},
        "missing file": {"messages": messages(f"file://{root}/nope.mp4")},
        "not a video": {"messages": messages(f"file://{root}/notes.mp4")},
        "http URL": {"messages": messages("https://example.com/clip.mp4")},
        "relative URL": {"messages": messages("file:clip.mp4")},
        "bad delta_mode": {**good, "delta_mode": "fast"},
        "keyframes_per_gop": {**good, "keyframes_per_gop": 3},
        "switch type": {**good, "max_gops": "8"},
        "misspelt switch": {**good, "keyframe_per_gop": 1},
        "max_tokens": {**good, "max_tokens": 0},
        "temperature": {**good, "temperature": -1},
        "no video": {"messages": [{"role": "user", "content": QUESTION}]},
        "two videos": {"messages": [{"role": "user", "content": messages(clip)[0]["content"] * 2}]},
        "image part": {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": clip}}]}]},
        "ends with assistant": {"messages": messages(clip) + [{"role": "assistant", "content": "Yes."}]},
        "late system": {"messages": messages(clip) + [{"role": "system", "content": "Be brief."}]},
        "other model": {**good, "model": "gpt-4o"},
    }[case]


EXPECTED = {
    "malformed JSON": (400, "not valid JSON"), "not an object": (400, "must be a JSON object"),
    "no messages": (400, 'missing field "messages"'), "outside the root": (403, "outside the allowed media folders"),
    "dot-dot": (403, "outside the allowed"), "symlink out": (403, "escape.mp4: outside the allowed"),
    "missing file": (404, "nope.mp4: no such file"), "not a video": (400, "notes.mp4"),
    "http URL": (400, "only file:// URLs"), "relative URL": (400, "file:///absolute/path"),
    "bad delta_mode": (400, "delta_mode must be one of cope, zero, keyframes_only, got 'fast'"),
    "keyframes_per_gop": (400, "keyframes_per_gop must be in 1..2"), "switch type": (400, "max_gops must be an integer"),
    "misspelt switch": (400, "did you mean 'keyframes_per_gop'?"), "max_tokens": (400, "max_tokens must be in 1..4096"),
    "temperature": (400, "temperature must be >= 0"), "no video": (400, "carries no video"),
    "two videos": (400, "exactly one"), "image part": (400, "is not supported"),
    "ends with assistant": (400, "the last message must be a user message"),
    "late system": (400, "may only come first"), "other model": (404, "'gpt-4o' is not served here"),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_a_bad_request_gets_a_4xx_of_one_line_and_the_server_goes_on(case, server, clip, media):
    status, reply = request(server, "POST", "/v1/chat/completions", bad_request(case, clip, *media))
    code, words = EXPECTED[case]
    assert status == code, reply
    message = reply["error"]["message"]
    assert reply["error"]["type"] == "invalid_request_error" and "\n" not in message and words in message, message
    assert request(server, "GET", "/health")[0] == 200


def test_routes_and_methods(server):
    assert request(server, "GET", "/v1/nothing")[0] == 404
    status, reply = request(server, "GET", "/v1/chat/completions")
    assert status == 405 and "takes POST" in reply["error"]["message"]
    status, reply = request(server, "GET", "/v1/models")
    assert status == 200 and [m["id"] for m in reply["data"]] == ["tiny-cope"]
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=60)
    connection.request("POST", "/v1/nothing", body=b'{"messages": []}')
    response = connection.getresponse()
    response.read()  # refused before its body was read: the connection closes rather than parse the body as a request
    assert response.status == 404 and response.getheader("Connection") == "close"
    connection.close()


def test_a_crash_is_a_500_of_one_line_and_the_server_goes_on(server, service, clip, monkeypatch):
    def crash(*args):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(service, "new_chat", crash)
    status, reply = ask(server, clip)
    assert status == 500 and reply["error"]["type"] == "server_error"
    assert "RuntimeError: boom" in reply["error"]["message"] and "second line" not in reply["error"]["message"]
    monkeypatch.undo()
    assert ask(server, clip, max_tokens=1)[0] == 200 and not service.health()["busy"]


# ---------------------------------------------------------------------------- concurrency, cache, logs


def test_concurrent_requests_get_the_sequential_answers(server, clip):
    cases = [dict(max_tokens=4), dict(max_tokens=4, delta_mode="keyframes_only")] * 2
    sequential = [ask(server, clip, **fields)[1]["choices"][0]["message"]["content"] for fields in cases[:2]] * 2
    replies = [None] * len(cases)

    def run(i):
        replies[i] = ask(server, clip, **cases[i])

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(cases))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert [status for status, _ in replies] == [200] * 4
    assert [reply["choices"][0]["message"]["content"] for _, reply in replies] == sequential


def test_health_answers_while_a_question_waits_for_the_model(server, service, clip):
    result = {}
    with service.lock:  # the model is busy: the request queues
        thread = threading.Thread(target=lambda: result.update(reply=ask(server, clip, max_tokens=1)))
        thread.start()
        deadline = time.monotonic() + 30
        while service.health()["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        started = time.perf_counter()
        status, health = request(server, "GET", "/health")
        assert status == 200 and health["status"] == "ok" and health["waiting"] == 1
        assert time.perf_counter() - started < 5
    thread.join()
    assert result["reply"][0] == 200


def test_repeated_questions_on_a_file_reuse_the_decoded_video(server, service, clip):
    assert ask(server, clip, max_tokens=1)[0] == 200
    before = service.health()["video_cache"]
    assert ask(server, clip, max_tokens=1, keyframes_per_gop=2)[0] == 200
    after = service.health()["video_cache"]
    assert after["misses"] == before["misses"] and after["hits"] == before["hits"] + 1


def test_one_log_line_per_request(service, clip):
    """On a server of its own, so no other test's request can write into its log. The requests share
    one keep-alive connection, so one handler thread serves them in turn: when the last (/health) is
    answered, the first two have written every line they will write."""
    logs = []
    own = start(Service(service.model, service.tokenizer, service.settings, name=service.name,
                        media=service.media, log=logs.append))
    connection = http.client.HTTPConnection("127.0.0.1", own.port, timeout=120)

    def send(method, body=None):
        path = "/health" if method == "GET" else "/v1/chat/completions"
        connection.request(method, path, body=None if body is None else json.dumps(body).encode(),
                           headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        response.read()
        return response.status

    messages = [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip}},
                                             {"type": "text", "text": QUESTION}]}]
    try:
        assert send("POST", {"messages": messages, "max_tokens": 1}) == 200
        kept = connection.sock
        assert send("POST", {"messages": []}) == 400
        assert send("GET") == 200
        assert connection.sock is kept is not None, "the server closed the connection between the requests"
    finally:
        connection.close()
        own.shutdown()
        own.server_close()
    lines = [line for line in logs if "/health" not in line]
    assert len(lines) == 2, lines
    answered, refused = lines
    assert answered.startswith("127.0.0.1 POST /v1/chat/completions 200 ") and " visual=80 ttft=" in answered
    assert refused.startswith("127.0.0.1 POST /v1/chat/completions 400 ") and "error: " in refused


def test_an_api_key_guards_the_api_but_not_health(service, clip):
    guarded = start(Service(service.model, service.tokenizer, service.settings, name="k", media=service.media,
                            api_key="secret", log=lambda line: None))
    try:
        status, reply = request(guarded, "GET", "/v1/models")
        assert status == 401 and "API key" in reply["error"]["message"]
        assert request(guarded, "GET", "/v1/models", headers={"Authorization": "Bearer wrong"})[0] == 401
        assert request(guarded, "GET", "/v1/models", headers={"Authorization": "Bearer secret"})[0] == 200
        assert request(guarded, "GET", "/health")[0] == 200
    finally:
        guarded.shutdown()
        guarded.server_close()


# ---------------------------------------------------------------------------- the CLI


def test_help_teaches_a_newcomer(capsys):
    with pytest.raises(SystemExit):
        serve.main(["--help"])
    text = capsys.readouterr().out
    for phrase in ("curl", "from openai import OpenAI", "--allowed-media-path", "127.0.0.1", "file://", "video_url",
                   "keyframes_per_gop", "delta_mode", "stream", "usage", "/health", "--api-key", "refuses every video"):
        assert phrase in text, phrase


def test_a_later_question_on_a_video_reuses_its_prefix_and_answers_as_a_fresh_prefill(loaded, media, clip):
    """A server of its own (an empty prefix cache): the second question on the clip reuses the
    first's prefix; other switches, another system prompt or a touched file prefill afresh."""
    service = Service(*loaded, name="tiny-cope", media=MediaPolicy([str(media[0])]), log=lambda line: None)
    server = start(service)
    later, system = "Which way does the car go?", [{"role": "system", "content": "Answer briefly."}]
    try:
        replies = [ask(server, clip), ask(server, clip, later), ask(server, clip, later, keyframes_per_gop=2)]
        messages = system + [{"role": "user", "content": [{"type": "video_url", "video_url": {"url": clip}},
                                                          {"type": "text", "text": later}]}]
        replies.append(request(server, "POST", "/v1/chat/completions", {"messages": messages, "max_tokens": 8}))
        os.utime(media[0] / "clip.mp4")  # the same bytes, a new modification time
        replies.append(ask(server, clip, later))
        health = service.health()["prefix_cache"]
    finally:
        server.shutdown()
        server.server_close()
    assert all(status == 200 for status, _ in replies), replies
    assert [reply["usage"]["prefix_reused"] for _, reply in replies] == [False, True, False, False, False]
    fresh = direct_chat(loaded)
    answer = "".join(fresh.ask(later))
    for _, reply in (replies[1], replies[4]):
        assert reply["choices"][0]["message"]["content"] == answer
        assert reply["usage"]["prompt_tokens"] == fresh.last.prompt_tokens
        assert reply["usage"]["visual_tokens"] == fresh.last.visual_tokens == 80
    assert health["hits"] == 1 and health["entries"] == 4 and 0 < health["bytes"] <= 4 * 2**30


def test_a_prefix_cache_of_0_gb_keeps_nothing(loaded, media, clip):
    service = Service(*loaded, name="tiny-cope", media=MediaPolicy([str(media[0])]), prefix_cache_gb=0,
                      log=lambda line: None)
    server = start(service)
    try:
        replies = [ask(server, clip, max_tokens=2) for _ in range(2)]
    finally:
        server.shutdown()
        server.server_close()
    assert [reply["usage"]["prefix_reused"] for _, reply in replies] == [False, False]
    assert service.health()["prefix_cache"]["entries"] == 0


@pytest.mark.parametrize("flags, words", [(["--checkpoint", "/nonexistent"], "no such directory"),
                                          (["--allowed-media-path", "/nonexistent"], "--allowed-media-path /nonexistent"),
                                          (["--port", "70000"], "--port must be in 0..65535"),
                                          (["--prefix-cache-gb", "-1"], "--prefix-cache-gb must be >= 0")])
def test_cli_bad_arguments_give_one_line_and_exit_1(flags, words, cope_dir, capsys):  # noqa: F811
    code = serve.main(["--checkpoint", cope_dir, *flags])
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and words in errors[0]


def test_only_loopback_hosts_count_as_private():
    assert serve.is_loopback("127.0.0.1") and serve.is_loopback("::1") and serve.is_loopback("localhost")
    assert not serve.is_loopback("0.0.0.0") and not serve.is_loopback("192.168.1.4") and not serve.is_loopback("example.com")
