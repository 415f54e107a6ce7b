"""Synthetic test videos with known content and motion, written with PyAV."""

from __future__ import annotations

import struct
from fractions import Fraction

import av
import numpy as np


def texture(height: int, width: int, seed: int = 0) -> np.ndarray:
    """Smooth random texture (8-px blobs, blurred): trackable by block matching, not periodic."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    image = coarse.repeat(8, 0).repeat(8, 1)[:height, :width]
    for axis in (0, 1):
        image = (image + np.roll(image, 1, axis) + np.roll(image, 2, axis)) / 3
    return image.astype(np.uint8)


def pan(num_frames: int, height: int, width: int, dx: int, dy: int, seed: int = 0) -> list[np.ndarray]:
    """Frames of a scene moving by (dx, dy) px per frame: content at x in frame i is at x + dx in i+1."""
    margin = max(abs(dx), abs(dy)) * num_frames + 8
    world = texture(height + 2 * margin, width + 2 * margin, seed)
    return [np.ascontiguousarray(world[margin - dy * i: margin - dy * i + height, margin - dx * i: margin - dx * i + width])
            for i in range(num_frames)]


def moving_square(num_frames: int, size: int, side: int, dx: int, dy: int, start=(8, 8)) -> list[np.ndarray]:
    background = texture(size, size, seed=1)
    square = texture(side, side, seed=2) // 2 + 128
    frames = []
    for i in range(num_frames):
        frame = background.copy()
        y, x = start[0] + dy * i, start[1] + dx * i
        frame[y:y + side, x:x + side] = square
        frames.append(frame)
    return frames


def write(path: str, frames: list[np.ndarray], codec: str = "libx264", fps: int = 30, options: dict | None = None,
          times: list[float] | None = None) -> str:
    """Encodes RGB frames; `times` (seconds) gives variable frame rate (needs a container keeping pts)."""
    height, width = frames[0].shape[:2]
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        if times is not None:
            stream.time_base = Fraction(1, 1000)
            stream.codec_context.time_base = Fraction(1, 1000)
        if options:
            stream.options = options
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            if times is not None:
                frame.pts, frame.time_base = round(times[i] * 1000), Fraction(1, 1000)
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def write_audio_only(path: str) -> str:
    with av.open(path, "w") as container:
        stream = container.add_stream("aac", rate=16000)
        for i in range(20):
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 1024), np.float32), format="fltp", layout="mono")
            frame.sample_rate, frame.pts = 16000, i * 1024
            for packet in stream.encode(frame):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return path


def set_mp4_rotation(path: str, clockwise_degrees: int) -> None:
    """Patches the video track's tkhd matrix the way phones mark portrait video (display rotation)."""
    data = bytearray(open(path, "rb").read())
    at = data.index(b"tkhd")
    version = data[at + 4]
    matrix_at = at + 4 + 4 + (32 if version == 1 else 20) + 8 + 8
    one, minus_one = 0x00010000, 0xFFFF0000
    a, b, c, d = {90: (0, one, minus_one, 0), 180: (minus_one, 0, 0, minus_one), 270: (0, minus_one, one, 0)}[clockwise_degrees]
    struct.pack_into(">9I", data, matrix_at, a, b, 0, c, d, 0, 0, 0, 0x40000000)
    open(path, "wb").write(bytes(data))
