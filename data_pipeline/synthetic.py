"""Synthetic videos with known content and motion: the built-in demo data of the tiny configs
(`cope_jax.main` with an empty `data_dir`) and the known-motion fixtures of the tests."""

from __future__ import annotations

import argparse
import os
import sys
import time
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


def moving_square(num_frames: int, size: int, side: int, dx: float, dy: float, start=(8, 8),
                  seed: int = 1) -> list[np.ndarray]:
    """A textured square moving by (dx, dy) px per frame over a still background, bouncing at edges.

    Positions are rounded per frame (round(start + v * i)), so speeds below 1 px/frame work. The background
    texture comes from `seed`, the square's from `seed + 1` (brightened, so it stands out)."""
    background = texture(size, size, seed=seed)
    square = texture(side, side, seed=seed + 1) // 2 + 128
    frames = []
    for i in range(num_frames):
        frame = background.copy()
        y, x = _bounce(round(start[0] + dy * i), size - side), _bounce(round(start[1] + dx * i), size - side)
        frame[y:y + side, x:x + side] = square
        frames.append(frame)
    return frames


def write(path: str, frames: list[np.ndarray], codec: str = "libx264", fps: int = 30, options: dict | None = None,
          times: list[float] | None = None) -> str:
    """Encodes RGB frames; `times` (seconds) gives variable frame rate (needs a container keeping pts).

    The same frames give the same bytes (measured with PyAV 18.1, x264 core 165): x264's macroblock tree changes the
    B-frames from run to run on AVX-512 CPUs (not with `asm=AVX2`), so it is off unless `options` sets `x264-params`;
    one encoder thread, because x264's automatic count follows the machine's cores and changes the bitstream."""
    height, width = frames[0].shape[:2]
    with av.open(path, "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height = width, height
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        if codec == "libx264":
            options = {"x264-params": "mbtree=0", **(options or {})}
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


_ANSWER_FORMAT = "Answer with the option's letter from the given choices directly."
# (question, {option: (x, y) direction}) in image axes: x grows rightwards, y downwards; options in the order A-D.
_CAMERA = ("Which way does the camera move?", {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1)})
_CORNER = ("Towards which corner does the square move?",
           {"top left": (-1, -1), "top right": (1, -1), "bottom left": (-1, 1), "bottom right": (1, 1)})


def _question(prompt: str, options) -> str:
    return "\n".join([prompt, *(f"{'ABCD'[i]}. {option}" for i, option in enumerate(options)), _ANSWER_FORMAT])


def motion_questions(directory: str, count: int, size: int = 64, seconds: float = 4.0, fps: int = 30,
                     seed: int = 0) -> list[dict]:
    """Writes `count` clips (`pan_000.mp4`, `corner_001.mp4`, ...) whose answer needs motion; returns their
    LLaVA-Video-178K annotation rows (§8) with `answer` and `task` added: the stage-2 demo data.

    Camera pans and squares heading for a corner alternate; each kind's answers are balanced over A-D. Every clip has
    its own random texture and the square starts at the frame centre, so frame 0 (the keyframe at 1 per GOP) says
    nothing about the answer: a model must read the P steps to beat chance."""
    os.makedirs(directory, exist_ok=True)
    rng = np.random.default_rng(seed)
    answers = np.empty(count, dtype=int)
    for kind in (0, 1):
        answers[kind::2] = rng.permutation(np.arange(len(answers[kind::2])) % 4)
    texture_seeds, speeds = rng.integers(0, 2**31, count), rng.integers(1, 3, count)
    num_frames, side = int(seconds * fps), size // 4
    centre = (size - side) / 2
    rows = []
    for index in range(count):
        kind, texture_seed = index % 2, int(texture_seeds[index])
        prompt, options = (_CAMERA, _CORNER)[kind]
        x, y = list(options.values())[answers[index]]
        if kind == 0:
            # pan(dx, dy) moves the content by (dx, dy) px per frame: a camera moving right shows it moving left.
            speed = int(speeds[index])
            frames = pan(num_frames, size, size, -x * speed, -y * speed, seed=texture_seed)
        else:
            # From the centre, nearly at the corner by the last frame: never bounces; below 1 px/frame at 64 px.
            speed = centre / num_frames
            frames = moving_square(num_frames, size, side, x * speed, y * speed, start=(centre, centre),
                                   seed=texture_seed)
        clip, letter = f"{('pan', 'corner')[kind]}_{index:03d}", "ABCD"[answers[index]]
        write(os.path.join(directory, clip + ".mp4"), frames, fps=fps)
        rows.append({"id": clip, "video": clip + ".mp4", "data_source": "demo_motion", "answer": letter,
                     "task": ("camera", "corner")[kind],
                     "conversations": [{"from": "human", "value": "<image>\n" + _question(prompt, options)},
                                       {"from": "gpt", "value": letter}]})
    return rows


def stream_mpegts(output, frames, fps: int = 30, gop: int = 60, realtime: bool = True,
                  b_frames: int = 0) -> None:
    """Writes frames as an H.264 MPEG-TS stream to `output` (a path or a binary file object), as a
    live encoder does: packets flushed as they are made and, with `realtime`, frame i not before
    i / fps seconds after the first. x264 runs zero-latency, or with `b_frames` B-frames (as a
    recorder does: the decoder then holds frames back to reorder them)."""
    with av.open(output, "w", format="mpegts", options={"flush_packets": "1"}) as container:
        stream = container.add_stream("libx264", rate=fps)
        stream.width, stream.height = frames[0].shape[1], frames[0].shape[0]
        stream.pix_fmt = "yuv420p"
        stream.codec_context.thread_count = 1
        stream.options = ({"bf": str(b_frames), "x264-params": f"keyint={gop}"} if b_frames
                          else {"tune": "zerolatency", "x264-params": f"mbtree=0:keyint={gop}"})
        started = time.perf_counter()
        for i, rgb in enumerate(frames):
            if realtime:
                time.sleep(max(0.0, started + i / fps - time.perf_counter()))
            for packet in stream.encode(av.VideoFrame.from_ndarray(rgb, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m data_pipeline.synthetic",
        description="Streams a synthetic video (a textured square moving over a still background) as MPEG-TS on "
                    "standard output or to a URL, in real time like a camera encoder: a live source for "
                    "`python -m cope_jax.chat --video - --live` (or --video URL).")
    parser.add_argument("--output", default="-", help="- (standard output, default) or a URL FFmpeg writes to, "
                        "e.g. udp://127.0.0.1:5000")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of the stream (default %(default)s)")
    parser.add_argument("--size", type=int, default=112, help="width and height in pixels (default %(default)s)")
    parser.add_argument("--fps", type=int, default=30, help="frame rate (default %(default)s)")
    parser.add_argument("--as-fast-as-possible", action="store_true", help="do not pace frames at real time")
    args = parser.parse_args(argv)
    if args.seconds <= 0 or args.size < 32 or args.fps < 1:
        parser.error("--seconds must be > 0, --size >= 32 and --fps >= 1")
    frames = moving_square(round(args.seconds * args.fps), args.size, args.size // 4, 1.5, 0.75)
    try:
        stream_mpegts(sys.stdout.buffer if args.output == "-" else args.output, frames, args.fps,
                      realtime=not args.as_fast_as_possible)
    except BrokenPipeError:  # the reader went away: nothing more to say
        return 0
    except av.error.FFmpegError as e:
        print(f"error: {args.output}: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
