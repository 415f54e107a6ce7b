"""Answering a benchmark's questions with a CoPE checkpoint and scoring them (`cope_jax.evaluate`).

Each video is read once (from preprocessed records when they hold it at the same settings, else
from its file) and its shared prefix (system prompt, visual stream, time instruction) is prefilled
once; its questions then continue from that KV cache, up to `batch_size` of them prefilled and
decoded together. <output>/predictions.jsonl gets one line per question as it is answered, so a
rerun skips what is done; <output>/results.json holds the summary. The ablation sweep runs the
paper's grid of settings on one checkpoint into one subdirectory each, with a table and a plot.
"""

from __future__ import annotations

import functools
import json
import os
import sys

import matplotlib
from tqdm import tqdm

from cope_jax.errors import UserError
from cope_jax.evaluation.questions import Question, is_correct, prompt_text
from cope_jax.inference import VideoChat
from cope_jax.inference.generation import SamplingConfig
from cope_jax.video.settings import VideoSettings
from cope_jax.video.stream import video_from_file, video_from_records
from cope_jax.video.switches import SWITCHES
from data_pipeline import records as records_module

PREDICTIONS, RESULTS, SETTINGS = "predictions.jsonl", "results.json", "settings.json"


# ---------------------------------------------------------------------------- the run


def _video_source(question: Question, videos: str, records, settings):
    """A callable reading the question's video: from the records when preprocessed there, else
    from its file (preprocessed in memory at the checkpoint's settings)."""
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
        earlier.update(VideoSettings.from_dict(earlier).to_dict())  # older outputs' spellings (time_instruction: true)
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
    os.makedirs(output, exist_ok=True)
    _check_settings(output, {"checkpoint": checkpoint, "max_new_tokens": max_new_tokens, **settings.to_dict()})
    records = None
    if records_dir:
        manifest = records_module.read_manifest(records_dir)["settings"]
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
SWEEP_FIELDS = {**SWITCHES, "fusion": int}  # the switches, and fusion (H.5: it changes the preprocessing)


def parse_sweep(spec: str) -> list[dict]:
    """"paper", or settings separated by ";" each "field=value,field=value" (fields: keyframes_per_gop,
    delta_mode, dense_frames, max_gops, time_instruction, fusion) -> one dict per setting."""
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
    return settings.with_switches(where=f"--sweep {sweep_name(setting)}", error=UserError, **setting)


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
    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt  # after use(): pyplot picks its backend when imported

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
