"""``curate export``: the final training shards of a run, resharded, duplicates left out on request.

::

    DIR/00000.tar, 00001.tar, ...   WebDataset: KEY.<ext>, KEY.txt, KEY.json of each kept sample,
                                    the members exactly as OUT/shards/*.tar has them, N per tar
                                    (the last tar holds the rest)
    DIR/_export_plan.json           what is being exported (written first: a rerun resumes it)
    DIR/_export.json                the run, options, counts per tar (written last: the done marker)

The driver plans from small per-shard counts, which Ray tasks compute from each shard's
samples Parquet (and its dedup results with ``--no-duplicates``): the exported samples are
the kept ones in shard order, then tar order, and output tar ``j`` takes positions
``[j * N, (j + 1) * N)`` of that order, i.e. a few slices ``(input shard, start, stop)``. A
Ray task per output tar streams those slices out of the curated tars into the new tar
(temporary name, then rename), so no sample passes through the driver and a rerun after a
crash writes only the tars still missing. Training reads ``DIR`` as it reads ``OUT/shards``.
"""

from __future__ import annotations

import hashlib
import json
import os
import tarfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import fsspec
import pyarrow.parquet as pq

from curate.dedup.results import DedupError, duplicate_keys, files_fingerprint, read_results, shard_name
from curate.io.files import TarWriter, atomic_open, is_temp, output_fs, write_atomic
from curate.io.reader import split_member_name
from curate.progress import Progress
from curate.schema import STATUS_KEPT

DEFAULT_SAMPLES_PER_SHARD = 10_000
PLAN = "_export_plan.json"
MANIFEST = "_export.json"
MAX_IN_FLIGHT = 64  # tasks submitted ahead of the ones finished: the driver's refs stay few


class ExportError(ValueError):
    """The export cannot run with these options on this output; the message says why."""


@dataclass
class ExportSummary:
    dest: str
    samples: int = 0
    shards: int = 0
    written: int = 0  # tars written by this call (the others were there from an interrupted one)
    left_out: int = 0  # kept samples left out as duplicates
    up_to_date: bool = False
    wall_s: float = 0.0
    tars: list[dict[str, Any]] = field(default_factory=list)


def output_tar(index: int) -> str:
    return f"{index:05d}.tar"


# ------------------------------------------------------------------ tasks (run on workers)


def _selected_keys(output: str, shard: str, no_duplicates: bool) -> tuple[list[str], int]:
    """The exported keys of a shard in order (its kept samples, less duplicates when asked), and
    how many kept samples were left out."""
    _, root = output_fs(output)
    with fsspec.open(f"{root}/samples/{shard}.parquet", "rb") as f:
        table = pq.read_table(f, columns=["key", "status"])
    kept = [k for k, s in zip(table["key"].to_pylist(), table["status"].to_pylist()) if s == STATUS_KEPT]
    if not no_duplicates:
        return kept, 0
    dups = duplicate_keys(output, shard)
    selected = [k for k in kept if k not in dups]
    return selected, len(kept) - len(selected)


def count_shard(output: str, shard: str, no_duplicates: bool) -> dict[str, Any]:
    """A shard's number of exported samples, and whether its curated tar is there to copy from."""
    selected, left_out = _selected_keys(output, shard, no_duplicates)
    fs, root = output_fs(output)
    return {
        "shard": shard,
        "samples": len(selected),
        "left_out": left_out,
        "tar": fs.exists(f"{root}/shards/{shard}.tar"),
    }


def _curated_samples(url: str) -> Iterator[tuple[str, list[tuple[str, bytes]]]]:
    """A curated tar's samples in order: the original key (from KEY.json) and the members as
    they are (names and bytes)."""
    with fsspec.open(url, "rb") as f, tarfile.open(fileobj=f, mode="r|") as tar:
        stem, members = None, []
        for info in tar:
            if not info.isfile():
                continue
            member_stem, _ = split_member_name(info.name)
            data = tar.extractfile(info).read()
            if member_stem != stem and members:
                yield _original_key(members), members
                members = []
            stem = member_stem
            members.append((info.name, data))
        if members:
            yield _original_key(members), members


def _original_key(members: list[tuple[str, bytes]]) -> str | None:
    for name, data in members:
        if name.endswith(".json"):
            return json.loads(data).get("key")
    return None


def _renamed(members: list[tuple[str, bytes]], stem: str) -> list[tuple[str, bytes]]:
    return [(f"{stem}.{name.rsplit('/', 1)[-1].split('.', 1)[1]}", data) for name, data in members]


