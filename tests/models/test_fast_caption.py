"""BLIP and BLIP-2 captioning without generate(): the captions generate() writes, with less work.

The reference is transformers' own ``generate`` of ``BlipForConditionalGeneration`` and
``Blip2ForConditionalGeneration`` (its top-p warper, repetition penalty and min-length
processors) on real, tiny, random models: for the same seeds, both paths must write the
same captions. Work is counted where it repeats: BLIP's cross-attention key projection,
which sees every image token once per row that attends to it, and the rows of BLIP-2's
prompt prefill.
"""

from __future__ import annotations

import copy

import pytest
import torch

from curate.models.base import LoadOptions
from curate.models.captioner import GenerationSettings, HFCaptioner, open_captioner
from tests.helpers import noise_image

SEEDS = [3, 1, 4, 1, 5, 9]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def images():
    return [noise_image(24 + 4 * i, 40 - 3 * i, seed=i) for i in range(len(SEEDS))]


@pytest.fixture(scope="module")
def loaded(tiny_models) -> HFCaptioner:
    model = open_captioner(LoadOptions(str(tiny_models["captioner"])), GenerationSettings(), device="cpu")
    assert isinstance(model, HFCaptioner)
    return model


@pytest.fixture(scope="module")
def loaded_blip2(tmp_path_factory) -> HFCaptioner:
    from tests.random_models import build_tiny_blip2

    directory = build_tiny_blip2(tmp_path_factory.mktemp("blip2") / "blip2", seed=5)
    model = open_captioner(LoadOptions(str(directory)), GenerationSettings(), device="cpu")
    assert isinstance(model, HFCaptioner)
    return model


def _with(loaded: HFCaptioner, **settings) -> HFCaptioner:
    model = copy.copy(loaded)
    settings.setdefault("num_captions", 4)
    settings.setdefault("max_new_tokens", 10)
    settings.setdefault("dedupe", False)
    model.settings = GenerationSettings(**settings)
    return model


def _both(loaded: HFCaptioner, images, **settings) -> tuple[list[list[str]], list[list[str]]]:
    fast = _with(loaded, fast_decoding=True, **settings)
    slow = _with(loaded, fast_decoding=False, **settings)
    assert fast.fast and not slow.fast
    return fast(images, seeds=SEEDS), slow(images, seeds=SEEDS)


@pytest.mark.parametrize(
    "settings",
    [
        {},
        {"prompt": "a picture of"},
        {"top_p": 0.5, "temperature": 0.7},
        {"repetition_penalty": 1.5, "min_new_tokens": 4},
        {"top_p": 1.0, "num_captions": 1},
    ],
    ids=["default", "prompt", "top_p-temperature", "penalty-min-tokens", "full-vocabulary"],
)
@pytest.mark.parametrize("kind", ["blip", "blip-2"])
def test_fast_path_writes_generates_captions(loaded, loaded_blip2, images, settings, kind):
    fast, slow = _both(loaded if kind == "blip" else loaded_blip2, images, **settings)
    assert fast == slow
    n = settings.get("num_captions", 4)
    # a random OPT can sample special tokens only, which decode empty and are dropped
    assert all(len(c) == n for c in fast) if kind == "blip" else sum(map(len, fast)) >= n * len(fast) - 2
    assert len({c for row in fast for c in row}) > n  # sampled: the captions differ


@pytest.fixture
def ending_early(loaded):
    """The captioner with its end token made likely, so rows finish at different steps
    and leave the fast path's batch (a random decoder almost never ends a caption)."""
    model = copy.copy(loaded)
    model.model = copy.deepcopy(loaded.model)
    sep = model.model.config.text_config.sep_token_id
    with torch.no_grad():
        model.model.text_decoder.cls.predictions.bias[sep] += 4.0
    return model


def test_rows_that_finish_leave_the_batch_and_the_captions_stay_the_same(ending_early, images):
    fast, slow = _both(ending_early, images, max_new_tokens=12)
    assert fast == slow
    lengths = {len(c.split()) for row in fast for c in row}
    assert len(lengths) > 2 and max(lengths) < 12  # captions of many lengths, none cut at the limit


def _image_rows_seen(model: HFCaptioner, images) -> int:
    """Rows that passed all image tokens through the first cross-attention's key projection."""
    layer = model.model.text_decoder.bert.encoder.layer[0].crossattention.self.key
    seen = []
    handle = layer.register_forward_hook(lambda _m, args, _out: seen.append(args[0].shape[:2]))
    try:
        model(images, seeds=SEEDS)
    finally:
        handle.remove()
    image_tokens = max(t for _, t in seen)
    return sum(b for b, t in seen if t == image_tokens)


def test_each_image_is_attended_to_once_not_once_per_caption(loaded, images):
    fast = _image_rows_seen(_with(loaded, fast_decoding=True), images)
    slow = _image_rows_seen(_with(loaded, fast_decoding=False), images)
    assert fast == len(images)
    assert slow == 4 * len(images)  # generate repeats each image for each of its 4 captions


def test_blip2_prefills_each_prompt_once_not_once_per_caption(loaded_blip2, images):
    def prefill_rows(model: HFCaptioner) -> int:
        rows = []

        def hook(_module, _args, kwargs):
            if kwargs.get("inputs_embeds") is not None:
                rows.append(kwargs["inputs_embeds"].shape[0])

        handle = model.model.language_model.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            model(images, seeds=SEEDS)
        finally:
            handle.remove()
        return sum(rows)

    assert prefill_rows(_with(loaded_blip2, fast_decoding=True)) == len(images)
    assert prefill_rows(_with(loaded_blip2, fast_decoding=False)) == 4 * len(images)


def test_beam_search_and_the_switch_keep_generate(loaded, images):
    assert not _with(loaded, decoding="beam", num_beams=4).fast
    assert not _with(loaded, fast_decoding=False).fast
    beams = _with(loaded, decoding="beam", num_beams=4)(images[:2])
    assert [len(c) for c in beams] == [4, 4]


def test_pipeline_option_reaches_the_captioner(tiny_models):
    from curate.config import CaptionerConfig
    from curate.models.captioner import generation_settings

    assert generation_settings(CaptionerConfig(model="m")).fast_decoding is True
    assert generation_settings(CaptionerConfig(model="m", fast_decoding=False)).fast_decoding is False
