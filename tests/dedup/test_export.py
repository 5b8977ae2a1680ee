"""curate export: the curated samples resharded into training tars, duplicates left out on
request, read by the training stage as it reads OUT/shards."""

from __future__ import annotations

import io
import json
import os
import shutil
import tarfile
from pathlib import Path

import pytest

from curate.explore import run_query
from curate.export import ExportError, plan_slices, run_export, write_export_shard
from tests.dedup.conftest import convert_run, copy_run
from tests.helpers import image_bytes, make_shard
from train.lib.data import iter_records, list_shards


def _members(tars: list[Path]) -> list[tuple[str, bytes]]:
    out = []
    for path in tars:
        with tarfile.open(path) as tar:
            out += [(m.name, tar.extractfile(m).read()) for m in tar if m.isfile()]
    return out


def _records(shards: list[str]) -> list[tuple[str, tuple[str, ...], bytes]]:
    return [(r.key, tuple(r.captions), r.image) for s in shards for r in iter_records(s)]


def test_plan_slices_lay_the_shards_end_to_end():
    assert plan_slices([("a", 5), ("b", 0), ("c", 7)], 4) == [
        [("a", 0, 4)],
        [("a", 4, 5), ("c", 0, 3)],
        [("c", 3, 7)],
    ]
    assert plan_slices([("a", 0)], 4) == []


def test_export_reshards_the_curated_members_exactly(dedup_run, tmp_path):
    dest = tmp_path / "train"
    summary = run_export(str(dedup_run.out), str(dest), samples_per_shard=40)
    assert (summary.samples, summary.shards, summary.written) == (150, 4, 4)
    tars = sorted(dest.glob("*.tar"))
    assert [t.name for t in tars] == ["00000.tar", "00001.tar", "00002.tar", "00003.tar"]
    manifest = json.loads((dest / "_export.json").read_text())
    assert [t["samples"] for t in manifest["tars"]] == [40, 40, 40, 30]
    curated = sorted((dedup_run.out / "shards").glob("*.tar"))
    # every member as the curated tars have it, in the same order (shard order, then tar order)
    assert _members(tars) == _members(curated)
    # and the training stage reads the export as it reads OUT/shards
    assert list_shards(str(dest)) == [str(t) for t in tars]
    assert _records(list_shards(str(dest))) == _records(list_shards(str(dedup_run.out / "shards")))
    # a rerun has nothing to do; an interrupted one writes only the missing tars
    assert run_export(str(dedup_run.out), str(dest), samples_per_shard=40).up_to_date
    before = {t.name: t.read_bytes() for t in tars}
    (dest / "00002.tar").unlink()
    (dest / "_export.json").unlink()
    resumed = run_export(str(dedup_run.out), str(dest), samples_per_shard=40)
    assert resumed.written == 1 and {t.name: t.read_bytes() for t in sorted(dest.glob("*.tar"))} == before
    # other options into the same directory: refused, unless --overwrite
    with pytest.raises(ExportError, match="holds another export"):
        run_export(str(dedup_run.out), str(dest), samples_per_shard=100)
    again = run_export(str(dedup_run.out), str(dest), samples_per_shard=100, overwrite=True)
    assert again.shards == 2 and sorted(t.name for t in dest.glob("*.tar")) == ["00000.tar", "00001.tar"]


def test_no_duplicates_leaves_out_what_the_samples_view_names(dedup_run, tmp_path):
    dest = tmp_path / "unique"
    summary = run_export(str(dedup_run.out), str(dest), no_duplicates=True, samples_per_shard=64)
    flagged = run_query(
        dedup_run.out, "SELECT key FROM samples WHERE status = 'kept' AND duplicate_of IS NOT NULL"
    ).to_pylist()
    assert summary.left_out == len(flagged) == dedup_run.phash.duplicates
    keys = [r[0] for r in _records(list_shards(str(dest)))]
    assert len(keys) == summary.samples == 150 - len(flagged)
    assert not {f["key"] for f in flagged} & set(keys)
    # every group keeps its representative
    reps = run_query(dedup_run.out, 'SELECT DISTINCT "group" AS g FROM duplicates').to_pylist()
    assert {r["g"].split("/", 1)[1] for r in reps} <= set(keys)
    meta = json.loads((dest / "_export.json").read_text())
    assert meta["no_duplicates"] and set(meta["dedup"]) == {"exact", "phash"}


