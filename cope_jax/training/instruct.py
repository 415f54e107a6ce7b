"""Stage-2 data: LLaVA-Video-178K conversations joined to preprocessed videos (docs/architecture.md §8).

Rows come from `.json` lists, `.jsonl` files or LLaVA's YAML mixture (`read_annotations`). Each
row is checked and budgeted once, before any batching (`InstructSource`): its video must be in the
preprocessing output (joined on the `video` path without extension), its conversation well
formed, and its visual + text tokens must fit `max_seq_len`; over it, GOPs are dropped uniformly
(never assistant text). What cannot be used is listed with its reason, never dropped silently.

An example has static shapes: ids padded to `max_seq_len` (trimmed per batch to a length bucket),
and the video's keyframes and P steps in fixed slots with a per-video token_source, the layout
`CoPEVideoLM.encode_videos` takes. The loss mask is the prompt module's: the assistant's words
and their `<|im_end|>` only.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re

import grain.python as grain
import jax
import numpy as np

from cope_jax.errors import ConfigError, UserError
from cope_jax.training.loop import log
from cope_jax.video import prompt
from cope_jax.video.settings import VideoSettings
from cope_jax.video.stream import Video, plan_video, video_batch
from data_pipeline import records, sampler
from data_pipeline.loaders import pair_loader

SKIPPED_FILE = "skipped.jsonl"


class AnnotationError(UserError):
    """An annotation file or mixture that cannot be read; the message names it."""


# ---------------------------------------------------------------------------- annotation files


def read_annotations(paths, seed: int = 0) -> list[dict]:
    """Rows of every file in `paths` (a path, a comma-separated string or a list), in order."""
    if isinstance(paths, str):
        paths = [p for p in paths.split(",") if p.strip()]
    rows = []
    for path in paths:
        path = os.path.expanduser(str(path).strip())
        if path.endswith((".yaml", ".yml")):
            rows += _read_mixture(path, seed)
        else:
            rows += _read_rows(path)
    return rows


def _read_rows(path: str) -> list[dict]:
    if not os.path.exists(path):
        raise AnnotationError(f"{path}: no such annotation file")
    try:
        with open(path) as f:
            if path.endswith(".jsonl"):
                rows = [json.loads(line) for line in f if line.strip()]
            else:
                rows = json.load(f)
    except (ValueError, UnicodeDecodeError) as e:
        raise AnnotationError(f"{path}: not valid JSON{' lines' if path.endswith('.jsonl') else ''} ({e})") from None
    if not isinstance(rows, list):
        raise AnnotationError(f"{path}: expected a JSON list of rows, got {type(rows).__name__}")
    return [dict(row, _file=path) if isinstance(row, dict) else {"_bad": row, "_file": path} for row in rows]


_STRATEGY = re.compile(r"^(all|first|end|random)(?::(\d+(?:\.\d+)?)(%?))?$")


def _read_mixture(path: str, seed: int) -> list[dict]:
    """LLaVA's data mixture: `datasets: [{json_path, sampling_strategy: all|first:N|end:N|random:N}]`,
    N a count or a percentage; json_path relative to the YAML file's directory."""
    import yaml

    try:
        with open(path) as f:
            mixture = yaml.safe_load(f)
    except OSError as e:
        raise AnnotationError(f"{path}: cannot read the mixture ({e.strerror or e})") from None
    except yaml.YAMLError as e:
        raise AnnotationError(f"{path}: not valid YAML ({str(e).splitlines()[0]})") from None
    if not isinstance(mixture, dict) or not isinstance(mixture.get("datasets"), list):
        raise AnnotationError(f"{path}: expected a 'datasets:' list of {{json_path, sampling_strategy}}")
    rows, rng = [], np.random.default_rng(seed)
    for i, entry in enumerate(mixture["datasets"]):
        if not isinstance(entry, dict) or "json_path" not in entry:
            raise AnnotationError(f"{path}: datasets[{i}] has no json_path")
        json_path = os.path.join(os.path.dirname(os.path.abspath(path)), os.path.expanduser(entry["json_path"]))
        strategy = str(entry.get("sampling_strategy", "all")).strip()
        match = _STRATEGY.match(strategy)
        if not match or (match.group(1) != "all" and match.group(2) is None):
            raise AnnotationError(f"{path}: datasets[{i}] sampling_strategy {strategy!r}: expected all, first:N, "
                                  "end:N or random:N (N a count or a percentage like 10%)")
        rows += _sampled(_read_rows(json_path), match.group(1), match.group(2), match.group(3), rng)
    return rows


