"""``curate query``: the read-only views, the export formats, and docs/queries.md."""

from __future__ import annotations

import copy
import io
import json
import re
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from curate import explore
from curate.cli import main
from curate.config import PolicyConfig
from curate.schema import SAMPLES_SCHEMA, candidate_score
from curate.stages.policy import decide
from tests.explore.run_output import POLICY, SAMPLES, cand

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs" / "queries.md"


def _query(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["query", *args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_the_fixture_is_what_the_keep_policy_decides():
    """The hand-written statuses, reasons and kept flags are the real policy's, for those scores."""
    policy = PolicyConfig(**POLICY)
    for samples in SAMPLES.values():
        for s in samples:
            if s["status"] == "error":
                continue
            cands = copy.deepcopy(s["candidates"])
            kept, reason = decide(cands, policy)
            assert reason == s.get("reason"), s["key"]
            assert ("dropped" if reason else "kept") == s["status"], s["key"]
            assert [c["kept"] for c in cands] == [c["kept"] for c in s["candidates"]], s["key"]
            assert [c["text"] for c in kept] == ([s["caption"]] if s["status"] == "kept" else []), s["key"]


def test_query_table(run_out, capsys):
    code, out, _ = _query(
        capsys, str(run_out), "SELECT status, count(*) AS n FROM samples GROUP BY ALL ORDER BY ALL"
    )
    assert code == 0
    lines = out.splitlines()
    assert lines[0].split("|")[0].strip() == "status"
    assert [re.split(r"\s*\|\s*", line.strip()) for line in lines[2:5]] == [
        ["dropped", "3"],
        ["error", "1"],
        ["kept", "4"],
    ]
    assert lines[-1] == "(3 rows)" and len(lines) == 6


def test_query_table_truncates_and_escapes(run_out, capsys):
    code, out, _ = _query(
        capsys, str(run_out), "SELECT key, error FROM samples ORDER BY key", "--max-rows", "2"
    )
    assert code == 0
    lines = out.splitlines()
    assert [line.split("|")[0].strip() for line in lines[2:-1]] == ["k0000", "k0001"]  # header, rule, 2 rows
    assert lines[-1].startswith("(8 rows, first 2 shown")
    code, out, _ = _query(capsys, str(run_out), "SELECT error FROM samples WHERE status = 'error'")
    assert code == 0
    # a newline in data cannot break the table: one header, one rule, one row, the footer
    assert len(out.splitlines()) == 4 and "cannot identify image file\\nTraceback" in out
    code, out, _ = _query(capsys, str(run_out), "SELECT chr(27) || '[31mred' AS x")
    assert code == 0
    assert "\x1b" not in out and "\\x1b[31mred" in out


def test_query_csv_json_jsonl(run_out, capsys):
    sql = "SELECT key, status, caption FROM samples WHERE shard = '00000' ORDER BY key"
    code, out, _ = _query(capsys, str(run_out), sql, "--format", "csv")
    assert code == 0
    assert out.splitlines() == [
        "key,status,caption",
        "k0000,kept,a red box",
        "k0001,kept,blue <b>sky</b> & sea",
        "k0002,dropped,",
    ]
    code, out, _ = _query(capsys, str(run_out), sql, "--format", "json")
    assert code == 0
    assert json.loads(out) == [
        {"key": "k0000", "status": "kept", "caption": "a red box"},
        {"key": "k0001", "status": "kept", "caption": "blue <b>sky</b> & sea"},
        {"key": "k0002", "status": "dropped", "caption": None},
    ]
    code, out, _ = _query(capsys, str(run_out), sql, "--format", "jsonl")
    assert code == 0
    assert [json.loads(line) for line in out.splitlines()] == [
        {"key": "k0000", "status": "kept", "caption": "a red box"},
        {"key": "k0001", "status": "kept", "caption": "blue <b>sky</b> & sea"},
        {"key": "k0002", "status": "dropped", "caption": None},
    ]


def test_query_to_file(run_out, tmp_path, capsys):
    sql = "SELECT key, source, text, clip_score FROM candidates WHERE is_best ORDER BY key"
    target = tmp_path / "best.parquet"
    code, _, err = _query(capsys, str(run_out), sql, "--to", str(target))  # format from the extension
    assert code == 0 and str(target) in err
    table = pq.read_table(target)
    assert table.column("key").to_pylist() == ["k0000", "k0001", "k0100", "k0201"]
    assert table.column("source").to_pylist() == ["synthetic", "alt", "synthetic", "kale"]
    csv_target = tmp_path / "best.txt"
    code, _, _ = _query(capsys, str(run_out), sql, "--format", "csv", "--to", str(csv_target))
    assert code == 0
    lines = csv_target.read_text().splitlines()
    assert lines[0] == "key,source,text,clip_score" and len(lines) == 5
    code, _, err = _query(capsys, str(run_out), sql, "--to", str(tmp_path / "best.xyz"))
    assert code == 2 and "--format" in err and not (tmp_path / "best.xyz").exists()
    inside = run_out / "samples" / "extra.parquet"
    code, _, err = _query(capsys, str(run_out), sql, "--to", str(inside))
    assert code == 2 and "samples directory" in err and not inside.exists()


def test_query_parquet_to_stdout(run_out, capsysbinary):
    assert main(["query", str(run_out), "SELECT key FROM samples ORDER BY key", "--format", "parquet"]) == 0
    data = capsysbinary.readouterr().out
    assert data[:4] == b"PAR1"
    assert pq.read_table(io.BytesIO(data)).column("key").to_pylist() == sorted(
        s["key"] for samples in SAMPLES.values() for s in samples
    )


@pytest.mark.parametrize(
    ("sql", "message"),
    [
        ("COPY samples TO '{tmp}/x.csv'", "only SELECT-like statements"),
        (
            "COPY (SELECT 1 AS key) TO '{samples}/00000.parquet' (FORMAT parquet, USE_TMP_FILE false)",
            "only SELECT-like statements",
        ),
        ("CREATE TABLE t AS SELECT * FROM samples", "only SELECT-like statements"),
        ("ATTACH '{tmp}/x.duckdb' AS x", "only SELECT-like statements"),
        ("INSTALL httpfs", "only SELECT-like statements"),
        ("SET enable_external_access = true", "only SELECT-like statements"),
        ("SELECT 1; COPY samples TO '{tmp}/x.csv'", "exactly one SQL statement (got 2)"),
    ],
)
def test_query_refuses_writes(run_out, tmp_path, capsys, sql, message):
    before = {p.name: p.read_bytes() for p in (run_out / "samples").iterdir()}
    code, out, err = _query(capsys, str(run_out), sql.format(samples=run_out / "samples", tmp=tmp_path))
    assert code == 2
    assert "curate query: error: " in err and message in err and out == ""
    assert list(tmp_path.iterdir()) == []
    assert {p.name: p.read_bytes() for p in (run_out / "samples").iterdir()} == before


def test_locked_connection_refuses_files_even_for_select(run_out):
    con = explore.connect(run_out)
    with pytest.raises(duckdb.Error, match="disabled by configuration"):
        explore.execute(con, "SELECT * FROM read_csv('/etc/passwd')").fetchall()
    with pytest.raises(duckdb.Error, match="locked"):
        con.execute("SET enable_external_access = true")
    # DuckDB alone would let a COPY overwrite an allowed file: execute() must refuse it
    with pytest.raises(explore.ReadOnlyQueryError):
        explore.execute(con, f"COPY samples TO '{run_out}/samples/00000.parquet'")
    con.close()


def test_query_errors(run_out, tmp_path, capsys):
    code, _, err = _query(capsys, str(run_out), "SELEC * FROM samples")
    assert code == 2 and "Parser Error" in err
    code, _, err = _query(capsys, str(run_out), "SELECT nope FROM samples")
    assert code == 2 and "nope" in err
    missing = tmp_path / "nowhere"
    code, _, err = _query(capsys, str(missing), "SELECT 1")
    assert code == 2 and f"run output not found: {missing}" in err
    empty = tmp_path / "empty"
    (empty / "samples").mkdir(parents=True)
    for command in (["query", str(empty), "SELECT 1"], ["stats", str(empty)], ["report", str(empty)]):
        assert main(command) == 2
        assert f"no samples Parquet in run output: {empty / 'samples'}" in capsys.readouterr().err


def test_candidates_view(run_out):
    table = explore.run_query(
        run_out,
        "SELECT key, candidate_index, source, clip_score, score, score_rank, is_best FROM candidates "
        "ORDER BY key, candidate_index",
    )
    rows = {(r["key"], r["candidate_index"]): r for r in table.to_pylist()}
    assert len(rows) == 15  # 7 samples with candidates: 2 each, k0201 has 3; the error row has none
    assert rows[("k0201", 2)] == {
        "key": "k0201",
        "candidate_index": 2,
        "source": "kale",
        "clip_score": pytest.approx(0.38),
        "score": pytest.approx(0.38),
        "score_rank": 1,
        "is_best": True,
    }
    assert rows[("k0201", 3)]["score_rank"] == 2 and rows[("k0201", 1)]["score_rank"] == 3
    assert all(r["score"] == r["clip_score"] for r in rows.values())  # every candidate has a CLIP score
    best = sorted(key for (key, _), r in rows.items() if r["is_best"])
    assert best == ["k0000", "k0001", "k0100", "k0201"]  # the kept samples, one best each


def test_score_is_clip_else_itm_in_sql_and_python(tmp_path):
    """The view's ``score`` and ``score_rank`` follow curate.schema.candidate_score, also for a
    CapFilt-only run (no CLIP scores) and for texts no model scored."""
    cands = [
        cand("both", "alt", 0.9, 0.3, True),
        cand("itm only", "synthetic", 0.7, None, False),
        cand("clip only", "synthetic", None, 0.2, False),
        cand("neither", "kale", None, None, False),
    ]
    assert [candidate_score(c) for c in cands] == [0.3, 0.7, 0.2, None]
    row = {"key": "k", "shard": "s", "status": "kept", "caption": "both", "candidates": cands}
    (tmp_path / "samples").mkdir()
    pq.write_table(pa.Table.from_pylist([row], schema=SAMPLES_SCHEMA), tmp_path / "samples" / "s.parquet")
    got = explore.run_query(
        tmp_path, "SELECT text, score, score_rank FROM candidates ORDER BY candidate_index"
    )
    scores = [None if r["score"] is None else round(r["score"], 6) for r in got.to_pylist()]
    assert scores == [candidate_score(c) for c in cands]
    assert [r["score_rank"] for r in got.to_pylist()] == [2, 1, 3, 4]  # an unscored text ranks last


# ---------------------------------------------------------------- docs/queries.md


def _doc_blocks() -> list[str]:
    return re.findall(r"```sql\n(.*?)```", DOCS.read_text(), flags=re.S)


def test_docs_view_definitions_match_the_library():
    setup = next(b for b in _doc_blocks() if "CREATE VIEW candidates" in b)
    normalize = lambda s: " ".join(s.split())  # noqa: E731
    assert normalize(explore.CANDIDATES_VIEW_SQL) in normalize(setup)
    assert normalize(explore.samples_view_sql("out/samples/*.parquet")) in normalize(setup)


def test_docs_queries_run(run_out):
    """Every SQL block in docs/queries.md runs in plain duckdb; view queries also via curate query."""
    blocks = _doc_blocks()
    assert len(blocks) >= 6
    plain = duckdb.connect()
    for block in blocks:
        if "duplicate" in block:  # need a deduplicated run: tests/dedup/test_explore.py runs them
            continue
        sql = block.replace("'out/", f"'{run_out}/")
        if "CREATE VIEW" in block:
            for statement in plain.extract_statements(sql):
                plain.execute(statement.query)
            continue
        expected = plain.sql(sql).fetchall()
        assert expected, f"docs query returned nothing:\n{block}"
        if "'out/" not in block:
            assert explore.run_query(run_out, block).to_pylist() == [
                dict(zip(plain.sql(sql).columns, row)) for row in expected
            ], block
    # answers the docs promise, on this data
    keep = dict(
        plain.sql(
            "SELECT shard, keep_rate FROM ("
            + next(b for b in blocks if "keep rate per shard" in b).rstrip("; \n")
            + ")"
        ).fetchall()
    )
    assert keep == {
        "00000": pytest.approx(2 / 3, abs=1e-3),
        "00001": pytest.approx(1 / 3, abs=1e-3),
        "00002": pytest.approx(0.5),
    }
    lost = plain.sql(next(b for b in blocks if "lost to a synthetic" in b).replace("'out/", f"'{run_out}/"))
    assert sorted(r[lost.columns.index("key")] for r in lost.fetchall()) == ["k0000", "k0100"]
    wins = plain.sql(next(b for b in blocks if "which source wins" in b)).fetchall()
    assert {r[0]: r[1] for r in wins} == {"synthetic": 2, "alt": 1, "kale": 1}


def test_docs_hugging_face_datasets(run_out):
    datasets = pytest.importorskip("datasets")
    ds = datasets.load_dataset("parquet", data_files=str(run_out / "samples" / "*.parquet"), split="train")
    assert ds.num_rows == 8 and "candidates" in ds.column_names
