"""lmms-eval itself, in its own virtualenv (`make lmms-eval-venv`) and offline, asks `python -m
cope_jax.serve` (a tiny checkpoint, in this process) through the `cope_jax` model of
integrations/lmms_eval, on a local PerceptionTest-style task over generated videos: the accuracy it
reports, and every answer it logs, equal `python -m cope_jax.evaluate`'s on the same questions file
with the same switches and answer length. Also: the client's pieces, retries and 4xx messages.

Run with the main venv's pytest: `make test-lmms-eval` (it builds both virtualenvs first)."""

import glob
import json
import os
import pathlib
import shutil
import subprocess
import sys
import threading
import time

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[3]
sys.path[:0] = [str(ROOT / "tests"), str(ROOT / "integrations" / "lmms_eval")]

from test_chat import cope_dir, delta_dir, source_dir  # noqa: E402, F401 - the tiny checkpoint fixtures

from cope_jax import evaluate, inference  # noqa: E402
from cope_jax.evaluation import questions as question_file  # noqa: E402
from cope_jax.serving.http import make_server  # noqa: E402
from cope_jax.serving.service import MediaPolicy, Service  # noqa: E402
from cope_lmms import client  # noqa: E402 - standard library only: importable here
from data_pipeline import synthetic  # noqa: E402

LMMS_VENV = ROOT / ".venv-lmms-eval"
TASK = "cope_jax_selftest_mc"  # unique: lmms-eval's own tasks win a name clash
MAX_NEW_TOKENS = 12
SWITCHES = {"keyframes_per_gop": 2}  # not the checkpoint's 1: the switch must reach the server
LMMS_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def lmms_bin() -> pathlib.Path:
    """lmms-eval's virtualenv: missing is a failure, never a skip (asked for first: before the checkpoint is built)."""
    if not os.access(LMMS_VENV / "bin" / "lmms-eval", os.X_OK) or not (LMMS_VENV / ".installed").exists():
        pytest.fail(f"{LMMS_VENV} is missing or incomplete: run make lmms-eval-venv")
    return LMMS_VENV / "bin"


def offline_env(hf_home) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV", "XLA_FLAGS")}
    env.update(HF_HOME=str(hf_home), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
               HF_EVALUATE_OFFLINE="1", WANDB_MODE="disabled", TOKENIZERS_PARALLELISM="false", COPE_API_KEY="")
    return env


# ---------------------------------------------------------------------------- the server and the questions


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    """Four generated clips (camera pans and moving squares), one renamed with a space and a '#'."""
    directory = tmp_path_factory.mktemp("videos")
    rows = synthetic.motion_questions(str(directory), 4, size=64, seconds=4.0)
    odd = "corner #003.mp4"  # percent-encoded in the file:// URL, decoded by the server
    os.rename(directory / rows[3]["video"], directory / odd)
    rows[3]["video"] = odd
    return directory, rows


