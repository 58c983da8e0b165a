"""Data layer: real-format loaders on tiny fake copies, transforms, embedded builders."""
import gzip
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import scipy.io
import torch
from PIL import Image

from xml_plugin.data import embedded
from xml_plugin.data.datasets import cache_root, get_dataset
from xml_plugin.data.real import CUB200, Cars196, InShop, StanfordOnlineProducts
from xml_plugin.data.transforms import eval_transform, train_transform


def _jpeg(path: Path, colour) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (12, 9), colour).save(path, "JPEG")


# ---------------------------------------------------------------------------------------------
# fake copies of the four distributed formats

def make_cub(root: Path) -> None:
    base = root / "CUB_200_2011"
    # image ids deliberately listed out of order; class ids 1..3
    rows = [(3, "002.B/b1.jpg", 2), (1, "001.A/a1.jpg", 1), (2, "001.A/a2.jpg", 1), (4, "003.C/c1.jpg", 3)]
    for _, rel, cls in rows:
        _jpeg(base / "images" / rel, (cls * 60, 0, 0))
    (base / "images.txt").write_text("".join(f"{i} {rel}\n" for i, rel, _ in rows))
    (base / "image_class_labels.txt").write_text("".join(f"{i} {c}\n" for i, _, c in rows))
    (base / "classes.txt").write_text("1 001.A\n2 002.B\n3 003.C\n")


def make_cars(root: Path) -> None:
    classes = [5, 2, 5, 1, 2]
    dt = [("bbox_x1", "O"), ("bbox_y1", "O"), ("bbox_x2", "O"), ("bbox_y2", "O"),
          ("relative_im_path", "O"), ("class", "O"), ("test", "O")]
    ann = np.zeros((1, len(classes)), dtype=dt)
    for i, c in enumerate(classes):
        rel = f"car_ims/{i + 1:06d}.jpg"
        _jpeg(root / rel, (0, c * 40, 0))
        ann[0, i] = (1, 1, 10, 8, rel, np.uint8(c), np.uint8(i % 2))
    names = np.array([f"Car {k}" for k in range(1, 6)], dtype=object)[None, :]
    scipy.io.savemat(str(root / "cars_annos.mat"), {"annotations": ann, "class_names": names})


def make_sop(root: Path) -> None:
    base = root / "Stanford_Online_Products"
    train = [(1, 10, 1, "bicycle_final/10_0.JPG"), (2, 10, 1, "bicycle_final/10_1.JPG"),
             (3, 3, 2, "chair_final/3_0.JPG")]
    test = [(4, 50, 2, "chair_final/50_0.JPG"), (5, 50, 2, "chair_final/50_1.JPG"), (6, 7, 1, "bicycle_final/7_0.JPG")]
    for rows, name in ((train, "Ebay_train.txt"), (test, "Ebay_test.txt")):
        lines = ["image_id class_id super_class_id path"] + [" ".join(map(str, r)) for r in rows]
        base.mkdir(parents=True, exist_ok=True)
        (base / name).write_text("\n".join(lines) + "\n")
        for r in rows:
            _jpeg(base / r[3], (0, 0, r[1] * 4))


INSHOP_ROWS = [
    ("img/WOMEN/Dresses/id_00000009/01_1_front.jpg", "id_00000009", "train"),
    ("img/WOMEN/Dresses/id_00000002/01_1_front.jpg", "id_00000002", "train"),
    ("img/WOMEN/Dresses/id_00000002/01_2_side.jpg", "id_00000002", "train"),
    ("img/MEN/Denim/id_00000005/01_1_front.jpg", "id_00000005", "train"),
    ("img/MEN/Denim/id_00000031/01_1_front.jpg", "id_00000031", "query"),
    ("img/MEN/Denim/id_00000031/01_2_side.jpg", "id_00000031", "gallery"),
    ("img/MEN/Denim/id_00000020/01_1_front.jpg", "id_00000020", "gallery"),
    ("img/MEN/Denim/id_00000020/01_2_side.jpg", "id_00000020", "query"),
]


