"""Reading OpenAI's TorchScript CLIP archives without running them: a restricted unpickler turns module objects
into inert placeholders, and which attributes are parameters and buffers is read from the ``__parameters__`` /
``__buffers__`` lines of the archive's generated code, parsed as text, never executed.
"""

from __future__ import annotations

import _compat_pickle
import io
import pickle
import re
import struct
import zipfile
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import torch

from clipforge.checkpoint.errors import CONVERT_HELP, REDOWNLOAD_HELP, CheckpointError, UnsafeCheckpointError

_SCALARS = (bool, int, float, str)

# TorchScript archives
#
# Layout (torch >= 1.4; the root folder is named after the file at save time, e.g. "ViT-B-32/" in OpenAI's files):
#   <root>/data.pkl        the module tree: each module is a `__torch__.<qualified name>` object whose pickled state
#                          is a dict {attribute: value} in slot order; tensors are `_rebuild_tensor_v2` calls whose
#                          storages are persistent ids ('storage', <torch.XStorage>, key, location, numel)
#   <root>/data/<key>      raw storage bytes, in the byte order named by <root>/byteorder (little when absent)
#   <root>/code/__torch__/<qualifier path>.py   generated source; a module class body declares
#                          `__parameters__ = [...]`, `__buffers__ = [...]` and `name : Type` for each attribute
#   <root>/constants.pkl (+ constants/)         tensors baked into the code (traced constants); not state
#   <root>/version, <root>/.data/...           bookkeeping


_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexDoubleStorage": torch.complex128,
    "ComplexFloatStorage": torch.complex64,
}


@dataclass(frozen=True)
class _StorageType:
    """Stand-in for ``torch.<X>Storage`` in a pickle: only carries the dtype."""

    name: str
    dtype: torch.dtype


class _ScriptObject:
    """Inert stand-in for a TorchScript object: records its pickled state and nothing else."""

    qualified_name: ClassVar[str] = ""

    def __init__(self, *args: Any) -> None:
        self.args = args
        self.state: Any = None

    def __setstate__(self, state: Any) -> None:
        self.state = state


@dataclass
class _ClassInfo:
    """What the generated code says about one TorchScript class."""

    is_module: bool
    parameters: set[str]
    buffers: set[str]
    types: dict[str, str]


def _identity_list(items: Any) -> Any:
    return items


def _restore_type_tag(value: Any, type_str: Any) -> Any:
    return value


_SAFE_FUNCTIONS: dict[tuple[str, str], Callable[..., Any]] = {
    ("collections", "OrderedDict"): OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _identity_list,
    ("torch.jit._pickle", "build_doublelist"): _identity_list,
    ("torch.jit._pickle", "build_boollist"): _identity_list,
    ("torch.jit._pickle", "build_tensorlist"): _identity_list,
    ("torch.jit._pickle", "build_complexlist"): _identity_list,
    ("torch.jit._pickle", "restore_type_tag"): _restore_type_tag,
}


