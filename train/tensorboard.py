"""TensorBoard scalar event files, written directly: no TensorFlow, torch or tensorboardX.

A TensorBoard log is a file named ``events.out.tfevents.*`` holding TFRecords: each record is
its length (uint64), the masked CRC-32C of those 8 bytes, the data and the data's masked
CRC-32C. The data is a serialised ``tensorflow.Event`` protocol buffer. Scalars need four of
its fields, encoded here by hand (protobuf wire format): ``wall_time`` (1, double), ``step``
(2, int64), ``file_version`` (3, string, in the first record) and ``summary`` (5), whose
``value`` entries (1) carry a ``tag`` (1, string) and a ``simple_value`` (2, float).

(tensorboardX writes the same records, but importing it imports torch wherever torch is
installed: 5 s and 0.5 GB of memory before a training run starts.)
"""

from __future__ import annotations

import itertools
import os
import socket
import struct
import time

from etils import epath


def _crc32c_table() -> list[int]:
    table = []
    for byte in range(256):
        crc = byte
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1  # Castagnoli, reflected
        table.append(crc)
    return table


_TABLE = _crc32c_table()
_FILES = itertools.count()  # one new file per writer, even two in one process and second


def crc32c(data: bytes) -> int:
    """The CRC-32C (Castagnoli) checksum of ``data``."""
    crc = 0xFFFFFFFF
    for byte in data:
        crc = _TABLE[(crc ^ byte) & 0xFF] ^ (crc >> 8)
    return crc ^ 0xFFFFFFFF


def _masked(data: bytes) -> bytes:
    """TFRecord's masked CRC of ``data``, as 4 little-endian bytes."""
    crc = crc32c(data)
    return struct.pack("<I", (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


def _event(wall_time: float, step: int, body: bytes) -> bytes:
    """An ``Event`` with its time, step and ``body`` (already encoded fields)."""
    return b"\x09" + struct.pack("<d", wall_time) + b"\x10" + _varint(step) + body


class EventWriter:
    """Appends scalars to a new event file in ``logdir`` (local or any ``epath`` URL)."""

    def __init__(self, logdir: epath.Path) -> None:
        logdir.mkdir(parents=True, exist_ok=True)
        now = time.time()
        self.path = logdir / (f"events.out.tfevents.{int(now)}.{socket.gethostname()}."
                              f"{os.getpid()}.{next(_FILES)}")
        self._file = self.path.open("wb")
        self._record(_event(now, 0, _field(3, b"brain.Event:2")))

    def scalars(self, step: int, values: dict[str, float]) -> None:
        """Record ``{tag: value}`` at ``step``, flushed so a killed run keeps it."""
        summary = b"".join(_field(1, _field(1, tag.encode()) + b"\x15" + struct.pack("<f", v))
                           for tag, v in values.items())
        self._record(_event(time.time(), step, _field(5, summary)))
        self._file.flush()

    def close(self) -> None:
        """Close the file."""
        self._file.close()

    def _record(self, data: bytes) -> None:
        length = struct.pack("<Q", len(data))
        self._file.write(length + _masked(length) + data + _masked(data))