def make_inshop(root: Path) -> None:
    lines = [str(len(INSHOP_ROWS)), "image_name item_id evaluation_status"]
    lines += [" ".join(r) for r in INSHOP_ROWS]
    root.mkdir(parents=True, exist_ok=True)
    (root / "list_eval_partition.txt").write_text("\n".join(lines) + "\n")
    for rel, _, _ in INSHOP_ROWS:
        _jpeg(root / rel, (90, 90, 90))


# ---------------------------------------------------------------------------------------------

def test_cub_labels_and_both_root_forms(tmp_path):
    make_cub(tmp_path)
    for root in (tmp_path, tmp_path / "CUB_200_2011"):
        ds = CUB200(root)
        assert len(ds) == 4 and ds.num_classes == 3
        # sorted by image id: 1 (A), 2 (A), 3 (B), 4 (C)
        assert ds.labels.tolist() == [0, 0, 1, 2]
        assert ds.labels.dtype == np.int64
        assert ds.class_names == ["001.A", "002.B", "003.C"]
        assert ds.is_query is None and ds.is_gallery is None
        assert ds.image(2).getpixel((3, 3))[0] > 100  # class 2 image is red (120)
    # moving the data set keeps the fingerprint; it is stable across loads
    assert CUB200(tmp_path).fingerprint() == CUB200(tmp_path / "CUB_200_2011").fingerprint()


def test_items_are_transformed_tensors(tmp_path):
    make_cub(tmp_path)
    ds = get_dataset("cub200", root=str(tmp_path))
    item = ds[3]
    assert item["label"] == 2 and isinstance(item["label"], int)
    assert item["data"].shape == (3, 224, 224)  # default eval transform
    ds.transform = eval_transform(32)
    assert ds[0]["data"].shape == (3, 32, 32)


def test_missing_file_messages_name_path_layout_and_flag(tmp_path):
    with pytest.raises(FileNotFoundError) as e:
        CUB200(tmp_path)
    msg = str(e.value)
    assert str(tmp_path / "CUB_200_2011" / "images.txt") in msg
    assert "image_class_labels.txt" in msg and "--dataset_root" in msg
    make_cub(tmp_path)
    os.remove(tmp_path / "CUB_200_2011" / "classes.txt")
    with pytest.raises(FileNotFoundError, match="classes.txt"):
        CUB200(tmp_path)
    with pytest.raises(FileNotFoundError) as e:
        Cars196(tmp_path)
    assert str(tmp_path / "cars_annos.mat") in str(e.value) and "car_ims" in str(e.value)
    with pytest.raises(FileNotFoundError, match="Ebay_train.txt"):
        StanfordOnlineProducts(tmp_path)
    with pytest.raises(FileNotFoundError, match="list_eval_partition.txt") as e:
        InShop(tmp_path)
    assert "--dataset_root" in str(e.value)


def test_cars_reads_struct_array(tmp_path):
    make_cars(tmp_path)
    ds = get_dataset("cars196", root=tmp_path)
    assert len(ds) == 5 and ds.num_classes == 3
    assert ds.labels.tolist() == [2, 1, 2, 0, 1]  # classes 5, 2, 5, 1, 2 -> sorted ids 1, 2, 5
    assert ds.class_names == ["Car 1", "Car 2", "Car 5"]
    assert ds.is_official_test.tolist() == [False, True, False, True, False]
    assert ds.image(0).getpixel((4, 4))[1] > 150
    shutil.rmtree(tmp_path / "car_ims")
    with pytest.raises(FileNotFoundError, match="car_ims"):
        Cars196(tmp_path)