@pytest.fixture(scope="module")
def server(cope_dir, videos):  # noqa: F811
    model, tokenizer, settings = inference.load(cope_dir)
    logs = []
    service = Service(model, tokenizer, settings, name="tiny-cope", media=MediaPolicy([str(videos[0])]),
                      log=logs.append)
    server = make_server(service, "127.0.0.1", 0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    server.logs = logs
    yield server
    server.shutdown()
    server.server_close()


def questions_from(rows) -> list[dict]:
    """cope_jax.evaluate's questions: the clips' motion questions, and one more on each of two clips."""
    questions = []
    for row in rows:
        question, *options, _ = row["conversations"][0]["value"].removeprefix("<image>\n").split("\n")
        questions.append({"id": row["id"], "video": row["video"], "question": question,
                          "options": [o.split(". ", 1)[1] for o in options], "answer": row["answer"]})
    for row in rows[:2]:
        questions.append({"id": row["id"] + "_what", "video": row["video"], "question": "What does the video show?",
                          "options": ["a square", "a texture", "a car", "a face"], "answer": "B"})
    return questions


def ask_directly(server, question: dict, videos_dir) -> str:
    text = question_file.prompt_text(question_file.parse_question(question))
    body = client.chat_body(os.path.join(videos_dir, question["video"]), text, max_tokens=MAX_NEW_TOKENS,
                            switches=SWITCHES)
    return client.answer_text(client.Client(f"http://127.0.0.1:{server.port}").chat(body))


@pytest.fixture(scope="module")
def questions_file(server, videos, tmp_path_factory):
    """The questions with an answer key that makes the accuracy neither 0 nor 1: a random tiny model
    rarely names the right option, so where it names one (asked directly), every other question's key
    is that letter and the rest the next letter; questions whose answers name none keep theirs."""
    directory, rows = videos
    questions = questions_from(rows)
    named = 0
    for question in questions:
        letter = question_file.answer_letter(ask_directly(server, question, directory), "ABCD")
        if letter:
            question["answer"] = letter if named % 2 == 0 else "ABCD"[("ABCD".index(letter) + 1) % 4]
            named += 1
    path = tmp_path_factory.mktemp("questions") / "questions.jsonl"
    path.write_text("".join(json.dumps(q) + "\n" for q in questions))
    return path, questions, named


# ---------------------------------------------------------------------------- the local lmms-eval task

TASK_YAML = f"""\
task: {TASK}
dataset_path: json
dataset_kwargs:
  data_files:
    test: questions.jsonl
test_split: test
output_type: generate_until
doc_to_visual: !function utils.doc_to_visual
doc_to_text: !function utils.doc_to_text
doc_to_target: answer
# No max_new_tokens (as PerceptionTest): the model arg max_new_tokens gives it. No stop strings.
generation_kwargs:
  until: []
  do_sample: false
process_results: !function utils.process_results
metric_list:
  - metric: accuracy
    aggregation: mean
    higher_is_better: true
metadata:
  version: 0.0
"""

# lmms-eval's perceptiontest/val/utils.py, over this file's rows: the same prompt and first-letter scoring.
TASK_UTILS = '''\
import os
import re

VIDEOS = {videos!r}
POST_PROMPT = "\\nAnswer with the option's letter from the given choices directly."


def doc_to_visual(doc):
    return [os.path.join(VIDEOS, doc["video"])]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    options = "".join(f"\\n{{letter}}. {{option}}" for letter, option in zip("ABCD", doc["options"]))
    return doc["question"] + options + POST_PROMPT


def process_results(doc, results):
    match = re.search(r"\\b([A-D])\\b", results[0].strip())
    return {{"accuracy": float(bool(match) and match.group(1) == doc["answer"])}}
'''


def write_task(directory: pathlib.Path, questions_path, videos_dir) -> pathlib.Path:
    directory.mkdir(parents=True)
    shutil.copy(questions_path, directory / "questions.jsonl")
    (directory / f"{TASK}.yaml").write_text(TASK_YAML)
    (directory / "utils.py").write_text(TASK_UTILS.format(videos=str(videos_dir)))
    return directory


def model_args(port: int, **extra) -> str:
    fields = {"base_url": f"http://127.0.0.1:{port}", **SWITCHES, "max_new_tokens": MAX_NEW_TOKENS, **extra}
    return ",".join(f"{k}={v}" for k, v in fields.items())


def run_lmms_eval(lmms_bin, server, task_dir, output, hf_home, check: bool = True) -> subprocess.CompletedProcess:
    command = [str(lmms_bin / "lmms-eval"), "--model", "cope_jax", "--model_args", model_args(server.port),
               "--tasks", TASK, "--include_path", str(task_dir), "--batch_size", "1", "--output_path", str(output),
               "--log_samples", "--verbosity", "DEBUG"]  # DEBUG: otherwise a failed evaluation still exits 0
    done = subprocess.run(command, env=offline_env(hf_home), cwd=task_dir, capture_output=True, text=True,
                          timeout=LMMS_TIMEOUT_S)
    assert done.returncode == 0 or not check, f"lmms-eval exited {done.returncode}:\n{done.stdout[-4000:]}\n{done.stderr[-8000:]}"
    return done


def settled(logs: list) -> list:
    """The server's log once no line came for 0.3 s (a line is written just after its reply is sent)."""
    while True:
        count = len(logs)
        time.sleep(0.3)
        if len(logs) == count:
            return logs


def the_file(output, pattern: str) -> str:
    found = glob.glob(os.path.join(output, "**", pattern), recursive=True)
    assert len(found) == 1, f"expected one {pattern} under {output}, found {found}"
    return found[0]


# ---------------------------------------------------------------------------- lmms-eval against cope_jax.evaluate


def test_lmms_eval_reports_cope_jax_evaluates_scores_and_answers(lmms_bin, server, videos, questions_file, cope_dir,  # noqa: F811
                                                                  tmp_path):
    videos_dir, _ = videos
    path, questions, named = questions_file
    task_dir = write_task(tmp_path / "tasks" / TASK, path, videos_dir)
    before = len(settled(server.logs))
    done = run_lmms_eval(lmms_bin, server, task_dir, tmp_path / "lmms_out", tmp_path / "hf")
    posts = [line for line in settled(server.logs)[before:] if " POST /v1/chat/completions " in line]
    assert len(posts) == len(questions) and all(" 200 " in line for line in posts), posts

    results = json.load(open(the_file(tmp_path / "lmms_out", "*_results.json")))
    assert results["n-samples"][TASK] == {"original": len(questions), "effective": len(questions)}
    lmms_accuracy = results["results"][TASK]["accuracy,none"]
    samples = [json.loads(line) for line in open(the_file(tmp_path / "lmms_out", f"*_samples_{TASK}.jsonl"))]
    assert f"|{TASK}|" in done.stdout  # the score table

    flags = [f"--{k.replace('_', '-')}={v}" for k, v in SWITCHES.items()]
    code = evaluate.main(["--checkpoint", cope_dir, "--questions", str(path), "--videos", str(videos_dir),
                          "--output", str(tmp_path / "evaluate_out"), "--max-new-tokens", str(MAX_NEW_TOKENS), *flags])
    assert code == 0
    ours = json.load(open(tmp_path / "evaluate_out" / "results.json"))
    predictions = {e["id"]: e for e in map(json.loads, open(tmp_path / "evaluate_out" / "predictions.jsonl"))}
    assert (ours["count"], ours["failed"]) == (len(questions), 0)

    assert lmms_accuracy == pytest.approx(ours["accuracy"], abs=1e-12)
    if named >= 2:  # the answer key makes some right and some wrong (see questions_file)
        assert 0 < lmms_accuracy < 1, (lmms_accuracy, named)
    assert sorted(s["doc_id"] for s in samples) == list(range(len(questions)))
    for sample in samples:
        question = questions[sample["doc_id"]]
        ours_here = predictions[question["id"]]
        response = sample["filtered_resps"]
        response = response[0] if isinstance(response, list) else response
        assert response == ours_here["prediction"].strip(), question["id"]
        assert sample["target"] == question["answer"]
        assert sample["accuracy"] == float(ours_here["correct"]), question["id"]
        assert sample["token_counts"] == [{"input_tokens": ours_here["prompt_tokens"],
                                           "output_tokens": sample["token_counts"][0]["output_tokens"]}]


def test_a_refused_video_fails_the_run_with_the_servers_message(lmms_bin, server, videos, questions_file, tmp_path):
    """A server whose --allowed-media-path misses the videos: lmms-eval exits non-zero (DEBUG) with the 403's text."""
    service = server.service
    refusing = make_server(Service(service.model, service.tokenizer, service.settings, name="tiny-cope",
                                   media=MediaPolicy([str(tmp_path)]), log=lambda line: None),
                           "127.0.0.1", 0)
    threading.Thread(target=refusing.serve_forever, daemon=True).start()
    try:
        task_dir = write_task(tmp_path / "tasks" / TASK, questions_file[0], videos[0])
        done = run_lmms_eval(lmms_bin, refusing, task_dir, tmp_path / "lmms_out", tmp_path / "hf", check=False)
    finally:
        refusing.shutdown()
        refusing.server_close()
    assert done.returncode != 0
    assert "HTTP 403" in done.stderr and "outside the allowed media folders" in done.stderr, done.stderr[-4000:]
    assert "start the server with --allowed-media-path" in done.stderr
    assert not glob.glob(str(tmp_path / "lmms_out" / "**" / "*_results.json"), recursive=True)


# ---------------------------------------------------------------------------- the model class, in lmms-eval's venv

MODEL_CHECKS = '''\
import sys
from cope_lmms.model import CopeJax

base = sys.argv[1]
try:
    CopeJax(base_url=base, keyframe_per_gop=1)
    raise SystemExit("a misspelt model arg was accepted")
except ValueError as e:
    assert "did you mean 'keyframes_per_gop'" in str(e), e
try:
    CopeJax(base_url=base, keyframes_per_gop="two")
    raise SystemExit("a non-integer switch was accepted")
except ValueError as e:
    assert "keyframes_per_gop must be an integer" in str(e), e
model = CopeJax(base_url=base + "/v1", keyframes_per_gop=2.0, batch_size="auto", max_batch_size=None, device="cpu")
assert model.switches["keyframes_per_gop"] == 2 and model.batch_size == 1
class Request:
    def __init__(self, *args):
        self.args = args
model.task_dict = {"t": {"test": [{"v": ["a.mp4", "b.mp4"]}]}}
try:
    model.generate_until([Request("q", {}, lambda doc: doc["v"], 0, "t", "test")])
    raise SystemExit("two videos were accepted")
except ValueError as e:
    assert "exactly one video file" in str(e) and "gave 2 visual(s)" in str(e), e
for method in (model.loglikelihood, model.generate_until_multi_round):
    try:
        method([])
        raise SystemExit(method.__name__ + " did not raise")
    except NotImplementedError as e:
        assert "not supported" in str(e), e
model.task_dict = {"t": {"test": [{"v": [sys.argv[2]]}]}}
stop = sys.argv[4] or "never in an answer"
full, cut = model.generate_until([Request(sys.argv[3], {"max_new_tokens": 6}, lambda doc: doc["v"], 0, "t", "test"),
                                  Request(sys.argv[3], {"max_new_tokens": 6, "until": [stop, "never in an answer"]},
                                          lambda doc: doc["v"], 0, "t", "test")])
print(repr(full.text), repr(cut.text), full.token_counts)
assert cut.text == full.text.split(stop)[0] and (cut.text != full.text) == bool(sys.argv[4]), (full.text, cut.text)
assert full.token_counts.output_tokens == 6
print("ok")
'''


def test_the_model_class_checks_its_args_and_requests(lmms_bin, server, videos, tmp_path):
    videos_dir, rows = videos
    video = str(videos_dir / rows[0]["video"])
    prompt = "What does the video show?"
    answer = client.answer_text(client.Client(f"http://127.0.0.1:{server.port}").chat(
        client.chat_body(video, prompt, max_tokens=6, switches=SWITCHES)))
    stop = next((c for c in answer[1:] if c.isascii() and c.isalnum()), "")  # a stop string found in the answer
    script = tmp_path / "checks.py"
    script.write_text(MODEL_CHECKS)
    done = subprocess.run([str(lmms_bin / "python"), str(script), f"http://127.0.0.1:{server.port}", video, prompt, stop],
                          env=offline_env(tmp_path / "hf"), capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and done.stdout.strip().endswith("ok"), done.stdout + done.stderr[-4000:]


# ---------------------------------------------------------------------------- the HTTP client (standard library)


def test_client_urls_bodies_and_stop_strings():
    assert client.root_url("http://127.0.0.1:8000/v1/") == client.root_url("http://127.0.0.1:8000") == "http://127.0.0.1:8000"
    with pytest.raises(ValueError, match="base_url must look like"):
        client.root_url("127.0.0.1:8000")
    assert client.file_url("/data/a b/c#1?.mp4") == "file:///data/a%20b/c%231%3F.mp4"
    body = client.chat_body("/v/x.mp4", "Which?", max_tokens=5, switches={"keyframes_per_gop": 1, "delta_mode": None},
                            system_prompt="Be brief.")
    assert body == {"messages": [{"role": "system", "content": "Be brief."},
                                 {"role": "user", "content": [{"type": "video_url", "video_url": {"url": "file:///v/x.mp4"}},
                                                              {"type": "text", "text": "Which?"}]}],
                    "max_tokens": 5, "temperature": 0.0, "keyframes_per_gop": 1}
    assert client.truncate("B. left\n\nmore", ["\n\n"]) == "B. left"
    assert client.truncate("B. left\n\nmore", "left") == "B. "
    assert client.truncate("ab", None) == client.truncate("ab", []) == client.truncate("ab", [""]) == "ab"
    assert client.truncate("a1b2", ["2", "1"]) == "a"


def test_client_retries_with_backoff_then_says_what_to_start():
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    waits = []
    c = client.Client(f"http://127.0.0.1:{port}", max_retries=3, sleep=waits.append, timeout=5)
    with pytest.raises(client.CopeServerError, match="cannot reach the cope_jax server after 4 tries.*cope_jax.serve"):
        c.health()
    assert waits == [1.0, 2.0, 4.0]


def test_client_4xx_carries_the_servers_message(server, videos, tmp_path):
    videos_dir, rows = videos
    c = client.Client(f"http://127.0.0.1:{server.port}/v1", max_retries=0)
    outside = tmp_path / "outside.mp4"
    shutil.copy(videos_dir / rows[0]["video"], outside)
    with pytest.raises(client.CopeServerError, match=r"HTTP 403: .*outside the allowed media folders.*--allowed-media-path"):
        c.chat(client.chat_body(str(outside), "What?", max_tokens=2))
    with pytest.raises(client.CopeServerError, match=r"HTTP 400: keyframes_per_gop must be in 1\.\.2"):
        c.chat(client.chat_body(str(videos_dir / rows[0]["video"]), "What?", max_tokens=2, switches={"keyframes_per_gop": 3}))
    assert c.health()["status"] == "ok"
