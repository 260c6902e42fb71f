"""A test-only reader of W&B's offline run file (``run-<id>.wandb``), to check what clipforge logged.

The file is W&B's record log: a 7-byte header (``:W&B``, magic 0xBEE1, version 0), then 32 KiB blocks of
chunks, each ``crc32 (4) | length (2, little-endian) | type (1: full, 2: first, 3: middle, 4: last)`` and its
bytes; a record's chunks joined are one serialised ``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

_HEADER, _BLOCK, _CHUNK_HEADER = 7, 32 * 1024, 7


def _records(path: Path):
    data = path.read_bytes()
    assert data[:4] == b":W&B", f"{path}: not a W&B run file"
    position, pending = _HEADER, b""
    while position + _CHUNK_HEADER <= len(data):
        left_in_block = _BLOCK - position % _BLOCK
        if left_in_block < _CHUNK_HEADER:  # the block's tail is padding
            position += left_in_block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[position : position + _CHUNK_HEADER])
        if length == 0 and kind == 0:
            break
        chunk = data[position + _CHUNK_HEADER : position + _CHUNK_HEADER + length]
        position += _CHUNK_HEADER + length
        pending = chunk if kind in (1, 2) else pending + chunk
        if kind in (1, 4):
            yield pending
            pending = b""


def history(path: Path) -> list[dict]:
    """The rows logged with ``run.log`` (``_step`` included), in order."""
    from wandb.proto import wandb_internal_pb2

    rows = []
    for data in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        if record.WhichOneof("record_type") == "history":
            rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json)
                         for item in record.history.item})  # fmt: skip
    return rows


def config(path: Path) -> dict:
    """The run's config as logged: the run record's, then later config records' updates."""
    from wandb.proto import wandb_internal_pb2

    values: dict = {}
    for data in _records(path):
        record = wandb_internal_pb2.Record()
        record.ParseFromString(data)
        kind = record.WhichOneof("record_type")
        updates = (
            record.run.config.update if kind == "run" else record.config.update if kind == "config" else ()
        )
        values.update({item.key: json.loads(item.value_json) for item in updates})
    return values
