"""A video -> the steps the LLM reads -> the arrays `CoPEVideoLM.encode_video` takes (host side).

docs/architecture.md §7: the steps come from `data_pipeline.sampler` (keyframes_per_gop keyframes per GOP, the
rest P steps, at most max_gops GOPs), or for the dense LLaVA-Video baseline `dense_frames` steps
spread uniformly, all keyframes. `video_batch` lays several videos out with static shapes: all
keyframes in one array, all P steps in another, and per video a row of source indices into the
token tables the model builds from them (padding points at a zero row).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence

import numpy as np

from cope_jax.video.settings import VideoInputError, VideoSettings
from data_pipeline import codec, preprocess, records, sampler


@dataclasses.dataclass(frozen=True)
class Video:
    """One preprocessed video: its step structure, and a reader for the primitives of some steps."""

    video_id: str
    source: str
    fps: float
    gop: int
    fusion: int
    size: int
    is_gop_start: np.ndarray  # bool [T]
    timestamps: np.ndarray  # float32 [T], seconds in the source
    read: Callable[[Sequence[int]], dict]  # steps -> records.decode dict of those steps
    seconds: float  # duration: resampled frames / fps, as LLaVA-Video's total frames / fps

    @property
    def duration(self) -> float:
        return self.seconds


def _video_from_record_bytes(data: bytes, seconds: float) -> Video:
    header, _ = records.read_header(data)
    return Video(video_id=header["video_id"], source=header["source"], fps=header["fps"], gop=header["gop"],
                 fusion=header["fusion"], size=header["height"],
                 is_gop_start=np.asarray(header["is_gop_start"], bool),
                 timestamps=np.asarray(header["timestamps"], np.float32),
                 read=lambda steps: records.decode(data, steps), seconds=float(seconds))


def video_from_file(path: str, settings: codec.Settings) -> Video:
    """Any video file preprocessing accepts, turned into primitives in memory by the same code."""
    try:
        data, counts = preprocess.encode_video(os.path.expanduser(path), settings)
    except codec.VideoError as e:
        raise VideoInputError(f"{path}: {e}") from None
    return _video_from_record_bytes(data, counts["seconds"])


def video_from_records(output_dir: str, video_id: str) -> Video:
    """A video of a preprocessing output directory, by its id."""
    try:
        data = records.open(output_dir)
        index = data.index_of(video_id)
        return _video_from_record_bytes(data.raw(index), data.videos()[index]["seconds"])
    except records.RecordError as e:
        raise VideoInputError(str(e)) from None


@dataclasses.dataclass(frozen=True)
class VideoPlan(sampler.StepPlan):
    """The sampler's plan (steps, is_keyframe) with what the time instruction needs."""

    timestamps: np.ndarray = None  # float32 [S]
    duration: float = 0.0


def plan_video(video: Video, settings: VideoSettings) -> VideoPlan:
    """Which steps the LLM reads, and as what (docs/architecture.md §7 switches)."""
    if settings.dense_frames:
        # LLaVA-Video: np.linspace(0, total - 1, N) over the video; here over its 1/fusion-rate steps.
        steps = np.unique(np.linspace(0, len(video.timestamps) - 1, settings.dense_frames).astype(np.int32))
        keyframe = np.ones(len(steps), bool)
    else:
        try:
            plan = sampler.sample_steps(video.is_gop_start, video.gop // video.fusion, settings.keyframes_per_gop,
                                        settings.max_gops)
        except ValueError as e:
            raise VideoInputError(f"{video.source}: {e}") from None
        steps, keyframe = plan.steps, plan.is_keyframe
        if settings.delta_mode == "keyframes_only":
            steps, keyframe = steps[keyframe], keyframe[keyframe]
    return VideoPlan(steps.astype(np.int32), keyframe, sampler.step_seconds(steps, video.fusion, video.fps), video.duration)


@dataclasses.dataclass(frozen=True)
class Chunk(sampler.StepPlan):
    """What a video prefix grows by: the planned steps of one GOP (a file's), or one step as it
    arrives (a live stream's), with their primitives. `video_batch` takes it as a one-video plan."""

    timestamps: np.ndarray = None  # float32 [S], seconds from the video's start
    primitives: dict = None  # records.decode dict of these steps, in order (rgb, mv, residual)
    gop: int = 0  # the GOP they belong to: a bounded cache lets whole GOPs go


