"""The last task of every block: the keep policy, then the block's rows written as part files.

What leaves the task is a summary of a few fields per shard (``SUMMARY_SCHEMA``), so
neither rows nor images travel to the driver.
"""

from __future__ import annotations

from collections.abc import Iterator

import pyarrow as pa

from curate.config import DecodeConfig, PolicyConfig, RulesConfig
from curate.io.reader import read_shard
from curate.io.writer import SUMMARY_SCHEMA, ShardStreamWriter, write_part
from curate.stages.decode import decode_rows
from curate.stages.memory import release_free_memory
from curate.stages.policy import apply_policy_rows
from curate.stages.rows import shard_refs_of, to_rows


def finish_block(
    batch: pa.Table,
    policy: PolicyConfig,
    output: str,
    write_tars: bool = True,
    embeddings: str | None = None,
) -> pa.Table:
    """Ray Data entry point: decide each sample, write the block (with its embeddings of dtype
    ``embeddings``, when the run writes them), return its per-shard summary."""
    rows = apply_policy_rows(to_rows(batch), policy, keep_images=write_tars)
    summaries = write_part(rows, output, write_tars, embeddings)
    del rows
    release_free_memory()
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)


def convert_shards(
    batch: pa.Table,
    batch_size: int,
    decode: DecodeConfig,
    policy: PolicyConfig,
    output: str,
    write_tars: bool = True,
    rules: RulesConfig | None = None,
) -> Iterator[pa.Table]:
    """Ray Data entry point of a pipeline without models: each shard of ``batch`` read,
    its images checked (and ``rules`` applied), each sample decided and written, in this one task; yields the
    summary of every block (the last one of a shard carries its meta)."""
    writer = ShardStreamWriter(output, write_tars)
    try:
        for shard in shard_refs_of(batch):
            for rows in read_shard(shard, batch_size=batch_size):
                rows = decode_rows(rows, decode, keep_pixels=False, rules=rules)
                rows = apply_policy_rows(rows, policy, keep_images=write_tars)
                yield pa.Table.from_pylist(writer(rows, shard.url), schema=SUMMARY_SCHEMA)
                release_free_memory()
    except BaseException:
        writer.abort()  # nothing under a final name; a retry starts the shard afresh
        raise