def _sampled(rows: list[dict], how: str, amount: str | None, percent: str, rng) -> list[dict]:
    if how == "all":
        return rows
    n = round(len(rows) * float(amount) / 100) if percent else int(float(amount))
    n = min(n, len(rows))
    if how == "first":
        return rows[:n]
    if how == "end":
        return rows[len(rows) - n:]
    return [rows[i] for i in sorted(rng.choice(len(rows), n, replace=False))]


# ---------------------------------------------------------------------------- rows


class BadRow(ValueError):
    """Why one annotation row is skipped."""


def conversation_turns(row: dict) -> list[tuple[str, str]]:
    """A row's conversation as (role, text) turns, the `<image>` placeholder taken out of the
    first human turn (the stream goes where the prompt template puts it)."""
    turns = row.get("conversations")
    if not isinstance(turns, list) or not turns:
        raise BadRow("no 'conversations' list")
    out = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or turn.get("from") not in ("human", "gpt") or not isinstance(turn.get("value"), str):
            raise BadRow(f"conversations[{i}]: expected {{'from': 'human'|'gpt', 'value': str}}")
        expected = "human" if i % 2 == 0 else "gpt"
        if turn["from"] != expected:
            raise BadRow(f"conversations[{i}] is from {turn['from']!r}; turns must alternate human, gpt, ...")
        out.append((turn["from"], turn["value"]))
    if out[-1][0] != "gpt":
        raise BadRow("the conversation ends without an answer (last turn not from 'gpt')")
    placeholders = [text.count(prompt.IMAGE_PLACEHOLDER) for _, text in out]
    if placeholders[0] != 1 or sum(placeholders) != 1:
        raise BadRow(f"expected exactly one {prompt.IMAGE_PLACEHOLDER} placeholder, in the first human turn")
    first = out[0][1].replace(prompt.IMAGE_PLACEHOLDER, "").strip("\n")
    return [("human", first)] + out[1:]


def video_key(row: dict) -> str:
    """The preprocessing video id a row joins on: its `video` path without extension."""
    video = row.get("video")
    if not isinstance(video, str) or not video:
        raise BadRow("no 'video' field")
    return os.path.splitext(video.replace(os.sep, "/").lstrip("./"))[0]


# ---------------------------------------------------------------------------- the source


@dataclasses.dataclass(frozen=True)
class Example:
    """One usable row: where its video is and how much of it fits."""

    row: int  # index into the rows
    record: int  # index into the preprocessing output
    max_gops: int  # GOPs kept (<= the settings' max_gops when over budget)
    tokens: int  # visual + text tokens
    keyframes: int
    p_steps: int
    visual_tokens: int


