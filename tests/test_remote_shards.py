"""Remote shards through fsspec, against a loopback HTTP server serving real shards: the same samples as the local
folder, retries that resume mid-shard without a duplicate or a gap, the failure policy, missing packages."""

from __future__ import annotations

import itertools
import json
import socket
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from clipforge.cli import main as cli_main
from clipforge.data.raw import DataError, RawSample, UnitError
from clipforge.data.remote import UNREACHABLE_SHARD, RemoteOptions, iter_remote_shard
from clipforge.data.shards import iter_shard
from clipforge.data.sources import open_source
from clipforge.data.stream import SampleDecoder, TrainStream, unit_order
from clipforge.tokenizer import get_tokenizer
from clipforge.train import TrainingError, resolve_train_config, train
from clipforge.transforms import get_transforms
from tests.conftest import locked_import
from tests.datasets import digits_shards

FAST = {"remote_retries": 3, "remote_backoff_s": 0.01}


class ShardServer:
    """Serves the files of ``root`` on 127.0.0.1 (a random port). ``ranges``: honour ``Range: bytes=N-``.
    ``faults[name]``: one fault per GET of that file, used in order: ``("drop", n)`` sends the full length then
    only n bytes and, half a second later, breaks the connection; ``("status", code)`` answers with that error. ``always[name]``: a
    status for every request (HEAD too)."""

    def __init__(self, root: Path, ranges: bool = True) -> None:
        self.root, self.ranges = root, ranges
        self.faults: dict[str, list[tuple[str, int]]] = {}
        self.always: dict[str, int] = {}
        self.gets: Counter[str] = Counter()
        self.range_starts: list[tuple[str, int]] = []
        handler = type("Handler", (_Handler,), {"owner": self})
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class _Handler(BaseHTTPRequestHandler):
    owner: ShardServer

    def log_message(self, *args: object) -> None:  # quiet
        pass

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def do_GET(self) -> None:
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        server = self.owner
        name = self.path.lstrip("/").split("?")[0]
        if name in server.always:
            self.send_error(server.always[name])
            return
        file = server.root / name
        if not file.is_file():
            self.send_error(404)
            return
        data = file.read_bytes()
        fault = None
        if body:
            server.gets[name] += 1
            fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
        if fault and fault[0] == "status":
            self.send_error(fault[1])
            return
        start = 0
        wanted = self.headers.get("Range")
        if wanted and server.ranges:
            start = int(wanted.removeprefix("bytes=").split("-")[0])
            if body:
                server.range_starts.append((name, start))
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        else:
            self.send_response(200)
        if server.ranges:
            self.send_header("Accept-Ranges", "bytes")
        payload = data[start:]
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if not body:
            return
        if fault and fault[0] == "drop":
            self.wfile.write(payload[: fault[1]])
            self.wfile.flush()
            time.sleep(0.5)  # the client reads these bytes before the connection breaks (else it drops them)
            self.connection.shutdown(socket.SHUT_RDWR)
            self.close_connection = True
            return
        self.wfile.write(payload)


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    locked_import("aiohttp")  # fsspec's HTTP filesystem: pinned, so missing it fails here, naming it
    return digits_shards(tmp_path_factory.mktemp("shards"), n=60, per_shard=10)  # 6 shards, a manifest


@pytest.fixture
def server(shards):
    served = ShardServer(shards)
    yield served
    served.close()


@pytest.fixture
def plain_server(shards):
    served = ShardServer(shards, ranges=False)
    yield served
    served.close()


def pattern(server: ShardServer) -> str:
    return f"{server.url}/shard-{{000000..000005}}.tar"


def samples(items) -> list[tuple[str, bytes, tuple[str, ...]]]:
    return [(s.key, s.image, s.captions) for s in items if isinstance(s, RawSample)]


def make_stream(source, **kwargs) -> TrainStream:
    defaults = {"batch_size": 8, "seed": 3, "shuffle_buffer": 16}
    decoder = SampleDecoder(get_transforms("tiny", train=True))
    return TrainStream([source], [1.0], decoder, get_tokenizer("tiny"), **(defaults | kwargs))


