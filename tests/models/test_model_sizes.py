"""The paper-size random models (bench/gpu.yaml) have the published architectures' shapes.

Built on the meta device: shapes and parameter counts without allocating ~1.3 B weights.
"""

from __future__ import annotations

import pytest
import torch
import transformers

from curate.tiny_models import SIZES, _tokenizer, blip_config, build_all, clip_config


def _params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.fixture(scope="module")
def paper_tokenizers(tmp_path_factory):
    d, shape = tmp_path_factory.mktemp("vocab"), SIZES["paper"]
    return _tokenizer(d / "blip", shape["blip_vocab"]), _tokenizer(d / "clip", shape["clip_vocab"])


def test_paper_clip_is_vit_l_14(paper_tokenizers):
    _, tok = paper_tokenizers
    assert len(tok) == 49408
    with torch.device("meta"):
        model = transformers.CLIPModel(clip_config(tok, "paper"))
    # openai/clip-vit-large-patch14: 427,616,513 parameters
    assert _params(model) == pytest.approx(427_616_513, rel=1e-4)
    assert model.vision_model.embeddings.num_patches == (224 // 14) ** 2
    assert model.text_projection.out_features == 768


def test_paper_blip_is_vit_l_16_at_384_with_a_bert_base_decoder(paper_tokenizers):
    tok, _ = paper_tokenizers
    assert len(tok) == 30524  # bert-base-uncased + [DEC] + [ENC]
    with torch.device("meta"):
        captioner = transformers.BlipForConditionalGeneration(blip_config(tok, "paper"))
        itm = transformers.BlipForImageTextRetrieval(blip_config(tok, "paper"))
    vision = _params(captioner.vision_model)
    assert vision == pytest.approx(303e6, rel=0.01)  # ViT-L/16
    assert captioner.vision_model.embeddings.num_patches == (384 // 16) ** 2
    assert 420e6 < _params(captioner) < 480e6
    assert 420e6 < _params(itm) < 480e6
    assert captioner.text_decoder.bert.encoder.layer[0].crossattention.self.key.in_features == 1024


def test_tiny_is_the_default_and_unknown_sizes_are_refused(tmp_path):
    assert SIZES["tiny"]["vision"]["hidden_size"] == 32
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        build_all(tmp_path, size="huge")
