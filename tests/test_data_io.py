"""The raw data layer: tar shards (reading, damage, writing), tables, image folders, open_source, write_shards."""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import pickle
import tarfile
import warnings
from pathlib import Path

import pytest
from PIL import Image

from clipforge.data.folders import ImageFolderSource
from clipforge.data.raw import DataError, DataNotFoundError, RawSample, UnitError
from clipforge.data.shards import Manifest, ShardWriter, iter_shard, split_member_name
from clipforge.data.sources import ConcatSource, ShardSource, Source, expand_braces, open_source, write_shards
from clipforge.data.tables import TableSource


def _jpeg(width: int = 16, height: int = 12, color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), color).save(out, format="JPEG")
    return out.getvalue()


def _png_rgba(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGBA", (width, height), (0, 128, 255, 100)).save(out, format="PNG")
    return out.getvalue()


def _tar(path: Path, members: list[tuple[str, bytes]], fmt: int = tarfile.PAX_FORMAT) -> Path:
    """A tar written by Python's tarfile (not by clipforge), so the reader is tested on foreign shards."""
    with tarfile.open(path, "w", format=fmt) as archive:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def _samples(items: list[RawSample | UnitError]) -> list[RawSample]:
    return [s for s in items if isinstance(s, RawSample)]


def _errors(items: list[RawSample | UnitError]) -> list[UnitError]:
    return [e for e in items if isinstance(e, UnitError)]


# ----------------------------------------------------------------------------------------------------------------
# ShardWriter -> iter_shard


def test_writer_round_trip(tmp_path: Path) -> None:
    written = [
        ("000000", _jpeg(), "jpg", ["a red square"], {}),
        ("000001", _png_rgba(8, 8), "png", ["first", "second", "first"], {"label": 3, "tags": ["x", "y"]}),
        ("000002", b"", "jpg", ["zero-size image"], {"cls": b"7", "de.txt": "ein Quadrat"}),
        ("000003", _jpeg(), "jpeg", [], {"note": "no caption at all"}),
        ("sub/dir/" + "k" * 120, _jpeg(), "webp", ["long key, café ☕"], {}),
        ("000005", _jpeg(), "jpg", ["   "], {"caption": "a json field that is not a caption"}),
    ]
    with ShardWriter(tmp_path / "out", max_samples=4) as writer:
        for key, image, ext, captions, extra in written:
            writer.write(key, image, ext, captions, extra)
    read = [s for shard in sorted((tmp_path / "out").glob("*.tar")) for s in iter_shard(shard)]
    assert len(read) == len(written) and all(isinstance(s, RawSample) for s in read)
    for sample, (key, image, ext, captions, extra) in zip(read, written):
        assert sample.key.split("/", 1)[1] == key
        assert sample.image == image
        assert sample.captions == tuple(captions)
        assert dict(sample.extra) == extra
        assert sample.image_name.endswith(f"{key}.{ext}")
        assert sample.error == (None if captions else "missing_caption")
    assert read[0].key == "shard-000000.tar/000000" and read[4].key.startswith("shard-000001.tar/sub/dir/")
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as archive:  # a standard tar to other tools
        assert archive.getnames()[:2] == ["000000.jpg", "000000.txt"]


def test_writer_bounds_manifest_and_atomicity(tmp_path: Path) -> None:
    sizes = [3000, 9000, 500, 500, 700, 20_000, 1200, 300, 300, 300, 300, 4000]
    out = tmp_path / "out"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        writer = ShardWriter(out, prefix="part", max_bytes=12_000, max_samples=4)
        for index, size in enumerate(sizes):
            writer.write(f"{index:04d}", bytes([index]) * size, "jpg", f"caption {index}")
        writer.record_dropped("image_corrupt", 2)
        manifest = writer.close()
    assert len([w for w in caught if "larger than max_bytes" in str(w.message)]) == 1  # the 20 kB sample
    files = sorted(out.iterdir())
    assert [f.name for f in files] == ["manifest.json"] + [
        s.name for s in manifest.shards
    ]  # no temp files left
    keys_in_order = []
    for info in manifest.shards:
        path = out / info.name
        data = path.read_bytes()
        assert info.num_bytes == len(data)
        assert info.sha256 == hashlib.sha256(data).hexdigest()
        samples = _samples(list(iter_shard(path)))
        assert len(samples) == info.num_samples <= 4
        assert info.num_bytes <= 12_000 or info.num_samples == 1  # only a lone oversized sample may exceed it
        keys_in_order += [s.key.split("/")[1] for s in samples]
    assert keys_in_order == [f"{i:04d}" for i in range(len(sizes))]  # order kept, nothing straddles shards
    assert manifest.oversized_samples == 1
    on_disk = Manifest.load(out / "manifest.json")
    assert on_disk == manifest and on_disk.num_samples == len(sizes)
    assert on_disk.dropped == {"image_corrupt": 2} and on_disk.args["max_bytes"] == 12_000
    # each sample is a 512-byte header + data padded to 512 + a 1024-byte caption member; 1024 bytes end a tar:
    # 4608 | 10752 | 3 x 2048 (+ 22016 would not fit) | 22016 alone | 3072 + 3 x 2048 (max_samples) | 2048 + 5120
    assert [s.num_samples for s in manifest.shards] == [1, 1, 3, 1, 4, 2]


def test_writer_is_deterministic_refuses_existing_output_and_aborts_cleanly(tmp_path: Path) -> None:
    def write(out: Path) -> Manifest:
        with ShardWriter(out, max_samples=2) as writer:
            for index in range(5):
                writer.write(f"{index:03d}", _jpeg(color=(index, 0, 0)), "jpg", f"c{index}", {"i": index})
        return writer.manifest

    first, second = write(tmp_path / "a"), write(tmp_path / "b")
    assert [s.sha256 for s in first.shards] == [s.sha256 for s in second.shards]
    with pytest.raises(DataError, match="overwrite=True"):
        ShardWriter(tmp_path / "a")
    ShardWriter(tmp_path / "a", overwrite=True).close()
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["manifest.json"]

    with pytest.raises(RuntimeError, match="boom"), ShardWriter(tmp_path / "c", max_samples=2) as writer:
        for index in range(3):
            writer.write(f"{index:03d}", _jpeg(), "jpg", "x")
        raise RuntimeError("boom")
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == ["shard-000000.tar"]  # no manifest, no temp

    writer = ShardWriter(tmp_path / "d")
    with pytest.raises(ValueError, match="invalid sample key"):
        writer.write("a.b", b"x", "jpg", "c")
    with pytest.raises(ValueError, match="image extension"):
        writer.write("a", b"x", "svg", "c")
    with pytest.raises(ValueError, match="not a valid suffix"):
        writer.write("a", b"x", "jpg", "c", {"txt": b"raw"})
    writer.write("a", b"x", "jpg", "c")
    with pytest.raises(ValueError, match="duplicate key"):
        writer.write("a", b"x", "jpg", "c")
    writer.abort()


# ----------------------------------------------------------------------------------------------------------------
# iter_shard on foreign and broken tars


def test_iter_shard_sample_semantics(tmp_path: Path) -> None:
    image = _jpeg()
    shard = _tar(
        tmp_path / "s.tar",
        [
            ("000000.jpg", b""),  # zero-size image: passed on, the decoder counts it
            ("000000.txt", b"empty image"),
            ("000001.jpg", image),  # no caption
            ("000002.txt", b"no image"),
            ("000003.jpg", image),
            ("000003.txt", b"\xff\xfe bad utf-8"),
            ("000004.png", image),
            ("000004.json", json.dumps({"caption": "from json", "url": "http://x", "width": 16}).encode()),
            ("000005.jpg", image),
            ("000005.txt", "\ufeffsame caption".encode()),
            ("000005.json", json.dumps({"caption": "same caption", "status": "success"}).encode()),
            ("000006.jpg", image),
            ("000006.txt", b"primary"),
            ("000006.json", json.dumps({"captions": ["primary", "alt 1", "alt 2"], "text": "kept"}).encode()),
            ("000006.cls", b"12"),
            ("000006.de.txt", "primär".encode()),
            ("000006.png", b"second image"),
            ("000007.jpg", image),
            ("000007.json", b"{not json"),
            ("000007.txt", b"caption"),
            ("000008.jpg", image),
            ("000008.JPG", image),  # same suffix after lower-casing: duplicate
            ("000008.txt", b"dup"),
            ("000009.jpg", image),
            ("000010.jpg", image),
            ("000009.txt", b"late caption"),  # key 000009 again after another key: not contiguous
            ("000010.txt", b"ten"),
            ("nested/dir/000011.webp", image),
            ("nested/dir/000011.txt", b""),
        ],
    )
    samples = list(iter_shard(shard))
    assert all(isinstance(s, RawSample) for s in samples)
    by_key = {s.key: s for s in samples}
    assert list(by_key) == [
        *(f"s.tar/{i:06d}" for i in range(11)),
        "s.tar/000009#2",
        "s.tar/000010#2",
        "s.tar/nested/dir/000011",
    ]
    assert len(by_key) == len(samples)  # keys unique within the source

    def get(i: int | str) -> RawSample:
        return by_key[f"s.tar/{i:06d}" if isinstance(i, int) else f"s.tar/{i}"]

    assert get(0).image == b"" and get(0).error is None
    assert get(1).error == "missing_caption" and get(1).image == image and get(1).captions == ()
    assert get(2).error == "missing_image" and get(2).image is None and get(2).captions == ("no image",)
    assert get(3).error == "bad_caption_encoding" and get(3).extra["txt"] == b"\xff\xfe bad utf-8"
    assert get(4).captions == ("from json",) and dict(get(4).extra) == {"url": "http://x", "width": 16}
    assert get(5).captions == ("same caption",) and dict(get(5).extra) == {"status": "success"}
    six = get(6)
    assert six.captions == ("primary", "alt 1", "alt 2") and six.image == image
    assert dict(six.extra) == {"text": "kept", "cls": b"12", "de.txt": "primär", "png": b"second image"}
    assert get(7).captions == ("caption",) and get(7).extra["json"] == b"{not json" and get(7).error is None
    assert get(8).error == "duplicate_member"
    assert get(9).error == "missing_caption" and get("000009#2").error == "non_contiguous_sample"
    assert get(10).error == "missing_caption" and get("000010#2").captions == ("ten",)
    assert get("nested/dir/000011").captions == ("",) and get("nested/dir/000011").error is None
    assert split_member_name("a/b.c/000012.de.txt") == ("a/b.c/000012", "de.txt")


@pytest.mark.parametrize("fmt", [tarfile.USTAR_FORMAT, tarfile.GNU_FORMAT, tarfile.PAX_FORMAT])
def test_iter_shard_long_names_in_every_tar_format(tmp_path: Path, fmt: int) -> None:
    key = "d" * 60 + "/" + "e" * 90  # over 100 characters: ustar prefix, GNU ././@LongLink, or a pax header
    shard = _tar(tmp_path / "long.tar", [(f"{key}.jpg", b"img"), (f"{key}.txt", b"cap")], fmt)
    (sample,) = iter_shard(shard)
    assert sample.key == f"long.tar/{key}" and sample.image == b"img" and sample.captions == ("cap",)


def test_iter_shard_reads_gzip_and_directory_members(tmp_path: Path) -> None:
    plain = tmp_path / "plain.tar"
    with tarfile.open(plain, "w") as archive:
        info = tarfile.TarInfo("dir")
        info.type = tarfile.DIRTYPE
        archive.addfile(info)
        for name, data in [("dir/a.jpg", b"1"), ("dir/a.txt", b"x")]:
            member = tarfile.TarInfo(name)
            member.size = len(data)
            archive.addfile(member, io.BytesIO(data))
    zipped = tmp_path / "zipped.tar.gz"
    zipped.write_bytes(gzip.compress(plain.read_bytes()))
    for path in (plain, zipped):
        (sample,) = iter_shard(path)
        assert sample.key.endswith("/dir/a") and sample.captions == ("x",)
    cut = tmp_path / "cut.tar.gz"
    cut.write_bytes(zipped.read_bytes()[:-30])
    items = list(iter_shard(cut))
    assert len(items) == 1 and isinstance(items[0], UnitError) and items[0].reason == "truncated_shard"


def _written_shard(tmp_path: Path, n: int = 5) -> tuple[Path, list[RawSample], list[int], int]:
    """A clipforge shard of n samples (2-3 members each), the samples, the offset of each sample's first header,
    and the offset of the end-of-archive blocks."""
    with ShardWriter(tmp_path / "w") as writer:
        for index in range(n):
            extra = {"i": index} if index % 2 else {}
            writer.write(f"{index:03d}", _jpeg(8 + 40 * index, 8), "jpg", f"cap {index}", extra)
    path = tmp_path / "w" / "shard-000000.tar"
    with tarfile.open(path) as archive:
        members = archive.getmembers()
        starts = [next(m.offset for m in members if m.name.startswith(f"{i:03d}.")) for i in range(n)]
        end = archive.offset  # where the end-of-archive blocks begin
    return path, _samples(list(iter_shard(path))), starts, end


def test_truncated_shard_yields_complete_samples_then_one_unit_error(tmp_path: Path) -> None:
    path, full, starts, end = _written_shard(tmp_path)
    data = path.read_bytes()
    cuts = sorted(set(range(0, len(data), 200)) | {s + d for s in starts for d in (1, 511, 512, 513)} | {end})
    for cut in cuts:
        if cut >= len(data):
            continue
        broken = tmp_path / "broken.tar"
        broken.write_bytes(data[:cut])
        items = list(iter_shard(broken, label=path.name))
        errors = _errors(items)
        if cut >= end + 512:  # the first end-of-archive block is there: a complete archive
            assert items == full and not errors, cut
            continue
        assert len(errors) == 1 and items[-1] is errors[0], cut
        # sample i is complete once the next sample's first header (or the end-of-archive block) was read
        expected = sum(
            1 for i in range(len(full)) if cut >= (starts[i + 1] if i + 1 < len(full) else end) + 512
        )
        assert _samples(items) == full[:expected], cut
        assert errors[0].samples_read == expected, cut
        assert errors[0].reason == ("unreadable_shard" if cut < 512 else "truncated_shard"), cut
        assert str(broken) in errors[0].message and "re-" in errors[0].message
    assert _errors(list(iter_shard(path))) == []


def test_corrupt_header_and_non_tar_files(tmp_path: Path) -> None:
    path, full, starts, _ = _written_shard(tmp_path)
    data = bytearray(path.read_bytes())
    data[starts[3] + 10] ^= 0xFF  # a byte of sample 3's first header: its checksum no longer matches
    corrupt = tmp_path / "corrupt.tar"
    corrupt.write_bytes(bytes(data))
    items = list(iter_shard(corrupt, label=path.name))
    assert _samples(items) == full[:2]  # sample 2 may have had more members after it: not complete
    (error,) = _errors(items)
    assert error.reason == "truncated_shard" and error.samples_read == 2 and "checksum" in error.message

    html = tmp_path / "page.tar"
    html.write_bytes(b"<html><body>404 Not Found</body></html>\n" * 40)
    empty = tmp_path / "empty.tar"
    empty.write_bytes(b"")
    for bad in (html, empty, tmp_path):
        (error,) = list(iter_shard(bad))
        assert isinstance(error, UnitError) and error.reason == "unreadable_shard" and error.samples_read == 0
    (error,) = list(iter_shard(tmp_path / "nope.tar"))
    assert isinstance(error, UnitError) and error.reason == "missing_shard" and "nope.tar" in error.message


# ----------------------------------------------------------------------------------------------------------------
# Tables and folders


def _images(folder: Path, names: list[str]) -> None:
    for name in names:
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_bytes(_jpeg())


def test_csv_detection_quoting_paths_and_row_errors(tmp_path: Path) -> None:
    _images(tmp_path / "data" / "img", ["a.jpg", "b.jpg"])
    (tmp_path / "data" / "img" / "folder.jpg").mkdir()
    abs_image = tmp_path / "abs.jpg"
    abs_image.write_bytes(_jpeg())
    table = tmp_path / "data" / "train.csv"
    table.write_text(
        "\ufeffFilePath,Title,label\n"
        'img/a.jpg,"a dog, running ""fast""\non two lines",1\n'
        "\n"
        f"{abs_image},plain,2\n"
        "img/missing.jpg,gone,3\n"
        ",no path,4\n"
        "img/b.jpg,,5\n"
        "img/folder.jpg,a directory,6\n",
        encoding="utf-8",
    )
    source = TableSource(table)
    assert (source.image_column, source.caption_column) == ("FilePath", "Title")
    assert source.unit_kind == "row" and source.num_units() == source.num_samples() == 6
    rows = [next(iter(source.iter_unit(i))) for i in range(6)]
    assert [r.key for r in rows] == [
        "train.csv:2",
        "train.csv:5",
        "train.csv:6",
        "train.csv:7",
        "train.csv:8",
        "train.csv:9",
    ]
    assert rows[0].captions == ('a dog, running "fast"\non two lines',) and rows[0].image == _jpeg()
    assert dict(rows[0].extra) == {"label": "1"} and rows[0].image_name == str(tmp_path / "data/img/a.jpg")
    assert rows[1].image == _jpeg() and rows[1].error is None  # absolute path kept
    assert rows[2].error == "missing_image" and rows[2].image is None
    assert rows[3].error == "missing_image" and rows[3].captions == ("no path",)
    assert rows[4].captions == ("",) and rows[4].error is None  # empty caption: the consumer counts it
    assert rows[5].error == "unreadable_image_file"
    # a source survives pickling (DataLoader workers) after it has opened its file
    assert pickle.loads(pickle.dumps(source)).row(0) == rows[0]
    rooted = TableSource(table, root=tmp_path / "elsewhere")
    assert rooted.row(0).error == "missing_image" and rooted.row(1).error is None


def test_tsv_jsonl_options_and_clear_errors(tmp_path: Path) -> None:
    _images(tmp_path, ["x.jpg", "y.jpg"])
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("x.jpg\tone | two |\ny.jpg\tthree\n", encoding="utf-8")
    source = TableSource(tsv, columns=["image", "caption"], caption_separator="|")
    assert [source.row(i).captions for i in range(2)] == [("one ", " two "), ("three",)]

    jsonl = tmp_path / "pairs.jsonl"
    jsonl.write_text(
        json.dumps({"file": "x.jpg", "captions": ["c1", "c2"], "split": "train"})
        + "\n\n"
        + json.dumps({"file": "y.jpg", "captions": None})
        + "\n"
        + json.dumps({"file": "y.jpg"})
        + "\n",
        encoding="utf-8",
    )
    rows = [r for i in range(TableSource(jsonl).num_units()) for r in TableSource(jsonl).iter_unit(i)]
    assert rows[0].captions == ("c1", "c2") and dict(rows[0].extra) == {"split": "train"}
    assert [r.key for r in rows] == ["pairs.jsonl:1", "pairs.jsonl:3", "pairs.jsonl:4"]
    assert rows[1].error == rows[2].error == "missing_caption"

    no_caption = tmp_path / "bad.csv"
    no_caption.write_text("path,alt_text\nx.jpg,hi\n", encoding="utf-8")
    with pytest.raises(DataError) as info:
        TableSource(no_caption)
    message = str(info.value)
    assert str(no_caption) in message and "'path', 'alt_text'" in message and "caption_column=" in message
    assert TableSource(no_caption, caption_column="alt_text").row(0).captions == ("hi",)
    with pytest.raises(DataError, match="image_column='pic' is not a column"):
        TableSource(no_caption, image_column="pic", caption_column="alt_text")

    urls = tmp_path / "urls.csv"
    urls.write_text("url,caption\nhttp://example.com/a.jpg,hi\n", encoding="utf-8")
    with pytest.raises(DataError, match="download them first"):
        TableSource(urls)
    with pytest.raises(DataError, match="holds URLs"):
        TableSource(urls, image_column="url")

    broken = tmp_path / "broken.csv"
    broken.write_bytes(b"image,caption\nx.jpg,ok\ny.jpg,caf\xe9\nx.jpg,too,many\ny.jpg,fine\n")
    with pytest.raises(DataError, match=r"broken.csv:3: not valid utf-8.*on_bad_row='report'"):
        TableSource(broken)
    with pytest.raises(DataError, match=r"broken.csv:4: the row has 3 fields but the header has 2"):
        TableSource(broken, encoding="latin-1")
    reported = TableSource(broken, on_bad_row="report")
    assert [reported.row(i).error for i in range(4)] == [None, "malformed_row", "malformed_row", None]
    assert "line 3" in reported.notes[0] and "line 4" in reported.notes[0]
    assert TableSource(broken, encoding="latin-1", on_bad_row="report").row(1).captions == ("café",)


def test_image_folder_with_sidecar_captions(tmp_path: Path) -> None:
    root = tmp_path / "stamps"
    _images(root, ["b.jpg", "a.png", "sub/c.JPG", ".hidden.jpg", "d.jpeg"])
    (root / "a.txt").write_text("an apple", encoding="utf-8")
    (root / "b.txt").write_bytes(b"\xff bad")
    (root / "sub" / "c.txt").write_text("line one\nline two\n", encoding="utf-8")
    (root / "orphan.txt").write_text("no image", encoding="utf-8")
    (root / "notes.svg").write_text("<svg/>", encoding="utf-8")
    source = ImageFolderSource(root, caption_separator="\n")
    rows = [s for i in range(source.num_units()) for s in source.iter_unit(i)]
    assert [r.key for r in rows] == [
        "stamps/a.png",
        "stamps/b.jpg",
        "stamps/d.jpeg",
        "stamps/orphan.txt",
        "stamps/sub/c.JPG",
    ]
    assert rows[0].captions == ("an apple",) and rows[0].error is None and rows[0].image == _jpeg()
    assert rows[1].error == "bad_caption_encoding"
    assert rows[2].error == "missing_caption" and rows[2].image is not None
    assert rows[3].error == "missing_image" and rows[3].captions == ("no image",)
    assert rows[4].captions == ("line one", "line two")
    assert any(".svg: 1" in n and "hidden: 1" in n for n in source.notes)


# ----------------------------------------------------------------------------------------------------------------
# open_source


def test_open_source_patterns_lists_and_manifests(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    with ShardWriter(shards, max_samples=2) as writer:
        for index in range(7):  # 4 shards: 2 + 2 + 2 + 1
            writer.write(f"{index:03d}", _jpeg(), "jpg", f"c{index}")
    assert expand_braces("s-{000..002}.tar") == ["s-000.tar", "s-001.tar", "s-002.tar"]
    assert expand_braces("{a,b}/{8..10}") == ["a/8", "a/9", "a/10", "b/8", "b/9", "b/10"]

    directory = open_source(shards)
    assert isinstance(directory, ShardSource) and isinstance(directory, Source)
    assert directory.unit_kind == "shard" and directory.num_units() == 4 and directory.num_samples() == 7
    assert [s.captions[0] for i in range(4) for s in directory.iter_unit(i)] == [f"c{i}" for i in range(7)]

    braced = open_source(f"{shards}/shard-{{000000..000002}}.tar")
    assert braced.num_units() == 3 and braced.num_samples() is None  # no manifest read for a pattern
    globbed = open_source(f"{shards}/*.tar")
    assert globbed.num_units() == 4
    joined = open_source(f"{shards}/shard-000003.tar :: {shards}/shard-{{000000..000001}}.tar")
    assert [s.key for s in joined.iter_unit(0)] == ["shard-000003.tar/006"]

    with pytest.raises(DataError, match=r"names 6 shards but only 4 exist.*allow_missing=True"):
        open_source(f"{shards}/shard-{{000000..000005}}.tar")
    lenient = open_source(f"{shards}/shard-{{000000..000005}}.tar", allow_missing=True)
    (missing,) = lenient.iter_unit(5)
    assert isinstance(missing, UnitError) and missing.reason == "missing_shard"

    for spec in (tmp_path / "nothing.tar", f"{tmp_path}/*.tar", f"{tmp_path}/x-{{0..3}}.tar"):
        with pytest.raises(DataNotFoundError) as info:
            open_source(spec)
        assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)
        assert str(spec) in str(info.value)

    (shards / "extra.tar").write_bytes((shards / "shard-000000.tar").read_bytes())
    with pytest.raises(DataError, match="use_manifest=False"):
        open_source(shards)
    assert open_source(shards, use_manifest=False).num_units() == 5
    (shards / "extra.tar").unlink()
    (shards / "shard-000001.tar").unlink()
    with pytest.raises(DataError, match="1 of its 4 shards are missing"):
        open_source(shards)

    with pytest.raises(TypeError, match="unknown options"):
        open_source(shards, image_colum="x")
    with pytest.raises(DataError, match=r"\['image_column'\] do not apply"):
        open_source(shards, image_column="x", allow_missing=True)


def test_open_source_tables_folders_and_joins(tmp_path: Path) -> None:
    _images(tmp_path / "folder", ["a.jpg"])
    (tmp_path / "folder" / "a.txt").write_text("folder caption", encoding="utf-8")
    _images(tmp_path, ["x.jpg"])
    (tmp_path / "one.csv").write_text("image,caption\nx.jpg,from csv\n", encoding="utf-8")
    (tmp_path / "two.jsonl").write_text('{"image": "x.jpg", "caption": "from jsonl"}\n', encoding="utf-8")
    assert isinstance(open_source(tmp_path / "folder"), ImageFolderSource)
    table = open_source(str(tmp_path / "one.csv"), caption_column="caption")
    assert isinstance(table, TableSource) and table.num_samples() == 1
    joined = open_source(f"{tmp_path}/one.csv::{tmp_path}/two.jsonl::{tmp_path}/folder")
    assert isinstance(joined, ConcatSource) and joined.unit_kind == "row" and joined.num_samples() == 3
    captions = [s.captions[0] for i in range(joined.num_units()) for s in joined.iter_unit(i)]
    assert captions == ["from csv", "from jsonl", "folder caption"]
    (tmp_path / "copy").mkdir()
    (tmp_path / "copy" / "one.csv").write_text("image,caption\n../x.jpg,again\n", encoding="utf-8")
    twice = open_source(f"{tmp_path}/one.csv::{tmp_path}/copy/one.csv")
    keys = [s.key for i in range(2) for s in twice.iter_unit(i)]
    assert len(set(keys)) == 2 and keys[0].endswith("one.csv:2") and keys[1].endswith("copy/one.csv:2")
    with ShardWriter(tmp_path / "shards") as writer:
        writer.write("000", _jpeg(), "jpg", "c")
    with pytest.raises(DataError, match="cannot join shard and table"):
        open_source(f"{tmp_path}/one.csv::{tmp_path}/shards")
    (tmp_path / "data.parquet").write_bytes(b"PAR1")
    with pytest.raises(DataError, match="convert it to CSV or JSONL"):
        open_source(tmp_path / "data.parquet")


# ----------------------------------------------------------------------------------------------------------------
# write_shards


def test_write_shards_skips_counts_and_resizes(tmp_path: Path) -> None:
    images = tmp_path / "images"
    images.mkdir()
    (images / "big.jpg").write_bytes(_jpeg(300, 200))
    (images / "tall.jpg").write_bytes(_jpeg(100, 400))
    (images / "small.jpg").write_bytes(_jpeg(40, 30))
    (images / "alpha.png").write_bytes(_png_rgba(200, 120))
    (images / "text.jpg").write_bytes(b"<html>not an image</html>")
    (images / "cut.jpg").write_bytes(_jpeg(300, 200)[:400])
    (images / "empty.jpg").write_bytes(b"")
    (images / "fine.jpg").write_bytes(_jpeg(64, 64))
    rows = [
        ("big.jpg", "wide"),
        ("tall.jpg", "tall"),
        ("small.jpg", "small"),
        ("alpha.png", "transparent"),
        ("text.jpg", "html"),
        ("cut.jpg", "truncated"),
        ("empty.jpg", "zero bytes"),
        ("fine.jpg", "   "),
        ("missing.jpg", "gone"),
        ("fine.jpg", "exactly the limit"),
    ]
    table = tmp_path / "pairs.csv"
    table.write_text(
        "image,caption,label\n" + "".join(f"images/{p},{c},{i}\n" for i, (p, c) in enumerate(rows))
    )
    source = open_source(table)
    manifest = write_shards(source, tmp_path / "out", max_samples=2, resize=64, progress=False)
    assert manifest.dropped == {
        "image_not_image": 1,
        "image_corrupt": 1,
        "image_empty": 1,
        "empty_caption": 1,
        "missing_image": 1,
    }
    assert manifest.num_samples == 5 and [s.num_samples for s in manifest.shards] == [2, 2, 1]
    on_disk = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert on_disk["dropped"] == manifest.dropped and on_disk["args"]["resize"] == 64

    out = open_source(tmp_path / "out")
    written = [s for i in range(out.num_units()) for s in out.iter_unit(i)]
    assert [s.captions for s in written] == [
        ("wide",),
        ("tall",),
        ("small",),
        ("transparent",),
        ("exactly the limit",),
    ]
    assert [s.extra["source_key"] for s in written] == [f"pairs.csv:{n}" for n in (2, 3, 4, 5, 11)]
    assert written[0].extra["label"] == "0"
    sizes = [Image.open(io.BytesIO(s.image)).size for s in written]
    assert sizes == [(96, 64), (64, 256), (40, 30), (107, 64), (64, 64)]
    assert written[2].image == _jpeg(40, 30) and written[4].image == _jpeg(64, 64)  # small enough: bytes kept
    with Image.open(io.BytesIO(written[3].image)) as alpha:
        assert alpha.format == "PNG" and alpha.mode == "RGBA" and written[3].image_name.endswith(".png")
    assert written[0].image_name.endswith(".jpg")

    parallel = write_shards(
        source, tmp_path / "out2", max_samples=2, resize=64, num_workers=2, progress=False
    )
    assert [s.sha256 for s in parallel.shards] == [s.sha256 for s in manifest.shards]


def test_write_shards_counts_broken_source_shards(tmp_path: Path) -> None:
    path, full, starts, _ = _written_shard(tmp_path)
    broken = tmp_path / "in" / "broken.tar"
    broken.parent.mkdir()
    broken.write_bytes(path.read_bytes()[: starts[2] + 600])
    manifest = write_shards(open_source(broken), tmp_path / "out", progress=False)
    written = list(iter_shard(tmp_path / "out" / "shard-000000.tar"))
    assert [s.captions for s in written] == [s.captions for s in full[:2]]
    assert manifest.num_samples == 2 and manifest.dropped == {"truncated_shard": 1}
    assert manifest.unit_errors[0]["samples_read"] == 2 and "broken.tar" in manifest.unit_errors[0]["message"]


def test_cli_data_shards_prints_exact_counts(tmp_path: Path, capsys) -> None:
    from clipforge.cli import main
    from tests.datasets import digits_table

    table = digits_table(tmp_path / "digits", n=20)
    (tmp_path / "digits" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nnot really")
    (tmp_path / "digits" / "empty.png").write_bytes(b"")
    with table.open("a") as f:
        f.write("broken.png,a broken file\nempty.png,an empty file\ndigit_00000.png,\nmissing.png,gone\n")
    out = tmp_path / "shards"
    assert main(["data", "shards", str(table), str(out), "--max-samples", "8", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 20 samples in 3 shards" in printed
    assert "dropped 4 inputs" in printed
    for reason in ("image_corrupt", "image_empty", "empty_caption", "missing_image"):
        assert f"  {reason} " in printed, (reason, printed)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["dropped"] == {
        "empty_caption": 1,
        "image_corrupt": 1,
        "image_empty": 1,
        "missing_image": 1,
    }
    # a second run refuses to overwrite: a clear error and exit status 2, not a traceback
    assert main(["data", "shards", str(table), str(out), "--quiet"]) == 2
    assert "overwrite" in capsys.readouterr().err


def test_class_folders_are_a_data_source_and_rows_have_one_meaning(tmp_path: Path) -> None:
    from clipforge.data.folders import ClassFolderSource
    from clipforge.data.tables import interpret_row

    _images(tmp_path / "tree", ["dog/b.jpg", "dog/sub/a.jpg", "cat/c.jpg", "cat/.hidden.jpg", "loose.jpg"])
    (tmp_path / "tree" / "cat" / "notes.txt").write_text("not an image", encoding="utf-8")
    (tmp_path / "tree" / "empty").mkdir()
    source = ClassFolderSource(tmp_path / "tree")
    assert source.classnames == ["cat", "dog", "empty"] and source.num_units() == 3
    rows = [s for i in range(source.num_units()) for s in source.iter_unit(i)]
    assert [(r.key, dict(r.extra)) for r in rows] == [
        ("cat/c.jpg", {"label": 0, "class": "cat"}),
        ("dog/b.jpg", {"label": 1, "class": "dog"}),
        ("dog/sub/a.jpg", {"label": 1, "class": "dog"}),
    ]
    assert rows[0].image == _jpeg() and rows[0].captions == () and rows[0].error is None
    assert [n.split(": ", 1)[1] for n in source.notes] == [
        "1 images outside the class folders were not read",
        "files that are not images were not read: .txt 1",
        "1 class folders hold no images: empty",
    ]
    # The one row rule: caption columns in turn, the training split rule, other columns kept as fields.
    row = interpret_row(
        "t.csv:2", 2, {"image": " a.jpg ", "title": "x|y|", "alt": "z", "label": "3"},
        image_column="image", caption_columns=["title", "alt"], caption_separator="|", root=tmp_path,
    )  # fmt: skip
    assert (
        row.image_path == tmp_path / "a.jpg"
        and row.captions == ("x", "y", "z")
        and row.fields == {"label": "3"}
    )
    bad = interpret_row(
        "t.jsonl:1", 1, {"image": 7, "caption": {"a": 1}}, image_column="image", caption_columns=["caption"],
        caption_separator=None, root=tmp_path,
    )  # fmt: skip
    assert (bad.image_path, bad.error) == (None, "malformed_row") and "column 'image' holds 7" in bad.problem