def test_a_url_pattern_opens_as_the_local_folder_does(shards, server):
    local, remote = open_source(shards), open_source(pattern(server), **FAST)
    assert remote.num_units() == 6 and remote.labels == local.labels == [p.name for p in local.paths]
    assert remote.num_samples() == local.num_samples() == 60  # counts from the manifest beside the shards
    assert open_source(server.url + "/").paths == remote.paths  # a folder URL reads the manifest's list
    assert open_source(pattern(server), use_manifest=False).num_samples() is None
    for index in range(6):
        assert samples(remote.iter_unit(index)) == samples(local.iter_unit(index))


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stream_over_http_sees_the_local_samples_in_the_same_order(shards, server, workers):
    def batches(source):
        stream = make_stream(source, num_workers=workers)
        return list(itertools.islice(iter(DataLoader(stream, batch_size=None, num_workers=workers)), 10))

    local, remote = batches(open_source(shards)), batches(open_source(pattern(server), **FAST))
    assert [k for b in remote for _, k in b.keys] == [k for b in local for _, k in b.keys]
    assert all(
        torch.equal(a.images, b.images) and torch.equal(a.tokens, b.tokens) for a, b in zip(local, remote)
    )


def _config(data: str, out: Path, name: str, **extra):
    return resolve_train_config(None, {
        "model": "tiny", "data.train": [data], "data.batch_size": 8, "data.num_workers": 0, "steps": 4,
        "data.remote_backoff_s": 0.01, "run.output_dir": str(out), "run.name": name, "run.progress": False,
        "run.report_to": [], "model_overrides": {"vision.layers": 1, "text.layers": 1}, **extra,
    })  # fmt: skip


def test_training_over_http_gives_the_local_weights(shards, server, tmp_path):
    local = train(_config(str(shards), tmp_path, "local"))
    remote = train(_config(pattern(server), tmp_path, "remote"))
    expected, got = load_file(local.model_path), load_file(remote.model_path)
    assert expected.keys() == got.keys() and all(torch.equal(expected[k], got[k]) for k in expected)
    assert remote.skipped == {}


@pytest.mark.parametrize("ranges", [True, False])
@pytest.mark.parametrize("cut", [700, 5000, 9000])
def test_a_connection_dropped_mid_shard_is_resumed_without_duplicate_or_gap(shards, tmp_path, ranges, cut):
    served = ShardServer(shards, ranges=ranges)
    try:
        served.faults["shard-000002.tar"] = [("drop", cut)]
        url = f"{served.url}/shard-000002.tar"
        got = list(iter_remote_shard(url, label="shard-000002.tar", options=RemoteOptions(3, 0.01)))
    finally:
        served.close()
    assert samples(got) == samples(iter_shard(shards / "shard-000002.tar")) and len(samples(got)) == 10
    assert not [item for item in got if isinstance(item, UnitError)]
    assert served.gets["shard-000002.tar"] == 2  # the dropped read, then one retry
    assert served.range_starts == (
        [("shard-000002.tar", cut)] if ranges else []
    )  # resumed at the byte reached


def test_retries_back_off_exponentially_and_start_again_after_progress(shards, server, monkeypatch):
    waits: list[float] = []
    monkeypatch.setattr("clipforge.data.remote._wait", waits.append)
    faults = [("status", 503), ("status", 502), ("status", 500), ("drop", 3000), ("status", 503)]
    server.faults["shard-000001.tar"] = faults
    got = list(iter_remote_shard(f"{server.url}/shard-000001.tar", label="s", options=RemoteOptions(3, 0.5)))
    assert samples(got) == samples(iter_shard(server.root / "shard-000001.tar", label="s"))
    assert waits == [0.5, 1.0, 2.0, 0.5, 1.0]  # 3 failures at byte 0; bytes arrive; then two more
    server.faults["shard-000001.tar"] = [("status", 503)] * 4
    got = list(iter_remote_shard(f"{server.url}/shard-000001.tar", label="s", options=RemoteOptions(3, 0.5)))
    assert [i.reason for i in got] == [UNREACHABLE_SHARD] and "after 4 attempt(s) (HTTP 503" in got[0].message


