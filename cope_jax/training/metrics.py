"""Training metrics: TensorBoard event files without TensorFlow, and throughput.

An event file is a TFRecord stream of `Event` protos: each record is
`u64 length | masked crc32c(length) | data | masked crc32c(data)`. Scalars need only three
proto messages, encoded by hand below, so TensorBoard works with no extra dependency. `Throughput` gives steps/s, examples/s and the ETA.
"""

from __future__ import annotations

import os
import socket
import struct
import time

_CRC32C_TABLE = []
for _n in range(256):
    _c = _n
    for _ in range(8):
        _c = (_c >> 1) ^ 0x82F63B78 if _c & 1 else _c >> 1
    _CRC32C_TABLE.append(_c)


def crc32c(data: bytes) -> int:
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _CRC32C_TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(crc: int) -> int:
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte = value & 0x7F
        value >>= 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int) -> bytes:
    return _varint((number << 3) | wire_type)


def _length_delimited(number: int, payload: bytes) -> bytes:
    return _field(number, 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, *, file_version: str | None = None, scalars: dict | None = None) -> bytes:
    """Event{wall_time=1 (double), step=2 (int64), file_version=3, summary=5{value=1{tag=1, simple_value=2}}}."""
    out = _field(1, 1) + struct.pack("<d", wall_time) + _field(2, 0) + _varint(step)
    if file_version is not None:
        out += _length_delimited(3, file_version.encode())
    if scalars:
        values = b"".join(_length_delimited(1, _length_delimited(1, tag.encode()) + _field(2, 5) + struct.pack("<f", float(v)))
                          for tag, v in scalars.items())
        out += _length_delimited(5, values)
    return out


def _record(data: bytes) -> bytes:
    header = struct.pack("<Q", len(data))
    return header + struct.pack("<I", _masked(crc32c(header))) + data + struct.pack("<I", _masked(crc32c(data)))


def read_scalars(path: str) -> list[tuple[int, str, float]]:
    """(step, tag, value) from an event file, checking every CRC (used by tests and tools)."""
    data, out, at = open(path, "rb").read(), [], 0
    while at < len(data):
        (length,) = struct.unpack_from("<Q", data, at)
        if struct.unpack_from("<I", data, at + 8)[0] != _masked(crc32c(data[at:at + 8])):
            raise ValueError(f"{path}: corrupt length CRC at byte {at}")
        body = data[at + 12: at + 12 + length]
        if struct.unpack_from("<I", data, at + 12 + length)[0] != _masked(crc32c(body)):
            raise ValueError(f"{path}: corrupt data CRC at byte {at}")
        at += 16 + length
        out += _parse_scalars(body)
    return out


def _read_varint(data: bytes, at: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[at]
        value |= (byte & 0x7F) << shift
        at, shift = at + 1, shift + 7
        if not byte & 0x80:
            return value, at


def _fields(data: bytes):
    at = 0
    while at < len(data):
        key, at = _read_varint(data, at)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, at = _read_varint(data, at)
        elif wire == 1:
            value, at = data[at:at + 8], at + 8
        elif wire == 5:
            value, at = data[at:at + 4], at + 4
        else:
            length, at = _read_varint(data, at)
            value, at = data[at:at + length], at + length
        yield number, value


def _parse_scalars(event: bytes) -> list[tuple[int, str, float]]:
    fields = list(_fields(event))
    step = next((v for n, v in fields if n == 2), 0)
    out = []
    for summary in (v for n, v in fields if n == 5):
        for _, value in _fields(summary):
            parts = dict(_fields(value))
            if 2 in parts:
                out.append((step, parts[1].decode(), struct.unpack("<f", parts[2])[0]))
    return out


class MetricWriter:
    """`write(step, {"train/loss": ..})` -> one event file per process in `logdir`, flushed each call."""

    def __init__(self, logdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(logdir, exist_ok=True)
        name = f"events.out.tfevents.{int(time.time())}.{socket.gethostname()}.{os.getpid()}"
        self.path = os.path.join(logdir, name)
        self._file = open(self.path, "ab")
        self._file.write(_record(_event(time.time(), 0, file_version="brain.Event:2")))
        self._file.flush()

    def write(self, step: int, scalars: dict) -> None:
        if self.enabled:
            self._file.write(_record(_event(time.time(), step, scalars=scalars)))
            self._file.flush()

    def close(self) -> None:
        if self.enabled:
            self._file.close()


class Throughput:
    """steps/s, examples/s and ETA over the last logging window."""

    def __init__(self, start_step: int, total_steps: int, batch_size: int):
        self.total, self.batch = total_steps, batch_size
        self.step, self.time = start_step, time.perf_counter()

    def update(self, step: int) -> dict:
        if step == self.step:  # the window ended where the meter started: nothing to measure yet
            return {}
        now = time.perf_counter()
        rate = (step - self.step) / max(now - self.time, 1e-9)
        self.step, self.time = step, now
        return {"steps_per_second": rate, "examples_per_second": rate * self.batch,
                "eta_seconds": (self.total - step) / max(rate, 1e-9)}


def format_eta(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