def test_sop_pools_train_and_test(tmp_path):
    make_sop(tmp_path)
    ds = StanfordOnlineProducts(tmp_path)
    assert len(ds) == 6
    # class ids 10, 10, 3, 50, 50, 7 -> sorted 3, 7, 10, 50
    assert ds.labels.tolist() == [2, 2, 0, 3, 3, 1]
    assert ds.num_classes == 4 and ds.class_names[0] == "chair/3"
    assert ds.image(5).size == (12, 9)
    assert StanfordOnlineProducts(tmp_path / "Stanford_Online_Products").labels.tolist() == ds.labels.tolist()


def test_inshop_query_gallery(tmp_path):
    make_inshop(tmp_path)
    ds = InShop(tmp_path)
    assert len(ds) == 8 and ds.num_classes == 5
    # item ids sorted: 02, 05, 09, 20, 31
    assert ds.labels.tolist() == [2, 0, 0, 1, 4, 4, 3, 3]
    assert ds.is_train.tolist() == [True] * 4 + [False] * 4
    assert ds.is_query.tolist() == [False] * 4 + [True, False, False, True]
    assert ds.is_gallery.tolist() == [False] * 4 + [False, True, True, False]
    assert ds.class_names[0] == "id_00000002"
    # the partition is part of the identity
    f1 = ds.fingerprint()
    ds.is_query = ~ds.is_query
    assert ds.fingerprint() != f1


def test_transforms():
    img = Image.new("RGB", (300, 200), (255, 0, 0))
    x = eval_transform(64)(img)
    assert x.shape == (3, 64, 64)
    # red channel normalised with ImageNet statistics
    assert torch.allclose(x[0], torch.full((64, 64), (1 - 0.485) / 0.229), atol=1e-5)
    assert train_transform(48)(img).shape == (3, 48, 48)
    # flip=False never mirrors: an asymmetric image cropped at full scale stays identical
    half = Image.new("RGB", (64, 64), (0, 0, 0))
    half.paste((255, 255, 255), (0, 0, 32, 64))
    t = train_transform(64, scale=(1.0, 1.0), flip=False)
    outs = [t(half) for _ in range(10)]
    assert all(o[:, :, :16].mean() > o[:, :, -16:].mean() for o in outs)
    with pytest.raises(ValueError, match="scale"):
        train_transform(64, scale=(0.5, 1.5))
    with pytest.raises(ValueError, match="image_size"):
        eval_transform(0)


def test_cache_root_env(monkeypatch, tmp_path):
    monkeypatch.setenv("XML_PLUGIN_CACHE", str(tmp_path / "c"))
    assert cache_root() == tmp_path / "c"
    monkeypatch.delenv("XML_PLUGIN_CACHE")
    assert cache_root() == Path.home() / ".cache" / "xml_plugin"


# ---------------------------------------------------------------------------------------------
# embedded builders

def test_build_once_is_atomic(tmp_path):
    def failing(tmp):
        (tmp / "half.png").write_bytes(b"x")
        raise KeyboardInterrupt  # a killed build
    with pytest.raises(KeyboardInterrupt):
        embedded.build_once("toy", 1, {"a": 1}, failing, root=tmp_path)
    assert list(tmp_path.iterdir()) == []  # neither a done folder nor a leftover temp folder
    calls = []

    def ok(tmp):
        calls.append(1)
        (tmp / "x.png").write_bytes(b"x")
        return {"items": [], "class_names": []}
    a = embedded.build_once("toy", 1, {"a": 1}, ok, root=tmp_path)
    b = embedded.build_once("toy", 1, {"a": 1}, ok, root=tmp_path)
    c = embedded.build_once("toy", 1, {"a": 2}, ok, root=tmp_path)
    assert a == b != c and len(calls) == 2 and (a / "index.json").is_file()


def _needs_cards():
    if shutil.which("rsvg-convert") is None or not embedded.DECK_DIR.is_dir():
        pytest.skip("Debian packages kdegames-card-data-kf5 librsvg2-bin are not installed")
    for deck in ("standard", "oxygen-air"):
        if not (embedded.DECK_DIR / f"svg-{deck}").is_dir():
            pytest.skip(f"card deck {deck} (kdegames-card-data-kf5) is not installed")