def write_export_shard(
    output: str, dest: str, index: int, slices: list[tuple[str, int, int]], no_duplicates: bool
) -> dict[str, Any]:
    """Write output tar ``index`` from ``slices`` of the exported order; its name and count.

    A key already taken in this tar (two input shards used the same key) is written as
    ``SHARD_KEY``; the members' bytes, ``KEY.json``'s ``key`` and ``shard`` included, are the
    curated tar's.
    """
    _, root = output_fs(output)
    path = f"{dest}/{output_tar(index)}"
    written = 0
    with atomic_open(path) as f, TarWriter(f) as tar:
        stems: set[str] = set()
        for shard, start, stop in slices:
            selected, _ = _selected_keys(output, shard, no_duplicates)
            if stop > len(selected):
                raise ExportError(
                    f"shard {shard} has {len(selected)} samples to export, the plan takes [{start}, {stop}): "
                    "the run or its dedup changed after the export was planned; rerun curate export"
                )
            wanted = set(selected[start:stop])
            found = 0
            for key, members in _curated_samples(f"{root}/shards/{shard}.tar"):
                if key not in wanted:
                    continue
                stem = split_member_name(members[0][0])[0]
                if stem in stems:
                    stem = f"{shard}_{stem}"
                    n = 1
                    while stem in stems:
                        stem, n = f"{shard}_{split_member_name(members[0][0])[0]}_{n}", n + 1
                    members = _renamed(members, stem)
                stems.add(stem)
                tar.add_all(members)
                found += 1
                if found == len(wanted):
                    break
            if found != len(wanted):
                raise ExportError(
                    f"{root}/shards/{shard}.tar holds {found} of the {len(wanted)} kept samples its "
                    "Parquet names: the curated tar does not match the run"
                )
            written += found
    return {"name": output_tar(index), "samples": written}


# ------------------------------------------------------------------ the driver


def plan_slices(counts: list[tuple[str, int]], per_shard: int) -> list[list[tuple[str, int, int]]]:
    """Output tar j takes positions [j * per_shard, (j + 1) * per_shard) of the shards'
    exported samples laid end to end: as slices (shard, start, stop) of each shard's own order."""
    plans: list[list[tuple[str, int, int]]] = []
    current: list[tuple[str, int, int]] = []
    room = per_shard
    for shard, count in counts:
        start = 0
        while start < count:
            take = min(room, count - start)
            current.append((shard, start, start + take))
            start += take
            room -= take
            if room == 0:
                plans.append(current)
                current, room = [], per_shard
    if current:
        plans.append(current)
    return plans


def _bounded(calls: Iterator[Any], limit: int) -> Iterator[Any]:
    """Results of Ray tasks as they finish, with at most ``limit`` submitted and unfinished."""
    import ray

    pending: list[Any] = []
    for ref in calls:
        pending.append(ref)
        if len(pending) >= limit:
            ready, pending = ray.wait(pending, num_returns=1)
            yield ray.get(ready[0])
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        yield ray.get(ready[0])


def check_export(output: str, dest: str, no_duplicates: bool, samples_per_shard: int) -> list[str]:
    """Everything that can be known before Ray starts; the run's shard names."""
    from curate.dedup.run import check_run

    if samples_per_shard < 1:
        raise ExportError(f"--samples-per-shard must be at least 1, got {samples_per_shard}")
    try:
        files = check_run(output)
    except DedupError as exc:
        raise ExportError(str(exc)) from exc
    _, root = output_fs(output)
    _, target = output_fs(dest)
    if "://" not in dest:
        root_abs, target_abs = os.path.abspath(root), os.path.abspath(target)
        for inner in ("", "samples", "shards", "_shards", "dedup"):
            if target_abs == os.path.join(root_abs, inner).rstrip("/"):
                raise ExportError(f"--to {dest} is inside the run's own output; choose another directory")
    if no_duplicates:
        results = read_results(output)
        if not results:
            raise ExportError(f"--no-duplicates needs a dedup of the run: run curate dedup {root} first")
        current = files_fingerprint(output, files)
        stale = [m for m, r in results.items() if (r.meta.get("plan") or {}).get("samples") != current]
        if stale:
            raise ExportError(
                f"the dedup ({', '.join(stale)}) was computed before the run's samples changed: "
                f"rerun curate dedup {root} --method {stale[0]}"
            )
    return [shard_name(p) for p in files]


