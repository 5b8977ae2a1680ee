"""The output contract: one Parquet row per input sample.

Column names here are read by DuckDB users, the training stage and outside checks.
Extend the schema; never rename or drop a column.

samples/*.parquet
    key          str    sample key inside its shard (img2dataset's ``KEY``)
    shard        str    shard name (input tar file stem, made unique)
    status       str    'kept' | 'dropped' | 'error'
    reason       str    why a sample was dropped (null unless dropped)
    error        str    error message (null unless status is 'error')
    alt_text     str    the original text (``KEY.txt``), null when missing
    width        int32  decoded image width (null when it could not be decoded)
    height       int32  decoded image height
    caption      str    the best kept caption (null unless kept)
    captions     list<str>  every kept caption, best first
    candidates   list<struct<text, source, itm_score, clip_score, kept, rule>>
                 every text that was scored: source is 'alt', 'synthetic' or 'kale'
                 (the LLM rewrite of the dense caption with the alt-text); ``rule`` names the
                 alt-text rule the text failed ('alt_text_language', ...): it was scored but
                 could not be kept (null when it passed, or no rules ran)
    url          str    ``url`` from ``KEY.json`` when present
    image_ext    str    extension of the image member ('jpg', 'png', ...)
    image_sha256 str    sha256 of the original image bytes
    source_url   str    the input tar the sample came from
    meta         str    the original ``KEY.json`` text (null when absent)
    kale_status  str    KALE rewrite outcome (null when the pipeline has no rewriter or the
                        sample never reached it): 'accepted', 'rejected:REASON' (empty,
                        copies_input, repetitive, too_long, truncated, echoes_prompt,
                        no_shared_facts; the sample keeps its other captions) or
                        'skipped:REASON' (no_alt_text, no_dense_caption)
    download_status str  img2dataset's status for the URL ('success', 'failed_to_download',
                         'failed_to_resize'); null when the input tar is not img2dataset's
    download_error  str  img2dataset's error message ('HTTP Error 404: Not Found', 'timed out',
                         'Image decoding error', ...); null on success
    download_sha256 str  sha256 img2dataset computed over the downloaded bytes, before any
                         resize (``image_sha256`` is of the bytes in the tar); null on failure
    image_phash  str    64-bit DCT perceptual hash of the decoded image, 16 hex digits
                        (curate.dedup.phash); null when the image was not decoded
    alt_text_language        str      the alt-text's language by the ``rules.alt_text.languages``
                                      rule's model (ISO 639-1, 'und' without letters); null without
                                      that rule or an alt-text
    alt_text_language_score  float32  the model's probability for that language
    aesthetic_score  float32  the aesthetic head's score of the ranker's image embedding (LAION's
                              1-10 scale); null without an ``aesthetic`` section
    nsfw_score       float32  the NSFW classifier's probability; null without an ``nsfw`` section
    watermark_score  float32  the watermark classifier's probability; null without ``watermark``

embeddings/*.parquet (``output.write_embeddings: true``; one file per shard, committed before
its samples file) -- a row per sample the ranker scored, in the samples' order:
    key              str   joins samples.key (with shard)
    shard            str
    image_embedding  list<float16|float32>  the ranker's unit image embedding (CLIP's image
                                            tower, the bridge filter's ITC projection)
    text_embedding   list<float16|float32>  the same ranker's unit embedding of the best kept
                                            caption (``caption``); null when none was kept
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pyarrow as pa

STATUS_KEPT = "kept"
STATUS_DROPPED = "dropped"
STATUS_ERROR = "error"
STATUSES = (STATUS_KEPT, STATUS_DROPPED, STATUS_ERROR)

SOURCE_ALT = "alt"
SOURCE_SYNTHETIC = "synthetic"
SOURCE_KALE = "kale"

CANDIDATE_TYPE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("source", pa.string()),
        pa.field("itm_score", pa.float32()),
        pa.field("clip_score", pa.float32()),
        pa.field("kept", pa.bool_()),
        pa.field("rule", pa.string()),
    ]
)


def candidate_score(candidate: Mapping[str, Any]) -> float | None:
    """The score a candidate ranks by: CLIP similarity when a ranker scored it, else ITM match
    probability (a CapFilt-only run has no CLIP scores); None when neither model scored it.

    The one rule for the keep policy, the report and ``curate query``'s ``score`` column (whose
    SQL form is ``curate.explore.views.SCORE_SQL``).
    """
    clip = candidate.get("clip_score")
    return clip if clip is not None else candidate.get("itm_score")


SAMPLES_SCHEMA = pa.schema(
    [
        pa.field("key", pa.string(), nullable=False),
        pa.field("shard", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("reason", pa.string()),
        pa.field("error", pa.string()),
        pa.field("alt_text", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("candidates", pa.list_(CANDIDATE_TYPE)),
        pa.field("url", pa.string()),
        pa.field("image_ext", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("source_url", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("kale_status", pa.string()),
        pa.field("download_status", pa.string()),
        pa.field("download_error", pa.string()),
        pa.field("download_sha256", pa.string()),
        pa.field("image_phash", pa.string()),
        pa.field("alt_text_language", pa.string()),
        pa.field("alt_text_language_score", pa.float32()),
        pa.field("aesthetic_score", pa.float32()),
        pa.field("nsfw_score", pa.float32()),
        pa.field("watermark_score", pa.float32()),
    ]
)

EMBEDDING_DTYPES = {"float16": pa.float16(), "float32": pa.float32()}


def embeddings_schema(dtype: str = "float16") -> pa.Schema:
    """``embeddings/NAME.parquet`` with vectors of ``dtype`` (``output.embedding_dtype``)."""
    vector = pa.list_(EMBEDDING_DTYPES[dtype])
    return pa.schema(
        [
            pa.field("key", pa.string()),
            pa.field("shard", pa.string()),
            pa.field("image_embedding", vector),
            pa.field("text_embedding", vector),
        ]
    )


# Rows travel between pipeline stages with this schema. ``candidates`` is a typed list
# there too, so no stage parses or re-dumps it: the output's fields with the scores in
# float64, as the models give them, so the policy compares and sorts exactly what was
# computed (``kept`` is null until the policy decides); the writer casts to CANDIDATE_TYPE.
# ``image`` holds the original bytes; ``pixels`` the decoded RGB (uint8, row-major,
# downscaled to the decode stage's ``max_side``) with its shape in ``pixels_width`` and
# ``pixels_height``; ``width``/``height`` stay the original image size. With
# ``output.write_embeddings``, the ranker leaves its unit image embedding in ``image_embedding`` and
# each candidate's text embedding in its ``text_embedding`` (float32 bytes) for the writer.
ROW_SAMPLE = "sample"
ROW_SHARD_END = "shard_end"

INTERNAL_CANDIDATE_TYPE = pa.struct(
    [
        pa.field("text", pa.string()),
        pa.field("source", pa.string()),
        pa.field("itm_score", pa.float64()),
        pa.field("clip_score", pa.float64()),
        pa.field("kept", pa.bool_()),
        pa.field("rule", pa.string()),
        pa.field("text_embedding", pa.binary()),
    ]
)

INTERNAL_SCHEMA = pa.schema(
    [
        pa.field("row_type", pa.string()),
        pa.field("key", pa.string()),
        pa.field("shard", pa.string()),
        pa.field("seq", pa.int64()),
        pa.field("status", pa.string()),
        pa.field("reason", pa.string()),
        pa.field("error", pa.string()),
        pa.field("alt_text", pa.string()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("caption", pa.string()),
        pa.field("captions", pa.list_(pa.string())),
        pa.field("candidates", pa.list_(INTERNAL_CANDIDATE_TYPE)),
        pa.field("url", pa.string()),
        pa.field("image_ext", pa.string()),
        pa.field("image_sha256", pa.string()),
        pa.field("source_url", pa.string()),
        pa.field("meta", pa.string()),
        pa.field("image", pa.binary()),
        pa.field("pixels", pa.binary()),
        pa.field("pixels_width", pa.int32()),
        pa.field("pixels_height", pa.int32()),
        pa.field("kale_status", pa.string()),
        pa.field("download_status", pa.string()),
        pa.field("download_error", pa.string()),
        pa.field("download_sha256", pa.string()),
        # shard_end rows only: how many samples the shard held and what went wrong
        # while reading it (a truncated tar, a file that is not a tar).
        pa.field("shard_total", pa.int64()),
        pa.field("shard_error", pa.string()),
        pa.field("image_phash", pa.string()),
        pa.field("alt_text_language", pa.string()),
        pa.field("alt_text_language_score", pa.float64()),
        pa.field("aesthetic_score", pa.float64()),
        pa.field("nsfw_score", pa.float64()),
        pa.field("watermark_score", pa.float64()),
        pa.field("image_embedding", pa.binary()),
    ]
)

# status used inside the pipeline for samples still being processed
STATUS_PENDING = "pending"


def empty_row() -> dict:
    """A row of the internal schema with every field null."""
    return {name: None for name in INTERNAL_SCHEMA.names}
