"""Fuzz targets for every parser of untrusted bytes, shared by ``tests/test_fuzz.py`` and ``scripts/fuzz.py``.

Each target takes ``bytes`` (the tokenizer: ``str``), feeds them to one parser and enforces its contract: the
parser returns, or raises one of the target's documented error types with a non-empty message. Anything else
(another exception type, ``MemoryError`` under a memory limit, no answer within the time limit) is a
:class:`ContractViolation`. Seeds are real inputs (a shard of the built-in emoji data, its JPEG re-encoded as
PNG/GIF, a clipforge safetensors header, ``torch.save`` and TorchScript archives, captions in many languages)
that the strategies in ``test_fuzz.py`` and the mutator in ``scripts/fuzz.py`` mutate.
"""

from __future__ import annotations

import atexit
import contextlib
import gzip
import io
import json
import random
import resource
import shutil
import signal
import struct
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
EMOJI_SHARD = ROOT / "src" / "clipforge" / "builtin_data" / "emoji" / "test" / "shard-000000.tar"
DEFAULT_TIMEOUT_S = 10.0  # far above any seed's parse time (milliseconds), far below "hung"


class ContractViolation(AssertionError):
    """A parser broke its contract on an input: wrong exception type, no answer in time, or out of memory."""


class _NoAnswer(BaseException):  # BaseException: parsers that catch Exception must not swallow it
    pass


@dataclass(frozen=True)
class Target:
    """One parser under fuzzing: what it is, how to call it, which errors it may raise, its seed inputs."""

    name: str
    parser: str  # the public entry point, for the report
    call: Callable[[Any], None]
    seeds: Callable[[], list[Any]]
    kind: str = "bytes"  # or "str"


# ----------------------------------------------------------------------------------------------------------------
# Scratch files: one folder per process, reused by every call (fuzzing writes thousands of inputs).


@lru_cache(maxsize=1)
def scratch() -> Path:
    folder = Path(tempfile.mkdtemp(prefix="clipforge-fuzz-"))
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def _write(name: str, data: bytes) -> Path:
    path = scratch() / name
    path.write_bytes(data)
    return path


# ----------------------------------------------------------------------------------------------------------------
# The targets


def shard_tar(data: bytes) -> None:
    """``iter_shard`` on a tar (or .tar.gz) file: yields samples and at most one UnitError, never raises."""
    from clipforge.data.raw import RawSample, UnitError
    from clipforge.data.shards import iter_shard

    items = list(iter_shard(_write("fuzz.tar", data)))
    assert all(isinstance(item, RawSample | UnitError) for item in items)
    assert all(isinstance(item, RawSample) for item in items[:-1]), "a UnitError must come last"
    for item in items:
        if isinstance(item, UnitError):
            assert item.message and item.reason, item
        else:
            assert isinstance(item.captions, tuple) and all(isinstance(c, str) for c in item.captions)


def shard_manifest(data: bytes) -> None:
    """``Manifest.load`` on a shard folder's ``manifest.json``."""
    from clipforge.data.shards import Manifest

    manifest = Manifest.load(_write("manifest.json", data))
    assert isinstance(manifest.num_samples, int)


def image(data: bytes) -> None:
    """``load_image`` on encoded bytes (every format Pillow opens): an 8-bit RGB image or ImageLoadError."""
    import warnings

    from clipforge.images import load_image

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # damaged EXIF blocks warn (documented); Pillow's bomb warning
        result = load_image(data, name="fuzz-image")
    assert result.mode == "RGB" and result.width > 0 and result.height > 0


def checkpoint_file(data: bytes) -> None:
    """``read_weights`` on any checkpoint file: safetensors (header and embedded config), torch.save zip or
    legacy, TorchScript archives; the container is detected from the bytes."""
    from clipforge.checkpoint import read_weights

    read_weights(_write("fuzz.ckpt", data))


def safetensors_header(data: bytes) -> None:
    """``read_weights`` on a safetensors file whose JSON header is ``data`` (length prefix and tensor bytes
    framed correctly), so mutations reach the header and the embedded clipforge config."""
    checkpoint_file(struct.pack("<Q", len(data)) + data + bytes(64))


def torchscript_pickle(data: bytes) -> None:
    """``read_weights`` on a TorchScript archive (valid zip, real code/ and data/ records) whose ``data.pkl`` is
    ``data``: the restricted unpickler on arbitrary pickles."""
    records = dict(_torchscript_records())
    records[f"{_TS_ROOT}/data.pkl"] = data
    checkpoint_file(_zip(records))