def run_export(
    output: str,
    dest: str,
    *,
    no_duplicates: bool = False,
    samples_per_shard: int = DEFAULT_SAMPLES_PER_SHARD,
    overwrite: bool = False,
    progress: Progress | None = None,
) -> ExportSummary:
    """Write the kept samples of ``output`` as tars of ``samples_per_shard`` under ``dest``.

    Ray must be initialised. A rerun with the same options over the same run finishes an
    interrupted export (only missing tars are written) or has nothing to do; a ``dest``
    holding another export is refused unless ``overwrite``.
    """
    import ray

    started = time.time()
    shards = check_export(output, dest, no_duplicates, samples_per_shard)
    fs, target = output_fs(dest)
    _, root = output_fs(output)
    summary = ExportSummary(dest=target)
    count = ray.remote(count_shard).options(num_cpus=0.25)
    counts = {
        r["shard"]: r
        for r in _bounded((count.remote(output, s, no_duplicates) for s in shards), MAX_IN_FLIGHT)
    }
    missing = [s for s in shards if counts[s]["samples"] and not counts[s]["tar"]]
    if missing:
        raise ExportError(
            f"{len(missing)} shard(s) of {root} have kept samples but no curated tar (first: "
            f"{root}/shards/{missing[0]}.tar): was the run made with output.write_shards: false?"
        )
    ordered = [(s, counts[s]["samples"]) for s in shards]
    summary.left_out = sum(counts[s]["left_out"] for s in shards)
    results = read_results(output) if no_duplicates else {}
    plan = {
        "run": root,
        "no_duplicates": no_duplicates,
        "samples_per_shard": samples_per_shard,
        "dedup": {m: r.meta.get("plan") for m, r in results.items()},
        "counts": ordered,
    }
    plan["fingerprint"] = hashlib.sha256(json.dumps(plan, sort_keys=True).encode()).hexdigest()[:16]
    slices = plan_slices(ordered, samples_per_shard)
    summary.samples = sum(c for _, c in ordered)
    summary.shards = len(slices)
    if _previous(fs, target, plan["fingerprint"], overwrite, MANIFEST):
        summary.up_to_date = True
        return summary
    resume = _previous(fs, target, plan["fingerprint"], overwrite, PLAN)
    if not resume:
        _clear(fs, target, overwrite)
        fs.makedirs(target, exist_ok=True)
        write_atomic(f"{target}/{PLAN}", json.dumps(plan, indent=1).encode(), fs)
    progress = progress or Progress("curate export", unit="samples", enabled=False)
    progress.update(0, total=summary.samples)
    done = {output_tar(j) for j in range(len(slices)) if resume and fs.exists(f"{target}/{output_tar(j)}")}
    write = ray.remote(write_export_shard).options(num_cpus=0.5, max_retries=3)
    todo = (
        write.remote(output, target, j, s, no_duplicates)
        for j, s in enumerate(slices)
        if output_tar(j) not in done
    )
    tars = {}
    for j, s in enumerate(slices):
        if output_tar(j) in done:
            tars[output_tar(j)] = sum(stop - start for _, start, stop in s)
            progress.update(tars[output_tar(j)])
    for result in _bounded(todo, MAX_IN_FLIGHT):
        tars[result["name"]] = result["samples"]
        summary.written += 1
        progress.update(result["samples"])
        progress.note(f"  {result['name']}: {result['samples']:,} samples")
    summary.tars = [{"name": n, "samples": tars[n]} for n in sorted(tars)]
    manifest = {
        "run": root,
        "samples": summary.samples,
        "left_out_as_duplicates": summary.left_out,
        "no_duplicates": no_duplicates,
        "samples_per_shard": samples_per_shard,
        "dedup": {
            m: {"threshold": r.meta.get("threshold"), "finished_at": r.meta.get("finished_at")}
            for m, r in results.items()
        },
        "fingerprint": plan["fingerprint"],
        "tars": summary.tars,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    write_atomic(f"{target}/{MANIFEST}", json.dumps(manifest, indent=1).encode(), fs)
    summary.wall_s = time.time() - started
    return summary


def _previous(fs, target: str, fingerprint: str, overwrite: bool, name: str) -> bool:
    """Whether ``target/name`` records this very export (so it can be reused)."""
    path = f"{target}/{name}"
    if overwrite or not fs.exists(path):
        return False
    with fs.open(path, "rb") as f:
        try:
            return json.loads(f.read()).get("fingerprint") == fingerprint
        except ValueError:
            return False


def _clear(fs, target: str, overwrite: bool) -> None:
    """Make ``target`` ready for a new export: refuse to mix one into files it did not write."""
    if not fs.exists(target):
        return
    entries = [p for p in fs.ls(target, detail=False)]
    ours = [
        p
        for p in entries
        if (base := p.rsplit("/", 1)[-1]) in (PLAN, MANIFEST)
        or is_temp(base)
        or (base.endswith(".tar") and base[:-4].isdigit())
    ]
    others = [p for p in entries if p not in ours]
    if ours and not overwrite:
        raise ExportError(
            f"{target} holds another export (other run, options or samples); pass --overwrite to replace it"
        )
    if others and not ours:
        raise ExportError(f"{target} is not empty and holds no export; choose an empty or new directory")
    for p in ours:
        fs.rm(p, recursive=True)
