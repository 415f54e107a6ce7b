"""Synthetic videos with known content and motion: the built-in demo data of the tiny configs
(`cope_jax.main` with an empty `data_dir`) and the known-motion fixtures of the tests."""

from __future__ import annotations

import os
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


def _bounce(position: int, limit: int) -> int:
    """Reflects a linear coordinate into [0, limit] (a square bouncing off the frame edges)."""
    period = 2 * limit
    position %= period
    return position if position <= limit else period - position


def moving_square(num_frames: int, size: int, side: int, dx: int, dy: int, start=(8, 8)) -> list[np.ndarray]:
    """A textured square moving by (dx, dy) px per frame over a still background, bouncing at edges."""
    background = texture(size, size, seed=1)
    square = texture(side, side, seed=2) // 2 + 128
    frames = []
    for i in range(num_frames):
        frame = background.copy()
        y, x = _bounce(start[0] + dy * i, size - side), _bounce(start[1] + dx * i, size - side)
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


def demo_clips(directory: str, count: int = 8, size: int = 64, seconds: float = 4.0, fps: int = 30) -> list[str]:
    """Writes `count` H.264 clips of pans in varied directions and speeds and moving squares."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(0)
    paths = []
    frames_per_clip = int(seconds * fps)
    for index in range(count):
        dx, dy = (int(v) for v in rng.integers(-2, 3, size=2))
        if index % 3 == 2:
            frames = moving_square(frames_per_clip, size, size // 4, int(np.sign(dx) or 1), int(np.sign(dy) or 1),
                                   start=(size // 2, size // 2))
        else:
            frames = pan(frames_per_clip, size, size, dx, dy, seed=index)
        paths.append(write(os.path.join(directory, f"demo_{index:03d}.mp4"), frames, fps=fps))
    return paths