def tokenizer(text: str) -> None:
    """The BPE tokenizer on any Unicode: ``encode``, ``__call__`` on one text and on a batch, ``decode``."""
    tok = _tokenizer()
    ids = tok.encode(text)
    assert all(0 <= i < tok.vocab_size for i in ids)
    rows = tok([text, "a photo of a cat", text, "", text])  # five texts: the batch path
    assert rows.shape == (5, tok.context_length) and bool((rows[:, 0] == tok.sot_token_id).all())
    assert tok([text]).tolist()[0] == rows.tolist()[0]  # the few-texts path gives the same row
    tok.decode(ids)


def table(data: bytes) -> None:
    """The table readers on ``data`` as a .csv, a .tsv and a .jsonl: ``TableSource`` (every row read) and
    ``open_eval_dataset`` (every record listed)."""
    from clipforge.data.tables import TableSource
    from clipforge.eval.datasets import open_eval_dataset

    _image_beside_tables()
    for suffix in (".csv", ".tsv", ".jsonl"):
        path = _write(f"table{suffix}", data)
        with contextlib.suppress(_allowed_table_errors()):
            source = TableSource(path, on_bad_row="report")
            for index in range(source.num_units()):
                source.row(index)
        with contextlib.suppress(_allowed_table_errors()):
            dataset = open_eval_dataset(path)
            assert len(dataset) >= 0


def _allowed_table_errors() -> tuple[type[BaseException], ...]:
    from clipforge.data.raw import DataError

    return (DataError,)


@lru_cache(maxsize=1)
def _tokenizer() -> Any:
    from clipforge.bpe import Tokenizer

    return Tokenizer()


# ----------------------------------------------------------------------------------------------------------------
# Seeds: real inputs


@lru_cache(maxsize=1)
def _emoji_samples() -> list[Any]:
    from clipforge.data.shards import iter_shard

    samples = []
    for sample in iter_shard(EMOJI_SHARD):
        samples.append(sample)
        if len(samples) == 2:
            return samples
    raise RuntimeError(f"{EMOJI_SHARD}: expected at least 2 samples")


@lru_cache(maxsize=1)
def image_seeds() -> list[bytes]:
    from PIL import Image

    jpeg = _emoji_samples()[0].image
    img = Image.open(io.BytesIO(jpeg)).convert("RGB").resize((16, 16))
    seeds = [jpeg]
    for fmt, mode in (("PNG", "RGBA"), ("GIF", "P"), ("PNG", "I;16"), ("BMP", "RGB"), ("TIFF", "RGB")):
        out = io.BytesIO()
        img.convert("L").convert(mode).save(out, fmt) if mode == "I;16" else img.convert(mode).save(out, fmt)
        seeds.append(out.getvalue())
    return seeds


@lru_cache(maxsize=1)
def shard_seeds() -> list[bytes]:
    """A two-sample shard written by ``ShardWriter`` (image, .txt, .json with captions and fields), its
    gzip form, and the first members of the real built-in shard."""
    from clipforge.data.raw import END_OF_ARCHIVE, tar_member_bytes

    first, second = _emoji_samples()
    png = image_seeds()[1]
    members = [
        tar_member_bytes("a/000001.png", png),
        tar_member_bytes("a/000001.txt", first.captions[0].encode()),
        tar_member_bytes(
            "a/000001.json", json.dumps({"captions": list(first.captions), "label": 3}).encode()
        ),
        tar_member_bytes("a/000002.jpg", second.image),
        tar_member_bytes("a/000002.txt", second.captions[0].encode()),
        tar_member_bytes("a/000002.cls", b"7"),
    ]
    small = b"".join(members) + END_OF_ARCHIVE
    real = EMOJI_SHARD.read_bytes()[: 12 * 512]
    return [small, gzip.compress(small, mtime=0), real]


def manifest_seeds() -> list[bytes]:
    return [(EMOJI_SHARD.parent / "manifest.json").read_bytes()]


@lru_cache(maxsize=1)
def _native_header() -> bytes:
    from clipforge.checkpoint.native import native_metadata
    from clipforge.config import get_model_config

    metadata = native_metadata(get_model_config("tiny"))
    header = {
        "__metadata__": metadata,
        "visual.proj": {"dtype": "F32", "shape": [4, 4], "data_offsets": [0, 64]},
    }
    return json.dumps(header, separators=(",", ":")).encode()


def safetensors_header_seeds() -> list[bytes]:
    return [_native_header()]


_TS_ROOT = "tiny"


