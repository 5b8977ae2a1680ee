"""Property test: mutated tars never crash the reader/decoder/policy chain, and every
sample the reader could parse is accounted for exactly once."""

from __future__ import annotations

import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from curate.config import DecodeConfig, PolicyConfig
from curate.io.reader import ShardRef, read_shard
from curate.schema import ROW_SAMPLE, ROW_SHARD_END, STATUSES
from curate.stages.decode import decode_rows
from curate.stages.policy import apply_policy_rows
from tests.helpers import image_bytes, write_tar


def _valid_tar() -> bytes:
    with tempfile.TemporaryDirectory() as d:
        path = write_tar(
            Path(d) / "s.tar",
            [
                m
                for i in range(4)
                for m in [
                    (
                        f"k{i}.jpg" if i % 2 else f"k{i}.png",
                        image_bytes(20, 16, "jpg" if i % 2 else "png", i),
                    ),
                    (f"k{i}.txt", f"caption {i}".encode()),
                    (f"k{i}.json", b'{"url": "http://x"}'),
                ]
            ],
        )
        return path.read_bytes()


VALID = _valid_tar()

mutation = st.one_of(
    st.tuples(st.just("truncate"), st.integers(0, len(VALID)), st.just(0)),
    st.tuples(st.just("flip"), st.integers(0, len(VALID) - 1), st.integers(0, 255)),
    st.tuples(st.just("insert"), st.integers(0, len(VALID)), st.integers(0, 255)),
    st.tuples(st.just("zero_block"), st.integers(0, len(VALID) // 512), st.just(0)),
)


def _mutate(data: bytes, ops: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for op, pos, val in ops:
        pos = min(pos, len(buf))
        if op == "truncate":
            del buf[pos:]
        elif op == "flip" and pos < len(buf):
            buf[pos] = val
        elif op == "insert":
            buf[pos:pos] = bytes([val]) * 7
        elif op == "zero_block":
            buf[pos * 512 : pos * 512 + 512] = bytes(min(512, max(0, len(buf) - pos * 512)))
    return bytes(buf)


@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ops=st.lists(mutation, min_size=1, max_size=3))
def test_mutated_tars_are_accounted_for(ops, tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "00000.tar"
    path.write_bytes(_mutate(VALID, ops))
    rows = [r for batch in read_shard(ShardRef(url=str(path), name="00000"), batch_size=3) for r in batch]
    ends = [r for r in rows if r["row_type"] == ROW_SHARD_END]
    samples = [r for r in rows if r["row_type"] == ROW_SAMPLE]
    assert len(ends) == 1 and ends[-1] is rows[-1]
    assert ends[0]["shard_total"] == len(samples)
    assert len({r["key"] for r in samples}) == len(samples)
    samples = apply_policy_rows(decode_rows(samples, DecodeConfig()), PolicyConfig())
    for r in samples:
        assert r["status"] in STATUSES
        if r["status"] == "error":
            assert r["error"]
        if r["status"] == "dropped":
            assert r["reason"]
        if r["status"] == "kept":
            assert r["caption"] == r["alt_text"]
    if ends[0]["shard_error"] is None and not samples:
        # a tar that reads cleanly with no sample must really hold no file members
        import tarfile

        with tarfile.open(path) as tar:
            assert not [m for m in tar.getmembers() if m.isfile()]