def test_cards_build_labels_determinism_reuse(monkeypatch, tmp_path):
    _needs_cards()
    monkeypatch.setenv("XML_PLUGIN_CACHE", str(tmp_path / "a"))
    decks = ["standard", "oxygen-air"]
    before = embedded.BUILD_COUNTS["cards"]
    ds = get_dataset("cards", decks=decks, image_size=48)
    assert embedded.BUILD_COUNTS["cards"] == before + 1
    assert len(ds) == 104 and ds.num_classes == 52
    assert np.bincount(ds.labels).tolist() == [2] * 52
    # suit-major order: clubs first (1..king), spades last
    assert ds.class_names[0] == "1_club" and ds.class_names[12] == "king_club"
    assert ds.class_names[13] == "1_diamond" and ds.class_names[51] == "king_spade"
    i = int(np.flatnonzero(ds.labels == ds.class_names.index("queen_heart"))[0])
    img = np.asarray(ds.image(i))
    assert img.shape == (48, 48, 3) and img.std() > 10  # not blank
    assert img[..., 0].mean() > img[..., 2].mean()  # hearts are red
    index_mtime = (ds.folder / "index.json").stat().st_mtime_ns
    # reuse: the second call finds the folder and does not build
    again = get_dataset("cards", decks=decks, image_size=48)
    assert embedded.BUILD_COUNTS["cards"] == before + 1
    assert again.folder == ds.folder and (again.folder / "index.json").stat().st_mtime_ns == index_mtime
    assert again.fingerprint() == ds.fingerprint()
    # determinism: rendering cards again (a fresh decompressed deck, the build's zoom) gives the
    # stored pixels exactly
    svg = tmp_path / "standard.svg"
    svg.write_bytes(gzip.decompress(embedded._deck_file(embedded.DECK_DIR, "standard").read_bytes()))
    zoom = ds.build_info["zooms"]["standard"]
    for k in np.flatnonzero([p.parent.name == "standard" for p in ds.paths])[::13]:
        card = ds.class_names[ds.labels[k]]
        fresh = embedded.card_image(shutil.which("rsvg-convert"), svg, card, zoom, 48)
        assert np.array_equal(np.asarray(fresh), np.asarray(ds.image(k))), card


def test_cards_missing_deck_names_packages(tmp_path):
    with pytest.raises(FileNotFoundError, match="kdegames-card-data-kf5") as e:
        embedded.Cards(root=tmp_path, decks=["standard"], deck_dir=str(tmp_path))
    assert "svg-standard" in str(e.value)
    assert list(tmp_path.iterdir()) == []


def _needs_fonts(keys):
    for k in keys:
        try:
            embedded._font_file(embedded.FONT_DIR, k)
        except FileNotFoundError as exc:
            pytest.skip(str(exc))


def test_kanji_build(monkeypatch, tmp_path):
    fonts = ["motoya-l-cedar", "wqy-microhei"]
    _needs_fonts(fonts)
    monkeypatch.setenv("XML_PLUGIN_CACHE", str(tmp_path))
    before = embedded.BUILD_COUNTS["kanji"]
    ds = get_dataset("kanji", num_classes=5, image_size=32, fonts=fonts)
    assert len(ds) == 10 and ds.num_classes == 5
    assert ds.labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    cps = [ord(c) for c in ds.class_names]
    assert cps == sorted(cps) and all(0x4E00 <= c <= 0x9FFF for c in cps)
    assert ds.class_names[0] == "\u4e00"  # the first ideograph is in every CJK font
    for k in range(len(ds)):
        img = np.asarray(ds.image(k).convert("L"))
        assert img.shape == (32, 32) and img.min() < 100 and img.max() == 255  # ink on white
    # the two fonts draw the same character differently
    assert not np.array_equal(np.asarray(ds.image(2)), np.asarray(ds.image(3)))
    again = get_dataset("kanji", num_classes=5, image_size=32, fonts=fonts)
    assert embedded.BUILD_COUNTS["kanji"] == before + 1 and again.folder == ds.folder
    other = embedded.Kanji(root=tmp_path / "other", num_classes=5, image_size=32, fonts=fonts)
    assert all(np.array_equal(np.asarray(ds.image(k)), np.asarray(other.image(k))) for k in range(len(ds)))
    seeded = embedded.Kanji(num_classes=5, image_size=32, fonts=fonts, seed=3)
    assert seeded.class_names != ds.class_names and seeded.fingerprint() != ds.fingerprint()
    assert [ord(c) for c in seeded.class_names] == sorted(ord(c) for c in seeded.class_names)