def test_export_refuses_what_it_cannot_do(dedup_run, tmp_path):
    out = copy_run(dedup_run.out, tmp_path / "run")
    with pytest.raises(ExportError, match="needs a dedup of the run"):
        run_export(str(out), str(tmp_path / "a"), no_duplicates=True)
    with pytest.raises(ExportError, match="at least 1"):
        run_export(str(out), str(tmp_path / "a"), samples_per_shard=0)
    with pytest.raises(ExportError, match="inside the run's own output"):
        run_export(str(out), str(out / "shards"))
    shutil.copytree(dedup_run.out / "dedup", out / "dedup")
    path = out / "samples" / "00000.parquet"
    path.write_bytes(path.read_bytes())  # rewritten: the dedup is now older than the samples
    os.utime(path, (1, 1))
    with pytest.raises(ExportError, match="rerun curate dedup"):
        run_export(str(out), str(tmp_path / "a"), no_duplicates=True)
    (out / "shards" / "00001.tar").unlink()
    with pytest.raises(ExportError, match=r"no curated tar .*output\.write_shards: false"):
        run_export(str(out), str(tmp_path / "b"))
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(ExportError, match="not empty and holds no export"):
        run_export(str(dedup_run.out), str(tmp_path / "c"))


def test_keys_shared_by_two_input_shards_stay_apart(tmp_path):
    samples = [
        {"key": f"k{i}", "image": image_bytes(24, 20, seed=i), "txt": f"picture {i}"} for i in range(3)
    ]
    inputs = [make_shard(tmp_path / "in" / "a.tar", samples), make_shard(tmp_path / "in" / "b.tar", samples)]
    out = tmp_path / "out"
    convert_run(inputs, out)
    summary = run_export(str(out), str(tmp_path / "train"), samples_per_shard=10)
    assert summary.samples == 6 and summary.shards == 1
    names = [n for n, _ in _members([tmp_path / "train" / "00000.tar"])]
    assert sorted(names[:3]) == ["k0.jpg", "k0.json", "k0.txt"]
    assert [n.split(".")[0] for n in names[::3]] == ["k0", "k1", "k2", "b_k0", "b_k1", "b_k2"]
    records = _records([str(tmp_path / "train" / "00000.tar")])
    assert len({r[0] for r in records}) == 6
    # the members' bytes are the curated ones: KEY.json still names the sample's own shard and key
    meta = json.loads(dict(_members([tmp_path / "train" / "00000.tar"]))["b_k0.json"])
    assert (meta["shard"], meta["key"]) == ("b", "k0")
    # a plan or a curated tar that no longer matches the run is an error, not a short tar
    (tmp_path / "x").mkdir()
    with pytest.raises(ExportError, match=r"has 3 samples to export, the plan takes \[0, 4\)"):
        write_export_shard(str(out), str(tmp_path / "x"), 0, [("a", 0, 4)], False)
    curated = out / "shards" / "a.tar"
    members = _members([curated])
    with tarfile.open(curated, "w") as tar:
        for name, data in members[:-3]:  # the last sample's three members left out
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(ExportError, match="holds 2 of the 3 kept samples"):
        write_export_shard(str(out), str(tmp_path / "x"), 0, [("a", 0, 3)], False)
    assert not list((tmp_path / "x").iterdir())  # no tar, and no temporary file, left behind


def test_the_command_line(dedup_run, tmp_path, capsys):
    from curate.cli import main

    assert main(["export", str(dedup_run.out), "--to", str(tmp_path / "t"), "--samples-per-shard", "0"]) == 2
    assert "at least 1" in capsys.readouterr().err
    dest = tmp_path / "t"
    code = main(
        [
            "export",
            str(dedup_run.out),
            "--to",
            str(dest),
            "--no-duplicates",
            "--samples-per-shard",
            "50",
            "-v",
        ]
    )
    assert code == 0
    said = capsys.readouterr()
    expected = 150 - dedup_run.phash.duplicates
    assert (
        f"{expected:,} kept samples in 2 tar(s), {dedup_run.phash.duplicates} duplicates left out" in said.out
    )
    assert "curate export:" in said.err and "00001.tar" in said.err  # the progress display's lines
