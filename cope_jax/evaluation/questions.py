"""Video questions and how answers are scored: one definition for `cope_jax.evaluate` and for the
held-out accuracy a stage-2 run reports (the `demo_accuracy` evaluator).

A question: {"id", "video", "question", "options": [...] for multiple choice (absent: open-ended),
"answer": "B" or the answer text}. Multiple choice is asked as lmms-eval's PerceptionTest task asks
it (the options as "A. ...", then "Answer with the option's letter from the given choices
directly.") and scored by the first option letter standing alone in the answer; open-ended answers
score by normalised exact match.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import string

from cope_jax import distributed
from cope_jax.errors import UserError
from cope_jax.inference import VideoChat
from cope_jax.inference.generation import SamplingConfig
from cope_jax.training import instruct
from cope_jax.training.loop import log
from cope_jax.video.stream import video_from_records

MC_POSTFIX = "Answer with the option's letter from the given choices directly."


@dataclasses.dataclass(frozen=True)
class Question:
    id: str
    video: str
    question: str
    answer: str
    options: tuple[str, ...] = ()

    @property
    def letters(self) -> str:
        return string.ascii_uppercase[: len(self.options)]


def parse_question(row) -> Question:
    """One JSONL row -> Question; ValueError names what is wrong."""
    if not isinstance(row, dict):
        raise ValueError("not a JSON object")
    missing = [k for k in ("id", "video", "question", "answer") if k not in row]
    if missing:
        raise ValueError(f"missing {', '.join(missing)}")
    options = row.get("options") or ()
    if not isinstance(options, (list, tuple)) or not all(isinstance(o, str) for o in options) or len(options) > 26:
        raise ValueError("options must be a list of up to 26 strings")
    question = Question(str(row["id"]), str(row["video"]), str(row["question"]), str(row["answer"]).strip(), tuple(options))
    if question.options and question.answer.upper() not in question.letters:
        raise ValueError(f"answer {question.answer!r} is not one of the option letters {question.letters}")
    return question


def read_questions(path: str) -> tuple[list[Question], list[dict]]:
    """-> (questions, problems): a malformed line is a problem (listed, counted), never a crash."""
    questions, problems, seen = [], [], set()
    try:
        lines = open(os.path.expanduser(path)).read().splitlines()
    except OSError as e:
        raise UserError(f"--questions {path}: {e.strerror or e}") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            question = parse_question(json.loads(line))
            if question.id in seen:
                raise ValueError(f"duplicate id {question.id!r}")
        except ValueError as e:  # json.JSONDecodeError is a ValueError
            problems.append({"line": number, "error": f"{path} line {number}: {e}"})
            continue
        seen.add(question.id)
        questions.append(question)
    return questions, problems


def prompt_text(question: Question) -> str:
    """lmms-eval PerceptionTest (mc): question, options "A. ..." one per line, then the post-prompt."""
    if not question.options:
        return question.question
    options = "\n".join(f"{letter}. {option}" for letter, option in zip(question.letters, question.options))
    return f"{question.question}\n{options}\n{MC_POSTFIX}"


def answer_letter(answer: str, letters: str) -> str | None:
    """The first option letter standing alone in an answer ("B", "B.", "(B) cat", "The answer is B"),
    as lmms-eval's PerceptionTest scoring finds it; None when there is none."""
    for match in re.finditer(r"\b([A-Z])\b", answer.strip()):
        if match.group(1) in letters:
            return match.group(1)
    return None


def normalise(text: str) -> str:
    text = text.lower().strip()
    text = "".join(c for c in text if c not in string.punctuation)
    return " ".join(w for w in text.split() if w not in ("a", "an", "the"))


def is_correct(question: Question, prediction: str) -> bool:
    if question.options:
        return answer_letter(prediction, question.letters) == question.answer.upper()
    return normalise(prediction) == normalise(question.answer)


# ---------------------------------------------------------------------------- the stage-2 evaluator

DEMO_ANSWERS = "ABCD"


def demo_accuracy(stage, params) -> dict:
    """Held-out multiple-choice accuracy of a stage-2 run (`finetune.Stage`) on its built-in demo
    questions, per config.eval_delta_modes (paper App. H.3, H.4), through the inference path users
    run; {} when the run trains on other data."""
    if not stage.eval_file:
        return {}
    config, settings = stage.config, stage.settings
    model = stage.model(params)
    rows = instruct.read_annotations(stage.eval_file)[: config.eval_max_questions or None]
    result, lines = {}, []
    for mode in config.eval_delta_modes:
        mode_settings = settings.with_switches(delta_mode=mode)
        correct = tokens = 0
        for row in rows:
            video = video_from_records(stage.data_dir, instruct.video_key(row))
            chat = VideoChat(model, stage.tokenizer, mode_settings, video=lambda v=video: v,
                             sampling=SamplingConfig(max_new_tokens=3))
            question = instruct.conversation_turns(row)[0][1]
            answer = "".join(chat.ask(question))
            distributed.progress(f"held-out question {row.get('id', '')} ({mode})")
            correct += answer_letter(answer, DEMO_ANSWERS) == row["conversations"][1]["value"].strip()[:1]
            tokens = chat.last.visual_tokens
        result[f"accuracy_{mode}"] = correct / max(len(rows), 1)
        result[f"visual_tokens_{mode}"] = tokens
        lines.append(f"| {mode:<15} | {tokens:>13} | {correct:>3}/{len(rows):<3} = {correct / max(len(rows), 1):6.1%} |")
    log(f"held-out accuracy, {len(rows)} questions ({settings.keyframes_per_gop} keyframe(s) per GOP; chance 25%):\n"
        "| delta mode      | visual tokens | accuracy         |\n|-----------------|---------------|------------------|\n"
        + "\n".join(lines))
    return result
