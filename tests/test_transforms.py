"""Evaluation transforms (center crop, whole-image resize, padding) checked on synthetic images whose corners are
coloured, and the data-set presets merged automatically for --dataset NAME."""
from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from xml_plugin import config as C
from xml_plugin.data.transforms import eval_transform

RED, GREEN, BLUE, BLACK = (255, 0, 0), (0, 255, 0), (0, 0, 255), (0, 0, 0)


def _portrait(w=60, h=120, corner=12):
    """A grey portrait card with a red band on top and a blue band at the bottom (where a card's indices are)."""
    a = np.full((h, w, 3), 128, dtype=np.uint8)
    a[:corner] = RED
    a[-corner:] = BLUE
    return Image.fromarray(a)


def _pixels(tensor):
    """Normalise-free view: with mean 0 and std 1 the tensor holds ToTensor's [0, 1] values; -> uint8 HWC."""
    return (tensor.permute(1, 2, 0).numpy() * 255).round().astype(int)


def _tf(mode, size=48):
    return eval_transform(size, mean=(0, 0, 0), std=(1, 1, 1), mode=mode)


def test_center_crop_cuts_the_ends_of_a_portrait_image():
    out = _pixels(_tf("center_crop")(_portrait()))
    assert out.shape == (48, 48, 3)
    # shorter side 60 -> round(48 * 256 / 224) = 55, so the image is 55 x 110 and the crop keeps rows 31..78:
    # the 12-pixel bands (now 11 pixels) at both ends are gone
    assert not (out[..., 0] > 200).any() and not (out[..., 2] > 200).any()


def test_resize_keeps_the_whole_image():
    out = _pixels(_tf("resize")(_portrait()))
    assert out.shape == (48, 48, 3)
    # both bands survive, squeezed to 12 * 48 / 120 = 4.8 rows
    assert (out[1, :, 0] > 200).all() and (out[-2, :, 2] > 200).all()
    assert (np.abs(out[24] - 128) <= 2).all()


def test_pad_keeps_the_aspect_ratio():
    out = _pixels(_tf("pad")(_portrait()))
    # 60 x 120 padded with white to 120 x 120, then 48 x 48: the content is 24 columns wide, centred
    content = (np.abs(out[24] - 128) <= 3).all(axis=1)  # pure grey columns
    touched = (out[24] < 250).any(axis=1)  # columns with any content (antialiased edges included)
    assert 22 <= content.sum() <= 24 and 24 <= touched.sum() <= 26
    assert (out[24, :10] == 255).all() and (out[24, -10:] == 255).all()
    assert (out[1, 24, 0] > 200) and (out[-2, 24, 2] > 200)  # both bands survive, aspect ratio kept


def test_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="transforms.eval.mode"):
        eval_transform(32, mode="squash")


@pytest.mark.parametrize("dataset, mode", [("cards", "resize"), ("kanji", "resize"), ("cub200", "center_crop"),
                                           ("sop", "center_crop")])
def test_data_set_presets_are_picked_for_the_data_set(dataset, mode):
    overrides = [("dataset.name", dataset)]
    cfg = C.load({}, overrides, presets=C.presets_for({}, overrides))
    assert cfg["transforms"]["eval"]["mode"] == mode
    if dataset == "cards":  # the card keeps its corners: no flip, crops of at least half the card, filling its frame
        assert cfg["transforms"]["train"] == {"scale": [0.5, 1.0], "flip": False, "pad": None}
        assert cfg["dataset"]["options_for"]["cards"] == {"framing": "fill"}
    if dataset in ("cub200", "sop"):  # the real data sets keep the protocol's transforms
        assert cfg["transforms"]["train"] == {"scale": [0.16, 1.0], "flip": True, "pad": None}
        assert "cards" not in cfg["dataset"]["options_for"]
    # the user's own words still win over a preset
    mine = overrides + [("transforms.eval.mode", "pad")]
    assert C.load({}, mine, presets=C.presets_for({}, mine))["transforms"]["eval"]["mode"] == "pad"


def test_a_chosen_general_preset_wins_over_the_data_set_preset():
    sel = {"config_general": ["smoke"]}
    overrides = [("dataset.name", "kanji")]
    cfg = C.load(sel, overrides, presets=C.presets_for(sel, overrides))
    assert cfg["cache"]["views"] == 2 and cfg["dataset"]["options_for"]["kanji"]["num_classes"] == 200


def _corners(w=60, h=120, c=10):
    """A grey portrait image with a red, green, blue and black c x c patch in its four corners (TL, TR, BL, BR)."""
    a = np.full((h, w, 3), 128, dtype=np.uint8)
    a[:c, :c], a[:c, -c:], a[-c:, :c], a[-c:, -c:] = RED, GREEN, BLUE, BLACK
    return Image.fromarray(a)


def _is(pixel, colour, tol=40):
    return bool((np.abs(np.asarray(pixel) - np.asarray(colour)) <= tol).all())


def test_resize_keeps_all_four_corners():
    out = _pixels(_tf("resize")(_corners()))
    # 48 / 60 = 0.8 across, 48 / 120 = 0.4 down: a 10 px patch becomes 8 x 4 px; its centre is at (2, 4) from the corner
    assert _is(out[2, 4], RED) and _is(out[2, -5], GREEN) and _is(out[-3, 4], BLUE) and _is(out[-3, -5], BLACK)


