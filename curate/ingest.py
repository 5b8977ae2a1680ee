"""Download URL + alt-text lists (LAION, DataComp, CC12M parquet files) into WebDataset
shards with img2dataset, in the layout ``curate run`` reads.

img2dataset (the ``img2dataset`` extra, imported lazily) does the downloading: its
multiprocessing distributor on this machine, or its Ray distributor on the cluster this
process runs in (inside ``ray job submit``). Each shard ``NNNNN`` ends as ``NNNNN.tar``
(the downloaded images, ``.txt``, ``.json``), ``NNNNN.parquet`` (every URL of the shard,
failures included, with status and error message) and ``NNNNN_stats.json``, written last
and so the shard's done marker: a rerun downloads only the shards without one.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import logging
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field

import fsspec
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json
import pyarrow.parquet as pq

from curate.config import URL_LIST_FORMATS, IngestConfig
from curate.progress import Progress

log = logging.getLogger("curate.ingest")

INSTALL_HINT = "pip install 'curate[img2dataset]'"
# img2dataset's imports phone home (albumentations' update check) unless told not to
QUIET_ENV = {"NO_ALBUMENTATIONS_UPDATE": "1", "WANDB_MODE": "disabled"}
MAX_AUTO_PROCESSES = 16
STATS_SUFFIX = "_stats.json"
INGEST_DIR = "_ingest"  # `curate run URLS --output OUT` downloads into OUT/_ingest
SHARD_DIGITS = 5  # img2dataset's default oom_shard_count: shards 00000..99999
# longest first, so 'x.csv.gz' is csv.gz, not an unknown 'gz'
_FORMATS_BY_LENGTH = sorted(URL_LIST_FORMATS, key=len, reverse=True)


class IngestError(ValueError):
    """The URL list cannot be ingested as given: missing, unknown format, no such column."""


class MissingExtraError(ImportError):
    """img2dataset is not installed; the message says how to install it."""


def list_format(path: str) -> str | None:
    """The URL-list format a file name says (``urls.parquet`` -> parquet), or None."""
    name = path.rstrip("/").rsplit("/", 1)[-1].lower()
    return next((fmt for fmt in _FORMATS_BY_LENGTH if name.endswith("." + fmt)), None)


def is_url_list(spec: str) -> bool:
    """Whether an input spec names a URL list (by extension) rather than WebDataset tars."""
    return list_format(spec) is not None


def import_img2dataset():
    """img2dataset, or a MissingExtraError naming the install command."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)  # inherited by its spawned workers too
    try:
        import img2dataset
    except ImportError as exc:
        raise MissingExtraError(f"downloading URL lists needs img2dataset: {INSTALL_HINT} ({exc})") from exc
    return img2dataset


def resolve_distributor(choice: str) -> str:
    """``auto``: img2dataset's Ray distributor inside a Ray job or with RAY_ADDRESS, else local processes."""
    if choice != "auto":
        return choice
    in_ray = any(os.environ.get(k) for k in ("RAY_ADDRESS", "RAY_JOB_ID", "RAY_JOB_SUBMISSION_ID"))
    chosen = "ray" if in_ray else "multiprocessing"
    log.info("ingest distributor: %s (%s)", chosen, "inside a Ray job" if in_ray else "no Ray job")
    return chosen


@dataclass
class IngestPlan:
    """A checked URL list and what is left to download; built before any work starts."""

    url_list: str
    output: str
    cfg: IngestConfig
    input_format: str
    caption_col: str | None
    files: list[str]
    urls: int  # rows over every list file
    expected: list[int]  # shard ids this list fills
    done: set[int]  # of those, shards already finished by an earlier run

    @property
    def todo(self) -> list[int]:
        return [i for i in self.expected if i not in self.done]


