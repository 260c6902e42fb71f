"""Fuzzing every parser of untrusted bytes (issue 15, item 4): hypothesis property tests over the targets of
``tests/fuzz_targets.py`` (real seeds, mutated; plus unstructured input), the inputs that broke a contract
before their fix, and the memory bound (a subprocess with its address space capped).

The long runs are ``scripts/fuzz.py``; their numbers are in ``docs/reliability.md``.
"""

from __future__ import annotations

import gzip
import io
import json
import random
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests import fuzz_targets
from tests.conftest import locked_import

hypothesis = locked_import("hypothesis")
st = hypothesis.strategies
ROOT = Path(__file__).resolve().parents[1]


def _settings(examples: int) -> object:
    # deadline=None: the contract's own timer (check's timeout) is the hang guard, immune to a loaded machine.
    return hypothesis.settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=list(hypothesis.HealthCheck),
    )


def _mutated(name: str) -> object:
    seeds = fuzz_targets.TARGETS[name].seeds()
    mutated = st.builds(
        lambda seed, rng: fuzz_targets.mutate(seed, rng),
        st.sampled_from(seeds),
        st.randoms(use_true_random=False),
    )
    return st.one_of(mutated, st.binary(max_size=600))


def _check(name: str, data: object) -> None:
    fuzz_targets.check(name, data, timeout_s=5.0)


# ----------------------------------------------------------------------------------------------------------------
# Property tests: one per target


@pytest.mark.parametrize(
    ("name", "examples"),
    [
        ("shard_manifest", 150),
        ("image", 150),
        ("checkpoint_file", 120),
        ("safetensors_header", 120),
        ("torchscript_pickle", 120),
    ],
)
def test_mutated_inputs_keep_the_contract(name, examples):
    @_settings(examples)
    @hypothesis.given(_mutated(name))
    def run(data):
        _check(name, data)

    run()


@_settings(150)
@hypothesis.given(_mutated("shard_tar"), st.booleans())
def test_shard_reader_contract(data, repair):
    # Repaired checksums take mutations past the header check into the field parsers.
    _check("shard_tar", fuzz_targets.repair_tar_checksums(data) if repair else data)


_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@_settings(60)
@hypothesis.given(
    st.fixed_dictionaries(
        {"format": st.just("clipforge.shards"), "shards": _JSON | st.lists(st.dictionaries(
            st.sampled_from(["name", "num_samples", "num_bytes", "sha256"]), _JSON))},
        optional={"dropped": _JSON, "oversized_samples": _JSON, "unit_errors": _JSON, "args": _JSON},
    )
)  # fmt: skip
def test_manifest_of_any_json_shape(document):
    _check("shard_manifest", json.dumps(document).encode())


@_settings(200)
@hypothesis.given(
    st.one_of(
        st.text(),
        st.text(st.characters(codec="utf-8"), min_size=60, max_size=400),
        st.builds(fuzz_targets.mutate_text, st.sampled_from(fuzz_targets.TEXT_SEEDS), st.randoms()),
    )
)
def test_tokenizer_on_any_unicode(text):
    _check("tokenizer", text)


@_settings(100)
@hypothesis.given(_mutated("table"))
def test_table_readers_contract(data):
    _check("table", data)


def test_every_seed_parses_within_the_contract():
    for name, target in fuzz_targets.TARGETS.items():
        outcomes = [fuzz_targets.check(name, seed) for seed in target.seeds()]
        assert outcomes, name
        if name in ("shard_tar", "shard_manifest", "image", "safetensors_header", "tokenizer"):
            assert set(outcomes) == {"ok"}, (name, outcomes)  # real inputs parse fully


def test_the_contract_reports_wrong_types_and_hangs(monkeypatch):
    def raises(data):
        raise KeyError("x")

    def hangs(data):
        while True:
            pass

    for call, message in ((raises, "KeyError"), (hangs, "no answer within 0.2 s")):
        target = fuzz_targets.TARGETS["tokenizer"]
        monkeypatch.setitem(
            fuzz_targets.TARGETS, "tokenizer", fuzz_targets.Target("t", "t", call, target.seeds)
        )
        with pytest.raises(fuzz_targets.ContractViolation, match=message):
            fuzz_targets.check("tokenizer", "a", timeout_s=0.2)


# ----------------------------------------------------------------------------------------------------------------
# Regressions: inputs that broke a contract before their fix


def _manifest_error(document: bytes, tmp_path: Path) -> str:
    from clipforge.data.raw import DataError
    from clipforge.data.shards import Manifest

    path = tmp_path / "manifest.json"
    path.write_bytes(document)
    with pytest.raises(DataError) as info:
        Manifest.load(path)
    assert str(path) in str(info.value) and "use_manifest=False" in str(info.value)
    return str(info.value)