class _RestrictedUnpickler(pickle._Unpickler):  # the pure-Python unpickler, so that BUILD can be restricted
    """Unpickles a TorchScript ``data.pkl``: tensors, containers and inert placeholders, nothing callable."""

    dispatch: ClassVar[dict[int, Callable[[Any], None]]] = dict(pickle._Unpickler.dispatch)

    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str, path: Path) -> None:
        super().__init__(io.BytesIO(data))
        self._data_size = len(data)
        self.archive = archive
        self.root = root
        self.path = path
        self.big_endian = _byteorder(archive, root) == "big"
        self.storages: dict[str, torch.Tensor] = {}
        self.classes: dict[str, type[_ScriptObject]] = {}

    def find_class(self, module: str, name: str) -> Any:
        if self.proto < 3:  # Python 2 names (torch writes protocol 2), resolved as any unpickler would
            if (module, name) in _compat_pickle.NAME_MAPPING:
                module, name = _compat_pickle.NAME_MAPPING[(module, name)]
            else:
                module = _compat_pickle.IMPORT_MAPPING.get(module, module)
        if module == "__torch__" or module.startswith("__torch__."):
            qualified = f"{module}.{name}"
            if qualified not in self.classes:
                self.classes[qualified] = type(name, (_ScriptObject,), {"qualified_name": qualified})
            return self.classes[qualified]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return self._rebuild_tensor
        if module == "torch._utils" and name in ("_rebuild_parameter", "_rebuild_parameter_with_state"):
            return _rebuild_parameter
        if module == "torch" and name == "device":
            return _device
        if module == "torch" and name.endswith("Storage"):
            raise CheckpointError(
                f"{self.path}: the TorchScript archive stores tensors as torch.{name}, which clipforge cannot read "
                "yet; convert the file to safetensors in a trusted environment"
            )
        if (module, name) in _SAFE_FUNCTIONS:
            return _SAFE_FUNCTIONS[(module, name)]
        raise UnsafeCheckpointError(
            f"{self.path}: the TorchScript archive's data.pkl refers to the global '{module}.{name}', which is "
            "not a tensor, a container or a TorchScript module; loading it could execute code from the file, "
            f"which clipforge refuses to do. {CONVERT_HELP}"
        )

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (
            isinstance(pid, tuple)
            and len(pid) == 5
            and pid[0] == "storage"
            and isinstance(pid[1], _StorageType)
            and isinstance(pid[2], str)
            and re.fullmatch(r"\w+", pid[2])
            and isinstance(pid[4], int)
            and pid[4] >= 0
        ):
            raise CheckpointError(
                f"{self.path}: unexpected storage reference {pid!r} in data.pkl; the file is corrupt"
            )
        _, storage_type, key, _location, numel = pid
        if key not in self.storages:
            self.storages[key] = self._load_storage(key, storage_type.dtype, numel)
        storage = self.storages[key]
        if storage.dtype != storage_type.dtype:
            raise CheckpointError(f"{self.path}: storage {key} is read as two dtypes; the file is corrupt")
        return storage

    def _load_storage(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        record = f"{self.root}/data/{key}"
        nbytes = numel * dtype.itemsize
        try:
            size = self.archive.getinfo(record).file_size
        except KeyError as exc:
            raise CheckpointError(f"{self.path}: record {record} is missing; {REDOWNLOAD_HELP}") from exc
        if size != nbytes:
            raise CheckpointError(
                f"{self.path}: record {record} has {size} bytes, expected {numel} x {dtype.itemsize}; "
                f"the file is truncated or corrupt; {REDOWNLOAD_HELP}"
            )
        if numel == 0:
            return torch.empty(0, dtype=dtype)
        buffer = bytearray(nbytes)  # read in place: one copy of each storage in memory, not two
        try:
            with self.archive.open(record) as handle:
                complete = handle.readinto(buffer) == nbytes and not handle.read(1)
        except (zipfile.BadZipFile, OSError, EOFError) as exc:
            raise CheckpointError(
                f"{self.path}: record {record} is corrupt ({exc}); {REDOWNLOAD_HELP}"
            ) from exc
        if not complete:
            raise CheckpointError(f"{self.path}: record {record} is truncated; {REDOWNLOAD_HELP}")
        storage = torch.frombuffer(buffer, dtype=torch.uint8)
        if self.big_endian:
            part = dtype.itemsize // 2 if dtype.is_complex else dtype.itemsize  # complex: swap each half
            if part > 1:
                storage = storage.view(-1, part).flip(1).reshape(-1)
        return storage.view(dtype)

    def _rebuild_tensor(
        self,
        storage: Any,
        storage_offset: Any,
        size: Any,
        stride: Any,
        requires_grad: Any = False,
        backward_hooks: Any = None,
        metadata: Any = None,
    ) -> torch.Tensor:
        if not (
            isinstance(storage, torch.Tensor)
            and _is_int(storage_offset)
            and isinstance(size, tuple | list)
            and isinstance(stride, tuple | list)
            and len(size) == len(stride)
            and all(_is_int(n) and n >= 0 for n in (*size, *stride))
        ):
            raise CheckpointError(f"{self.path}: malformed tensor record in data.pkl; the file is corrupt")
        numel = 1
        for n in size:
            numel *= n
        last = (
            storage_offset + sum((n - 1) * s for n, s in zip(size, stride)) if numel else storage_offset - 1
        )
        if storage_offset < 0 or last >= storage.numel():
            raise CheckpointError(
                f"{self.path}: a tensor record points outside its storage; the file is truncated or corrupt"
            )
        return torch.as_strided(storage, tuple(size), tuple(stride), storage_offset)

    def _restricted_build(self) -> None:
        state = self.stack.pop()
        target = self.stack[-1]
        if not isinstance(target, _ScriptObject):
            raise UnsafeCheckpointError(
                f"{self.path}: data.pkl sets the state of a {type(target).__name__}, which only code-carrying "
                f"pickles do; clipforge refuses to load it. {CONVERT_HELP}"
            )
        target.__setstate__(state)

    dispatch[pickle.BUILD[0]] = _restricted_build

    def _bounded_bytearray8(self) -> None:
        (length,) = struct.unpack("<Q", self.read(8))
        if length > self._data_size:  # pickle's own opcode allocates ``length`` bytes before reading them
            raise CheckpointError(
                f"{self.path}: data.pkl declares a {length:,}-byte array in a {self._data_size:,}-byte pickle; "
                f"the file is truncated or corrupt; {REDOWNLOAD_HELP}"
            )
        self.append(bytearray(self.read(length)))

    dispatch[pickle.BYTEARRAY8[0]] = _bounded_bytearray8


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _rebuild_parameter(
    data: Any, requires_grad: Any = False, backward_hooks: Any = None, state: Any = None
) -> Any:
    if not isinstance(data, torch.Tensor):
        raise CheckpointError("malformed parameter record in a TorchScript data.pkl; the file is corrupt")
    return data


def _device(spec: Any) -> str:
    if not isinstance(spec, str):
        raise CheckpointError("malformed device record in a TorchScript data.pkl; the file is corrupt")
    return spec


def _byteorder(archive: zipfile.ZipFile, root: str) -> str:
    try:
        return archive.read(f"{root}/byteorder").decode().strip()
    except KeyError:
        return "little"


def read_torchscript(
    path: Path, root: str
) -> tuple[dict[str, torch.Tensor], dict[str, str], tuple[str, ...]]:
    """(flat parameters and buffers, root scalar attributes, ignored entries) of a TorchScript archive."""
    try:
        with zipfile.ZipFile(path) as archive:
            data = archive.read(f"{root}/data.pkl")
            obj = _RestrictedUnpickler(data, archive, root, path).load()
            sources = _SourceIndex(archive, root, path)
            if not isinstance(obj, _ScriptObject):
                raise CheckpointError(f"{path}: data.pkl of the TorchScript archive does not hold a module")
            tensors: dict[str, torch.Tensor] = {}
            ignored: list[str] = []
            _collect_module(obj, "", sources, tensors, ignored, path)
    except CheckpointError:
        raise
    except MemoryError:  # never from a size field: record sizes were checked against the file (reader.py)
        raise
    except Exception as exc:  # the unpickler, zipfile and torch raise many types on damaged bytes
        raise CheckpointError(
            f"{path}: TorchScript archive is truncated or corrupt ({type(exc).__name__}: {exc}); {REDOWNLOAD_HELP}"
        ) from exc
    if not tensors:
        raise CheckpointError(f"{path}: the TorchScript archive holds no parameters or buffers")
    metadata = {"torchscript.class": obj.qualified_name, **_root_scalars(obj, tensors)}
    return tensors, metadata, tuple(ignored)


def _root_scalars(obj: _ScriptObject, tensors: Mapping[str, torch.Tensor]) -> dict[str, str]:
    """Scalar attributes of the root module (OpenAI's input_resolution/context_length/vocab_size, open_clip's
    context_length...), including one-element tensors that are not part of the state dict."""
    scalars: dict[str, str] = {}
    for name, value in obj.state.items():
        if name == "training" or name.startswith("_") or name in tensors:
            continue
        if isinstance(value, _SCALARS):
            scalars[name] = str(value)
        elif isinstance(value, torch.Tensor) and value.numel() == 1:
            scalars[name] = str(value.item())
    return scalars


def _collect_module(
    obj: _ScriptObject,
    prefix: str,
    sources: _SourceIndex,
    tensors: dict[str, torch.Tensor],
    ignored: list[str],
    path: Path,
) -> None:
    """Same order and selection as ``torch.jit.load(path).state_dict()``: parameters, then buffers (slot order),
    then each submodule recursively. A parameter is skipped when None; a buffer counts only when typed Tensor."""
    info = sources.class_info(obj.qualified_name)
    state = obj.state
    if not isinstance(state, dict):
        raise CheckpointError(
            f"{path}: module {prefix or '<root>'} ({obj.qualified_name}) has a custom pickled state, which "
            "clipforge cannot read; re-save its state_dict with safetensors in a trusted environment"
        )
    buffers = [
        name
        for name, value in state.items()
        if name in info.buffers and info.types.get(name) == "Tensor" and isinstance(value, torch.Tensor)
    ]
    for name, value in state.items():
        if name in info.parameters and isinstance(value, torch.Tensor):
            tensors[f"{prefix}{name}"] = value
    for name in buffers:
        tensors[f"{prefix}{name}"] = state[name]
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and name not in info.parameters and name not in buffers:
            ignored.append(f"{prefix}{name}")
    for name, value in state.items():
        if isinstance(value, _ScriptObject) and sources.class_info(value.qualified_name).is_module:
            _collect_module(value, f"{prefix}{name}.", sources, tensors, ignored, path)


_CLASS_RE = re.compile(r"^class\s+(\w+)\s*(?:\(\s*([\w.]+)\s*\))?\s*:")
_NAME_LIST_RE = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*\[(.*)\]\s*$")
_ANNOTATION_RE = re.compile(r"^\s+(\w+)\s*:\s*([^=]+?)\s*$")
_SUBSCRIPT_ANNOTATION_RE = re.compile(r'^\s+__annotations__\["([^"]+)"\]\s*=\s*(.+?)\s*$')


class _SourceIndex:
    """Class declarations from a TorchScript archive's generated code, parsed as text (never executed)."""

    def __init__(self, archive: zipfile.ZipFile, root: str, path: Path) -> None:
        self.archive = archive
        self.root = root
        self.path = path
        self.files: dict[str, dict[str, _ClassInfo]] = {}

    def class_info(self, qualified_name: str) -> _ClassInfo:
        if qualified_name.startswith("__torch__.torch.classes."):  # C++ (TorchBind) objects: never a Module
            return _ClassInfo(False, set(), set(), {})
        qualifier, _, name = qualified_name.rpartition(".")
        if qualifier not in self.files:
            self.files[qualifier] = self._parse_file(qualifier)
        info = self.files[qualifier].get(name)
        if info is None:
            raise CheckpointError(
                f"{self.path}: the TorchScript archive has no definition of class {qualified_name} under "
                f"{self.root}/code/; the file is incomplete or corrupt; {REDOWNLOAD_HELP}"
            )
        return info

    def _parse_file(self, qualifier: str) -> dict[str, _ClassInfo]:
        record = f"{self.root}/code/{qualifier.replace('.', '/')}.py"
        try:
            source = self.archive.read(record).decode("utf-8")
        except KeyError:
            return {}
        classes: dict[str, _ClassInfo] = {}
        current: _ClassInfo | None = None
        body_indent: str | None = None
        for line in source.splitlines():
            if not line.strip():
                continue
            if not line[0].isspace():
                match = _CLASS_RE.match(line)
                current = None
                if match:
                    current = _ClassInfo(match.group(2) == "Module", set(), set(), {})
                    classes[match.group(1)] = current
                    body_indent = None
                continue
            if current is None:
                continue
            indent = line[: len(line) - len(line.lstrip())]
            if body_indent is None:
                body_indent = indent
            if indent != body_indent:  # inside a method body
                continue
            if match := _NAME_LIST_RE.match(line):
                names = set(re.findall(r'"([^"]*)"', match.group(2)))
                (current.parameters if match.group(1) == "__parameters__" else current.buffers).update(names)
            elif (match := _SUBSCRIPT_ANNOTATION_RE.match(line)) or (match := _ANNOTATION_RE.match(line)):
                current.types[match.group(1)] = match.group(2)
        return classes