@dataclass
class IngestResult:
    """What a download left in ``output``, summed over its finished shards."""

    output: str
    urls: int
    shards: list[str]  # finished shard tars, ready for ``curate run --input``
    missing_shards: list[str]  # shards of this list without a done marker
    downloaded: int = 0
    failed_to_download: int = 0
    failed_to_resize: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # error message -> count, most first
    skipped: bool = False  # every shard was already there: img2dataset did not run
    wall_s: float = 0.0

    @property
    def complete(self) -> bool:
        return not self.missing_shards

    @property
    def failed(self) -> int:
        return self.failed_to_download + self.failed_to_resize

    @property
    def shard_glob(self) -> str:
        return f"{self.output}/*.tar"

    def summary_lines(self, top: int = 10) -> list[str]:
        """Where the shards are and how many URLs failed, by reason."""
        when = "already downloaded, nothing to do" if self.skipped else f"in {self.wall_s:.1f}s"
        lines = [
            f"{self.downloaded + self.failed} URLs in {len(self.shards)} shard(s), {when}: "
            f"{self.downloaded} downloaded, {self.failed} failed ({self.failed_to_download} "
            f"failed_to_download, {self.failed_to_resize} failed_to_resize)",
            f"shards: {self.shard_glob} (per-URL status: {self.output}/*.parquet)",
        ]
        if self.failures:
            lines.append("failures by reason:")
            ranked = sorted(self.failures.items(), key=lambda kv: (-kv[1], kv[0]))
            lines += [f"  {n:>8}  {reason}" for reason, n in ranked[:top]]
            if len(ranked) > top:
                lines.append(f"  ... and {len(ranked) - top} more reasons")
        if self.missing_shards:
            names = ", ".join(self.missing_shards[:5]) + (", ..." if len(self.missing_shards) > 5 else "")
            lines.append(
                f"INCOMPLETE: {len(self.missing_shards)} shard(s) unfinished ({names}); "
                "rerun the same command to download only those"
            )
        return lines


def _resolve_files(
    url_list: str, input_format: str | None
) -> tuple[fsspec.AbstractFileSystem, list[str], str]:
    fs, path = fsspec.core.url_to_fs(url_list)
    if fs.isdir(path):
        names = [p for p in fs.ls(path, detail=False) if fs.isfile(p)]
        if input_format is None:
            formats = sorted({f for p in names if (f := list_format(p))})
            if len(formats) != 1:
                found = ", ".join(formats) or "none"
                raise IngestError(
                    f"URL list directory {url_list}: needs files of exactly one format "
                    f"({', '.join(URL_LIST_FORMATS)}), found {found}; set the input format"
                )
            input_format = formats[0]
        # img2dataset's own rule for a directory
        files = sorted(fs.glob(path.rstrip("/") + "/*." + input_format))
        if not files:
            raise IngestError(f"URL list directory {url_list} has no *.{input_format} file")
        return fs, files, input_format
    if not fs.isfile(path):
        raise IngestError(f"URL list not found: {url_list}")
    input_format = input_format or list_format(path)
    if input_format is None:
        raise IngestError(
            f"URL list {url_list}: cannot tell the format from the name; "
            f"set the input format ({', '.join(URL_LIST_FORMATS)})"
        )
    return fs, [path], input_format


def _read_list(fs: fsspec.AbstractFileSystem, path: str, fmt: str) -> tuple[int, list[str]]:
    """(rows, columns) of one URL list, read the way img2dataset reads it."""
    if fmt == "parquet":
        with fs.open(path, "rb") as f:
            meta = pq.ParquetFile(f).metadata
            return meta.num_rows, list(meta.schema.to_arrow_schema().names)
    compression = "gzip" if fmt.endswith(".gz") else None
    base = fmt.removesuffix(".gz")
    with fs.open(path, "rb", compression=compression) as f:
        if base == "txt":
            table = pa_csv.read_csv(f, read_options=pa_csv.ReadOptions(column_names=["url"]))
        elif base == "csv":
            table = pa_csv.read_csv(f)
        elif base == "tsv":
            table = pa_csv.read_csv(f, parse_options=pa_csv.ParseOptions(delimiter="\t"))
        elif base == "jsonl":
            table = pa_json.read_json(f)
        else:  # json: one array of records
            records = json.load(f)
            if not isinstance(records, list):
                raise IngestError(f"URL list {path}: a .json list must be an array of records")
            table = pa.Table.from_pylist(records)
    return table.num_rows, table.column_names


