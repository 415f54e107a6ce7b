"""Any video -> canonical MPEG-4 Part 2 stream -> per-step codec primitives, all streaming.

1. `source_frames`: PyAV decode in presentation order, resampled by timestamp to `fps`, squashed to
   `size` x `size`, rotated upright. Frames are never all held: one pending frame at a time.
2. `canonical_frames`: re-encode in memory with `mpeg4` (fixed GOP, I-frames forced at GOP starts,
   no B-frames, no scene-cut I-frames) and decode again with `flags2=+export_mvs`. Frame types are
   checked: an encoder that ignores a setting fails loudly instead of shifting every GOP.
3. `steps`: every `fusion` frames, the decoded RGB and the motion fused over the window
   (docs/architecture.md §3). The residual is not stored: `records` derives it exactly from these two.
"""

from __future__ import annotations

import dataclasses
import errno
from fractions import Fraction
from typing import Iterator

import av
import av.logging
from av.video.reformatter import VideoReformatter
import numpy as np

from cope_jax.errors import UserError
from data_pipeline import primitives

I_FRAME = av.video.frame.PictureType.I
P_FRAME = av.video.frame.PictureType.P
MACROBLOCK = 16


class VideoError(UserError):
    """An input that cannot give a correct record; the message is the reason written to errors.jsonl."""


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that changes the records; stored in manifest.json and checked on resume."""

    fps: float = 30.0
    gop: int = 240
    fusion: int = 30
    size: int = 384
    # Fixed quantiser of the canonical mpeg4 stream (1 best .. 31 worst). The paper (§4.1) does not
    # give one; 4 keeps the decoded frames near-transparent (docs/preprocessing.md, "Storage") at
    # modest cost.
    qscale: int = 4
    # Motion is back-traced once per mv_block x mv_block tile (docs/preprocessing.md, "Storage":
    # per-pixel traces are noisy, cost 7x the bytes and make motion compensation no better).
    mv_block: int = 4
    # mjpeg quantiser of the stored RGB (1 = finest); the residual is derived from these frames.
    jpeg_qscale: int = 1

    def check(self) -> None:
        problems = []
        if not self.fps > 0:
            problems.append(f"fps must be > 0, got {self.fps}")
        if self.size < MACROBLOCK or self.size % MACROBLOCK:
            problems.append(f"size must be a positive multiple of {MACROBLOCK} (MPEG-4 macroblocks), got {self.size}")
        if self.fusion < 1 or self.gop < 1 or self.gop % self.fusion:
            problems.append(f"gop ({self.gop}) must be a positive multiple of fusion ({self.fusion})")
        for name in ("qscale", "jpeg_qscale"):
            if not 1 <= getattr(self, name) <= 31:
                problems.append(f"{name} must be in 1..31, got {getattr(self, name)}")
        if self.mv_block not in (1, 2, 4, 8, 16):
            problems.append(f"mv_block must be one of 1, 2, 4, 8, 16, got {self.mv_block}")
        if problems:
            raise ValueError("; ".join(problems))

    @classmethod
    def from_dict(cls, d: dict) -> "Settings":
        """The settings a manifest.json records (fields a later version added are ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclasses.dataclass
class Step:
    """One sampled step: frame `frame_index` of the canonical stream."""

    frame_index: int
    time: float
    is_gop_start: bool
    rgb: np.ndarray  # uint8 [H, W, 3], the decoded canonical frame
    mv_blocks: np.ndarray  # float32 [H / mv_block, W / mv_block, 2], fused over the step

    def mv(self, block: int) -> np.ndarray:
        return primitives.upsample(self.mv_blocks, block)


def _upright(frame: av.VideoFrame, size: int, scaler: VideoReformatter) -> av.VideoFrame:
    """Squash to size x size (like the SigLIP processor) and undo the display rotation.

    `scaler` is kept across frames: `frame.reformat` would rebuild the bicubic scaler every call,
    which cost 7x the scaling itself (bench/bench_preprocess.py)."""
    rotation = int(frame.rotation or 0) % 360
    if rotation == 0:
        return scaler.reformat(frame, width=size, height=size, format="yuv420p", interpolation="BICUBIC")
    rgb = scaler.reformat(frame, width=size, height=size, format="rgb24", interpolation="BICUBIC").to_ndarray()
    # FFmpeg's rotation is counter-clockwise degrees to apply for display.
    upright = np.ascontiguousarray(np.rot90(rgb, k=rotation // 90))
    return av.VideoFrame.from_ndarray(upright, format="rgb24").reformat(format="yuv420p")


def _reason(error: Exception) -> str:
    return getattr(error, "strerror", None) or str(error)


class _DecoderErrors:
    """FFmpeg's own error log while decoding one video. H.264 decoders conceal corrupt slices and
    carry on, logging "error while decoding MB ..." but raising nothing: without this, a damaged
    file would become a silently wrong record."""

    def __init__(self):
        level = av.logging.get_level()
        if level is None or level < av.logging.ERROR:  # PyAV forwards nothing by default
            av.logging.set_level(av.logging.ERROR)
        av.logging.set_skip_repeated(False)  # else a message seen for an earlier video is swallowed
        self.capture = av.logging.Capture(local=False)  # decoder threads log too
        self.checked = 0

    def __enter__(self):
        self.logs = self.capture.__enter__()
        return self

    def __exit__(self, *exc):
        return self.capture.__exit__(*exc)

    def first_new(self) -> str | None:
        """The first error logged since the last call, if any."""
        new = self.logs[self.checked:]
        self.checked += len(new)
        return next((message.strip() for level, _, message in new if level <= av.logging.ERROR), None)


def source_frames(path: str, settings: Settings, options: dict | None = None) -> Iterator[tuple[float, av.VideoFrame]]:
    """Yields (seconds since the first frame, upright yuv420p frame) at exactly `fps`.

    Output frame k shows the source frame on screen at time k / fps: the last one whose
    presentation timestamp is <= k / fps. Timestamps are exact fractions, so no drift on long or
    variable-frame-rate inputs. Decoder errors (concealed corruption) reject the video. `options`
    go to FFmpeg's demuxer and protocol (a live source's follow or rw_timeout).
    """
    fps = Fraction(settings.fps).limit_denominator(1001 * 1000)
    with _DecoderErrors() as errors:
        try:
            container = av.open(path, options=options or {})
        except (av.error.FFmpegError, OSError, UnicodeDecodeError) as e:
            detail = errors.first_new() or _reason(e)
            raise VideoError(f"cannot open (not a video, or truncated before its index): {detail}") from None
        with container:
            yield from _resampled(container, path, settings, fps, errors, growing=(options or {}).get("follow") == "1")


def _resampled(container, path: str, settings: Settings, fps: Fraction, errors: _DecoderErrors, growing: bool = False):
    if not container.streams.video:
        raise VideoError("no video stream (audio-only or not a video)")
    stream = container.streams.video[0]
    time_base = stream.time_base or Fraction(1, 90000)
    default_duration = 1 / (stream.average_rate or stream.guessed_rate or fps)
    first = pending = pending_time = None
    scaler = VideoReformatter()
    emitted = 0
    try:
        for frame in _decoded(container, stream, growing):
            if error := errors.first_new():
                raise _stream_error(error, pending_time)
            if frame.pts is None:
                raise VideoError("frame without a presentation timestamp")
            time = frame.pts * time_base
            first = time if first is None else first
            time -= first
            if pending is not None and time <= pending_time:
                continue  # duplicate or out-of-order timestamp: keep the frame shown first
            while pending is not None and Fraction(emitted) / fps < time:
                yield float(Fraction(emitted) / fps), pending
                emitted += 1
            pending, pending_time = _upright(frame, settings.size, scaler), time
    except av.error.FFmpegError as e:
        raise VideoError(f"undecodable after {emitted} frames: {errors.first_new() or _reason(e)}") from None
    if error := errors.first_new():
        raise _stream_error(error, pending_time)
    if pending is None:
        raise VideoError("no decodable video frames")
    _check_complete(_declared_seconds(container, stream, time_base), pending_time)
    end = pending_time + default_duration
    while Fraction(emitted) / fps < end:
        yield float(Fraction(emitted) / fps), pending
        emitted += 1


def _decoded(container, stream, growing: bool) -> Iterator[av.VideoFrame]:
    """The stream's frames in presentation order. A file followed as it grows ends when no data came
    for its rw_timeout (FFmpeg says EIO); the decoder then still holds the frames it was reordering
    (B-frames), which a flush gives back."""
    try:
        yield from container.decode(stream)
    except av.error.FFmpegError as e:
        if not (growing and getattr(e, "errno", None) == errno.EIO):
            raise
        yield from stream.codec_context.decode(None)


def _stream_error(message: str, at) -> VideoError:
    kind = "truncated" if "prematurely" in message or "truncat" in message.lower() else "corrupt stream"
    return VideoError(f"{kind} near {float(at or 0):.2f}s: {message}")


def _declared_seconds(container, stream, time_base) -> float | None:
    """The video duration the container claims: the stream's own, else the container's (Matroska)."""
    if stream.duration is not None:
        return float(stream.duration * time_base)
    if container.duration is not None:
        return container.duration / 1e6  # AV_TIME_BASE
    return None


def _check_complete(declared: float | None, last_time) -> None:
    """A container that declares more video than could be decoded was truncated."""
    if declared is not None and declared - float(last_time) > 1.0 + 0.05 * declared:
        raise VideoError(f"truncated: the container declares {declared:.2f}s of video but frames end at {float(last_time):.2f}s")


def _encoder(settings: Settings) -> av.CodecContext:
    encoder = av.CodecContext.create("mpeg4", "w")
    encoder.width = encoder.height = settings.size
    encoder.pix_fmt = "yuv420p"
    encoder.time_base = 1 / Fraction(settings.fps).limit_denominator(1001 * 1000)
    encoder.gop_size = settings.gop
    encoder.max_b_frames = 0
    # A fixed quantiser needs the flag *and* qmin = qmax: PyAV cannot set a frame's `quality`,
    # which the flag alone would read (and find 0, silently meaning qmin).
    encoder.qscale = True
    encoder.qmin = encoder.qmax = settings.qscale
    # sc_threshold alone does not stop mpeg4's scene-cut I-frames (docs/architecture.md §3); forced picture
    # types below do, and the decoded types are checked anyway.
    # One thread and bit-exact DSP: the same input gives the same bytes on any worker or CPU.
    encoder.options = {"sc_threshold": "1000000000", "threads": "1", "flags": "+bitexact"}
    return encoder


def canonical_frames(frames: Iterator[tuple[float, av.VideoFrame]], settings: Settings) -> Iterator[tuple[float, av.VideoFrame]]:
    """Re-encodes to the canonical stream and yields its decoded frames with motion vectors attached."""
    encoder = _encoder(settings)
    decoder = av.CodecContext.create("mpeg4", "r")
    decoder.options = {"flags2": "+export_mvs", "threads": "1", "flags": "+bitexact"}
    times: dict[int, float] = {}  # pts -> source time, for frames still inside the codec

    def decode(packets):
        for packet in packets:
            for out in decoder.decode(packet):
                yield times.pop(out.pts), out

    for index, (time, frame) in enumerate(frames):
        frame.pts, frame.time_base = index, encoder.time_base  # PyAV rescales pts across time bases
        frame.pict_type = I_FRAME if index % settings.gop == 0 else P_FRAME
        times[index] = time
        yield from decode(encoder.encode(frame))
    yield from decode(encoder.encode(None))
    yield from decode([None])


def _motion_vectors(frame: av.VideoFrame):
    side = frame.side_data.get("MOTION_VECTORS")
    return None if side is None else side.to_ndarray()


def steps(frames: Iterator[tuple[float, av.VideoFrame]], settings: Settings) -> Iterator[Step]:
    """Canonical decoded frames -> one Step every `fusion` frames (docs/architecture.md §3)."""
    size, block = settings.size, settings.mv_block
    fields: list[np.ndarray] = []
    no_motion = np.zeros((size // block, size // block, 2), np.float32)
    to_rgb = VideoReformatter()
    count = 0
    for index, (time, frame) in enumerate(frames):
        in_gop = index % settings.gop
        expected = I_FRAME if in_gop == 0 else P_FRAME
        if frame.pict_type != expected:
            raise VideoError(f"canonical encoder made frame {index} {frame.pict_type.name}, expected {expected.name}; "
                             "the mpeg4 encoder ignored the GOP settings")
        if in_gop:
            fields.append(primitives.block_motion(_motion_vectors(frame), size, size))
        if in_gop % settings.fusion == 0:
            mv = no_motion if in_gop == 0 else primitives.fuse(fields, size, size, block)
            fields = []
            yield Step(index, time, in_gop == 0, to_rgb.reformat(frame, format="rgb24").to_ndarray(), mv)
        count += 1
    if count == 0:
        raise VideoError("no frames after resampling")


def video_steps(path: str, settings: Settings) -> Iterator[Step]:
    """The whole per-video chain, streaming."""
    return steps(canonical_frames(source_frames(path, settings), settings), settings)


__all__ = ["Settings", "Step", "VideoError", "source_frames", "canonical_frames", "steps", "video_steps"]
