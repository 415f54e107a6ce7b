"""One video = one ArrayRecord record; `open(output_dir)` reads them back as docs/architecture.md §3 dicts.

Record bytes: `MAGIC`, a little-endian u32 header length, a JSON header, then the payload:

- `rgb`: one JPEG per step (mjpeg, 4:4:4, quantiser `jpeg_qscale`), about 45 dB PSNR against the
  decoded frame (docs/preprocessing.md, "Storage");
- `mv`: per step, zlib-compressed int16 quarter-pixels, planar [2, H/b, W/b] with b = `mv_block`:
  exact values of the fused motion at each tile's traced pixel.

`residual` is not stored: it is derived on read as `rgb[t] - warp(rgb[t-1], mv[t])` from the
stored frames, so `warp(rgb[t-1], mv[t]) + residual[t] == rgb[t]` holds exactly for every record
(docs/architecture.md §3's convention) and costs no bytes. A CRC32 of the payload is checked on every read.
"""

from __future__ import annotations

import builtins
import json
import os
import re
import struct
import threading
import zlib
from typing import Iterable, Sequence

import av
import numpy as np

from cope_jax.errors import UserError
from data_pipeline import primitives

MAGIC = b"COPEREC1"
SUBPEL = primitives.SUBPEL
SHARD_PATTERN = re.compile(r"^primitives-(\d{5})-of-(\d{5})\.array_record$")


class RecordError(UserError):
    """A record or output directory is corrupt or not what this version writes."""


def shard_name(index: int, count: int) -> str:
    return f"primitives-{index:05d}-of-{count:05d}.array_record"


# ---------------------------------------------------------------------------- encoding


def _jpeg_encoder(size: int, qscale: int) -> av.CodecContext:
    encoder = av.CodecContext.create("mjpeg", "w")
    encoder.width = encoder.height = size
    encoder.pix_fmt = "yuvj444p"
    encoder.time_base = 1
    encoder.qscale = True
    encoder.qmin = encoder.qmax = qscale  # see codec._encoder: the flag alone would mean qmin
    encoder.options = {"flags": "+bitexact", "threads": "1"}
    return encoder


def encode_jpeg(rgb: np.ndarray, qscale: int) -> bytes:
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuvj444p")
    frame.pts = 0
    encoder = _jpeg_encoder(rgb.shape[0], qscale)
    return b"".join(bytes(packet) for packet in encoder.encode(frame) + encoder.encode(None))


# One decoder per thread: loaders read records from several threads, and a codec context shared
# between threads crashes FFmpeg.
_local = threading.local()


def decode_jpeg(data: bytes) -> np.ndarray:
    if not hasattr(_local, "jpeg_decoder"):
        _local.jpeg_decoder = av.CodecContext.create("mjpeg", "r")
        _local.jpeg_decoder.options = {"flags": "+bitexact"}
    frames = _local.jpeg_decoder.decode(av.Packet(data))
    if len(frames) != 1:
        raise RecordError(f"JPEG step decoded to {len(frames)} frames")
    return frames[0].to_ndarray(format="rgb24")


def encode_mv(mv_blocks: np.ndarray) -> bytes:
    quarter = np.rint(mv_blocks * SUBPEL)
    if np.abs(quarter).max(initial=0) > np.iinfo(np.int16).max:
        raise ValueError("fused motion beyond the int16 quarter-pixel range")
    planar = np.ascontiguousarray(quarter.astype("<i2").transpose(2, 0, 1))
    return zlib.compress(planar.tobytes(), 6)


def decode_mv(data: bytes, tiles: int) -> np.ndarray:
    planar = np.frombuffer(zlib.decompress(data), "<i2").reshape(2, tiles, tiles)
    return planar.transpose(1, 2, 0).astype(np.float32) / SUBPEL