def plan_ingest(url_list: str, output: str, cfg: IngestConfig | None = None) -> IngestPlan:
    """Check the URL list (exists, format, columns) and find what is left to download.

    Raises IngestError naming the problem, and MissingExtraError when there is work to do
    and img2dataset is not installed, before anything is downloaded.
    """
    cfg = cfg or IngestConfig()
    if "://" not in output:
        output = os.path.abspath(output)
    output = output.rstrip("/")
    try:
        fs, files, fmt = _resolve_files(url_list, cfg.input_format)
        caption_col = None if fmt.startswith("txt") else cfg.caption_col  # a .txt list is URLs only
        counts = []
        for path in files:
            rows, columns = _read_list(fs, path, fmt)
            wanted = [c for c in (cfg.url_col, caption_col) if c and not fmt.startswith("txt")]
            absent = [c for c in wanted if c not in columns]
            if absent:
                raise IngestError(
                    f"URL list {path}: no column {absent[0]!r} (columns: {', '.join(columns)}); "
                    "set the URL and caption columns (LAION: URL and TEXT)"
                )
            counts.append(rows)
    except (OSError, pa.ArrowException, ValueError) as exc:
        if isinstance(exc, IngestError):
            raise
        raise IngestError(f"URL list {url_list}: unreadable: {type(exc).__name__}: {exc}") from exc
    if not sum(counts):
        raise IngestError(f"URL list {url_list} has no rows")
    n_shards = sum(math.ceil(n / cfg.samples_per_shard) for n in counts)
    done = set(_read_stats(output))
    start = 0
    if cfg.incremental_mode == "extend":
        start = max(done, default=-1) + 1
    if cfg.incremental_mode != "incremental":
        done = set()
    plan = IngestPlan(
        url_list=url_list,
        output=output,
        cfg=cfg,
        input_format=fmt,
        caption_col=caption_col,
        files=files,
        urls=sum(counts),
        expected=list(range(start, start + n_shards)),
        done=done & set(range(start, start + n_shards)),
    )
    if plan.todo and importlib.util.find_spec("img2dataset") is None:
        raise MissingExtraError(f"downloading URL lists needs img2dataset: {INSTALL_HINT}")
    return plan


def _read_stats(output: str) -> dict[int, dict]:
    """Shard id -> img2dataset's stats for every finished shard in ``output``."""
    fs, root = fsspec.core.url_to_fs(output)
    if not fs.exists(root):
        return {}
    out = {}
    for path in fs.glob(root.rstrip("/") + "/*" + STATS_SUFFIX):
        name = path.rsplit("/", 1)[-1].removesuffix(STATS_SUFFIX)
        if not name.isdigit():
            continue
        try:
            with fs.open(path, "rb") as f:
                out[int(name)] = json.loads(f.read())
        except (OSError, ValueError):
            continue  # a stats file cut short: the shard is not done
    return out


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """img2dataset and its worker processes talk on stdout; keep stdout for our summary."""
    sys.stdout.flush()
    try:
        saved = os.dup(1)
    except OSError:  # no file descriptor 1
        saved = None
    if saved is not None:
        os.dup2(2, 1)  # also for the processes it spawns, which inherit descriptor 1
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        if saved is not None:
            os.dup2(saved, 1)
            os.close(saved)


def _ensure_ray(address: str | None) -> None:
    import ray

    if not ray.is_initialized():
        ray.init(address=address, runtime_env={"env_vars": QUIET_ENV}, log_to_driver=True)