def test_center_crop_of_a_portrait_image_loses_all_four_corners():
    out = _pixels(_tf("center_crop")(_corners()))
    # 60 x 120 -> 55 x 110, crop 48 x 48 from rows 31..78: the patches (rows 0..9 and 101..109) are gone
    assert (np.abs(out - 128) <= 3).all()


def test_pad_keeps_all_four_corners_and_the_aspect_ratio():
    out = _pixels(_tf("pad")(_corners()))
    # 60 x 120 -> white 120 x 120 with the image in columns 30..89 -> 48 x 48: content in columns 12..35, every row
    grey = np.abs(out - 128).max(axis=2) <= 3
    rows, cols = np.nonzero(grey)
    assert cols.min() in (12, 13) and cols.max() in (34, 35)  # 24 columns wide (antialiased edges may eat one)
    assert rows.min() <= 4 and rows.max() >= 43  # 48 rows high: the height fills the square
    assert (out[:, :11] == 255).all() and (out[:, 37:] == 255).all()  # the padding is white
    # the 10 px patches are 4 x 4 px: centres 2 px inside the content box's corners
    assert _is(out[2, 14], RED) and _is(out[2, 33], GREEN) and _is(out[45, 14], BLUE) and _is(out[45, 33], BLACK)


def test_short_side_sets_the_size_before_the_center_crop():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, size=(256, 256, 3), dtype=np.uint8)
    out = eval_transform(200, mean=(0, 0, 0), std=(1, 1, 1), mode="center_crop", short_side=256)(Image.fromarray(img))
    # resize to 256 is the identity here; the center crop of 200 starts at (256 - 200) / 2 = 28
    assert np.array_equal(_pixels(out), img[28:228, 28:228])
    default = eval_transform(200, mean=(0, 0, 0), std=(1, 1, 1))(Image.fromarray(img))  # 229 by default: another view
    assert not np.array_equal(_pixels(default), img[28:228, 28:228])
    with pytest.raises(ValueError, match="short_side"):
        eval_transform(200, short_side=150)


def test_the_default_run_gets_the_card_preset_and_a_real_data_set_the_protocol():
    cfg = C.load({}, [], presets=C.presets_for({}, []))  # no --dataset, no --config_dataset: cards, the default
    assert cfg["dataset"]["name"] == "cards" and ("config_dataset", "cards") in C.presets_for({}, [])
    assert cfg["transforms"]["eval"]["mode"] == "resize" and cfg["transforms"]["train"]["flip"] is False
    sel = {"config_dataset": ["cub200"]}
    cub = C.load(sel, [], presets=C.presets_for(sel, []))
    assert cub["transforms"]["eval"]["mode"] == "center_crop" and cub["transforms"]["train"] == {"scale": [0.16, 1.0],
                                                                                                  "flip": True,
                                                                                                  "pad": None}


def test_the_eval_transform_is_part_of_the_cache_key(tiny_cfg):
    from xml_plugin.protocol.experiment import Experiment

    def cache_of(name, **extra):
        exp = Experiment(tiny_cfg(**extra), name, progress=False)
        return exp.setup().source.cache

    crop = cache_of("crop", **{"transforms.eval.mode": "center_crop"})
    whole = cache_of("whole", **{"transforms.eval.mode": "resize"})
    assert crop.folder != whole.folder
    assert not np.allclose(crop.eval_features(np.arange(4)).numpy(), whole.eval_features(np.arange(4)).numpy())
    # an option left unset (null) keeps the key of a config without it
    assert cache_of("crop_null", **{"transforms.eval.mode": "center_crop",
                                    "transforms.eval.short_side": None}).folder == crop.folder
    assert cache_of("crop_pad_null", **{"transforms.eval.mode": "center_crop",
                                        "transforms.train.pad": None}).folder == crop.folder
    assert cache_of("crop_pad", **{"transforms.eval.mode": "center_crop",
                                   "transforms.train.pad": True}).folder != crop.folder


@pytest.mark.parametrize("key, value, words", [
    ("transforms.eval.mode", "squash", "transforms.eval.mode must be one of center_crop, resize, pad"),
    ("transforms.eval.fill", [255, 255], "transforms.eval.fill must be 3 ints"),
    ("transforms.eval.fill", 255, "transforms.eval.fill must be 3 ints"),
    ("transforms.eval.short_side", 16, "transforms.eval.short_side must be an int >= image_size"),
    ("transforms.train.scale", [0.9, 0.1], "transforms.train.scale must be"),
    ("transforms.train.flip", "no", "transforms.train.flip must be true or false"),
])
def test_bad_transform_options_are_input_errors_before_anything_is_written(tiny_cfg, tmp_path, key, value, words):
    from xml_plugin.protocol.experiment import Experiment
    exp = Experiment(tiny_cfg(**{key: value}), "bad", progress=False)
    with pytest.raises(C.ConfigError, match=words):
        exp.setup()
    assert not (tmp_path / "experiments" / "bad").exists()
