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


COLOURS = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (20, 40, 220),
    "yellow": (240, 220, 20),
    "white": (250, 250, 250),
    "black": (10, 10, 10),
}


def colour_image(colour: tuple[int, int, int], seed: int):
    """A 40x32 image of one colour with a little noise: easy to tell apart, never identical."""
    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(seed).integers(-20, 21, (32, 40, 3))
    return Image.fromarray(np.clip(np.array(colour) + noise, 0, 255).astype(np.uint8), "RGB")


def web_samples(shard: int, n: int = 8) -> list[dict]:
    """Web-like samples whose alt-text names the image's colour (words the tiny tokenizers know)."""
    names = list(COLOURS)
    out = []
    for i in range(n):
        name = names[(shard * n + i) % len(names)]
        shape = ("circle", "square")[(shard * n + i) // len(names) % 2]
        out.append(
            {
                "key": f"{shard}{i:03d}",
                "image": colour_image(COLOURS[name], seed=100 * shard + i),
                "format": "png",
                "txt": f"a {name} {shape}",
            }
        )
    return out


@pytest.fixture(scope="session")
def colour_samples():
    """``colour_samples(shard, n=8) -> [sample dict]``: see ``web_samples``."""
    return web_samples


@pytest.fixture(scope="session")
def curated_run(tiny_models, tmp_path_factory):
    """A real curation run (local Ray, the tiny random models) over two small web shards: its
    ``OUT/shards/*.tar`` is what the training scripts read (``KEY.json`` with kept captions)."""
    from curate.config import pipeline_from_dict
    from curate.io.reader import expand_inputs, shard_refs
    from curate.pipeline import run_pipeline
    from tests.helpers import make_shard, start_local_ray

    root = tmp_path_factory.mktemp("curated_run")
    for s in range(2):
        make_shard(root / "web" / f"{s:05d}.tar", web_samples(s))
    cfg = pipeline_from_dict(
        {
            "name": "train_fixture",
            "captioner": {"model": str(tiny_models["captioner"]), "num_captions": 1, "max_new_tokens": 5,
                          "resources": {"device": "cpu"}},
            "filter": {"model": str(tiny_models["itm"]), "resources": {"device": "cpu"}},
            "policy": {"itm_threshold": 0.0},  # keep every text: the alt-text and a caption per sample
            "decode": {"min_side": 8},
        }
    )  # fmt: skip
    start_local_ray()
    out = root / "out"
    run_pipeline(cfg, shard_refs(expand_inputs(str(root / "web" / "*.tar"))), str(out))
    return out