@lru_cache(maxsize=1)
def _torchscript_archive() -> bytes:
    import torch

    class Tiny(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(3, 2)
            self.register_buffer("scale", torch.ones(2))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.proj(x) * self.scale

    out = io.BytesIO()
    torch.jit.save(torch.jit.script(Tiny()), out)
    return out.getvalue()


@lru_cache(maxsize=1)
def _torchscript_records() -> tuple[tuple[str, bytes], ...]:
    with zipfile.ZipFile(io.BytesIO(_torchscript_archive())) as archive:
        records = {info.filename: archive.read(info) for info in archive.infolist()}
    return tuple((f"{_TS_ROOT}/{name.split('/', 1)[1]}", data) for name, data in records.items())


def _zip(records: dict[str, bytes]) -> bytes:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for name, data in records.items():
            archive.writestr(name, data)
    return out.getvalue()


def torchscript_pickle_seeds() -> list[bytes]:
    return [dict(_torchscript_records())[f"{_TS_ROOT}/data.pkl"]]


@lru_cache(maxsize=1)
def checkpoint_seeds() -> list[bytes]:
    import torch
    from safetensors.torch import save

    from clipforge.checkpoint.native import native_metadata
    from clipforge.config import get_model_config

    tensors = {"visual.proj": torch.arange(16, dtype=torch.float32).reshape(4, 4)}
    native = save(tensors, metadata=native_metadata(get_model_config("tiny")))
    saved = io.BytesIO()
    torch.save({"state_dict": {"token_embedding.weight": torch.ones(3, 2)}, "epoch": 3}, saved)
    legacy = io.BytesIO()
    torch.save({"w": torch.ones(2)}, legacy, _use_new_zipfile_serialization=False)
    return [native, saved.getvalue(), legacy.getvalue(), _torchscript_archive()]


TEXT_SEEDS = [
    "a photo of a cat, sitting on a mat.",
    "Das ist ein Foto von einem Hund – überraschend!",
    "這是一張貓的照片。日本語のテキストも：猫が好きです。",
    "صورة قطة على السجادة",
    "фото кошки на ковре",
    "emoji 🐈‍⬛🏳️‍🌈 and &amp; entities &lt;b&gt; and mojibake Ã©tÃ©",
    "it's we'll they've I'd 1234567890 ...!!!???",
    "\x00\x1b[31mcontrol\r\ncharacters\t\u200b\ufeff",
    "pneumonoultramicroscopicsilicovolcanoconiosis" * 3,
]


@lru_cache(maxsize=1)
def _image_beside_tables() -> None:
    """A real image next to the scratch tables, so that rows naming it read a file."""
    _write("cat.png", image_seeds()[1])


def table_seeds() -> list[bytes]:
    return [
        b'image,caption\ncat.png,a photo of a cat\nnope.png,"a dog, quoted"\n',
        b"image\tcaption\tlabel\ncat.png\ta cat\tcat\ncat.png\tanother\tdog\n",
        b'{"image": "cat.png", "caption": ["a cat", "a kitten"], "label": 1}\n{"image": "cat.png", "text": "x"}\n',
        b"\xef\xbb\xbffilepath,title,label\ncat.png,cat,0\n",
    ]


TARGETS: dict[str, Target] = {
    t.name: t
    for t in (
        Target("shard_tar", "clipforge.data.shards.iter_shard", shard_tar, shard_seeds),
        Target("shard_manifest", "clipforge.data.shards.Manifest.load", shard_manifest, manifest_seeds),
        Target("image", "clipforge.images.load_image", image, image_seeds),
        Target("checkpoint_file", "clipforge.checkpoint.read_weights", checkpoint_file, checkpoint_seeds),
        Target(
            "safetensors_header",
            "read_weights: safetensors header + embedded config",
            safetensors_header,
            safetensors_header_seeds,
        ),
        Target(
            "torchscript_pickle",
            "read_weights: TorchScript data.pkl",
            torchscript_pickle,
            torchscript_pickle_seeds,
        ),
        Target("tokenizer", "clipforge.bpe.Tokenizer", tokenizer, lambda: list(TEXT_SEEDS), "str"),
        Target("table", "TableSource, open_eval_dataset (.csv/.tsv/.jsonl)", table, table_seeds),
    )
}


def allowed_errors(name: str) -> tuple[type[BaseException], ...]:
    """The documented error types of a target (imported lazily: importing clipforge takes a second)."""
    from clipforge.checkpoint.errors import CheckpointError
    from clipforge.data.raw import DataError
    from clipforge.images import ImageLoadError

    return {
        "shard_tar": (DataError,),
        "shard_manifest": (DataError,),
        "image": (ImageLoadError,),
        "checkpoint_file": (CheckpointError,),
        "safetensors_header": (CheckpointError,),
        "torchscript_pickle": (CheckpointError,),
        "tokenizer": (),
        "table": (DataError,),
    }[name]


# ----------------------------------------------------------------------------------------------------------------
# The contract


@contextlib.contextmanager
def _time_limit(seconds: float) -> Iterator[None]:
    def expire(signum: int, frame: object) -> None:
        raise _NoAnswer

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def check(name: str, data: Any, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """Run target ``name`` on ``data``; returns ``"ok"`` or the allowed error's type name, else raises
    :class:`ContractViolation` (the original exception chained)."""
    target = TARGETS[name]
    allowed = allowed_errors(name)
    try:
        with _time_limit(timeout_s):
            target.call(data)
    except _NoAnswer:
        raise ContractViolation(
            f"{name}: no answer within {timeout_s} s on a {len(data)}-long input"
        ) from None
    except allowed as exc:
        if not str(exc).strip():
            raise ContractViolation(f"{name}: {type(exc).__name__} with an empty message") from exc
        return type(exc).__name__
    except Exception as exc:  # MemoryError included: under a memory limit it means an unbounded allocation
        raise ContractViolation(f"{name}: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return "ok"


def limit_memory(extra_mib: int) -> int:
    """Cap this process's address space at its current size plus ``extra_mib``; returns the cap in bytes.

    Relative to the current size because importing torch maps gigabytes of address space before any parse.
    """
    with open("/proc/self/status") as status:
        vm_kib = next(int(line.split()[1]) for line in status if line.startswith("VmSize:"))
    cap = vm_kib * 1024 + extra_mib * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (cap, resource.getrlimit(resource.RLIMIT_AS)[1]))
    return cap


def mutate(seed: bytes, rng: random.Random, steps: int = 4) -> bytes:
    """A few random byte-level mutations of ``seed`` (flips, overwrites with boundary values, inserts,
    deletions, duplications, truncation): the script's mutator when atheris is not installed."""
    data = bytearray(seed)
    for _ in range(rng.randint(1, steps)):
        position = rng.randrange(len(data) + 1)
        action = rng.randrange(7)
        if action == 0 and data:
            data[min(position, len(data) - 1)] ^= 1 << rng.randrange(8)
        elif action == 1:
            value = rng.choice([b"\x00", b"\xff", b"\x7f", b"\x80", b"9" * 12, b"\xff" * 8, b"-1", b"1e999"])
            data[position : position + len(value)] = value
        elif action == 2:
            data[position:position] = rng.randbytes(rng.randint(1, 16))
        elif action == 3:
            del data[position : position + rng.randint(1, 64)]
        elif action == 4 and data:
            start = rng.randrange(len(data))
            data[position:position] = data[start : start + rng.randint(1, 256)]
        elif action == 5:
            del data[position:]
        else:
            data[position : position + 1] = bytes([rng.randrange(256)])
    return bytes(data)


def mutate_text(seed: str, rng: random.Random) -> str:
    """Text mutations: code points from every plane spliced in, runs repeated, long words."""
    text = list(seed)
    for _ in range(rng.randint(1, 4)):
        position = rng.randrange(len(text) + 1)
        action = rng.randrange(4)
        if action == 0:
            text[position:position] = [chr(rng.choice([rng.randrange(0x80), rng.randrange(0x110000)]))]
        elif action == 1 and text:
            text[position:position] = text[position : position + rng.randint(1, 8)] * rng.randint(2, 200)
        elif action == 2:
            del text[position : position + rng.randint(1, 8)]
        else:
            text[position:position] = rng.choices("abcdefghijklmnopqrstuvwxyzäöüßéπ我", k=rng.randint(1, 400))
    return "".join(c for c in text if not 0xD800 <= ord(c) <= 0xDFFF)


def repair_tar_checksums(data: bytes) -> bytes:
    """Recompute the checksum of every 512-byte block that carries a ustar magic, so that mutations of header
    fields reach the field parsers instead of stopping at the checksum test."""
    out = bytearray(data)
    for start in range(0, len(out) - 511, 512):
        block = out[start : start + 512]
        if block[257:262] == b"ustar":
            block[148:156] = b" " * 8
            out[start + 148 : start + 156] = b"%06o\x00 " % (sum(block) & 0o777777)
    return bytes(out)
