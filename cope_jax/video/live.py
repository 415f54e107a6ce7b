"""A video arriving as a stream -> its steps as they come, by preprocessing's own code.

A thread runs the chain preprocessing runs on a file (decode, resample to fps, canonical mpeg4
re-encode with motion vectors, a step every `fusion` frames) on frames as they arrive. The canonical
stream starts a GOP every `gop` frames and codes it from that GOP's frames alone, and each step is
stored as a record (with the step before it) and read back exactly as a file's record is, so a live
step's primitives equal the finished file's (tests/test_live.py).

Sources: `-` (standard input: MPEG-TS, Matroska or anything FFmpeg detects), any URL FFmpeg opens
as a stream (udp://, tcp://, rtsp://, http://, srt://) or a file still being written (read as it
grows). A source that closes (a pipe, TCP, RTSP, HTTP) ends with it; one that has no end but
silence (UDP, RTP, a growing file) ends when no video came for `stall_seconds`; for the others
that silence is a stall.
"""

from __future__ import annotations

import dataclasses
import os
import queue
import threading
import time
from collections.abc import Iterator

import numpy as np

from cope_jax.video.settings import VideoSettings
from cope_jax.video.stream import Chunk, gop_plan
from data_pipeline import codec, preprocess, records, sampler

STDIN = "-"


@dataclasses.dataclass(frozen=True)
class Event:
    """What the stream did: `frames` canonical frames so far; `step` a new step; `end`; `error`."""

    kind: str  # "frames" | "step" | "end" | "error"
    frames: int = 0
    step: codec.Step | None = None
    message: str = ""


def open_options(source: str, stall_seconds: float) -> tuple[str, dict]:
    """Where FFmpeg reads `source` from, and the options that make it a stream: a regular file is
    followed as it grows until no data came for `stall_seconds`; network reads give up after it."""
    timeout = str(int(stall_seconds * 1e6))
    if source == STDIN:
        return "pipe:0", {}
    if source.startswith(SILENT_END_SCHEMES) or source.startswith("pipe:"):
        return source, {}  # the events' own timeout notices the silence
    if "://" in source:
        return source, {"rw_timeout": timeout}
    return os.path.expanduser(source), {"follow": "1", "rw_timeout": timeout}


SILENT_END_SCHEMES = ("udp://", "rtp://")


def is_growing_file(source: str) -> bool:
    return source != STDIN and "://" not in source and not source.startswith("pipe:")


def ends_by_silence(source: str) -> bool:
    """Whether the source has no end but silence: UDP and RTP send no end, a growing file has none."""
    return is_growing_file(source) or source.startswith(SILENT_END_SCHEMES)


class LiveStream:
    """The preprocessing chain over a stream, in a daemon thread; `events()` yields what it made.

        stream = LiveStream("-", settings.preprocessing)
        for event in stream.events(timeout=10):
            ...
    """

    def __init__(self, source: str, settings: codec.Settings, stall_seconds: float = 10.0):
        self.source, self.settings, self.stall_seconds = source, settings, stall_seconds
        # About two GOPs of events (a frame's, a step's): when the model falls behind, the thread
        # waits (the lag shows it) instead of holding the video's decoded steps in memory.
        self.queue: queue.Queue[Event] = queue.Queue(maxsize=2 * (settings.gop + settings.gop // settings.fusion))
        self.first_frame_at: float | None = None  # wall clock (perf_counter) of the first canonical frame
        self.last_frame_at: float | None = None  # ... and of the newest
        self.thread = threading.Thread(target=self._run, name="live-ingest", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        url, options = open_options(self.source, self.stall_seconds)
        try:
            frames = codec.canonical_frames(codec.source_frames(url, self.settings, options), self.settings)
            for step in codec.steps(self._counted(frames), self.settings):
                self.queue.put(Event("step", step=step))
        except codec.VideoError as e:
            self.queue.put(Event("error", message=str(e)))
        except Exception as e:  # an FFmpeg surprise ends the stream with its reason, never a traceback
            self.queue.put(Event("error", message=f"internal error ({type(e).__name__}: {e})"))
        else:
            self.queue.put(Event("end"))

    def _counted(self, frames) -> Iterator:
        count = 0
        for item in frames:
            count += 1
            self.last_frame_at = time.perf_counter()
            if self.first_frame_at is None:
                self.first_frame_at = self.last_frame_at
            self.queue.put(Event("frames", frames=count))
            yield item

    def events(self) -> Iterator[Event]:
        """The stream's events until it ends or fails (then one `error` event and no more). No event
        for `stall_seconds` is the end of a source that ends by silence (an `end` saying so; a
        growing file's end comes first, from FFmpeg's own read timeout) and a stall of any other."""
        while True:
            try:
                event = self.queue.get(timeout=self.stall_seconds + (5.0 if is_growing_file(self.source) else 0.0))
            except queue.Empty:
                silence = f"no video for {self.stall_seconds:g}s"
                if ends_by_silence(self.source):
                    yield Event("end", message=f"{silence}: taken as the stream's end")
                else:
                    yield Event("error", message=f"the stream stalled: {silence}")
                return
            yield event
            if event.kind in ("end", "error"):
                return


class StepAssembler:
    """Steps in arrival order -> one Chunk per step the LLM reads, as soon as it arrives: its role
    (keyframe or P step) is its place in the GOP's plan, and its primitives are read back from a
    record of it and the GOP's step before it (a P step's residual is taken against that step's
    stored frame), exactly as a file's record is read."""

    def __init__(self, settings: VideoSettings, source: str):
        self.settings, self.source = settings, source
        self.meta = preprocess.record_meta("live", source, settings.preprocessing)
        self.steps: list[codec.Step] = []  # the GOP in progress

    def add(self, step: codec.Step) -> Chunk | None:
        """The step as a one-step Chunk, or None when the plan does not read it (keyframes_only)."""
        if step.is_gop_start:
            self.steps = []
        self.steps.append(step)
        within, is_keyframe = gop_plan(len(self.steps), self.settings)  # a GOP's plan never changes a step's role
        if not within.size or within[-1] != len(self.steps) - 1:
            return None
        pre = self.settings.preprocessing
        window = self.steps[-2:]
        data = records.encode(self.meta, window, pre.jpeg_qscale)
        step_index = np.asarray([step.frame_index // pre.fusion], np.int32)
        return Chunk(step_index, is_keyframe[-1:], sampler.step_seconds(step_index, pre.fusion, pre.fps),
                     records.decode(data, [len(window) - 1]), gop=step.frame_index // pre.gop)
