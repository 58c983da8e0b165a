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
    if dataset == "cards":  # the card keeps its corners: no flip, crops of at least half the card
        assert cfg["transforms"]["train"] == {"scale": [0.5, 1.0], "flip": False}
    if dataset in ("cub200", "sop"):  # the real data sets keep the protocol's transforms
        assert cfg["transforms"]["train"] == {"scale": [0.16, 1.0], "flip": True}
    # the user's own words still win over a preset
    mine = overrides + [("transforms.eval.mode", "pad")]
    assert C.load({}, mine, presets=C.presets_for({}, mine))["transforms"]["eval"]["mode"] == "pad"


def test_a_chosen_general_preset_wins_over_the_data_set_preset():
    sel = {"config_general": ["smoke"]}
    overrides = [("dataset.name", "kanji")]
    cfg = C.load(sel, overrides, presets=C.presets_for(sel, overrides))
    assert cfg["cache"]["views"] == 2 and cfg["dataset"]["options_for"]["kanji"]["num_classes"] == 200