def plan_chunks(video: Video, plan: VideoPlan) -> Iterator[Chunk]:
    """The plan's steps GOP by GOP, each GOP's primitives read only when its turn comes, so a long
    video holds one GOP of decoded frames at a time (dense plans group their frames the same way)."""
    gop_of_step = np.cumsum(video.is_gop_start) - 1
    gops = gop_of_step[plan.steps]
    for gop in dict.fromkeys(gops.tolist()):
        pick = gops == gop
        yield Chunk(plan.steps[pick], plan.is_keyframe[pick], plan.timestamps[pick], video.read(plan.steps[pick]), gop)


def gop_plan(num_steps: int, settings: VideoSettings) -> tuple[np.ndarray, np.ndarray]:
    """Which of a GOP's first `num_steps` steps are read and which are keyframes -> (step indices
    within the GOP, is_keyframe): the file rule (`plan_video`) applied to one GOP of a live stream
    (dense plans need a finished video: `LiveVideoChat` refuses them)."""
    plan = sampler.sample_steps(np.arange(num_steps) == 0, settings.preprocessing.gop // settings.preprocessing.fusion,
                                settings.keyframes_per_gop, max_gops=1)
    steps, keyframe = plan.steps, plan.is_keyframe
    if settings.delta_mode == "keyframes_only":
        steps, keyframe = steps[keyframe], keyframe[keyframe]
    return steps, keyframe


@dataclasses.dataclass(frozen=True)
class VideoBatch:
    """`CoPEVideoLM.encode_video`'s inputs for B videos, padded to static sizes."""

    keyframes: np.ndarray  # uint8 [K,H,W,3]
    mv: np.ndarray  # float32 [P,H,W,2]
    residual: np.ndarray  # int16 [P,H,W,3]
    token_source: np.ndarray  # int32 [B,L]
    lengths: np.ndarray  # int32 [B] real visual tokens per video


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple if multiple > 1 else n


def video_batch(plans: Sequence[VideoPlan | Chunk], primitives: Sequence[dict], tokens_per_keyframe: int,
                tokens_per_p_step: int, size: int, *, keyframe_slots: int | None = None,
                p_step_slots: int | None = None, length: int | None = None) -> VideoBatch:
    """Plans + the decoded primitives of their steps (records.decode dicts, steps in plan order) ->
    one VideoBatch. Slots and length default to exactly what the batch needs; give larger ones for
    static shapes across batches (padding frames are zero and never referenced)."""
    key_frames = [p["rgb"][plan.is_keyframe] for plan, p in zip(plans, primitives)]
    p_mv = [p["mv"][~plan.is_keyframe] for plan, p in zip(plans, primitives)]
    p_residual = [p["residual"][~plan.is_keyframe] for plan, p in zip(plans, primitives)]
    num_keyframes, num_p = sum(len(f) for f in key_frames), sum(len(m) for m in p_mv)
    keyframe_slots = num_keyframes if keyframe_slots is None else keyframe_slots
    p_step_slots = num_p if p_step_slots is None else p_step_slots
    if keyframe_slots < num_keyframes or p_step_slots < num_p:
        raise ValueError(f"batch needs {num_keyframes} keyframe and {num_p} P-step slots, got {keyframe_slots} and {p_step_slots}")
    padding = keyframe_slots * tokens_per_keyframe + p_step_slots * tokens_per_p_step
    rows, key_seen, p_seen = [], 0, 0
    for plan in plans:
        row = []
        for is_keyframe in plan.is_keyframe:
            if is_keyframe:
                row.append(key_seen * tokens_per_keyframe + np.arange(tokens_per_keyframe))
                key_seen += 1
            else:
                start = keyframe_slots * tokens_per_keyframe + p_seen * tokens_per_p_step
                row.append(start + np.arange(tokens_per_p_step))
                p_seen += 1
        rows.append(np.concatenate(row) if row else np.zeros(0, np.int64))
    lengths = np.asarray([len(r) for r in rows], np.int32)
    length = int(lengths.max(initial=0)) if length is None else length
    if length < lengths.max(initial=0):
        raise ValueError(f"batch needs {lengths.max()} visual tokens per video, got length {length}")
    token_source = np.full((len(plans), length), padding, np.int32)
    for b, row in enumerate(rows):
        token_source[b, : len(row)] = row
    return VideoBatch(keyframes=_stack_padded(key_frames, keyframe_slots, (size, size, 3), np.uint8),
                      mv=_stack_padded(p_mv, p_step_slots, (size, size, 2), np.float32),
                      residual=_stack_padded(p_residual, p_step_slots, (size, size, 3), np.int16),
                      token_source=token_source, lengths=lengths)


def _stack_padded(parts: Sequence[np.ndarray], slots: int, shape: tuple, dtype) -> np.ndarray:
    out = np.zeros((slots, *shape), dtype)
    at = 0
    for part in parts:
        out[at : at + len(part)] = part
        at += len(part)
    return out