def encode(meta: dict, steps: Iterable, jpeg_qscale: int) -> bytes:
    """meta: video_id, source, fps, gop, fusion, height, width, mv_block (+ anything JSON).
    steps: codec.Step objects in order, consumed one at a time (only compressed bytes are kept,
    so an hour of video costs its compressed size, not its frames)."""
    blobs, spans = [], {"rgb": [], "mv": []}
    timestamps, frame_index, is_gop_start = [], [], []
    offset = 0
    for step in steps:
        for name, data in (("rgb", encode_jpeg(step.rgb, jpeg_qscale)), ("mv", encode_mv(step.mv_blocks))):
            spans[name].append([offset, len(data)])
            blobs.append(data)
            offset += len(data)
        timestamps.append(float(np.float32(step.time)))
        frame_index.append(step.frame_index)
        is_gop_start.append(bool(step.is_gop_start))
    payload = b"".join(blobs)
    header = dict(meta, timestamps=timestamps, frame_index=frame_index, is_gop_start=is_gop_start,
                  spans=spans, payload_crc32=zlib.crc32(payload))
    header_bytes = json.dumps(header, sort_keys=True).encode()
    return MAGIC + struct.pack("<I", len(header_bytes)) + header_bytes + payload


# ---------------------------------------------------------------------------- decoding


def read_header(data: bytes) -> tuple[dict, memoryview]:
    if data[: len(MAGIC)] != MAGIC:
        raise RecordError("not a cope-jax primitives record (bad magic)")
    (length,) = struct.unpack_from("<I", data, len(MAGIC))
    start = len(MAGIC) + 4
    header = json.loads(bytes(data[start : start + length]))
    payload = memoryview(data)[start + length :]
    if zlib.crc32(payload) != header["payload_crc32"]:
        raise RecordError(f"record {header.get('video_id')!r}: payload checksum mismatch (corrupt shard)")
    return header, payload


def _blob(payload: memoryview, span) -> bytes:
    offset, length = span
    return bytes(payload[offset : offset + length])