@pytest.mark.parametrize(
    ("document", "message"),
    [
        (
            b'{"format": "clipforge.shards", "shards": [], "oversized_samples": 1e999}',
            "'oversized_samples' is inf",
        ),
        (b"[" * 100_000, "nested too deeply"),
        (
            b'{"format": "clipforge.shards", "shards": [{"name": 1, "num_samples": "x", "num_bytes": null, '
            b'"sha256": []}]}',
            "shard entry 0 has a name or sha256",
        ),
        (b'{"format": "clipforge.shards", "shards": {"a": 1}}', "'shards' is not a list"),
        (b'{"format": "clipforge.shards", "shards": [], "dropped": {"x": "many"}}', "'dropped' counts"),
    ],
)
def test_damaged_manifests_are_data_errors(document, message, tmp_path):
    # Before: OverflowError, RecursionError, and a TypeError only later, from Manifest.num_samples.
    assert message in _manifest_error(document, tmp_path)


def _tar_header(name: str, size_field: bytes) -> bytes:
    header = bytearray(512)
    header[0 : len(name)] = name.encode()
    header[100:108] = b"0000644\x00"
    header[124:136] = size_field
    header[156:157] = b"0"
    header[257:263] = b"ustar\x00"
    header[263:265] = b"00"
    return fuzz_targets.repair_tar_checksums(bytes(header))


@pytest.mark.parametrize(
    ("size_field", "message"),
    [
        (b"\x80" + (2**40).to_bytes(11, "big"), "claims 1,099,511,627,776 bytes, more than the 536,870,912"),
        (b"-0000000007\x00", "negative size"),
    ],
)
def test_a_shard_member_size_is_checked_before_reading(size_field, message, tmp_path):
    from clipforge.data.raw import UnitError
    from clipforge.data.shards import iter_shard

    path = tmp_path / "big.tar"
    path.write_bytes(_tar_header("000001.jpg", size_field) + bytes(4096))
    (error,) = list(iter_shard(path))
    assert isinstance(error, UnitError) and error.reason == "truncated_shard"  # after one valid header
    assert message in error.message and str(path) in error.message


def test_a_nul_in_an_image_path_is_an_image_load_error():
    from clipforge.images import ImageLoadError, load_image

    # Before: ValueError("embedded null byte") from open().
    with pytest.raises(ImageLoadError, match="contains a NUL character") as info:
        load_image("photos/cat\x00.png")
    assert info.value.reason == "missing"


def _checkpoint_error(data: bytes, tmp_path: Path) -> str:
    from clipforge.checkpoint import CheckpointError, read_weights

    path = tmp_path / "bad.pt"
    path.write_bytes(data)
    with pytest.raises(CheckpointError) as info:
        read_weights(path)
    assert str(path) in str(info.value)
    return str(info.value)


_REGRESSIONS = ROOT / "tests" / "fuzz_regressions" / "checkpoint_file"
_EXPECTED = {  # file (what it raised before, and where) -> the CheckpointError's message now
    "assertionerror-serialization-1922": "torch.save file is truncated or corrupt (AssertionError: storage key",
    "error-zipfile-1031": "TorchScript archive is truncated or corrupt (error: Error -3 while decompressing",
    "indexerror-weights_only_unpickler-404": "torch.save file is truncated or corrupt (IndexError",
    "indexerror-weights_only_unpickler-460": "torch.save file is truncated or corrupt (IndexError",
    "indexerror-weights_only_unpickler-471": "torch.save file is truncated or corrupt (IndexError",
    "indexerror-weights_only_unpickler-568": "torch.save file is truncated or corrupt (IndexError: pop from empty",
    "memoryerror-pickletools-690": "legacy torch.save file is truncated or corrupt (expected 3778379021 bytes",
    "notimplementederror-zipfile-1419": "zip archive is truncated or corrupt (NotImplementedError: zip file version",
    "notimplementederror-zipfile-1576": "zip record 'archive/data/2' claims 32,520 bytes (8 stored)",
    "typeerror-weights_only_unpickler-415": "torch.save file is truncated or corrupt (TypeError",
    "unicodedecodeerror-zipfile-1406": "zip archive is truncated or corrupt (UnicodeDecodeError",
}


@pytest.mark.parametrize("name", sorted(_EXPECTED))
def test_checkpoint_fuzz_findings_are_checkpoint_errors(name, tmp_path):
    # Found by scripts/fuzz.py (mutations of the seeds); each escaped read_weights as the type in its name.
    data = (_REGRESSIONS / f"{name}.input").read_bytes()
    assert _EXPECTED[name] in _checkpoint_error(data, tmp_path)


def test_every_stored_finding_has_an_expected_message():
    assert sorted(p.stem for p in _REGRESSIONS.glob("*.input")) == sorted(_EXPECTED)


