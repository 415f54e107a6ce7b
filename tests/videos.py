"""Test-only video helpers; the generators live in data_pipeline.synthetic (also the demo data)."""

from __future__ import annotations

import struct

import av
import numpy as np

from data_pipeline.synthetic import moving_square, pan, texture, write  # noqa: F401 - re-exported for tests


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
