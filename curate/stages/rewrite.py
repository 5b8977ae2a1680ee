"""KALE stage 1: an LLM rewrites the dense caption together with the alt-text.

BLIP3-KALE: a VLM's dense caption says what is visible but not what the alt-text
knows (names, places, products, species, events). An instruction-tuned LLM merges the
two into one factual caption, a candidate with ``source = 'kale'`` that the filter and
the ranker score like any other.

Small LLMs fail in recognisable ways, so a rewrite passes guard rails first: it is
rejected when empty, a copy of one input (same words), repetitive, too long (absolutely
or against its inputs), cut off by the token budget, when it echoes the prompt's labels
("Alt-text: ...", talk about the task instead of the image), or when it shares no
content word with either input (it dropped every fact). A rejected rewrite adds no
candidate: the sample keeps its other captions and ``kale_status`` says why.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from curate.config import RewriterConfig
from curate.schema import SOURCE_KALE, SOURCE_SYNTHETIC
from curate.stages.models import _ModelStage, _quiet_transformers, sample_seed
from curate.stages.rows import get_candidates, set_candidates

KALE_ACCEPTED = "accepted"

# Words that carry no fact: function words and image boilerplate ("stock photo", "clipart").
STOPWORDS = frozenset(
    """
    a an the and or but nor of in on at to for from by with without into onto over under
    above below near behind between through about against along across around as is are
    was were be been being has have had do does did this that these those there here it its
    they them their he she his her him we our you your i me my not no yes can could will would
    may might shall should must very also just some any each all both one two few more most
    other such only own same than too then so while which who whom whose what when where why
    how out off up down again further once image images picture pictures photo photos
    photograph stock clipart clip art vector illustration drawing graphic icon png jpg jpeg svg
    gif file free download shows showing shown depicts depicting features featuring displays
    displayed seen view visible appears looks like
    """.split()
)
_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_LEAD = re.compile(
    r"^\s*(?:here(?: is|'s)[^:\n]{0,60}:|(?:the )?(?:kale |rewritten |new |final |improved |image )?"
    r"(?:caption|description)\s*:)\s*",
    re.IGNORECASE,
)
_QUOTES = ('""', "''", "“”", "‘’", "«»")  # (left, right) pairs


def build_prompt(template: str, dense_caption: str, alt_text: str, max_input_chars: int | None = None) -> str:
    """Fill the pipeline's template; each input is whitespace-normalised and cut to ``max_input_chars``."""
    dense_caption, alt_text = _norm(dense_caption), _norm(alt_text)
    if max_input_chars is not None:
        dense_caption, alt_text = dense_caption[:max_input_chars], alt_text[:max_input_chars]
    return template.format(dense_caption=dense_caption, alt_text=alt_text)


def prompt_labels(template: str) -> tuple[str, ...]:
    """What the template writes before each input ('Image description', 'Alt-text').

    A rewrite that repeats them is echoing the prompt. Labels shorter than 4 characters
    ('A:') are ignored: as words they would match ordinary captions.
    """
    labels = []
    for literal, field, _, _ in string.Formatter().parse(template):
        if field is None:
            continue
        label = literal.rsplit("\n", 1)[-1].strip().rstrip(":").strip()
        if len(label) >= 4:
            labels.append(label)
    return tuple(labels)


def _label_re(label: str) -> str:
    return r"(?<!\w)" + re.escape(label) + r"(?!\w)"


def clean_rewrite(text: str, labels: tuple[str, ...] = ()) -> str:
    """The caption itself: one line of whitespace, no leading 'Caption:' (or prompt label), no quotes."""
    text = _LEAD.sub("", text.strip(), count=1)
    for label in labels:
        text = re.sub(r"^\s*(?:the )?" + _label_re(label) + r"\s*:\s*", "", text, count=1, flags=re.I)
    text = _norm(text)
    for left, right in _QUOTES:
        if len(text) >= 2 and text[0] == left and text[-1] == right:
            text = text[1:-1].strip()
    return text


def _norm(text: str) -> str:
    return " ".join(text.split())


def _stem(word: str) -> str:
    # plural -> singular, enough to match "cats" with "cat"; not a linguistic stemmer
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


def words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def content_words(text: str) -> set[str]:
    """Words that can carry a fact: not boilerplate, 3+ letters or containing a digit (years, models)."""
    return {
        _stem(w) for w in words(text) if w not in STOPWORDS and (len(w) >= 3 or any(c.isdigit() for c in w))
    }


