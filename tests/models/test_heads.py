"""The quality filters' models: the image classifier (NSFW, watermark) and LAION's aesthetic head.

The real checkpoints (Falconsai/nsfw_image_detection, amrul-hzz/watermark_detector, LAION's
sac+logos+ava1-l14-linearMSE) cannot be downloaded here: these tests build tiny random models
of the same layouts in temp dirs (tests/random_models.py) and load them through the production
code path.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from curate.config import AestheticConfig, ConfigError, pipeline_from_dict
from curate.models.aesthetic import AestheticHead
from curate.models.base import LoadOptions
from curate.models.classifier import ImageClassifier
from tests.helpers import noise_image
from tests.random_models import build_aesthetic_head, build_image_classifier


@pytest.fixture(scope="module")
def classifier_dir(tmp_path_factory):
    return build_image_classifier(tmp_path_factory.mktemp("nsfw"), ["normal", "nsfw"], seed=4)


def test_classifier_gives_the_probability_of_its_label(classifier_dir):
    from transformers import AutoModelForImageClassification

    images = [noise_image(40, 30, seed=i) for i in range(5)]
    by_name = ImageClassifier(LoadOptions(str(classifier_dir)), "NSFW", device="cpu", batch_size=2)
    by_index = ImageClassifier(LoadOptions(str(classifier_dir)), 1, device="cpu")
    assert by_name.label == 1 and by_name.label_name == "nsfw"
    scores = by_name(images)
    assert scores == pytest.approx(by_index(images), abs=1e-6)  # batches of 2 and of 5
    # the same softmax a plain transformers forward gives
    model = AutoModelForImageClassification.from_pretrained(classifier_dir).eval()
    pixels = by_name.processor(images=images, return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        expected = model(pixel_values=pixels).logits.softmax(-1)[:, 1].tolist()
    assert scores == pytest.approx(expected, abs=1e-6)
    assert len(set(np.round(scores, 6))) == len(images)  # image-dependent, not a constant


def test_a_label_the_model_does_not_have_is_refused_before_any_work(classifier_dir):
    with pytest.raises(ValueError, match=r"its classes: 0: 'normal', 1: 'nsfw'"):
        ImageClassifier(LoadOptions(str(classifier_dir)), "watermark", device="cpu")
    with pytest.raises(ConfigError, match=r"^nsfw\.label: label 'porn'"):
        pipeline_from_dict({"name": "p", "nsfw": {"model": str(classifier_dir), "label": "porn"}})
    with pytest.raises(ConfigError, match=r"^watermark\.max_score"):
        pipeline_from_dict(
            {"name": "p", "watermark": {"model": str(classifier_dir), "label": 1, "max_score": 2}}
        )


def test_aesthetic_head_matches_laions_mlp(tmp_path):
    path = build_aesthetic_head(tmp_path / "head.safetensors", dim=12, hidden=(16, 8), seed=2)
    from safetensors.torch import load_file

    state = load_file(path)
    # LAION's nn.Sequential(Linear, Dropout, Linear, Dropout, Linear), in eval mode
    mlp = torch.nn.Sequential(
        torch.nn.Linear(12, 16), torch.nn.Dropout(0.2), torch.nn.Linear(16, 8), torch.nn.Dropout(0.1)
    )
    mlp.append(torch.nn.Linear(8, 1))
    mlp.load_state_dict({k.replace("layers.", ""): v for k, v in state.items()})
    mlp.eval()
    x = np.random.default_rng(0).normal(size=(6, 12)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    with torch.no_grad():
        expected = mlp(torch.from_numpy(x))[:, 0].tolist()
    # as a file, and as a directory holding it under ``filename``
    for model, filename in ((str(path), "model.safetensors"), (str(tmp_path), "head.safetensors")):
        head = AestheticHead(AestheticConfig(model=model, filename=filename))
        assert head(x) == pytest.approx(expected, abs=1e-5)
    relu = AestheticHead(AestheticConfig(model=str(path), activation="relu"))
    assert relu(x) != pytest.approx(expected, abs=1e-5)
    with pytest.raises(ValueError, match="takes 12-d image embeddings"):
        head(x[:, :8])


def test_aesthetic_head_loads_laions_v1_linear_and_refuses_pickles_unless_allowed(tmp_path):
    from safetensors.torch import save_file

    weight, bias = torch.randn(1, 4), torch.randn(1)
    save_file({"weight": weight, "bias": bias}, str(tmp_path / "linear.safetensors"))
    head = AestheticHead(AestheticConfig(model=str(tmp_path / "linear.safetensors")))
    x = np.eye(4, dtype=np.float32)
    assert head(x) == pytest.approx((weight[0] + bias).tolist(), abs=1e-6)

    torch.save({"weight": weight, "bias": bias}, tmp_path / "linear.pth")
    with pytest.raises(RuntimeError, match="is a pickle"):
        AestheticHead(AestheticConfig(model=str(tmp_path / "linear.pth")))
    allowed = AestheticHead(AestheticConfig(model=str(tmp_path / "linear.pth"), allow_pickle_weights=True))
    assert allowed(x) == pytest.approx(head(x), abs=1e-6)

    save_file(
        {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(2, 5)}, str(tmp_path / "bad.safetensors")
    )
    with pytest.raises(RuntimeError, match="takes 5 inputs but the layer before gives 3"):
        AestheticHead(AestheticConfig(model=str(tmp_path / "bad.safetensors")))


def test_aesthetic_needs_a_ranker():
    with pytest.raises(ConfigError, match=r"^aesthetic: needs a 'ranker'"):
        pipeline_from_dict({"name": "p", "aesthetic": {"model": "x.safetensors"}})
    with pytest.raises(ConfigError, match=r"^aesthetic\.activation"):
        pipeline_from_dict({"name": "p", "aesthetic": {"model": "x.safetensors", "activation": "gelu"}})