def test_kanji_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="fonts-motoya-l-cedar"):
        embedded.Kanji(root=tmp_path, fonts=["motoya-l-cedar"], font_dir=str(tmp_path))
    with pytest.raises(ValueError, match="unknown kanji font"):
        embedded.Kanji(root=tmp_path, fonts=["comic-sans"])
    with pytest.raises(ValueError, match="num_classes"):
        embedded.Kanji(root=tmp_path, num_classes=0)


@pytest.mark.parametrize("framing", ["margins", "fill", "aspect"])
def test_cards_framings(monkeypatch, tmp_path, framing):
    """The stored card: `margins` fills the height of a square, `fill` the whole square, `aspect` keeps the card's
    own outline (portrait, no padding); read off the pixels, not the code's sizes."""
    _needs_cards()
    monkeypatch.setenv("XML_PLUGIN_CACHE", str(tmp_path / "a"))
    ds = get_dataset("cards", decks=["standard"], image_size=64, framing=framing)
    img = np.asarray(ds.image(0)).astype(int)
    h, w = img.shape[:2]
    ink_cols = np.flatnonzero((img < 250).any(axis=(0, 2)))  # columns with any non-white pixel (the card's border)
    ink_rows = np.flatnonzero((img < 250).any(axis=(1, 2)))
    width, height = ink_cols[-1] - ink_cols[0] + 1, ink_rows[-1] - ink_rows[0] + 1
    if framing == "margins":
        assert (h, w) == (64, 64) and height >= 62 and width <= 52  # a portrait card on a square: margins left/right
    elif framing == "fill":
        assert (h, w) == (64, 64) and height >= 62 and width >= 62
    else:
        assert h == 64 and 36 <= w <= 52 and width >= w - 2 and height >= 62  # the card's own portrait outline
    if framing != "margins":  # the framing is part of the folder's identity; the original square keeps its old name
        assert ds.folder != get_dataset("cards", decks=["standard"], image_size=64).folder
    with pytest.raises(ValueError, match="framing"):
        get_dataset("cards", decks=["standard"], image_size=64, framing="stretch")


def test_random_crop_pad_to_square_keeps_the_aspect():
    """A crop of a portrait image keeps a portrait aspect within RandomResizedCrop's [3/4, 4/3] of the image's own,
    and is padded (white columns), not stretched: the painted share of the width is the crop's aspect."""
    from xml_plugin.data.transforms import RandomCropPadToSquare
    from PIL import Image
    torch.manual_seed(0)
    src = Image.new("RGB", (100, 150), (200, 0, 0))
    tf = RandomCropPadToSquare(60, (0.5, 1.0))
    shares = []
    for _ in range(50):
        out = np.asarray(tf(src)).astype(int)
        assert out.shape == (60, 60, 3)
        red = (out[..., 0] > 100) & (out[..., 1] < 100)
        assert red.any(axis=1).all()  # the crop's height fills the square
        shares.append(red.any(axis=0).mean())
    lo, hi = (100 / 150) * 3 / 4, (100 / 150) * 4 / 3
    assert min(shares) >= lo - 0.04 and max(shares) <= hi + 0.04
    assert max(shares) - min(shares) > 0.1  # the aspect is drawn, not fixed