class InstructSource(grain.RandomAccessDataSource):
    """Checked, budgeted rows -> fixed-shape examples (`__getitem__`)."""

    def __init__(self, rows: list[dict], data_dir: str, tokenizer, settings: VideoSettings, *,
                 tokens_per_keyframe: int, tokens_per_p_step: int, max_seq_len: int, size: int):
        self.rows, self.tokenizer, self.settings = rows, tokenizer, settings
        self.records = records.open(data_dir)
        self.preprocessing = records.read_manifest(data_dir)["settings"]
        self.videos = self.records.videos()
        self.tokens_per_keyframe, self.tokens_per_p_step = tokens_per_keyframe, tokens_per_p_step
        self.max_seq_len, self.size = max_seq_len, size
        by_id = {video["video_id"]: i for i, video in enumerate(self.videos)}
        self.examples, self.skipped = [], []
        for i, row in enumerate(rows):
            try:
                if "_bad" in row:
                    raise BadRow(f"not a JSON object: {str(row['_bad'])[:60]!r}")
                key = video_key(row)
                if key not in by_id:
                    raise BadRow(f"video {key!r} is not in the preprocessing output {data_dir}")
                self.examples.append(self._budget(i, by_id[key]))
            except BadRow as e:
                self.skipped.append({"row": i, "id": row.get("id"), "file": row.get("_file"), "reason": str(e)})
        if not self.examples:
            reasons = sorted({s["reason"] for s in self.skipped})[:3]
            raise ConfigError(f"no usable training rows among {len(rows)} ({'; '.join(reasons) or 'no rows'})")
        self.keyframe_slots = max(e.keyframes for e in self.examples)
        self.p_step_slots = max(e.p_steps for e in self.examples)
        self.visual_slots = max(e.visual_tokens for e in self.examples)

    def video(self, record: int) -> Video:
        """A record as `stream.Video`, from its sidecar counts alone (the sampler's step rules)."""
        entry, p = self.videos[record], self.preprocessing
        steps = np.arange(entry["steps"])
        return Video(video_id=entry["video_id"], source=entry["source"], fps=p["fps"], gop=p["gop"], fusion=p["fusion"],
                     size=p["size"], is_gop_start=sampler.gop_starts(steps, p["gop"], p["fusion"]),
                     timestamps=sampler.step_seconds(steps, p["fusion"], p["fps"]),
                     read=lambda wanted: self.records.read(record, wanted), seconds=float(entry["seconds"]))

    def _prompt(self, row: dict, video: Video, max_gops: int):
        settings = dataclasses.replace(self.settings, max_gops=max_gops)
        plan = plan_video(video, settings)
        visual = plan.tokens(self.tokens_per_keyframe, self.tokens_per_p_step)
        preamble = prompt.time_instruction(plan.duration, plan.timestamps, settings.time_instruction)
        pieces = prompt.conversation_pieces(conversation_turns(row), preamble)
        return plan, prompt.tokenize(self.tokenizer, pieces, visual), visual

    def _budget(self, i: int, record: int) -> Example:
        video = self.video(record)
        if video.is_gop_start.size == 0:
            raise BadRow(f"video {video.video_id!r} has no steps")
        gops = int(min(self.settings.max_gops, video.is_gop_start.sum()))
        for max_gops in range(gops, 0, -1):  # drop GOPs (uniformly, by the sampler) until it fits
            plan, tokens, visual = self._prompt(self.rows[i], video, max_gops)
            if len(tokens) <= self.max_seq_len:
                return Example(i, record, max_gops, len(tokens), plan.num_keyframes, plan.num_p_steps, visual)
        raise BadRow(f"{len(tokens)} tokens even with one GOP ({visual} visual); max_seq_len is {self.max_seq_len}")

    def write_skipped(self, workdir: str) -> None:
        """<workdir>/skipped.jsonl: every row that cannot train and why; a one-line summary in the log."""
        if jax.process_index() == 0:
            os.makedirs(workdir, exist_ok=True)
            with open(os.path.join(workdir, SKIPPED_FILE), "w") as f:
                for entry in self.skipped:
                    f.write(json.dumps(entry) + "\n")
        if self.skipped:
            reasons = {}
            for entry in self.skipped:
                reason = entry["reason"].split(":")[0]
                reasons[reason] = reasons.get(reason, 0) + 1
            log(f"skipped {len(self.skipped)} of {len(self.rows)} rows (listed in {os.path.join(workdir, SKIPPED_FILE)}): "
                + "; ".join(f"{n} x {r}" for r, n in sorted(reasons.items(), key=lambda kv: -kv[1])[:3]))

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, k: int) -> dict:
        example = self.examples[k]
        video = self.video(example.record)
        plan, tokens, _ = self._prompt(self.rows[example.row], video, example.max_gops)
        batch = video_batch([plan], [video.read(plan.steps)], self.tokens_per_keyframe, self.tokens_per_p_step,
                            self.size, keyframe_slots=self.keyframe_slots, p_step_slots=self.p_step_slots,
                            length=self.visual_slots)
        pad = self.max_seq_len - len(tokens)
        return {"ids": np.pad(tokens.ids, (0, pad)), "is_visual": np.pad(tokens.is_visual, (0, pad)),
                "is_target": np.pad(tokens.is_target, (0, pad)), "length": np.int32(len(tokens)),
                "keyframes": batch.keyframes, "mv": batch.mv, "residual": batch.residual,
                "token_source": batch.token_source[0], "example": np.int64(k)}

    def __repr__(self) -> str:
        return f"InstructSource({len(self)} examples, {len(self.skipped)} skipped)"


def loader(source: InstructSource, *, global_batch_size: int, seed: int, workers: int, process_index: int = 0,
           process_count: int = 1) -> grain.DataLoader:
    """As `data_pipeline.loaders.pair_loader`: one global shuffle per epoch, each process its slice."""
    return pair_loader(source, global_batch_size=global_batch_size, seed=seed, workers=workers,
                       process_index=process_index, process_count=process_count)


def bucket_length(lengths: np.ndarray, buckets) -> int:
    """The smallest bucket that holds the longest sequence of a batch."""
    longest = int(np.max(lengths))
    for bucket in sorted(buckets):
        if bucket >= longest:
            return int(bucket)
    raise ValueError(f"a sequence of {longest} tokens exceeds the largest length bucket {max(buckets)}")
