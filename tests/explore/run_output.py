"""A run output written directly, for ``curate query/stats/report`` tests without Ray or models.

What a run leaves behind: input tars with real images, sample Parquet in the output contract
(:data:`curate.schema.SAMPLES_SCHEMA`), curated shards and a manifest. The scores are chosen
by hand so the tests can check exact quantiles and winners, which random tiny models cannot
give; the statuses, reasons and ``kept`` flags are what the pipeline's keep policy decides for
those scores under :data:`POLICY` (test_views.py checks that with the real policy), so the
fake says nothing the pipeline would not. tests/pipeline/test_explore_real_run.py runs the
same commands on the output of a real pipeline run.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw

from curate.io.files import write_tar
from curate.schema import SAMPLES_SCHEMA
from tests.helpers import encode_image, make_shard

# the manifest's policy, under which the samples below were decided
POLICY = {"itm_threshold": 0.5, "top_k": 1, "min_clip_score": 0.2}


def cand(text: str, source: str, itm: float | None, clip: float | None, kept: bool) -> dict[str, Any]:
    return {"text": text, "source": source, "itm_score": itm, "clip_score": clip, "kept": kept}


def shape_image(kind: str, color: str, ext: str) -> bytes:
    """A small real image: a shape on a background (RGBA for the clip-art PNG)."""
    mode = "RGBA" if kind == "clipart" else "RGB"
    img = Image.new(mode, (64, 48), (0, 0, 0, 0) if mode == "RGBA" else "white")
    draw = ImageDraw.Draw(img)
    if kind == "circle":
        draw.ellipse((8, 4, 56, 44), fill=color)
    else:
        draw.rectangle((8, 8, 56, 40), fill=color)
    return encode_image(img, ext)


# shard -> samples; "image" is (shape, colour, ext) or raw bytes (a corrupt file)
SAMPLES: dict[str, list[dict[str, Any]]] = {
    "00000": [
        dict(
            key="k0000",
            status="kept",
            image=("square", "red", "png"),
            alt="a red square",
            caption="a red box",
            candidates=[
                cand("a red square", "alt", 0.9, 0.30, False),
                cand("a red box", "synthetic", 0.8, 0.32, True),
            ],
        ),
        dict(
            key="k0001",
            status="kept",
            image=("square", "blue", "jpg"),
            alt="blue <b>sky</b> & sea",
            caption="blue <b>sky</b> & sea",
            candidates=[
                cand("blue <b>sky</b> & sea", "alt", 0.95, 0.40, True),
                cand("a blue picture", "synthetic", 0.6, 0.25, False),
            ],
        ),
        dict(
            key="k0002",
            status="dropped",
            reason="itm_below_threshold",
            image=("circle", "green", "jpeg"),
            alt="buy cheap watches",
            candidates=[
                cand("buy cheap watches", "alt", 0.1, 0.05, False),
                cand("a green square", "synthetic", 0.4, 0.22, False),
            ],
        ),
    ],
    "00001": [
        dict(
            key="k0100",
            status="kept",
            image=("circle", "gold", "png"),
            alt="<script>alert(1)</script>",
            caption="a yellow circle",
            candidates=[
                cand("<script>alert(1)</script>", "alt", 0.2, 0.10, False),
                cand("a yellow circle", "synthetic", 0.7, 0.35, True),
            ],
        ),
        dict(
            key="k0101",
            status="dropped",
            reason="clip_below_threshold",
            image=("clipart", "purple", "png"),
            alt="photo",
            candidates=[
                cand("photo", "alt", 0.55, 0.15, False),
                cand("a shape", "synthetic", 0.6, 0.18, False),
            ],
        ),
        dict(
            key="k0102",
            status="error",
            image=b"\xff\xd8 not really a jpeg",
            image_ext="jpg",
            alt="broken",
            error="cannot identify image file\nTraceback (most recent call last): ...",
        ),
    ],
    # the input tar of this shard is gone after the run: the report must cope
    "00002": [
        dict(
            key="k0200",
            status="dropped",
            reason="itm_below_threshold",
            image=("square", "purple", "jpg"),
            alt="lost image",
            candidates=[
                cand("lost image", "alt", 0.3, 0.20, False),
                cand("a purple thing", "synthetic", 0.45, 0.21, False),
            ],
        ),
        dict(
            key="k0201",
            status="kept",
            image=("square", "teal", "png"),
            alt="bike",
            caption="a red bicycle leaning on a wall in Amsterdam",
            candidates=[
                cand("bike", "alt", 0.7, 0.28, False),
                cand("a red bicycle leaning on a wall in Amsterdam", "kale", 0.85, 0.38, True),
                cand("a bicycle", "synthetic", 0.8, 0.33, False),
            ],
        ),
    ],
}
MISSING_INPUT_SHARD = "00002"


def _image_member(sample: dict[str, Any]) -> tuple[bytes, str]:
    if isinstance(sample["image"], bytes):
        return sample["image"], sample["image_ext"]
    return shape_image(*sample["image"]), sample["image"][2]


def make_run_output(tmp_path: Path, name: str = "out") -> Path:
    """Write input tars and the output of a curation run over them; return the output dir.

    8 samples in 3 shards: 4 kept, 3 dropped (2 itm_below_threshold, 1 clip_below_threshold),
    1 error. The input tar of shard 00002 is removed afterwards.
    """
    inputs = tmp_path / "inputs"
    out = tmp_path / name
    (out / "samples").mkdir(parents=True)
    shard_info = {}
    for shard, samples in SAMPLES.items():
        tar_path = inputs / f"{shard}.tar"
        rows, inputs_members, curated_members = [], [], []
        for s in samples:
            data, ext = _image_member(s)
            url = f"https://example.com/{s['key']}.{ext}"
            meta = json.dumps({"url": url, "key": s["key"]})
            inputs_members.append(
                {"key": s["key"], "image": data, "format": ext, "txt": s["alt"], "json": meta}
            )
            kept = s["status"] == "kept"
            decoded = s["status"] != "error"
            cands = s.get("candidates")
            rows.append(
                {
                    "key": s["key"],
                    "shard": shard,
                    "status": s["status"],
                    "reason": s.get("reason"),
                    "error": s.get("error"),
                    "alt_text": s["alt"],
                    "width": 64 if decoded else None,
                    "height": 48 if decoded else None,
                    "caption": s.get("caption") if kept else None,
                    "captions": [c["text"] for c in cands if c["kept"]] if kept else None,
                    "candidates": cands,
                    "url": url,
                    "image_ext": ext,
                    "image_sha256": hashlib.sha256(data).hexdigest(),
                    "source_url": str(tar_path),
                    "meta": meta,
                }
            )
            if kept:
                curated_meta = json.dumps({**json.loads(meta), "alt_text": s["alt"]})
                curated_members += [
                    (f"{s['key']}.{ext}", data),
                    (f"{s['key']}.txt", s["caption"].encode()),
                    (f"{s['key']}.json", curated_meta.encode()),
                ]
        make_shard(tar_path, inputs_members)
        write_tar(out / "shards" / f"{shard}.tar", curated_members)
        pq.write_table(
            pa.Table.from_pylist(rows, schema=SAMPLES_SCHEMA), out / "samples" / f"{shard}.parquet"
        )
        statuses = [r["status"] for r in rows]
        shard_info[shard] = {
            "samples": len(rows),
            "kept": statuses.count("kept"),
            "dropped": statuses.count("dropped"),
            "error": statuses.count("error"),
            "fault": None,
        }
        if shard == MISSING_INPUT_SHARD:
            tar_path.unlink()
    manifest = {
        "curate_version": "0.1.0",
        "pipeline": {"name": "test", "policy": dict(POLICY)},
        "input": [str(inputs / f"{s}.tar") for s in SAMPLES],
        "output": str(out),
        "models": {
            "captioner": {"model": "tiny-blip", "revision": "abc123"},
            "filter": {"model": "tiny-itm", "revision": None},
            "ranker": {"model": "tiny-clip", "revision": None},
        },
        "packages": {"duckdb": duckdb.__version__},
        "counts": {"kept": 4, "dropped": 3, "error": 1, "total": 8},
        "reasons": {"itm_below_threshold": 2, "clip_below_threshold": 1},
        "shards": shard_info,
        "started_at": "2025-01-01T00:00:00+00:00",
        "finished_at": "2025-01-01T00:00:04+00:00",
        "wall_s": 4.0,
        "samples_per_s": 2.0,
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return out
