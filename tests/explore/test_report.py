"""``curate report``: one self-contained page for a run or two, escaped, and whole in a browser."""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from curate.cli import main
from curate.schema import SAMPLES_SCHEMA
from tests.explore.chromium import body_count, render
from tests.explore.run_output import make_run_output


@pytest.fixture(scope="module")
def report_page(run_out) -> Path:
    """The report written once by the CLI to its default place, OUT/report.html."""
    assert main(["report", str(run_out)]) == 0
    return run_out / "report.html"


def _section(page: str, section: str) -> str:
    return page.split(f'<section id="{section}">')[1].split("</section>")[0]


def test_report_contents(report_page):
    page = report_page.read_text()
    # untrusted captions are escaped: the only script is the report's own check
    assert "<script>alert(1)</script>" not in page and "&lt;script&gt;alert(1)&lt;/script&gt;" in page
    assert "blue &lt;b&gt;sky&lt;/b&gt; &amp; sea" in page
    assert page.count("<script>") == 1
    assert 'src="http' not in page and "src='http" not in page  # self-contained
    for section in ("summary", "outcomes", "scores", "lengths", "kept", "dropped", "beat-alt", "shards"):
        assert f'<section id="{section}">' in page
    beat = _section(page, "beat-alt")
    assert beat.count('<figure class="card">') == 3  # k0000, k0100 (synthetic) and k0201 (KALE)
    assert all(key in beat for key in ("k0000", "k0100", "k0201"))
    dropped = _section(page, "dropped")
    assert dropped.count('<figure class="card">') == 3 and dropped.count("<img ") == 2
    assert "image not available: input shard not readable" in dropped  # k0200: input tar deleted
    kept = _section(page, "kept")
    # k0201's input tar is deleted too: its thumbnail comes from OUT/shards
    assert kept.count('<figure class="card">') == 4 and kept.count("<img ") == 4
    assert "image not available" not in kept
    # two score histograms, the outcomes chart and the length chart; thumbnails are JPEG
    assert page.count("data:image/png;base64,") == 4
    outcomes = _section(page, "outcomes")
    assert 'dropped: itm_below_threshold</td><td class="n">2<' in outcomes
    assert 'dropped: clip_below_threshold</td><td class="n">1<' in outcomes


def test_report_compare(run_out, tmp_path, capsys):
    other = make_run_output(tmp_path, name="out-b")
    table = pq.read_table(other / "samples" / "00000.parquet").to_pylist()
    table[2].update(status="kept", reason=None, caption="a green square", captions=["a green square"])
    table[2]["candidates"][1]["kept"] = True
    pq.write_table(pa.Table.from_pylist(table, schema=SAMPLES_SCHEMA), other / "samples" / "00000.parquet")
    target = tmp_path / "compare.html"
    assert (
        main(["report", str(run_out), "--compare", str(other), "--output", str(target), "--samples", "8"])
        == 0
    )
    assert capsys.readouterr().out.strip() == str(target)
    page = target.read_text()
    assert '<section id="compare">' in page and '<div class="cols">' in page
    changed = _section(page, "changed")
    assert "samples whose status or caption changed (1)" in changed
    assert changed.count('<figure class="card">') == 1 and "k0002" in changed
    compare = _section(page, "compare")
    assert re.search(
        r"samples kept</td><td class=\"n\">4</td><td class=\"n\">5</td><td class=\"n\">1<", compare
    )


def test_report_in_headless_chromium(report_page, tmp_path):
    """Open the page in a real browser: every image and plot decodes; the screenshot is not blank."""
    shown = render(report_page, tmp_path, width=1280, height=4200)
    # set by the report's own script on load: it ran (CSP hash right) and no image failed
    assert body_count(shown, "broken-images") == 0, shown.body
    assert body_count(shown, "images") == 13  # 4 plots + 4 kept + 2 dropped (1 placeholder) + 3 beat-alt
    assert "alert(1)" not in shown.dom.replace("&lt;script&gt;alert(1)&lt;/script&gt;", "")
    with Image.open(shown.screenshot) as img:
        assert img.size == (1280, 4200)
        colors = img.convert("RGB").resize((160, 525)).getcolors(maxcolors=1 << 16)
        assert colors is not None and len(colors) > 50  # text, plots and thumbnails, not a blank page
    if os.environ.get("CURATE_REPORT_SCREENSHOT"):  # keep a copy to look at
        shutil.copy(shown.screenshot, os.environ["CURATE_REPORT_SCREENSHOT"])
