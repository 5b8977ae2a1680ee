from __future__ import annotations

import hashlib
import json
import os
import re
import tarfile

import fsspec
import pytest

from curate.io.reader import (
    InputError,
    ShardRef,
    expand_braces,
    expand_inputs,
    iter_shard_rows,
    read_shard,
    resolve_inputs,
    sanitize_key,
    shard_refs,
    split_member_name,
)
from curate.schema import ROW_SAMPLE, ROW_SHARD_END, STATUS_ERROR, STATUS_PENDING
from tests.helpers import image_bytes, make_shard, noise_image, write_tar


def read_all(path, name="s", batch_size=32) -> tuple[list[dict], dict]:
    """Rows of one shard: (sample rows, the shard_end row); checks shard_end comes last, once."""
    rows = list(iter_shard_rows([ShardRef(url=str(path), name=name)], batch_size))
    assert rows, "the reader must always yield a shard_end row"
    assert rows[-1]["row_type"] == ROW_SHARD_END
    assert all(r["row_type"] == ROW_SAMPLE for r in rows[:-1])
    return rows[:-1], rows[-1]


def touch(path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return str(path)


# -- input specs -------------------------------------------------------------------------


def test_expand_braces_zero_padded_range():
    assert expand_braces("s/{00000..00003}.tar") == [f"s/{i:05d}.tar" for i in range(4)]
    assert expand_braces("{8..11}") == ["8", "9", "10", "11"]
    assert expand_braces("{0008..0011}") == ["0008", "0009", "0010", "0011"]
    assert expand_braces("{3..1}") == ["3", "2", "1"]


def test_expand_braces_lists_repeated_and_nested():
    assert expand_braces("a{x,y}b") == ["axb", "ayb"]
    assert expand_braces("{a,b}-{1..2}") == ["a-1", "a-2", "b-1", "b-2"]
    assert expand_braces("no-braces.tar") == ["no-braces.tar"]
    nested = expand_braces("p/{x,y{0..1}}.tar")
    assert set(nested) == {"p/x.tar", "p/y0.tar", "p/y1.tar"}


def test_expand_inputs_braces_are_checked_and_deduplicated(tmp_path):
    for name in ("000.tar", "001.tar", "x.tar", "y0.tar", "y1.tar"):
        touch(tmp_path / name)
    assert expand_inputs(str(tmp_path / "{000..001}.tar")) == [
        str(tmp_path / "000.tar"),
        str(tmp_path / "001.tar"),
    ]
    nested = expand_inputs(str(tmp_path / "{x,y{0..1}}.tar"))
    assert sorted(nested) == [str(tmp_path / n) for n in ("x.tar", "y0.tar", "y1.tar")]
    assert len(nested) == len(set(nested))
    # a spec given twice, or overlapping specs, name each shard once
    both = expand_inputs([str(tmp_path / "000.tar"), str(tmp_path / "{000..001}.tar")])
    assert both == [str(tmp_path / "000.tar"), str(tmp_path / "001.tar")]


def test_expand_inputs_brace_range_with_a_missing_member_names_it(tmp_path):
    touch(tmp_path / "000.tar")
    touch(tmp_path / "001.tar")
    with pytest.raises(InputError, match=re.escape(str(tmp_path / "002.tar"))):
        expand_inputs(str(tmp_path / "{000..002}.tar"))


def test_expand_inputs_globs(tmp_path):
    for name in ("b.tar", "a.tar", "c.txt", "sub/d.tar"):
        touch(tmp_path / name)
    assert expand_inputs(str(tmp_path / "*.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    # a broad glob only picks tar files
    assert expand_inputs(str(tmp_path / "*")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert expand_inputs(str(tmp_path / "?.tar")) == [str(tmp_path / "a.tar"), str(tmp_path / "b.tar")]
    assert expand_inputs(str(tmp_path / "**" / "*.tar")) == [
        str(tmp_path / "a.tar"),
        str(tmp_path / "b.tar"),
        str(tmp_path / "sub" / "d.tar"),
    ]
    with pytest.raises(InputError, match=r"matches no shard \(\.tar, \.tar\.gz, \.tgz\)"):
        expand_inputs(str(tmp_path / "*.zip"))


def test_expand_inputs_directory(tmp_path):
    for name in ("2.tar", "1.tar", "notes.txt"):
        touch(tmp_path / "d" / name)
    assert expand_inputs(str(tmp_path / "d")) == [
        str(tmp_path / "d" / "1.tar"),
        str(tmp_path / "d" / "2.tar"),
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputError, match=r"has no shard"):
        expand_inputs(str(tmp_path / "empty"))


def test_gzipped_shards_are_taken_by_directories_and_globs_and_the_rest_is_counted(tmp_path):
    import gzip

    plain = make_shard(
        tmp_path / "src" / "plain.tar", [{"key": "k0", "image": image_bytes(8, 8), "txt": "t"}]
    )
    d = tmp_path / "d"
    d.mkdir()
    (d / "00000.tar").write_bytes(plain.read_bytes())
    (d / "00001.tar.gz").write_bytes(gzip.compress(plain.read_bytes()))
    (d / "00002.tgz").write_bytes(gzip.compress(plain.read_bytes()))
    for name in ("99999.parquet", "99999_stats.json", "notes.txt"):  # sidecars of no shard here
        touch(d / name)
    want = [str(d / n) for n in ("00000.tar", "00001.tar.gz", "00002.tgz")]
    for spec in (str(d), str(d / "*")):
        found = resolve_inputs(spec)
        assert found.urls == want
        assert found.skipped == {".parquet": 1, "_stats.json": 1, ".txt": 1}
        assert "skipped 3 matched file(s) that are not shards" in found.skipped_note()
    assert expand_inputs(str(d / "*.tgz")) == [str(d / "00002.tgz")]
    assert resolve_inputs(str(d / "*.tar")).skipped_note() is None
    # a name without its shard suffix, and every sample read through the gzip layer
    assert [r.name for r in shard_refs(want)] == ["00000", "00001", "00002"]
    for ref in shard_refs(want):
        (row,), end = read_all(ref.url)
        assert row["key"] == "k0" and row["status"] == "pending" and end["shard_error"] is None


def test_expand_inputs_relative_path_becomes_absolute(tmp_path, monkeypatch):
    touch(tmp_path / "rel.tar")
    monkeypatch.chdir(tmp_path)
    assert expand_inputs("rel.tar") == [str(tmp_path / "rel.tar")]


def test_expand_inputs_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope" / "00001.tar"
    with pytest.raises(InputError, match=re.escape(str(missing))):
        expand_inputs(str(missing))
    with pytest.raises(InputError):
        expand_inputs([])


def test_expand_inputs_remote_urls_pass_through_unchecked():
    assert expand_inputs("s3://bucket/x/{0..1}.tar") == ["s3://bucket/x/0.tar", "s3://bucket/x/1.tar"]


def test_shard_refs_collisions_get_a_hash_suffix():
    urls = ["/data/a/shard.tar", "/data/b/shard.tar", "/data/c/other.tar"]
    refs = shard_refs(urls)
    assert [r.url for r in refs] == urls
    assert refs[2].name == "other"
    for ref in refs[:2]:
        assert ref.name == f"shard-{hashlib.sha1(ref.url.encode()).hexdigest()[:8]}"
    assert refs[0].name != refs[1].name
    assert shard_refs(urls) == refs  # deterministic


def test_shard_refs_sanitised_collisions_and_unsafe_names():
    refs = shard_refs(["/x/my shard.tar", "/y/my_shard.tar", "/z/wéird$.tar"])
    names = [r.name for r in refs]
    assert len(set(names)) == 3
    assert names[0].startswith("my_shard-") and names[1].startswith("my_shard-")
    assert all(re.fullmatch(r"[A-Za-z0-9._-]+", n) for n in names)


# -- member grouping -----------------------------------------------------------------------


def test_split_member_name():
    assert split_member_name("000001.jpg") == ("000001", "jpg")
    assert split_member_name("dir.v1/sub.x/000001.JPG") == ("dir.v1/sub.x/000001", "jpg")
    assert split_member_name("000001.seg.txt") == ("000001", "seg.txt")
    assert split_member_name("README") == ("README", "")


def test_groups_image_formats_text_and_json(tmp_path):
    images = {fmt: image_bytes(16, 12, fmt, seed=i) for i, fmt in enumerate(("jpg", "jpeg", "png", "webp"))}
    samples = [
        {
            "key": f"{i:06d}",
            "image": data,
            "format": fmt,
            "txt": f"  caption {fmt}\n",
            "json": {"url": f"http://x/{i}.{fmt}", "width": 16},
            "extra": {"exif": b"\x00\x01"},
        }
        for i, (fmt, data) in enumerate(images.items())
    ]
    path = make_shard(tmp_path / "00000.tar", samples)
    rows, end = read_all(path, name="00000")
    assert [r["key"] for r in rows] == ["000000", "000001", "000002", "000003"]
    assert [r["seq"] for r in rows] == [0, 1, 2, 3]
    for row, (fmt, data) in zip(rows, images.items()):
        assert row["status"] == STATUS_PENDING, row["error"]
        assert row["error"] is None
        assert row["image_ext"] == fmt
        assert row["image"] == data
        assert row["image_sha256"] == hashlib.sha256(data).hexdigest()
        assert row["alt_text"] == f"caption {fmt}"
        assert row["url"] == f"http://x/{row['seq']}.{fmt}"
        assert json.loads(row["meta"]) == {"url": row["url"], "width": 16}
        assert row["shard"] == "00000"
        assert row["source_url"] == str(path)
    assert end["shard_total"] == 4
    assert end["shard_error"] is None
    assert end["shard"] == "00000"


def test_key_with_dots_in_directory_names(tmp_path):
    path = make_shard(
        tmp_path / "s.tar",
        [
            {"key": "part.v1/sub.dir/000001", "image": image_bytes(), "format": "png", "txt": "one"},
            {"key": "part.v1/sub.dir/000002", "image": image_bytes(), "format": "png", "txt": "two"},
        ],
    )
    rows, end = read_all(path)
    assert [(r["key"], r["alt_text"], r["status"]) for r in rows] == [
        ("part.v1/sub.dir/000001", "one", STATUS_PENDING),
        ("part.v1/sub.dir/000002", "two", STATUS_PENDING),
    ]
    assert end["shard_total"] == 2


def test_missing_txt_gives_null_alt_text(tmp_path):
    path = make_shard(tmp_path / "s.tar", [{"key": "a", "image": image_bytes(), "format": "png"}])
    (row,), _ = read_all(path)
    assert row["status"] == STATUS_PENDING
    assert row["alt_text"] is None
    assert row["url"] is None and row["meta"] is None


def test_missing_image_is_an_error_naming_what_was_found(tmp_path):
    path = make_shard(
        tmp_path / "s.tar",
        [
            {"key": "a", "txt": "no picture", "json": {"url": "u"}},
            {"key": "b", "image": image_bytes(), "format": "png", "txt": "fine"},
        ],
    )
    (bad, good), end = read_all(path)
    assert bad["status"] == STATUS_ERROR
    assert "no image member" in bad["error"]
    assert "json" in bad["error"] and "txt" in bad["error"]
    assert bad["image"] is None
    assert bad["alt_text"] == "no picture"  # what could be read is kept for the record
    assert good["status"] == STATUS_PENDING
    assert end["shard_total"] == 2


def test_non_utf8_txt_is_an_error(tmp_path):
    path = make_shard(
        tmp_path / "s.tar", [{"key": "a", "image": image_bytes(), "format": "png", "txt": b"caf\xe9 \xff"}]
    )
    (row,), _ = read_all(path)
    assert row["status"] == STATUS_ERROR
    assert "a.txt is not valid UTF-8" in row["error"]
    assert row["image"] is None
    assert row["alt_text"] is None


def test_malformed_json_is_an_error(tmp_path):
    path = make_shard(
        tmp_path / "s.tar",
        [{"key": "a", "image": image_bytes(), "format": "png", "txt": "t", "json": b'{"url": "http://x'}],
    )
    (row,), _ = read_all(path)
    assert row["status"] == STATUS_ERROR
    assert "a.json is not valid JSON" in row["error"]
    assert row["url"] is None


def test_url_only_taken_from_a_json_object_string(tmp_path):
    path = make_shard(
        tmp_path / "s.tar",
        [
            {"key": "a", "image": image_bytes(), "format": "png", "json": {"url": 5}},
            {"key": "b", "image": image_bytes(), "format": "png", "json": [1, 2]},
            {"key": "c", "image": image_bytes(), "format": "png", "json": {"url": "https://e.com/c.jpg"}},
        ],
    )
    rows, _ = read_all(path)
    assert [r["status"] for r in rows] == [STATUS_PENDING] * 3
    assert [r["url"] for r in rows] == [None, None, "https://e.com/c.jpg"]
    assert rows[1]["meta"] == "[1, 2]"


def test_duplicate_non_adjacent_key_is_an_error_row(tmp_path):
    path = make_shard(
        tmp_path / "s.tar",
        [
            {"key": "a", "image": image_bytes(), "format": "png", "txt": "first"},
            {"key": "b", "image": image_bytes(), "format": "png", "txt": "b"},
            {"key": "a", "image": image_bytes(), "format": "png", "txt": "again"},
        ],
    )
    rows, end = read_all(path)
    assert len(rows) == 3
    assert rows[0]["status"] == STATUS_PENDING and rows[0]["key"] == "a"
    assert rows[2]["status"] == STATUS_ERROR
    assert "duplicate key 'a'" in rows[2]["error"]
    # the duplicate keeps a distinct key so (shard, key) stays unique in the output
    assert len({r["key"] for r in rows}) == 3
    assert end["shard_total"] == 3


def test_repeated_extension_within_a_group_is_an_error(tmp_path):
    path = write_tar(
        tmp_path / "s.tar",
        [("a.png", image_bytes()), ("a.txt", b"one"), ("a.txt", b"two")],
    )
    (row,), _ = read_all(path)
    assert row["status"] == STATUS_ERROR
    assert "repeats extension 'txt'" in row["error"]


def test_batches_respect_batch_size_and_end_with_shard_end(tmp_path):
    samples = [{"key": f"{i:03d}", "image": image_bytes(), "format": "png"} for i in range(5)]
    path = make_shard(tmp_path / "s.tar", samples)
    batches = list(read_shard(ShardRef(url=str(path), name="s"), batch_size=2))
    assert [len(b) for b in batches] == [2, 2, 2]
    assert batches[-1][-1]["row_type"] == ROW_SHARD_END
    assert batches[-1][-1]["shard_total"] == 5


@pytest.mark.parametrize(
    "where",
    [
        "in_image_data",  # tarfile notices this one by itself
        "at_member_boundary",  # tarfile alone would end quietly and yield 003 without its .txt
        "inside_member_header",  # likewise
        "before_end_of_archive",  # every member there, the end blocks missing: still a cut file
    ],
)
def test_truncated_tar_yields_samples_before_the_cut(tmp_path, where):
    samples = [
        {"key": f"{i:03d}", "image": noise_image(64, 64, seed=i), "format": "png", "txt": f"t{i}"}
        for i in range(5)
    ]
    full = make_shard(tmp_path / "full.tar", samples)
    data = full.read_bytes()
    with tarfile.open(full) as tar:
        members = {m.name: m for m in tar.getmembers()}
    image, txt, last = members["003.png"], members["003.txt"], members["004.txt"]
    cut = {
        "in_image_data": image.offset_data + image.size // 2,
        "at_member_boundary": txt.offset,
        "inside_member_header": txt.offset + 100,
        "before_end_of_archive": last.offset_data + 512,
    }[where]
    truncated = tmp_path / "cut.tar"
    truncated.write_bytes(data[:cut])
    rows, end = read_all(truncated)
    complete = ["000", "001", "002", "003"] if where == "before_end_of_archive" else ["000", "001", "002"]
    cut_key = "004" if where == "before_end_of_archive" else "003"
    assert [r["key"] for r in rows] == [*complete, cut_key]
    assert [r["alt_text"] for r in rows[:-1]] == [f"t{int(k)}" for k in complete]
    assert all(r["status"] == STATUS_PENDING for r in rows[:-1])
    # the sample the cut went through is never emitted half-read: it is an error row
    cut_row = rows[-1]
    assert cut_row["status"] == STATUS_ERROR
    assert "cut off" in cut_row["error"]
    assert cut_row["image"] is None and cut_row["alt_text"] is None
    assert end["shard_total"] == len(rows)
    assert end["shard_error"] is not None
    assert f"after {len(rows)} samples" in end["shard_error"]
    assert str(truncated) in end["shard_error"]


def test_tar_ending_right_after_its_end_of_archive_block_is_complete(tmp_path):
    samples = [{"key": f"{i:03d}", "image": image_bytes(), "format": "png", "txt": f"t{i}"} for i in range(2)]
    full = make_shard(tmp_path / "full.tar", samples)
    with tarfile.open(full) as tar:
        last = tar.getmembers()[-1]
    end_block = last.offset_data + ((last.size + 511) // 512) * 512
    short = tmp_path / "short.tar"
    short.write_bytes(full.read_bytes()[: end_block + 512])  # one zero block, no record padding
    rows, end = read_all(short)
    assert [r["alt_text"] for r in rows] == ["t0", "t1"]
    assert end["shard_error"] is None


def test_gzipped_tar_is_read(tmp_path):
    import gzip

    full = make_shard(tmp_path / "s.tar", [{"key": "a", "image": image_bytes(), "format": "png", "txt": "z"}])
    gz = tmp_path / "s.tar.gz"
    gz.write_bytes(gzip.compress(full.read_bytes()))
    (row,), end = read_all(gz)
    assert row["alt_text"] == "z"
    assert end["shard_error"] is None


def test_file_that_is_not_a_tar_is_a_shard_fault(tmp_path):
    path = tmp_path / "junk.tar"
    path.write_bytes(os.urandom(3000))
    rows, end = read_all(path)
    assert rows == []
    assert end["shard_total"] == 0
    assert end["shard_error"] and "unreadable tar" in end["shard_error"]


def test_zero_byte_file_is_a_shard_fault(tmp_path):
    path = tmp_path / "zero.tar"
    path.write_bytes(b"")
    rows, end = read_all(path)
    assert rows == []
    assert end["shard_total"] == 0
    assert end["shard_error"]


def test_empty_tar_has_no_samples_and_no_fault(tmp_path):
    path = write_tar(tmp_path / "empty.tar", [])
    rows, end = read_all(path)
    assert rows == []
    assert end["shard_total"] == 0
    assert end["shard_error"] is None


def test_missing_remote_shard_is_a_fault():
    rows, end = read_all("memory://curate-tests/does-not-exist.tar")
    assert rows == []
    assert "not found" in end["shard_error"]


def test_reads_fsspec_urls(tmp_path):
    local = make_shard(
        tmp_path / "s.tar", [{"key": "a", "image": image_bytes(), "format": "png", "txt": "m"}]
    )
    url = "memory://curate-tests/reader/s.tar"
    with fsspec.open(url, "wb") as f:
        f.write(local.read_bytes())
    try:
        (row,), end = read_all(url)
    finally:
        fsspec.filesystem("memory").rm(url)
    assert row["alt_text"] == "m" and row["source_url"] == url
    assert end["shard_error"] is None


# -- keys as file names ----------------------------------------------------------------------

SAFE = re.compile(r"[A-Za-z0-9_-]+")


@pytest.mark.parametrize("key", ["../x", "/abs", "a b\u00e9", "a.b", "", "..", "x/../../etc/passwd"])
def test_sanitize_key_makes_a_plain_file_stem(key):
    clean = sanitize_key(key)
    assert SAFE.fullmatch(clean), clean
    assert "/" not in clean and ".." not in clean and "." not in clean
    assert clean != key
    assert sanitize_key(key) == clean  # deterministic


@pytest.mark.parametrize("key", ["000123", "abc-DEF_1"])
def test_sanitize_key_keeps_safe_keys(key):
    assert sanitize_key(key) == key


def test_sanitize_key_distinguishes_keys_differing_only_in_unsafe_chars():
    keys = ["a b", "a!b", "a_b", "a.b", "a/b", "a\u00e9b", "a\u00e8b", "../x", "x", "/x"]
    names = [sanitize_key(k) for k in keys]
    assert len(set(names)) == len(keys), dict(zip(keys, names))
