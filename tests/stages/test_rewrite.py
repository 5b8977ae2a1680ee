"""KALE rewrite: prompt construction, guard rails, the transformers backend, the stage.

The language models are tiny LlamaForCausalLM built from a config with a word-level
tokenizer that has a chat template, saved to a temp dir and loaded through the same
code path as a Hugging Face model. Zeroing the final norm makes every logit equal, so
greedy decoding emits vocabulary id 0 forever: the vocabulary order then picks a
model that answers nothing (id 0 = end token) or one word (id 0 = 'cat').
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from curate.config import (
    DEFAULT_REWRITE_SYSTEM_PROMPT,
    DEFAULT_REWRITE_TEMPLATE,
    ConfigError,
    ModelResources,
    PolicyConfig,
    RewriterConfig,
    RewriterResources,
    pipeline_from_dict,
)
from curate.schema import ROW_SAMPLE, SOURCE_ALT, SOURCE_KALE, SOURCE_SYNTHETIC, STATUS_PENDING, empty_row
from curate.stages.policy import apply_policy_rows, decide
from curate.stages.rewrite import (
    RewriteStage,
    build_prompt,
    check_rewrite,
    clean_rewrite,
    content_words,
    dense_caption,
    prompt_labels,
    repeat_ratio,
)
from curate.stages.rows import get_candidates, set_candidates, to_rows, to_table

SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
WORDS = (
    "cat mat red bicycle bike sitting on a the an of in and with leaning against wall tabby "
    "system user assistant image description alt text rewrite caption keep names , . : ' -"
).split()
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


def build_tiny_chat_lm(path: Path, first: str | None = None, seed: int = 0, head_dim: int = 32) -> Path:
    """A random tiny Llama chat model; with ``first`` its greedy output is that token forever."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    vocab_list = SPECIALS + WORDS
    if first is not None:
        vocab_list = [first] + [t for t in vocab_list if t != first]
    vocab = {t: i for i, t in enumerate(vocab_list)}
    tk = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>"
    )
    tok.chat_template = CHAT_TEMPLATE
    config = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=2 * head_dim,
        intermediate_size=4 * head_dim,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=head_dim,
        max_position_embeddings=1024,
        bos_token_id=vocab["<s>"],
        eos_token_id=vocab["</s>"],
        pad_token_id=vocab["<pad>"],
        tie_word_embeddings=False,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    if first is not None:
        with torch.no_grad():
            model.model.norm.weight.zero_()
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def lms(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_lm")
    return {
        "random": build_tiny_chat_lm(root / "random"),
        "silent": build_tiny_chat_lm(root / "silent", first="</s>"),
        "cat": build_tiny_chat_lm(root / "cat", first="cat"),
    }


# ---- prompt construction -------------------------------------------------------------


def test_build_prompt_fills_both_fields_and_normalises_whitespace():
    prompt = build_prompt("D: {dense_caption}\nA: {alt_text}", "a red  bicycle\n leaning", "  Bike.png ")
    assert prompt == "D: a red bicycle leaning\nA: Bike.png"


def test_build_prompt_cuts_long_inputs_and_keeps_braces_in_values():
    prompt = build_prompt(
        "{dense_caption}|{alt_text}", "x" * 50, "{not a field} " + "y" * 50, max_input_chars=20
    )
    dense, alt = prompt.split("|")
    assert dense == "x" * 20 and alt == "{not a field} yyyyyy"


def test_default_prompt_says_what_kale_needs():
    prompt = build_prompt(DEFAULT_REWRITE_TEMPLATE, "a tabby cat on a mat", "Garfield_stock_photo.jpg")
    assert "a tabby cat on a mat" in prompt and "Garfield_stock_photo.jpg" in prompt
    for must in ("consistent with the image description", "file names", "stock photo"):
        assert must in DEFAULT_REWRITE_SYSTEM_PROMPT


def test_rewriter_renders_the_chat_template(lms):
    from curate.models.base import LoadOptions
    from curate.models.rewriter import Rewriter, RewriteSettings

    rw = Rewriter(LoadOptions(str(lms["random"])), RewriteSettings(system_prompt="be brief"), device="cpu")
    assert rw.render("hello") == "<s>system\nbe brief</s>\n<s>user\nhello</s>\n<s>assistant\n"
    plain = Rewriter(LoadOptions(str(lms["random"])), RewriteSettings(use_chat_template=False), device="cpu")
    assert plain.render("hello") == "hello\n"


def test_examples_are_rendered_as_turns_before_the_prompt(lms):
    from curate.models.base import LoadOptions
    from curate.models.rewriter import Rewriter, RewriteSettings, chat_messages

    shots = (("D: a cat", "A cat."), ("D: a bike", "A red bike."))
    rw = Rewriter(LoadOptions(str(lms["random"])), RewriteSettings(system_prompt="s", examples=shots))
    assert rw.render("D: a mat") == (
        "<s>system\ns</s>\n<s>user\nD: a cat</s>\n<s>assistant\nA cat.</s>\n"
        "<s>user\nD: a bike</s>\n<s>assistant\nA red bike.</s>\n<s>user\nD: a mat</s>\n<s>assistant\n"
    )
    plain = Rewriter(
        LoadOptions(str(lms["random"])), RewriteSettings("s", examples=shots, use_chat_template=False)
    )
    assert plain.render("D: a mat") == "s\n\nD: a cat\nA cat.\n\nD: a bike\nA red bike.\n\nD: a mat\n"
    # vLLM's chat() gets the same conversation
    assert [m["role"] for m in chat_messages("s", "D: a mat", shots)] == [
        "system",
        "user",
        "assistant",
        "user",
        "assistant",
        "user",
    ]


def test_stage_fills_the_examples_from_the_template(lms):
    from curate.config import RewriteExample

    stage = _stage(
        lms["random"],
        prompt_template="D: {dense_caption} | A: {alt_text}",
        examples=[RewriteExample("a  dog.", "Rex.jpg", "A dog named Rex.")],
    )
    assert stage.model.settings.examples == (("D: a dog. | A: Rex.jpg", "A dog named Rex."),)
    assert _stage(lms["random"], examples=[]).model.settings.examples == ()


def test_default_examples_show_a_merge_and_a_dropped_file_name():
    cfg = pipeline_from_dict({"captioner": {"model": "m"}, "rewriter": {"model": "m"}})
    answers = {e.alt_text: e.caption for e in cfg.rewriter.examples}
    assert answers["1967 Ford Mustang vector"] == "A red 1967 Ford Mustang."
    assert answers["img_2041.jpg"] == "A building."
    with pytest.raises(ConfigError, match=r"rewriter\.examples\[0\]\.caption: must not be empty"):
        pipeline_from_dict(
            {
                "captioner": {"model": "m"},
                "rewriter": {"model": "m", "examples": [{"dense_caption": "a cat", "caption": " "}]},
            }
        )
    with pytest.raises(ConfigError, match=r"rewriter\.examples\[0\]\.text: unknown field"):
        pipeline_from_dict(
            {"captioner": {"model": "m"}, "rewriter": {"model": "m", "examples": [{"text": "a cat"}]}}
        )
    with pytest.raises(ConfigError, match=r"rewriter\.examples: expected a list"):
        pipeline_from_dict({"captioner": {"model": "m"}, "rewriter": {"model": "m", "examples": "a cat"}})


def test_clean_rewrite_strips_labels_quotes_and_whitespace():
    assert (
        clean_rewrite('  Caption: "A red bicycle\n leaning on a wall."  ')
        == "A red bicycle leaning on a wall."
    )
    assert clean_rewrite("Here is the rewritten caption: a cat") == "a cat"
    assert clean_rewrite("The image description: a cat.") == "a cat."
    assert clean_rewrite("Alt-text: Garfield", labels=("Alt-text",)) == "Garfield"
    assert clean_rewrite("“A cat.”") == "A cat."
    assert clean_rewrite("Description of a cat") == "Description of a cat"  # no colon: not a label


def test_prompt_labels_come_from_the_template():
    assert prompt_labels(DEFAULT_REWRITE_TEMPLATE) == ("Image description", "Alt-text")
    assert prompt_labels("D: {dense_caption}\nA: {alt_text}") == ()  # too short to tell from words


# ---- guard rails ---------------------------------------------------------------------

DENSE = "a tabby cat sitting on a red mat next to a window"
LABELS = ("Image description", "Alt-text")
ALT = "Garfield the cat, 1978 comic strip, stock photo IMG_0042.jpg"


def test_a_good_rewrite_passes():
    ok, reason = check_rewrite(
        "Garfield, a tabby cat from the 1978 comic strip, sits on a red mat.",
        DENSE,
        ALT,
        prompt_labels=LABELS,
    )
    assert (ok, reason) == (True, None)


@pytest.mark.parametrize(
    ("text", "kwargs", "reason"),
    [
        ("", {}, "empty"),
        ("   ", {}, "empty"),
        ("A tabby cat sitting on a red mat, next to a window!", {}, "copies_input"),
        ("garfield the cat 1978 comic strip stock photo img_0042 jpg", {}, "copies_input"),
        ("a tabby cat " * 90, {"max_length_ratio": None, "max_repeat_ratio": 1.0}, "too_long"),
        ("a tabby cat on a red mat by a window that looks onto a garden", {"max_chars": 40}, "too_long"),
        ("Garfield the tabby cat " + " ".join(f"w{i}" for i in range(90)), {}, "too_long"),  # vs inputs
        ("the cat sat on the mat. the cat sat on the mat. the cat sat on the mat.", {}, "repetitive"),
        ("cat cat cat cat cat cat", {}, "repetitive"),
        ("Garfield the tabby cat sits on a red mat and", {"truncated": True}, "truncated"),
        ("Alt-text: Garfield. Image description: a tabby cat.", {"prompt_labels": LABELS}, "echoes_prompt"),
        ("Garfield the cat. This caption combines the alt-text.", {"prompt_labels": LABELS}, "echoes_prompt"),
        ("A lovely sunny afternoon outdoors.", {}, "no_shared_facts"),
        ("A stock photo image of clipart.", {}, "no_shared_facts"),  # boilerplate is no fact
    ],
)
def test_guard_rails_reject_with_a_reason(text, kwargs, reason):
    assert check_rewrite(text, DENSE, ALT, **kwargs) == (False, reason)


def test_truncation_can_be_allowed():
    text = "Garfield the tabby cat sits on a red mat and"
    assert check_rewrite(text, DENSE, ALT, truncated=True, reject_truncated=False) == (True, None)


def test_a_fact_from_either_input_is_enough():
    assert check_rewrite("Garfield in 1978.", "a drawing", ALT)[0]  # from the alt-text only
    assert check_rewrite("Two cats on mats.", DENSE, "IMG_0042.jpg")[0]  # plural of the dense words


def test_content_words_and_repeat_ratio():
    assert content_words("The 2 Cats of IMG stock photo, 1978!") == {"2", "cat", "img", "1978"}
    assert repeat_ratio("a red bicycle leaning against a white wall") == 0.0
    assert repeat_ratio("go go go go go", n=1) == pytest.approx(0.8)
    assert repeat_ratio("too short", n=3) == 0.0


def test_dense_caption_is_the_first_synthetic_candidate():
    cands = [
        {"text": "alt", "source": SOURCE_ALT},
        {"text": "first synthetic", "source": SOURCE_SYNTHETIC},
        {"text": "second synthetic", "source": SOURCE_SYNTHETIC},
    ]
    assert dense_caption(cands) == "first synthetic"
    assert dense_caption(cands[:1]) is None


# ---- config and policy ---------------------------------------------------------------

CAPTIONER = {"model": "cap", "num_captions": 1}
REWRITER = {"model": "m"}


def test_rewriter_config_validates_template_and_placement():
    cfg = pipeline_from_dict({"captioner": CAPTIONER, "rewriter": {"model": "packaged:smollm2"}})
    assert isinstance(cfg.rewriter, RewriterConfig) and cfg.rewriter.backend == "transformers"
    assert "rewriter" in cfg.models()
    with pytest.raises(ConfigError, match=r"rewriter.prompt_template: must use exactly"):
        pipeline_from_dict(
            {"captioner": CAPTIONER, "rewriter": {"model": "m", "prompt_template": "{alt_text}"}}
        )
    with pytest.raises(ConfigError, match=r"rewriter.prompt_template"):
        pipeline_from_dict({"captioner": CAPTIONER, "rewriter": {"model": "m", "prompt_template": "{oops"}})
    with pytest.raises(ConfigError, match=r"rewriter: needs a 'captioner'"):
        pipeline_from_dict({"rewriter": {"model": "m"}})
    with pytest.raises(ConfigError, match=r"rewriter.backend: must be one of"):
        pipeline_from_dict({"captioner": CAPTIONER, "rewriter": {"model": "m", "backend": "llamacpp"}})
    with pytest.raises(ConfigError, match=r"rewriter\.resources\.num_gpus: tensor_parallel_size=2"):
        pipeline_from_dict(
            {
                "captioner": CAPTIONER,
                "rewriter": {
                    "model": "m",
                    "backend": "vllm",
                    "resources": {"tensor_parallel_size": 2, "num_gpus": 1},
                },
            }
        )
    with pytest.raises(ConfigError, match=r"rewriter\.resources\.gpu_memory_utilization"):
        pipeline_from_dict(
            {"captioner": CAPTIONER, "rewriter": {"model": "m", "resources": {"gpu_memory_utilization": 1.5}}}
        )


def test_prefer_source_needs_its_sections():
    with pytest.raises(ConfigError, match=r"policy.prefer_source: 'kale' needs a 'rewriter'"):
        pipeline_from_dict(
            {"captioner": CAPTIONER, "ranker": {"model": "r"}, "policy": {"prefer_source": "kale"}}
        )
    with pytest.raises(ConfigError, match=r"policy.prefer_source: comparing scores"):
        pipeline_from_dict(
            {"captioner": CAPTIONER, "rewriter": {"model": "m"}, "policy": {"prefer_source": "kale"}}
        )


def _cands(alt: float, syn: float, kale: float | None, field: str = "clip_score") -> list[dict]:
    out = [
        {"text": "alt", "source": SOURCE_ALT, "itm_score": None, "clip_score": None},
        {"text": "syn", "source": SOURCE_SYNTHETIC, "itm_score": None, "clip_score": None},
    ]
    if kale is not None:
        out.append({"text": "kale", "source": SOURCE_KALE, "itm_score": None, "clip_score": None})
    for c, s in zip(out, (alt, syn, kale)):
        c[field] = s
    return out


@pytest.mark.parametrize(
    ("scores", "margin", "best"),
    [
        ((0.30, 0.25, 0.30), 0.0, "kale"),  # a tie goes to the rewrite
        ((0.30, 0.25, 0.29), 0.0, "alt"),
        ((0.30, 0.25, 0.29), 0.02, "kale"),  # within the margin
        ((0.30, 0.25, 0.20), 0.02, "alt"),
        ((0.30, 0.25, None), 0.0, "alt"),  # the rewrite was rejected: best other caption
    ],
)
def test_policy_prefers_kale_within_margin(scores, margin, best):
    policy = PolicyConfig(top_k=2, prefer_source="kale", prefer_margin=margin)
    kept, reason = decide(_cands(*scores), policy)
    assert reason is None and kept[0]["text"] == best and len(kept) == 2


def test_policy_prefer_uses_itm_without_a_ranker():
    policy = PolicyConfig(itm_threshold=0.5, prefer_source="kale", prefer_margin=0.05)
    kept, _ = decide(_cands(0.9, 0.6, 0.86, field="itm_score"), policy)
    assert [c["text"] for c in kept] == ["kale", "alt", "syn"]
    kept, _ = decide(_cands(0.9, 0.6, 0.4, field="itm_score"), policy)  # filtered out by ITM
    assert [c["text"] for c in kept] == ["alt", "syn"]


# ---- the transformers backend on tiny models ----------------------------------------


def _rewriter(path: Path, **settings):
    from curate.models.base import LoadOptions
    from curate.models.rewriter import Rewriter, RewriteSettings

    batch_size = settings.pop("batch_size", 8)
    return Rewriter(LoadOptions(str(path)), RewriteSettings(**settings), device="cpu", batch_size=batch_size)


def test_batched_generation_with_left_padding_matches_one_by_one(lms):
    rw = _rewriter(lms["random"], max_new_tokens=6, batch_size=4)
    prompts = [
        "a cat",
        "a red bicycle leaning against the wall with a tabby cat on the mat",
        "the mat",
        "bike",
    ]
    batched = rw(prompts)
    single = [rw([p])[0] for p in prompts]
    assert [r.text for r in batched] == [r.text for r in single]
    assert all(r.text for r in batched)  # random weights still say something


def test_end_token_and_token_budget_are_reported(lms):
    silent = _rewriter(lms["silent"], max_new_tokens=5)(["a cat", "a red bicycle"])
    assert [(r.text, r.truncated) for r in silent] == [("", False), ("", False)]
    looping = _rewriter(lms["cat"], max_new_tokens=4)(["a red bicycle"])
    assert [(r.text, r.truncated) for r in looping] == [("cat cat cat cat", True)]


def test_sampling_is_repeatable_with_a_seed(lms):
    rw = _rewriter(lms["random"], max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95)
    assert [r.text for r in rw(["a cat", "a bike"], seeds=[7, 8])] == [
        r.text for r in rw(["a cat", "a bike"], seeds=[7, 8])
    ]


def test_a_sampled_rewrite_depends_on_its_own_seed_only(lms):
    """Not on the prompts batched with it (left padding, length order) nor their number."""
    rw = _rewriter(lms["random"], max_new_tokens=8, do_sample=True, temperature=1.5, top_p=0.95)
    prompts = ["a cat", "a red bicycle leaning on a wall", "a bike"]
    together = [r.text for r in rw(prompts, seeds=[7, 8, 9])]
    assert [rw([p], seeds=[s])[0].text for p, s in zip(prompts, [7, 8, 9])] == together
    assert any(rw(prompts, seeds=[1, 2, 3])[i].text != t for i, t in enumerate(together))


def test_missing_chat_template_is_an_error_that_names_the_option(lms, tmp_path):
    import shutil

    path = tmp_path / "base"
    shutil.copytree(lms["random"], path)
    config = json.loads((path / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    (path / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(ValueError, match="use_chat_template: false"):
        _rewriter(path)
    assert _rewriter(path, use_chat_template=False, max_new_tokens=2)(["a cat"])[0].text


def test_packaged_model_names_resolve_and_unknown_ones_fail():
    from curate.models.rewriter import resolve_model

    assert resolve_model("some/hub-id") == "some/hub-id"
    with pytest.raises(ValueError, match="unknown packaged model 'packaged:nope'"):
        resolve_model("packaged:nope")


# ---- the stage -----------------------------------------------------------------------


def _row(i: int, alt: str | None, synthetic: list[str]) -> dict:
    r = empty_row()
    r.update(row_type=ROW_SAMPLE, key=f"k{i}", shard="s", seq=i, status=STATUS_PENDING, alt_text=alt)
    cands = [{"text": alt, "source": SOURCE_ALT, "itm_score": None, "clip_score": None}] if alt else []
    cands += [
        {"text": t, "source": SOURCE_SYNTHETIC, "itm_score": None, "clip_score": None} for t in synthetic
    ]
    set_candidates(r, cands)
    return r


def _stage(path: Path, **overrides) -> RewriteStage:
    cfg = RewriterConfig(
        model=str(path), resources=RewriterResources(device="cpu", batch_size=2), **overrides
    )
    return RewriteStage(cfg, seed=0, error_policy="raise")


def test_stage_adds_a_kale_candidate_and_skips_what_it_cannot_rewrite(lms):
    stage = _stage(lms["cat"], max_new_tokens=1, reject_truncated=False)
    rows = [
        _row(0, "Garfield the cat", ["a tabby cat on a mat"]),
        _row(1, None, ["a red bicycle"]),
        _row(2, "bike.png", []),
        _row(3, "my cat, stock photo", ["a cat on a red mat"]),
    ]
    out = to_rows(stage(to_table(rows)))
    assert [r["kale_status"] for r in out] == [
        "accepted",
        "skipped:no_alt_text",
        "skipped:no_dense_caption",
        "accepted",
    ]
    kale = [c for c in get_candidates(out[0]) if c["source"] == SOURCE_KALE]
    assert kale == [
        {
            "text": "cat",
            "source": SOURCE_KALE,
            "itm_score": None,
            "clip_score": None,
            "kept": None,
            "rule": None,
            "text_embedding": None,
        }
    ]
    assert [c["source"] for c in get_candidates(out[1])] == [SOURCE_SYNTHETIC]


@pytest.mark.parametrize(
    ("lm", "overrides", "status"),
    [
        ("silent", {}, "rejected:empty"),
        ("cat", {"max_new_tokens": 8}, "rejected:repetitive"),
        ("cat", {"max_new_tokens": 1}, "rejected:truncated"),
        ("cat", {"max_new_tokens": 1, "reject_truncated": False, "max_chars": 2}, "rejected:too_long"),
    ],
)
def test_rejected_rewrites_leave_the_best_other_caption(lms, lm, overrides, status):
    rows = [_row(0, "Garfield the cat", ["a tabby cat on a mat"])]
    out = to_rows(_stage(lms[lm], **overrides)(to_table(rows)))
    assert out[0]["kale_status"] == status
    cands = get_candidates(out[0])
    assert [c["source"] for c in cands] == [SOURCE_ALT, SOURCE_SYNTHETIC]
    for c, score in zip(cands, (0.2, 0.3)):
        c["clip_score"] = score
    set_candidates(out[0], cands)
    policy = PolicyConfig(top_k=1, prefer_source="kale")
    (done,) = apply_policy_rows(out, policy)
    assert done["status"] == "kept" and done["caption"] == "a tabby cat on a mat"


def test_end_to_end_caption_rewrite_filter_rank_policy_writer(lms, tiny_models, make_shard, tmp_path):
    """One process, no Ray: read -> decode -> caption -> rewrite -> filter -> rank -> policy -> writer."""
    from curate.config import CaptionerConfig, DecodeConfig, FilterConfig, RankerConfig
    from curate.io.reader import ShardRef, read_shard
    from curate.io.writer import output_row
    from curate.stages.decode import decode_rows
    from curate.stages.models import CaptionStage, FilterStage, RankStage
    from tests.helpers import noise_image

    alts = ["Garfield the cat", "bike.png", None, "a cat on a mat, stock photo"]
    samples = [
        {"key": f"{i:06d}", "image": noise_image(40, 32, seed=i), "format": "png", "txt": alt}
        for i, alt in enumerate(alts)
    ]
    shard = make_shard(tmp_path / "00000.tar", samples)
    rows = [r for batch in read_shard(ShardRef(url=str(shard), name="00000"), batch_size=8) for r in batch]
    samples_rows = decode_rows([r for r in rows if r["row_type"] == ROW_SAMPLE], DecodeConfig())
    table = to_table(samples_rows)
    cpu = ModelResources(device="cpu")
    cap = CaptionerConfig(
        model=str(tiny_models["captioner"]), num_captions=1, max_new_tokens=8, resources=cpu
    )
    table = CaptionStage(cap, seed=0, error_policy="raise")(table)
    table = _stage(lms["cat"], max_new_tokens=1, reject_truncated=False)(table)
    table = FilterStage(FilterConfig(model=str(tiny_models["itm"]), resources=cpu), error_policy="raise")(
        table
    )
    table = RankStage(RankerConfig(model=str(tiny_models["clip"]), resources=cpu), error_policy="raise")(
        table
    )
    policy = PolicyConfig(top_k=2, prefer_source="kale", prefer_margin=1.0)  # any score: the rewrite wins
    out = apply_policy_rows(to_rows(table), policy)

    by_alt = {r["alt_text"]: r for r in out}
    garfield = by_alt["Garfield the cat"]
    assert garfield["kale_status"] == "accepted" and garfield["caption"] == "cat"
    kale = [c for c in get_candidates(garfield) if c["source"] == SOURCE_KALE]
    assert len(kale) == 1 and kale[0]["clip_score"] is not None and kale[0]["itm_score"] is not None
    # 'cat' shares no fact with "bike.png" or the random words of a random captioner
    assert by_alt["bike.png"]["kale_status"] in {"accepted", "rejected:no_shared_facts"}
    assert by_alt[None]["kale_status"] == "skipped:no_alt_text"
    for r in out:
        assert r["status"] == "kept"
        assert output_row(r)["kale_status"] == r["kale_status"]
