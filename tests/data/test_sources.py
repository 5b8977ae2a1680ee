"""The source readers: items, captions and skip marks from the package trees, before any image is decoded."""

from __future__ import annotations

from pathlib import Path

import pytest

from curate.data.items import FetchError
from curate.data.sources import (
    OPENCLIPART_PNG_SUBDIR,
    OPENCLIPART_SVG_SUBDIR,
    SPLITS,
    TUXPAINT_SUBDIR,
    OpenclipartSource,
    TuxpaintSource,
    parse_svg_metadata,
    read_stamp_caption,
    split_for,
)
from tests.data.trees import SVG_TEMPLATE, build_openclipart, build_tuxpaint, txt


def test_tuxpaint_items_in_path_order_with_captions_and_skip_marks(tmp_path: Path) -> None:
    source = TuxpaintSource([build_tuxpaint(tmp_path / "src")])
    assert source.data_roots == [tmp_path / "src" / TUXPAINT_SUBDIR]
    items, available = source.items()
    assert available == len(items) == 40
    assert [i.id for i in items] == sorted(i.id for i in items)
    by_id = {i.id: i for i in items}
    assert by_id["animals/birds/crow"].caption == "A crow."
    assert by_id["animals/birds/crow"].meta["stamp_options"] == ["noflip"]
    assert by_id["animals/banner"].caption == "A very long banner."
    assert by_id["town/both"].image.name == "both.png"  # png preferred over svg
    marks = {i.id: (i.skip, i.detail) for i in items if i.skip}
    assert marks == {
        "food/apple_mirror": ("mirror_variant", "food/apple"),
        "food/pear": ("no_caption", "food/pear.png"),
        "seasonal/gift": ("no_image", "seasonal/gift.txt"),
        "town/sign": ("svg_only", "town/sign.svg"),
        "town/empty": ("empty_caption", "town/empty.txt"),
    }  # town/broken is not marked: only the encoder finds its image unreadable
    assert by_id["town/sign"].image.suffix == ".svg"  # kept, so --rasterize-svg can render it

    first, total = source.items(3)
    assert total == 40 and [i.id for i in first] == [i.id for i in items[:3]]
    assert {source.split_of(i) for i in items} == {name for name, _ in SPLITS}


def test_openclipart_items_pair_png_with_svg_title_and_fold_symlinks(tmp_path: Path) -> None:
    root = build_openclipart(tmp_path / "src")
    source = OpenclipartSource([root])
    assert source.data_roots == [root / OPENCLIPART_PNG_SUBDIR, root / OPENCLIPART_SVG_SUBDIR]
    items, available = source.items()
    assert available == len(items) == 8
    by_id = {i.id: i for i in items}
    frog = by_id["animals/frog_01"]
    assert frog.caption == "2 dead frogs" and frog.skip is None
    assert frog.meta["also_in"] == ["signs/frog_01"]
    assert frog.meta["url"] == f"deb://openclipart-png/{OPENCLIPART_PNG_SUBDIR}/animals/frog_01.png"
    assert by_id["tools/hammer_01"].caption == "hammer & nails"
    assert {i.id: i.skip for i in items if i.skip} == {
        "signs/frog_01": "duplicate_symlink",
        "shapes/vector_only": "svg_only",
        "shapes/raster_only": "no_caption",
        "shapes/untitled": "empty_caption",
        "shapes/badxml": "unreadable_metadata",
    }
    assert {source.split_of(i) for i in items} == {"all"}


def test_missing_layout_names_the_expected_directory(tmp_path: Path) -> None:
    with pytest.raises(FetchError, match=r"no usr/share/tuxpaint/stamps/ under .*tuxpaint-stamps-default"):
        TuxpaintSource([tmp_path])
    (tmp_path / OPENCLIPART_PNG_SUBDIR).mkdir(parents=True)
    with pytest.raises(FetchError, match=r"usr/share/openclipart/svg/ .*openclipart-svg package root"):
        OpenclipartSource([tmp_path])
    with pytest.raises(FetchError, match=r"source directory does not exist: .*nope"):
        OpenclipartSource([tmp_path, tmp_path / "nope"])


def test_stamp_caption_is_the_english_first_line(tmp_path: Path) -> None:
    path = tmp_path / "a.txt"
    txt(path, "\ufeff  A  red\tball \nfr.utf8=Une balle rouge.\n")
    assert read_stamp_caption(path) == "A red ball"
    txt(path, "pt_BR.utf8=Uma bola.\nen_GB.UTF-8=A ball.\n")  # translations only
    assert read_stamp_caption(path) == ""
    txt(path, "")
    assert read_stamp_caption(path) == ""


def test_split_for_is_a_fixed_80_10_10_hash_split() -> None:
    assert split_for("animals/birds/crow") == split_for("animals/birds/crow")
    counts = {name: 0 for name, _ in SPLITS}
    for i in range(2000):
        counts[split_for(f"stamp/{i}")] += 1
    assert 1500 < counts["train"] < 1700 and 120 < counts["val"] < 280 and 120 < counts["test"] < 280


def test_parse_svg_metadata_takes_the_works_title_not_the_agents() -> None:
    data = SVG_TEMPLATE.format(
        w=10,
        h=10,
        rw=6,
        rh=6,
        title=" milk\n  bottle ",
        description="a glass of milk",
        keywords="<rdf:li>food</rdf:li><rdf:li> beverage </rdf:li>",
    ).encode()
    md = parse_svg_metadata(data)
    assert md.title == "milk bottle"
    assert md.description == "a glass of milk"
    assert md.keywords == ["food", "beverage"]
    assert md.creator == "Jane Artist"
    assert md.license == "http://web.resource.org/cc/PublicDomain"
    alt = data.replace(
        b"<dc:title> milk\n  bottle </dc:title>",
        b'<dc:title><rdf:Alt><rdf:li xml:lang="en">Milk</rdf:li><rdf:li xml:lang="fr">Lait</rdf:li>'
        b"</rdf:Alt></dc:title>",
    )
    assert parse_svg_metadata(alt).title == "Milk"
    untitled = data.replace(b"<dc:title> milk\n  bottle </dc:title>", b"")
    assert parse_svg_metadata(untitled).title is None  # not the creator's or publisher's name
    no_work = (
        b'<svg xmlns:dc="http://purl.org/dc/elements/1.1/"><metadata>'
        b"<dc:creator><dc:title>Someone</dc:title></dc:creator>"
        b"<other><dc:title>Bare title</dc:title></other></metadata></svg>"
    )
    assert parse_svg_metadata(no_work).title == "Bare title"
    assert parse_svg_metadata(no_work.replace(b"Bare title", b"")).title is None
