"""The paper-size random models (bench/paper_models.py, for bench/gpu.yaml) have the published
architectures' shapes, and the test fixtures' models are the tiny ones.

The paper sizes are built on the meta device: shapes and parameter counts without allocating
~1.3 B weights.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import transformers

from bench.paper_models import PAPER
from tests.random_models import TINY, blip_config, build_clip, clip_config, tokenizer


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper_tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("vocab")
    return tokenizer(d / "blip", PAPER.blip_vocab), tokenizer(d / "clip", PAPER.clip_vocab)


def test_paper_clip_is_vit_l_14(paper_tokenizers):
    _, tok = paper_tokenizers
    assert len(tok) == 49408
    with torch.device("meta"):
        model = transformers.CLIPModel(clip_config(tok, PAPER))
    # openai/clip-vit-large-patch14: 427,616,513 parameters
    assert _params(model) == pytest.approx(427_616_513, rel=1e-4)
    assert model.vision_model.embeddings.num_patches == (224 // 14) ** 2
    assert model.text_projection.out_features == 768


def test_paper_blip_is_vit_l_16_at_384_with_a_bert_base_decoder(paper_tokenizers):
    tok, _ = paper_tokenizers
    assert len(tok) == 30524  # bert-base-uncased + [DEC] + [ENC]
    with torch.device("meta"):
        captioner = transformers.BlipForConditionalGeneration(blip_config(tok, PAPER))
        itm = transformers.BlipForImageTextRetrieval(blip_config(tok, PAPER))
    vision = _params(captioner.vision_model)
    assert vision == pytest.approx(303e6, rel=0.01)  # ViT-L/16
    assert captioner.vision_model.embeddings.num_patches == (384 // 16) ** 2
    assert 420e6 < _params(captioner) < 480e6
    assert 420e6 < _params(itm) < 480e6
    assert captioner.text_decoder.bert.encoder.layer[0].crossattention.self.key.in_features == 1024


def _saved_dtypes(directory) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(directory / "model.safetensors"), framework="pt") as f:
        return {f.get_slice(name).get_dtype() for name in f.keys()}  # noqa: SIM118


def test_the_fixture_models_are_tiny_and_fp32(tiny_models):
    """The session fixture builds TINY (paper sizes would take minutes and gigabytes) in fp32."""
    config = transformers.BlipConfig.from_pretrained(tiny_models["captioner"])
    assert config.vision_config.hidden_size == TINY.vision["hidden_size"] == 32
    assert transformers.CLIPConfig.from_pretrained(tiny_models["clip"]).projection_dim == 32
    assert _saved_dtypes(tiny_models["itm"]) == {"F32"}


def test_bf16_shapes_are_saved_in_bf16(tmp_path):
    """The paper models are written in bf16 (half the disk); checked on the tiny shapes."""
    assert PAPER.bf16
    clip = build_clip(tmp_path / "clip", shapes=dataclasses.replace(TINY, bf16=True))
    assert _saved_dtypes(clip) == {"BF16"}