def test_a_shard_that_always_fails_is_skipped_and_counted(shards, server, tmp_path):
    """7 steps of 8 without a shuffle buffer read the 50 samples of the first pass (5 shards work) and 6 of the
    second, whose first shard is not the broken one: the broken shard is met exactly once."""
    broken = int(unit_order(6, 0, 0, 1)[-1])
    server.always[f"shard-{broken:06d}.tar"] = 503
    extra = {"data.remote_retries": 2, "data.shuffle_buffer": 0, "steps": 7}
    summary = train(_config(pattern(server), tmp_path, "skip", **extra))
    assert summary.skipped == {UNREACHABLE_SHARD: 1}
    written = json.loads((Path(summary.run_dir) / "summary.json").read_text())
    assert written["skipped"] == {UNREACHABLE_SHARD: 1}
    error = [i for i in open_source(pattern(server), **FAST).iter_unit(broken) if isinstance(i, UnitError)]
    assert len(error) == 1 and error[0].reason == UNREACHABLE_SHARD
    assert "after 4 attempt(s) (HTTP 503" in error[0].message and "data.remote_retries" in error[0].message


@pytest.mark.parametrize("status", [503, 404])
def test_shard_failure_fail_stops_the_run_naming_the_url_and_status(shards, server, tmp_path, capsys, status):
    broken = "shard-000003.tar"
    server.always[broken] = status
    with pytest.raises(TrainingError, match=rf"{server.url}/{broken}: shard unreachable .*HTTP {status}"):
        train(_config(pattern(server), tmp_path, "fail", **{"data.shard_failure": "fail"}))
    args = ["train", "--data", pattern(server), "--set", "data.shard_failure=fail", "--set", "steps=4",
            "--set", "data.num_workers=0", "--set", "data.batch_size=8", "--set", "data.remote_backoff_s=0.01",
            "--set", f"run.output_dir={tmp_path}", "--set", "run.name=cli", "--set", "run.progress=false",
            "--set", "run.report_to=[]", "--set", "model_overrides={vision.layers: 1, text.layers: 1}"]  # fmt: skip
    assert cli_main(args) == 1
    err = capsys.readouterr().err
    assert f"{broken}: shard unreachable" in err and f"HTTP {status}" in err
    assert "data.shard_failure=skip" in err  # the fix


def test_a_404_is_not_retried_and_is_skipped_by_default(shards, server):
    server.always["shard-000004.tar"] = 404
    items = list(
        iter_remote_shard(f"{server.url}/shard-000004.tar", label="x", options=RemoteOptions(5, 0.01))
    )
    assert len(items) == 1 and items[0].reason == UNREACHABLE_SHARD
    assert "after 1 attempt(s) (HTTP 404" in items[0].message and "brace pattern's range" in items[0].message


def test_a_missing_filesystem_package_names_the_pip_install():
    with pytest.raises(
        DataError, match=r"s3://bucket/data/shard-000000\.tar: .*needs the s3fs package.*pip install s3fs"
    ):
        open_source("s3://bucket/data/shard-{000000..000003}.tar")
    with pytest.raises(DataError, match=r"gcsfs package.*pip install gcsfs"):
        open_source("gs://bucket/shard-000000.tar")


def test_bad_remote_specs_are_clear_errors(server):
    with pytest.raises(DataError, match="globs are not read for URLs.*brace pattern"):
        open_source(f"{server.url}/*.tar")
    with pytest.raises(DataError, match="no manifest.json at .*/nothing/manifest.json.*brace pattern"):
        open_source(f"{server.url}/nothing/")
    with pytest.raises(DataError, match="remote_retries: must be a whole number"):
        open_source(pattern(server), remote_retries=-1)
