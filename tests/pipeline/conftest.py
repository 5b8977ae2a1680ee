from __future__ import annotations

import tempfile

import pytest


@pytest.fixture
def ray_local():
    """A real in-process Ray, started on first use and shared by later tests.

    Function-scoped on purpose: the cluster test shuts it down before `ray stop`, and
    the next test that needs it starts it again.
    """
    import ray

    if not ray.is_initialized():
        ray.init(
            address="local",
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=tempfile.mkdtemp(prefix="ray-"),
            configure_logging=False,
        )
    return ray
