"""Read the tensors out of any checkpoint container (safetensors, ``torch.save`` archives, TorchScript archives)
without ever executing code from the file (TorchScript: see ``torchscript.py``)."""

from __future__ import annotations

import pickle
import pickletools
import re
import zipfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch

from clipforge.checkpoint.errors import CONVERT_HELP, REDOWNLOAD_HELP, CheckpointError, UnsafeCheckpointError
from clipforge.checkpoint.torchscript import read_torchscript

Container = Literal["safetensors", "torch", "torchscript"]

# open_clip training checkpoints, DeepSpeed/Lightning-style wrappers: the weights live under one of these keys.
_WRAPPER_KEYS = ("state_dict", "model", "module")
_DDP_PREFIX = "module."
_SCALARS = (bool, int, float, str)
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy (non-zip) torch.save file


@dataclass(frozen=True)
class RawCheckpoint:
    """The tensors and string metadata read from one checkpoint file, before any key renaming.

    ``tensors`` is flat with dotted names. ``ignored`` names entries that were neither tensors nor metadata
    (optimizer state, non-scalar objects, TorchScript tensor attributes that are not parameters or buffers).
    """

    tensors: dict[str, torch.Tensor]
    metadata: dict[str, str]
    container: Container
    path: Path
    ignored: tuple[str, ...] = ()