def repeat_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one: 0 for fresh text, near 1 for a loop."""
    ws = words(text)
    grams = [tuple(ws[i : i + n]) for i in range(len(ws) - n + 1)]
    if len(grams) < 2:
        return 0.0
    return 1.0 - len(set(grams)) / len(grams)


def check_rewrite(
    text: str,
    dense_caption: str,
    alt_text: str,
    max_chars: int = 1000,
    max_length_ratio: float | None = 3.0,
    repeat_ngram: int = 3,
    max_repeat_ratio: float = 0.25,
    truncated: bool = False,
    reject_truncated: bool = True,
    prompt_labels: tuple[str, ...] = (),
) -> tuple[bool, str | None]:
    """Guard rails for one rewrite -> (ok, reason); the first failing rail names the reason.

    Repetition is checked before length: a loop is the cause, its length the symptom.
    """
    if not text.strip():
        return False, "empty"
    if words(text) in (words(dense_caption), words(alt_text)):
        return False, "copies_input"  # adds nothing the other candidates do not have
    if repeat_ratio(text, repeat_ngram) > max_repeat_ratio:
        return False, "repetitive"
    if len(text) > max_chars:
        return False, "too_long"
    if max_length_ratio is not None and len(text) > max_length_ratio * (len(dense_caption) + len(alt_text)):
        return False, "too_long"
    if truncated and reject_truncated:
        return False, "truncated"
    if any(re.search(_label_re(label), text, re.IGNORECASE) for label in prompt_labels):
        return False, "echoes_prompt"
    if not content_words(text) & (content_words(dense_caption) | content_words(alt_text)):
        return False, "no_shared_facts"
    return True, None


def dense_caption(candidates: list[dict]) -> str | None:
    """The caption to rewrite: the captioner's first synthetic candidate (KALE runs it with one)."""
    return next((c["text"] for c in candidates if c["source"] == SOURCE_SYNTHETIC and c["text"]), None)


@dataclass
class _Job:
    row: dict
    candidates: list[dict]
    dense: str
    alt: str


class RewriteStage(_ModelStage):
    """Adds one ``kale`` candidate per sample that has an alt-text and a dense caption."""

    name = "rewriter"

    def __init__(self, cfg: RewriterConfig, seed: int = 0, error_policy: str = "capture") -> None:
        super().__init__(error_policy, cfg.resources.num_threads)
        from curate.models.rewriter import RewriteSettings, load_rewriter

        _quiet_transformers()
        self.cfg = cfg
        self.seed = seed
        self.labels = prompt_labels(cfg.prompt_template)
        self.echo_labels = self.labels if cfg.reject_prompt_echo else ()
        settings = RewriteSettings(
            system_prompt=cfg.system_prompt,
            examples=tuple(
                (build_prompt(cfg.prompt_template, e.dense_caption, e.alt_text), e.caption)
                for e in cfg.examples
            ),
            use_chat_template=cfg.use_chat_template,
            max_new_tokens=cfg.max_new_tokens,
            do_sample=cfg.do_sample,
            temperature=cfg.temperature,
            top_p=cfg.top_p,
            repetition_penalty=cfg.repetition_penalty,
        )
        self.model = load_rewriter(cfg, settings, seed=seed)

    def process(self, rows: list[dict]) -> None:
        cfg = self.cfg
        jobs: list[_Job] = []
        for row in rows:
            candidates = get_candidates(row)
            alt = _norm(row.get("alt_text") or "")[: cfg.max_input_chars]
            dense = _norm(dense_caption(candidates) or "")[: cfg.max_input_chars]
            if not alt:
                row["kale_status"] = "skipped:no_alt_text"
            elif not dense:
                row["kale_status"] = "skipped:no_dense_caption"
            else:
                jobs.append(_Job(row, candidates, dense, alt))
        if not jobs:
            return
        prompts = [build_prompt(cfg.prompt_template, j.dense, j.alt) for j in jobs]
        seeds = [sample_seed(self.seed, self.name, j.row) for j in jobs]
        # the whole block in one call: the wrapper batches (transformers) or schedules (vLLM)
        outputs = self.model(prompts, seeds=seeds)
        for job, out in zip(jobs, outputs):
            text = clean_rewrite(out.text, self.labels)
            ok, reason = check_rewrite(
                text,
                job.dense,
                job.alt,
                max_chars=cfg.max_chars,
                max_length_ratio=cfg.max_length_ratio,
                repeat_ngram=cfg.repeat_ngram,
                max_repeat_ratio=cfg.max_repeat_ratio,
                truncated=out.truncated,
                reject_truncated=cfg.reject_truncated,
                prompt_labels=self.echo_labels,
            )
            if not ok:
                job.row["kale_status"] = f"rejected:{reason}"
                continue
            kale = {"text": text, "source": SOURCE_KALE, "itm_score": None, "clip_score": None}
            job.candidates.append(kale)
            set_candidates(job.row, job.candidates)
            job.row["kale_status"] = KALE_ACCEPTED