def test_a_zip_record_claiming_more_than_the_file_is_refused(tmp_path):
    archive = bytearray(fuzz_targets._torchscript_archive())
    central = bytes(archive).index(b"PK\x01\x02")
    archive[central + 24 : central + 28] = struct.pack("<I", 2**32 - 1)  # uncompressed size: 4 GiB
    assert "claims 4,294,967,295 bytes" in _checkpoint_error(bytes(archive), tmp_path)


def test_huge_lengths_in_pickles_are_refused_before_allocating(tmp_path):
    # Before: MemoryError (pickletools reads BINBYTES8's length; pickle's BYTEARRAY8 allocates it).
    huge = struct.pack("<Q", 2**40)
    assert "legacy torch.save file is truncated" in _checkpoint_error(b"\x80\x02\x8e" + huge, tmp_path)
    with pytest.raises(Exception, match="declares a 1,099,511,627,776-byte array") as info:
        fuzz_targets.torchscript_pickle(b"\x80\x04\x96" + huge + b".")
    assert type(info.value).__name__ == "CheckpointError"


def _legacy_with_numel(numel: int) -> bytes:
    import torch

    out = io.BytesIO()
    torch.save({"w": torch.ones(2)}, out, _use_new_zipfile_serialization=False)
    return out.getvalue().replace(b"cpuq\x06K\x02N", b"cpuq\x06J" + struct.pack("<i", numel) + b"N")


def test_a_legacy_storage_larger_than_the_file_is_refused(tmp_path):
    # Before: torch allocated the declared 8.5 GB storage, then failed reading it.
    message = _checkpoint_error(_legacy_with_numel(0x7F000000), tmp_path)
    assert "declares 8,522,825,728 bytes of tensor data" in message


def test_long_words_tokenize_in_n_log_n_and_match_the_reference():
    from clipforge import bpe

    vocab = bpe._load_vocab()
    rng = random.Random(0)
    words = [
        "".join(rng.choices("abcdefghijklmnopqrstuvwxyzäöüéß", k=rng.randint(60, 200))) for _ in range(60)
    ]
    words += [
        "".join(chr(rng.randrange(0x800, 0x3000)) for _ in range(rng.randint(22, 60))) for _ in range(60)
    ]
    words += ["a" * 300, "ab" * 100, "pneumonoultramicroscopicsilicovolcanoconiosis" * 3]
    assert all(len(word.encode()) > bpe._LONG_WORD for word in words)  # all on the heap path
    reference = locked_import("open_clip.tokenizer", "open_clip_torch").SimpleTokenizer()
    for word in words:
        symbols = "".join(reference.byte_encoder[b] for b in word.encode())
        expected = [reference.encoder[token] for token in reference.bpe(symbols).split(" ")]
        assert bpe._bpe(word, vocab) == expected, word
    long_word = "".join(rng.choices("abcdefghijklmnopqrstuvwxyz", k=50_000))
    fuzz_targets.check("tokenizer", long_word, timeout_s=5.0)  # before: minutes (quadratic merges)


# ----------------------------------------------------------------------------------------------------------------
# Bounded memory


_BOUNDED_RUN = """
import json, sys
from tests import fuzz_targets
inputs = [bytes.fromhex(line) for line in sys.stdin.read().split()]
fuzz_targets.check("checkpoint_file", fuzz_targets.checkpoint_seeds()[0])
fuzz_targets.check("shard_tar", fuzz_targets.shard_seeds()[0])
fuzz_targets.limit_memory(1024)
names = sys.argv[1].split(",")
print(json.dumps([fuzz_targets.check(name, data) for name, data in zip(names, inputs)]))
"""


@pytest.mark.slow
def test_parsers_stay_within_a_memory_cap():
    """Inputs whose length fields claim gigabytes, parsed with the address space capped at +1 GiB: each must
    end in its documented error (not MemoryError). The gzip shard really inflates to 768 MiB."""
    import zlib

    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    size = 768 * 2**20
    body = b"".join(compressor.compress(bytes(2**24)) for _ in range(size // 2**24)) + compressor.flush()
    member = _tar_header("000001.jpg", b"%011o\x00" % size)
    bomb = gzip.compress(member, mtime=0) + body  # two gzip members: one stream of header + 768 MiB zeros
    cases = [
        ("shard_tar", bomb),
        ("checkpoint_file", b"\x80\x02\x8e" + struct.pack("<Q", 2**40)),
        ("checkpoint_file", _legacy_with_numel(0x7F000000)),
        ("torchscript_pickle", b"\x80\x04\x96" + struct.pack("<Q", 2**40) + b"."),
    ]
    result = subprocess.run(
        [sys.executable, "-c", _BOUNDED_RUN, ",".join(name for name, _ in cases)],
        input="\n".join(data.hex() for _, data in cases),
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PYTHONPATH": f"{ROOT / 'src'}:{ROOT}", "PATH": "/usr/bin:/bin", "OMP_NUM_THREADS": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == [
        "ok",
        "CheckpointError",
        "CheckpointError",
        "CheckpointError",
    ]
