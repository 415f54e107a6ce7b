"""Evaluate a CoPE checkpoint on video questions.

    python -m cope_jax.evaluate --checkpoint ~/jax/cope-7b --questions perceptiontest.jsonl \
        --videos ~/data/perceptiontest/videos --output ~/eval/pt-1kf --keyframes-per-gop 1
    python -m cope_jax.evaluate ... --records ~/data/perceptiontest/primitives   # reuse preprocessing
    python -m cope_jax.evaluate ... --delta-mode zero --output ~/eval/pt-zero    # paper App. H.3

Questions are JSONL, one per line: {"id", "video" (a path under --videos), "question",
"options": ["...", ...] for multiple choice (absent: open-ended), "answer": "B" or the answer text}.
Multiple choice is asked as lmms-eval's PerceptionTest task asks it (the options as "A. ...", then
"Answer with the option's letter from the given choices directly.") and scored by the first
option letter standing alone in the answer; open-ended answers score by normalised exact match.

Each video is read once (from --records when it is preprocessed there, else from its file) and
its shared prefix (system prompt, visual stream, time instruction) is prefilled once; its questions
then continue from that KV cache, up to --batch-size of them prefilled and decoded together.
<output>/predictions.jsonl gets one line per question as it is answered (prediction, correct,
visual tokens, TTFT), so a rerun skips what is done; <output>/results.json holds the summary. Bad
rows and videos that fail to read are listed in predictions.jsonl with their reason, counted, and
never stop the run.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import os
import re
import string
import sys
import time

from cope_jax import cli
from cope_jax.errors import UserError

MC_POSTFIX = "Answer with the option's letter from the given choices directly."
PREDICTIONS, RESULTS, SETTINGS = "predictions.jsonl", "results.json", "settings.json"


# ---------------------------------------------------------------------------- questions and scoring


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


# ---------------------------------------------------------------------------- the run


def _video_source(question: Question, videos: str, records, settings):
    """A callable reading the question's video: from the records when preprocessed there, else
    from its file (preprocessed in memory at the checkpoint's settings)."""
    from cope_jax.inference import video_from_file, video_from_records

    video_id = os.path.splitext(question.video)[0].lstrip("./")
    if records is not None and video_id in records["ids"] and records["settings"] == _reading(settings.preprocessing):
        return lambda: video_from_records(records["dir"], video_id)
    return lambda: video_from_file(os.path.join(videos, question.video), settings.preprocessing)


_READING_FIELDS = ("fps", "gop", "fusion", "size")


def _reading(preprocessing) -> dict:
    """What must match for preprocessed records to stand in for reading the file."""
    return {k: getattr(preprocessing, k) for k in _READING_FIELDS}


def _earlier(output: str) -> list[dict]:
    """The lines of an earlier run's predictions.jsonl (answers, failures, malformed questions)."""
    path = os.path.join(output, PREDICTIONS)
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def _check_settings(output: str, described: dict) -> None:
    """An output directory holds one setting: a rerun with others would mix results."""
    path = os.path.join(output, SETTINGS)
    if os.path.exists(path):
        earlier = json.load(open(path))
        if earlier != described:
            changed = sorted(k for k in set(earlier) | set(described) if earlier.get(k) != described.get(k))
            raise UserError(f"--output {output}: holds predictions made with other settings ({', '.join(changed)}); "
                            "use a new --output")
    else:
        with open(path, "w") as f:
            json.dump(described, f, indent=1)


def evaluate(model, tokenizer, settings, questions: list[Question], videos: str, output: str, *, records_dir: str = "",
             max_new_tokens: int = 32, problems: list[dict] = (), checkpoint: str = "", progress: bool = True,
             share_prefix: bool = True, batch_size: int = 8) -> dict:
    """Answers every question not already in <output>/predictions.jsonl, then writes results.json.
    Up to `batch_size` questions on one video decode together after its shared prefix (greedy
    answers do not depend on it). `share_prefix=False` prefills every question's whole prompt afresh,
    one at a time (for comparison)."""
    from tqdm import tqdm

    from cope_jax.inference import VideoChat
    from cope_jax.inference.generation import SamplingConfig

    os.makedirs(output, exist_ok=True)
    _check_settings(output, {"checkpoint": checkpoint, "max_new_tokens": max_new_tokens, **settings.to_dict()})
    records = None
    if records_dir:
        from data_pipeline import records as records_module

        from cope_jax.training.instruct import data_settings

        manifest = data_settings(records_dir)
        records = {"dir": records_dir, "ids": set(records_module.open(records_dir).video_ids()),
                   "settings": {k: manifest.get(k) for k in _READING_FIELDS}}
    entries = _earlier(output)
    done = {e["id"] for e in entries if "id" in e}
    todo = [q for q in questions if q.id not in done]
    by_video: dict[str, list[Question]] = {}
    for question in todo:
        by_video.setdefault(question.video, []).append(question)
    sampling = SamplingConfig(max_new_tokens=max_new_tokens)
    with open(os.path.join(output, PREDICTIONS), "a") as log_file, \
            tqdm(total=len(questions), initial=len(done), disable=not progress, unit="q", dynamic_ncols=True) as bar:
        for problem in problems:
            if problem["error"] not in {e.get("error") for e in entries}:
                entries.append(problem)
                log_file.write(json.dumps(problem) + "\n")
        for video_name, group in by_video.items():
            # Read once either way; without sharing, each question still prefills its whole prompt.
            video = functools.cache(_video_source(group[0], videos, records, settings))
            base = VideoChat(model, tokenizer, settings, video=video, sampling=sampling)
            try:
                base.prefill_video() if share_prefix else video()
                failure = None
            except UserError as e:
                failure = str(e)
            if failure or not share_prefix or batch_size == 1:
                answered = ([_failed(q, failure)] if failure else [_answer(base.fork(), q)] for q in group)
            else:
                answered = (_answer_batch(base, group[i: i + batch_size]) for i in range(0, len(group), batch_size))
            for chunk in answered:
                for entry in chunk:
                    entries.append(entry)
                    log_file.write(json.dumps(entry) + "\n")
                log_file.flush()
                bar.update(len(chunk))
                bar.set_postfix_str(_running(entries))
    results = summarise(entries)
    with open(os.path.join(output, RESULTS), "w") as f:
        json.dump(results, f, indent=1)
    return results


def _answer(chat, question: Question) -> dict:
    return _entry(question, "".join(chat.ask(prompt_text(question))), chat.last)


def _answer_batch(chat, questions: list[Question]) -> list[dict]:
    answers = chat.ask_many([prompt_text(q) for q in questions])
    return [_entry(q, prediction, stats) for q, (prediction, stats) in zip(questions, answers)]


def _entry(question: Question, prediction: str, stats) -> dict:
    return {"id": question.id, "video": question.video, "prediction": prediction, "answer": question.answer,
            "correct": is_correct(question, prediction), "visual_tokens": stats.visual_tokens,
            "prompt_tokens": stats.prompt_tokens, "ttft_s": round(stats.ttft_s, 4)}


def _failed(question: Question, reason: str) -> dict:
    return {"id": question.id, "video": question.video, "error": reason}


def _running(entries: list[dict]) -> str:
    answered = [e for e in entries if "correct" in e]
    failed = sum("error" in e for e in entries)
    accuracy = sum(e["correct"] for e in answered) / max(len(answered), 1)
    return f"acc {accuracy:.1%}" + (f", {failed} failed" if failed else "")


def summarise(entries: list[dict]) -> dict:
    answered = [e for e in entries if "correct" in e]
    n = max(len(answered), 1)
    return {"accuracy": sum(e["correct"] for e in answered) / n, "count": len(answered),
            "failed": sum("error" in e for e in entries),
            "mean_visual_tokens": sum(e["visual_tokens"] for e in answered) / n,
            "mean_ttft_s": sum(e["ttft_s"] for e in answered) / n}


# ---------------------------------------------------------------------------- ablation sweep

# The paper's grid on one checkpoint: keyframe density (Tab. 1), Δ-tokens zeroed (App. H.3),
# keyframes only (H.4), smaller fusion windows = more P steps per second (H.5), and the dense
# LLaVA-Video baseline of 64 frames (Fig. 4a).
PAPER_SWEEP = ("keyframes_per_gop=1", "keyframes_per_gop=2", "keyframes_per_gop=4",
               "keyframes_per_gop=1,delta_mode=zero", "keyframes_per_gop=1,delta_mode=keyframes_only",
               "keyframes_per_gop=1,fusion=15", "keyframes_per_gop=1,fusion=10", "dense_frames=64")
SWEEP_FIELDS = {"keyframes_per_gop": int, "max_gops": int, "dense_frames": int, "delta_mode": str, "fusion": int}


def parse_sweep(spec: str) -> list[dict]:
    """"paper", or settings separated by ";" each "field=value,field=value" (fields: keyframes_per_gop,
    delta_mode, dense_frames, max_gops, fusion) -> one dict per setting."""
    entries = PAPER_SWEEP if spec.strip() == "paper" else [e for e in spec.split(";") if e.strip()]
    settings = []
    for entry in entries:
        setting = {}
        for part in entry.split(","):
            field, _, value = part.partition("=")
            field = field.strip()
            if field not in SWEEP_FIELDS or not value.strip():
                raise UserError(f"--sweep {entry!r}: expected field=value with fields {', '.join(SWEEP_FIELDS)}")
            try:
                setting[field] = SWEEP_FIELDS[field](value.strip())
            except ValueError:
                raise UserError(f"--sweep {entry!r}: {field} takes an integer, got {value.strip()!r}") from None
        settings.append(setting)
    if not settings:
        raise UserError("--sweep: no settings")
    return settings


def sweep_name(setting: dict) -> str:
    return "_".join(f"{k}-{v}" for k, v in setting.items())


def apply_setting(settings, setting: dict):
    """A sweep entry over the checkpoint's VideoSettings (fusion changes how videos are preprocessed)."""
    switches = {k: v for k, v in setting.items() if k != "fusion"}
    if "fusion" in setting:
        switches["preprocessing"] = dataclasses.replace(settings.preprocessing, fusion=setting["fusion"])
    updated = dataclasses.replace(settings, **switches)
    try:
        updated.check()
    except ValueError as e:
        raise UserError(f"--sweep {sweep_name(setting)}: {e}") from None
    return updated


def run_sweep(model, tokenizer, settings, setting_list: list[dict], questions, videos: str, output: str, **kwargs) -> list[dict]:
    """Evaluates every setting into <output>/<name>/, then writes <output>/sweep.md and sweep.png."""
    rows = []
    for setting in setting_list:
        name = sweep_name(setting)
        print(f"sweep: {name}", file=sys.stderr, flush=True)
        results = evaluate(model, tokenizer, apply_setting(settings, setting), questions, videos,
                           os.path.join(output, name), **kwargs)
        rows.append({"setting": name, **setting, **results})
    write_sweep_table(rows, os.path.join(output, "sweep.md"))
    plot_sweep(rows, os.path.join(output, "sweep.png"))
    with open(os.path.join(output, "sweep.json"), "w") as f:
        json.dump(rows, f, indent=1)
    return rows


def write_sweep_table(rows: list[dict], path: str) -> None:
    lines = ["| setting | accuracy | questions | failed | visual tokens / video | TTFT (s) |",
             "|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row['setting']} | {row['accuracy']:.1%} | {row['count']} | {row['failed']} | "
                     f"{row['mean_visual_tokens']:.0f} | {row['mean_ttft_s']:.3f} |")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")


def plot_sweep(rows: list[dict], path: str) -> None:
    """Accuracy against visual tokens per video, one point per setting, the dense baseline marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4.5))
    for row in rows:
        dense = bool(row.get("dense_frames"))
        axes.scatter(row["mean_visual_tokens"], 100 * row["accuracy"], marker="s" if dense else "o",
                     color="tab:red" if dense else "tab:blue", s=60 if dense else 40, zorder=3)
        axes.annotate(row["setting"], (row["mean_visual_tokens"], 100 * row["accuracy"]),
                      textcoords="offset points", xytext=(5, 4), fontsize=7)
    axes.scatter([], [], marker="o", color="tab:blue", label="CoPE settings")
    axes.scatter([], [], marker="s", color="tab:red", label="dense keyframes (LLaVA-Video baseline)")
    axes.legend(loc="lower right", fontsize=8)
    axes.set_xscale("log")
    axes.margins(x=0.25, y=0.1)
    axes.set_xlabel("visual tokens per video (log)")
    axes.set_ylabel("accuracy (%)")
    axes.set_title("CoPE-VideoLM: accuracy vs visual tokens")
    axes.grid(True, alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


# ---------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cope_jax.evaluate", description=__doc__.split("\n\n")[0],
                                     epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", required=True, help="a CoPE checkpoint (cope_jax.convert, or <workdir>/model of stage 2)")
    parser.add_argument("--questions", required=True, help="JSONL questions (see above)")
    parser.add_argument("--videos", default=".", help="the directory the questions' video paths are under (default: .)")
    parser.add_argument("--records", default="", help="preprocessing output holding (some of) the videos; those are not re-read")
    parser.add_argument("--output", required=True, help="predictions.jsonl, results.json and settings.json go here; a rerun resumes")
    parser.add_argument("--limit", type=int, default=0, help="only the first N questions (0: all)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="longest answer (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="questions on one video answered together after its shared "
                        "prefix (default %(default)s; 1: one at a time; greedy answers are the same)")
    cli.add_switch_arguments(parser)
    parser.add_argument("--sweep", default="", help='ablation grid: "paper" (keyframes per GOP 1/2/4, zero, keyframes_only, '
                        'fusion 15/10, dense 64) or settings like "keyframes_per_gop=1;delta_mode=zero;fusion=15" -> '
                        "one subdirectory each, sweep.md (table) and sweep.png (accuracy vs visual tokens)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.limit < 0 or args.max_new_tokens < 1 or args.batch_size < 1:
            raise UserError("--limit must be >= 0, --max-new-tokens >= 1 and --batch-size >= 1")
        sweep = parse_sweep(args.sweep) if args.sweep else None
        questions, problems = read_questions(args.questions)
        if args.limit:
            questions = questions[: args.limit]
        if not questions:
            raise UserError(f"--questions {args.questions}: no usable question ({len(problems)} malformed lines)")
        from cope_jax import inference

        print(f"loading {args.checkpoint} ...", file=sys.stderr, flush=True)
        model, tokenizer, settings = inference.load(args.checkpoint, **cli.switches_from_args(args))
        started = time.perf_counter()
        common = dict(records_dir=os.path.expanduser(args.records), max_new_tokens=args.max_new_tokens, problems=problems,
                      batch_size=args.batch_size,
                      checkpoint=os.path.abspath(os.path.expanduser(args.checkpoint)))
        if sweep:
            for setting in sweep:  # every setting checked before the first one runs
                apply_setting(settings, setting)
            rows = run_sweep(model, tokenizer, settings, sweep, questions, os.path.expanduser(args.videos),
                             os.path.expanduser(args.output), **common)
            print(open(os.path.join(os.path.expanduser(args.output), "sweep.md")).read(), end="")
            print(f"{len(rows)} settings in {time.perf_counter() - started:.1f}s -> {args.output}/sweep.md, sweep.png")
            return 0
        results = evaluate(model, tokenizer, settings, questions, os.path.expanduser(args.videos),
                           os.path.expanduser(args.output), **common)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"accuracy {results['accuracy']:.2%} over {results['count']} questions ({results['failed']} failed), "
          f"{results['mean_visual_tokens']:.0f} visual tokens and TTFT {results['mean_ttft_s']:.3f}s on average, "
          f"{time.perf_counter() - started:.1f}s -> {os.path.join(args.output, RESULTS)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