def read_checkpoint(path: str | Path) -> RawCheckpoint:
    """Read a safetensors file, a ``torch.save`` file (zip or legacy) or a TorchScript archive.

    The container is detected from the file's bytes, not its extension. Raises :class:`CheckpointError` for a
    missing, truncated, corrupt or unrecognised file and :class:`UnsafeCheckpointError` for a file that would
    need to run code to be loaded.
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"{path}: no such file; check the path")
    if not path.is_file():
        raise CheckpointError(f"{path}: not a file; pass a checkpoint file")
    size = path.stat().st_size
    with open(path, "rb") as handle:
        head = handle.read(16)
    if size == 0:
        raise CheckpointError(f"{path}: the file is empty (0 bytes); {REDOWNLOAD_HELP}")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return _read_zip(path)
    if _looks_like_safetensors(head):
        return _read_safetensors(path, head, size)
    # A pickle (PROTO opcode): the legacy (pre-1.6) torch.save format.
    if len(head) > 1 and head[0] == 0x80 and 2 <= head[1] <= 5:
        _check_legacy_pickles(path)
        return _read_torch(path)
    raise CheckpointError(
        f"{path}: not a checkpoint: expected safetensors, a torch.save archive or a TorchScript archive "
        f"(the file starts with {head[:8]!r})"
    )


# ----------------------------------------------------------------------------------------------------------------
# safetensors


def _looks_like_safetensors(head: bytes) -> bool:
    # 8-byte little-endian header length, then a JSON object; a ~100 MB cap rejects random binary files.
    return len(head) >= 9 and head[8:9] == b"{" and 0 < int.from_bytes(head[:8], "little") < 100_000_000


def _read_safetensors(path: Path, head: bytes, size: int) -> RawCheckpoint:
    from safetensors import safe_open

    header_len = int.from_bytes(head[:8], "little")
    if 8 + header_len > size:
        raise CheckpointError(
            f"{path}: safetensors file is truncated or corrupt (its header needs {header_len} bytes, the file has "
            f"{size - 8}); {REDOWNLOAD_HELP}"
        )
    try:
        with safe_open(str(path), framework="pt", device="cpu") as handle:
            metadata = dict(handle.metadata() or {})
            tensors = {name: handle.get_tensor(name) for name in handle.keys()}  # noqa: SIM118 (not a dict)
    except Exception as exc:  # safetensors raises its own SafetensorError and OSError/ValueError variants
        raise CheckpointError(
            f"{path}: safetensors file is truncated or corrupt ({exc}); {REDOWNLOAD_HELP}"
        ) from exc
    if not tensors:
        raise CheckpointError(f"{path}: the safetensors file holds no tensors; it is not a model checkpoint")
    return RawCheckpoint(tensors, metadata, "safetensors", path)


# ----------------------------------------------------------------------------------------------------------------
# zip archives: torch.save (>= 1.6) and TorchScript


def _read_zip(path: Path) -> RawCheckpoint:
    try:
        with zipfile.ZipFile(path) as archive:
            names = archive.namelist()
            _check_record_sizes(archive.infolist(), path, path.stat().st_size)
    except CheckpointError:
        raise
    except MemoryError:
        raise
    except (
        Exception
    ) as exc:  # zipfile raises BadZipFile, struct.error, NotImplementedError, UnicodeDecodeError...
        raise CheckpointError(
            f"{path}: zip archive is truncated or corrupt ({type(exc).__name__}: {exc}); {REDOWNLOAD_HELP}"
        ) from exc
    roots = [
        name[: -len("/data.pkl")] for name in names if name.endswith("/data.pkl") and name.count("/") == 1
    ]
    if len(roots) != 1:
        if any(name.endswith("model.json") for name in names):
            raise CheckpointError(
                f"{path}: a TorchScript archive in the pre-1.4 layout (model.json), which clipforge cannot read; "
                "re-save it with a newer torch in a trusted environment"
            )
        raise CheckpointError(
            f"{path}: not a checkpoint: expected safetensors, a torch.save archive or a TorchScript archive "
            f"(a zip file without a single '<root>/data.pkl'; found {len(roots)})"
        )
    root = roots[0]
    if f"{root}/constants.pkl" in names or any(name.startswith(f"{root}/code/") for name in names):
        tensors, metadata, ignored = read_torchscript(path, root)
        return RawCheckpoint(tensors, metadata, "torchscript", path, ignored)
    return _read_torch(path)


# Deflate cannot expand data more than about 1032-fold; a record claiming more is a corrupt (or hostile) header.
_MAX_DEFLATE_RATIO = 1032


def _check_record_sizes(records: list[zipfile.ZipInfo], path: Path, file_size: int) -> None:
    """Refuse a zip whose directory claims record sizes its bytes cannot hold, before anything is allocated
    from them (torch and the TorchScript reader size their buffers from these fields)."""
    for info in records:
        stored = info.compress_type == zipfile.ZIP_STORED
        if (
            info.compress_size > file_size
            or (stored and info.file_size != info.compress_size)
            or info.file_size > _MAX_DEFLATE_RATIO * max(info.compress_size, 1)
        ):
            raise CheckpointError(
                f"{path}: zip record {info.filename!r} claims {info.file_size:,} bytes ({info.compress_size:,} "
                f"stored) in a {file_size:,}-byte file; the archive is truncated or corrupt; {REDOWNLOAD_HELP}"
            )


def _read_torch(path: Path) -> RawCheckpoint:
    """A ``torch.save`` file, loaded with ``weights_only=True`` (torch's own restricted unpickler)."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        refused = re.search(r"GLOBAL ([\w.]+)", str(exc))
        reasons = [line.strip() for line in str(exc).splitlines() if "nsupported" in line]
        what = f"it refers to '{refused.group(1)}'" if refused else (reasons or ["torch refused it"])[0]
        raise UnsafeCheckpointError(
            f"{path}: the file contains code or Python objects beyond tensors ({what}); loading it would "
            f"execute code from the file, which clipforge refuses to do. {CONVERT_HELP}"
        ) from exc
    except MemoryError:
        raise
    except (
        Exception
    ) as exc:  # torch's unpickler raises IndexError, TypeError, AssertionError... on damaged bytes
        first_line = (str(exc).splitlines() or [""])[0]
        raise CheckpointError(
            f"{path}: torch.save file is truncated or corrupt ({type(exc).__name__}: {first_line}); "
            f"{REDOWNLOAD_HELP}"
        ) from exc
    tensors, metadata, ignored = _unwrap(obj, path)
    return RawCheckpoint(tensors, metadata, "torch", path, tuple(ignored))


def _check_legacy_pickles(path: Path) -> None:
    """Parse (never run) the legacy format's leading pickles, so that a plain pickle reads as "not a checkpoint"
    and a truncated file as truncated rather than as unsafe."""
    # Layout: magic number, protocol version, system info, the object, storage keys, then raw storage bytes.
    size = path.stat().st_size
    with open(path, "rb") as raw:
        handle = _BoundedReader(raw, size)
        try:
            first = [(op.name, arg) for op, arg, _ in pickletools.genops(handle)]
            if ("LONG1", _LEGACY_MAGIC) not in first:
                raise CheckpointError(
                    f"{path}: not a checkpoint: expected safetensors, a torch.save archive or a TorchScript "
                    "archive (the file is a Python pickle without torch.save's magic number)"
                )
            for index in range(4):
                ops = [(op.name, arg) for op, arg, _ in pickletools.genops(handle)]
                if index == 2 and _legacy_storage_bytes(ops) > size:  # the object pickle names the storages
                    raise CheckpointError(
                        f"{path}: legacy torch.save file declares {_legacy_storage_bytes(ops):,} bytes of tensor "
                        f"data but has {size:,} bytes in all; it is truncated or corrupt; {REDOWNLOAD_HELP}"
                    )
        except (ValueError, EOFError) as exc:
            raise CheckpointError(
                f"{path}: legacy torch.save file is truncated or corrupt ({exc}); {REDOWNLOAD_HELP}"
            ) from exc


class _BoundedReader:
    """A file whose ``read(n)`` never asks for more than the bytes left: pickletools sizes its read from a
    length field in the file, which must not become a huge allocation."""

    def __init__(self, file: Any, size: int) -> None:
        self.file = file
        self.size = size

    def read(self, n: int = -1) -> bytes:
        left = max(self.size - self.file.tell(), 0)
        return self.file.read(left if n < 0 else min(n, left))

    def readline(self) -> bytes:
        return self.file.readline(1 << 20)

    def tell(self) -> int:
        return self.file.tell()


_STORAGE_ITEMSIZE = {"Double": 8, "Float": 4, "Half": 2, "BFloat16": 2, "Long": 8, "Int": 4, "Short": 2,
                     "Char": 1, "Byte": 1, "Bool": 1, "ComplexDouble": 16, "ComplexFloat": 8}  # fmt: skip


def _legacy_storage_bytes(ops: list[tuple[str, Any]]) -> int:
    """Bytes of tensor data a legacy object pickle declares: each storage's persistent id is a tuple
    ('storage', torch.<X>Storage, key, location, numel), so its last integer before BINPERSID is the numel."""
    total, itemsize, numel = 0, 8, 0
    for name, arg in ops:
        if name == "GLOBAL" and isinstance(arg, str) and arg.startswith("torch ") and arg.endswith("Storage"):
            itemsize = _STORAGE_ITEMSIZE.get(arg[len("torch ") : -len("Storage")], 16)
        elif name in ("BININT", "BININT1", "BININT2", "LONG1", "LONG4", "INT", "LONG") and isinstance(
            arg, int
        ):
            numel = max(arg, 0)
        elif name == "BINPERSID":
            total += numel * itemsize
    return total


def _unwrap(obj: Any, path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str], list[str]]:
    """A loaded ``torch.save`` object -> (flat tensors, top-level scalars as metadata, ignored entries)."""
    if isinstance(obj, torch.Tensor) or not isinstance(obj, Mapping):
        raise CheckpointError(
            f"{path}: holds a {type(obj).__name__}, not a dict of tensors; save model.state_dict() instead"
        )
    metadata: dict[str, str] = {}
    ignored: list[str] = []
    weights: Mapping[str, Any] = obj
    while True:  # {"state_dict": ...}, {"model": ...}, {"module": ...}, possibly nested
        key = next(
            (k for k in _WRAPPER_KEYS if isinstance(weights.get(k), Mapping) and _has_tensor(weights[k])),
            None,
        )
        if key is None:
            break
        for name, value in weights.items():
            if name == key:
                continue
            if isinstance(value, _SCALARS):
                metadata[str(name)] = str(value)
            else:
                ignored.append(str(name))
        weights = weights[key]
    tensors: dict[str, torch.Tensor] = {}
    _flatten(weights, "", tensors, metadata, ignored)
    if not tensors:
        raise CheckpointError(f"{path}: the file holds no tensors; it is not a model checkpoint")
    if all(name.startswith(_DDP_PREFIX) for name in tensors):  # saved from a DistributedDataParallel wrapper
        tensors = {name[len(_DDP_PREFIX) :]: value for name, value in tensors.items()}
    return tensors, metadata, ignored


def _has_tensor(mapping: Mapping[Any, Any]) -> bool:
    return any(
        isinstance(value, torch.Tensor) or (isinstance(value, Mapping) and _has_tensor(value))
        for value in mapping.values()
    )


def _flatten(
    mapping: Mapping[Any, Any],
    prefix: str,
    tensors: dict[str, torch.Tensor],
    metadata: dict[str, str],
    ignored: list[str],
) -> None:
    for key, value in mapping.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, Mapping):
            _flatten(value, f"{name}.", tensors, metadata, ignored)
        elif isinstance(value, _SCALARS):
            metadata[name] = str(value)
        else:
            ignored.append(name)