@contextlib.contextmanager
def _watch(plan: IngestPlan, progress: Progress | None, period_s: float = 2.0) -> Iterator[None]:
    """Report the shards img2dataset finishes (their ``_stats.json``) while it runs."""
    if progress is None:
        yield
        return
    stop = threading.Event()
    seen: set[int] = set()

    def poll() -> None:
        for shard, stats in sorted(_read_stats(plan.output).items()):
            if shard in seen or shard not in set(plan.expected):
                continue
            seen.add(shard)
            ok = int(stats.get("successes", 0))
            count = int(stats.get("count", 0))
            progress.update(count, {"downloaded": ok, "failed": count - ok})
            progress.note(f"  shard {shard:0{SHARD_DIGITS}d}: {ok} of {count} URLs downloaded")

    def loop() -> None:
        while not stop.wait(period_s):
            poll()

    poll()  # shards an earlier run finished
    thread = threading.Thread(target=loop, name="ingest-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        poll()


def run_ingest(
    plan: IngestPlan, ray_address: str | None = None, progress: Progress | None = None
) -> IngestResult:
    """Download what the plan has left, then sum the shards' stats into an IngestResult.

    ``progress`` (total: the plan's URLs) counts the URLs of each shard as it finishes.
    """
    started = time.time()
    cfg = plan.cfg
    skipped = not plan.todo
    if progress is not None and progress.total is None:
        progress.total = plan.urls
    if not skipped:
        img2dataset = import_img2dataset()
        distributor = resolve_distributor(cfg.resources.distributor)
        if distributor == "ray":
            _ensure_ray(ray_address)
        with _stdout_to_stderr(), _watch(plan, progress):
            img2dataset.download(
                url_list=plan.url_list,
                output_folder=plan.output,
                input_format=plan.input_format,
                url_col=cfg.url_col,
                caption_col=plan.caption_col,
                output_format="webdataset",
                image_size=cfg.image_size,
                resize_mode=cfg.resize_mode,
                resize_only_if_bigger=cfg.resize_only_if_bigger,
                encode_format=cfg.encode_format,
                encode_quality=cfg.encode_quality,
                min_image_size=cfg.min_image_size,
                timeout=cfg.timeout,
                retries=cfg.retries,
                number_sample_per_shard=cfg.samples_per_shard,
                processes_count=cfg.resources.processes or min(MAX_AUTO_PROCESSES, os.cpu_count() or 1),
                thread_count=cfg.resources.threads,
                distributor=distributor,
                incremental_mode=cfg.incremental_mode,
                user_agent_token=cfg.user_agent_token,
                # None: img2dataset's list (noai, noimageai, noindex, noimageindex); []: ignore them
                disallowed_header_directives=None if cfg.respect_opt_out_headers else [],
                compute_hash="sha256",
                enable_wandb=False,
            )
    stats = _read_stats(plan.output)
    ids = sorted(i for i in stats if i in set(plan.expected)) if plan.expected else []
    result = IngestResult(
        output=plan.output,
        urls=plan.urls,
        shards=[f"{plan.output}/{i:0{SHARD_DIGITS}d}.tar" for i in ids],
        missing_shards=[f"{i:0{SHARD_DIGITS}d}" for i in plan.expected if i not in stats],
        skipped=skipped,
    )
    failures: Counter = Counter()
    for i in ids:
        s = stats[i]
        result.downloaded += int(s.get("successes", 0))
        result.failed_to_download += int(s.get("failed_to_download", 0))
        result.failed_to_resize += int(s.get("failed_to_resize", 0))
        failures.update({k: v for k, v in (s.get("status_dict") or {}).items() if k != "success"})
    result.failures = dict(failures.most_common())
    result.wall_s = time.time() - started
    return result


def ingest(
    url_list: str, output: str, cfg: IngestConfig | None = None, ray_address: str | None = None
) -> IngestResult:
    """Plan and run in one call (the library entry point of ``curate ingest``)."""
    return run_ingest(plan_ingest(url_list, output, cfg), ray_address=ray_address)
