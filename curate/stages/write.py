"""The last task of every block: the keep policy, then the block's rows written as part files.

What leaves the task is a summary of a few fields per shard (``SUMMARY_SCHEMA``), so
neither rows nor images travel to the driver.
"""

from __future__ import annotations

import pyarrow as pa

from curate.config import PolicyConfig
from curate.io.writer import SUMMARY_SCHEMA, write_part
from curate.stages.memory import release_free_memory
from curate.stages.policy import apply_policy_rows
from curate.stages.rows import to_rows


def finish_block(batch: pa.Table, policy: PolicyConfig, output: str, write_tars: bool = True) -> pa.Table:
    """Ray Data entry point: decide each sample, write the block, return its per-shard summary."""
    rows = apply_policy_rows(to_rows(batch), policy, keep_images=write_tars)
    summaries = write_part(rows, output, write_tars)
    del rows
    release_free_memory()
    return pa.Table.from_pylist(summaries, schema=SUMMARY_SCHEMA)
