from __future__ import annotations

from pathlib import Path

import pytest

from tests.explore.run_output import make_run_output


@pytest.fixture(scope="module")
def run_out(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hand-written run output of tests/explore/run_output.py, once per test module."""
    return make_run_output(tmp_path_factory.mktemp("run"))
