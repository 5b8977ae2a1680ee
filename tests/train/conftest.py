from __future__ import annotations

import tempfile

import pytest


@pytest.fixture
def ray_train_local():
    """A fresh in-process Ray for Ray Train tests, shut down afterwards.

    Any Ray already up in this process (the pipeline tests' shared one) is shut down
    first: Ray Train needs its workers' CPUs free, and the next pipeline test that needs
    Ray starts it again (tests/pipeline/conftest.py).
    """
    import ray

    if ray.is_initialized():
        ray.shutdown()
    ray.init(
        address="local",
        num_cpus=4,
        include_dashboard=False,
        log_to_driver=False,
        configure_logging=False,
        _temp_dir=tempfile.mkdtemp(prefix="ray-"),
    )
    yield ray
    ray.shutdown()
