from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["TOKENIZERS_PARALLELISM"] = "false"

from pathlib import Path

import pytest

from tests.helpers import make_shard as _make_shard
from tests.helpers import start_local_ray


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Tiny random-weight BLIP captioner, BLIP ITM and CLIP directories, built once per session."""
    from tests.random_models import build_all

    return build_all(tmp_path_factory.mktemp("tiny_models"))


@pytest.fixture
def make_shard():
    """``make_shard(path, samples) -> Path``: see tests.helpers.make_shard."""
    return _make_shard


@pytest.fixture
def ray_local():
    """A real in-process Ray (function-scoped: see tests.helpers.start_local_ray)."""
    return start_local_ray()
