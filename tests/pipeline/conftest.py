from __future__ import annotations

import pytest


@pytest.fixture(scope="session")
def ray_local(tmp_path_factory: pytest.TempPathFactory):
    """A real in-process Ray, shared by the pipeline tests of this session."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=4,
            include_dashboard=False,
            log_to_driver=False,
            _temp_dir=str(tmp_path_factory.mktemp("ray")),
            configure_logging=False,
        )
    yield ray
    ray.shutdown()