def decode(data: bytes, steps: Sequence[int] | None = None) -> dict:
    """Record bytes -> the docs/architecture.md §3 dict; with `steps`, only those steps (in that order)."""
    header, payload = read_header(data)
    count = len(header["timestamps"])
    wanted = list(range(count)) if steps is None else [int(t) for t in steps]
    if any(not 0 <= t < count for t in wanted):
        raise IndexError(f"record {header['video_id']!r} has {count} steps, asked for {wanted}")
    block, size = header["mv_block"], header["height"]
    gop_start = np.asarray(header["is_gop_start"], bool)
    rgb_cache: dict[int, np.ndarray] = {}

    def rgb(t: int) -> np.ndarray:
        if t not in rgb_cache:
            rgb_cache[t] = decode_jpeg(_blob(payload, header["spans"]["rgb"][t]))
        return rgb_cache[t]

    rgbs, mvs, residuals = [], [], []
    for t in wanted:
        mv = primitives.upsample(decode_mv(_blob(payload, header["spans"]["mv"][t]), size // block), block)
        if gop_start[t]:
            residual = np.zeros((size, size, 3), np.int16)
        else:
            residual = primitives.residual(rgb(t), rgb(t - 1), mv)
        rgbs.append(rgb(t))
        mvs.append(mv)
        residuals.append(residual)
    frame_index = np.asarray(header["frame_index"], np.int64)[wanted]
    record = {key: header[key] for key in ("video_id", "source", "fps", "gop", "fusion", "height", "width", "mv_block")}
    record.update(
        num_steps=count,
        steps=np.asarray(wanted, np.int32),
        timestamps=np.asarray(header["timestamps"], np.float32)[wanted],
        frame_index=frame_index,
        gop_index=(frame_index // header["gop"]).astype(np.int32),
        is_gop_start=gop_start[wanted],
        rgb=np.stack(rgbs) if rgbs else np.zeros((0, size, size, 3), np.uint8),
        mv=np.stack(mvs) if mvs else np.zeros((0, size, size, 2), np.float32),
        residual=np.stack(residuals) if residuals else np.zeros((0, size, size, 3), np.int16),
    )
    return record


# ---------------------------------------------------------------------------- reading a directory


MANIFEST_FILE = "manifest.json"


def read_manifest(output_dir: str) -> dict:
    """A finished preprocessing output's manifest.json: settings, shards, per-video counts, totals."""
    path = os.path.join(os.path.expanduser(output_dir), MANIFEST_FILE)
    try:
        with builtins.open(path) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise RecordError(f"{output_dir}: no {MANIFEST_FILE} (not a finished preprocessing output)") from None
    except ValueError as e:
        raise RecordError(f"{path}: unreadable ({e})") from None
    if not isinstance(manifest, dict) or "settings" not in manifest:
        raise RecordError(f"{path}: unreadable ('settings' missing)")
    return manifest


def shard_paths(output_dir: str) -> list[str]:
    """Finished shards of every task (temporary files are never listed), checked for one shard count."""
    names = sorted(n for n in os.listdir(output_dir) if SHARD_PATTERN.match(n))
    counts = {SHARD_PATTERN.match(n).group(2) for n in names}
    if len(counts) > 1:
        raise RecordError(f"{output_dir}: shards from runs with different --num-shards ({sorted(counts)}); use separate output directories")
    return [os.path.join(output_dir, n) for n in names]


class Records:
    """Random-access sequence of per-video records; also a grain `RandomAccessDataSource`."""

    def __init__(self, output_dir: str):
        output_dir = os.path.expanduser(output_dir)  # "~/primitives" from Python gets no shell expansion
        if not os.path.isdir(output_dir):
            raise RecordError(f"{output_dir}: no such directory")
        self.output_dir = output_dir
        self.paths = shard_paths(output_dir)
        if not self.paths:
            raise RecordError(f"{output_dir}: no finished primitives-*.array_record shards (run python -m data_pipeline.preprocess)")
        self._source = None

    @property
    def source(self):
        if self._source is None:  # opened lazily so the object pickles cheaply into loader workers
            from array_record.python.array_record_data_source import ArrayRecordDataSource

            self._source = ArrayRecordDataSource(self.paths)
        return self._source

    def __getstate__(self):
        return {"output_dir": self.output_dir, "paths": self.paths, "_source": None}

    def videos(self) -> list[dict]:
        """Every record's per-video counts in index order (video_id, source, steps, frames, seconds,
        bytes), from the shards' JSON sidecars: no record is read."""
        videos = []
        for path in self.paths:
            sidecar = path[: -len(".array_record")] + ".json"
            try:
                with builtins.open(sidecar) as f:
                    videos += json.load(f)["videos"]
            except (OSError, ValueError, KeyError) as e:
                raise RecordError(f"{sidecar}: cannot list the shard's videos ({e})") from None
        return videos

    def video_ids(self) -> list[str]:
        return [video["video_id"] for video in self.videos()]

    def index_of(self, video_id: str) -> int:
        """The index of the record with this video id (the path under the input root, no extension)."""
        ids = self.video_ids()
        if video_id not in ids:
            close = [i for i in ids if video_id.lower() in i.lower()][:3]
            hint = f"; similar: {', '.join(close)}" if close else ""
            raise RecordError(f"{self.output_dir}: no video with id {video_id!r} among {len(ids)} videos{hint}")
        return ids.index(video_id)

    def __len__(self) -> int:
        return len(self.source)

    def raw(self, index: int) -> bytes:
        return self.source[index]

    def __getitem__(self, index: int) -> dict:
        if not -len(self) <= index < len(self):
            raise IndexError(f"record {index} out of range ({len(self)} records)")
        return decode(self.raw(index % len(self)))

    def read(self, index: int, steps: Sequence[int]) -> dict:
        """Only the listed steps of one record (what training loaders need)."""
        return decode(self.raw(index), steps)

    def __repr__(self) -> str:
        return f"Records({self.output_dir!r}, {len(self.paths)} shards)"


def open(output_dir: str) -> Records:  # noqa: A001 - the name docs/architecture.md fixes
    return Records(output_dir)


__all__ = ["open", "Records", "RecordError", "encode", "decode", "shard_name", "shard_paths", "read_manifest"]
