"""Data sets built from Debian packages, with no download at run time (docs/data.md):

- ``cards``: the 52 playing cards drawn by a fixed list of SVG decks (kdegames-card-data-kf5,
  rendered with librsvg2-bin's ``rsvg-convert``): few classes, several images each (CUB-like).
- ``kanji``: CJK ideographs drawn by a fixed list of fonts: many classes, few images each (SOP-like).

Each is built once, deterministically, into ``cache_root()/<name>-v<version>-<options hash>`` (PNG
files + ``index.json``) and reused. The build happens in a temporary folder that is renamed into
place only when complete, so a killed build never leaves a folder that counts as done.
"""
from __future__ import annotations

import gzip
import io
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image, ImageDraw, ImageFont, ImageOps

from ..registry import register
from .datasets import DMLDataset, cache_root, short_hash

INDEX = "index.json"
BUILD_COUNTS: Counter = Counter()  # name -> number of builds done by this process (tests check reuse)
_STALE_SECONDS = 600


# ---------------------------------------------------------------------------------------------
# build-once cache

def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True
    return True


def _remove_stale_builds(root: Path, name: str) -> None:
    """Delete temp folders of builds whose process died (older than 10 minutes)."""
    for tmp in root.glob(f".{name}-building-*"):
        try:
            pid = int(tmp.name.split("-building-")[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        if not _pid_alive(pid) and time.time() - tmp.stat().st_mtime > _STALE_SECONDS:
            shutil.rmtree(tmp, ignore_errors=True)


PROGRESS = {"on": True}  # the builders' progress bars; off with run.py --no_progress (see set_progress)


def set_progress(on: bool) -> None:
    """Show (or hide) the embedded data sets' build progress bars."""
    PROGRESS["on"] = bool(on)


def build_once(name: str, version: int, options: Dict, builder: Callable[[Path], Dict],
               root: Optional[Path] = None) -> Path:
    """Folder ``root/<name>-v<version>-<hash(options)>`` holding ``index.json``; runs
    ``builder(tmp_folder) -> index dict`` only if that folder is not complete yet."""
    root = Path(root).expanduser() if root is not None else cache_root()
    final = root / f"{name}-v{version}-{short_hash({'version': version, **options})}"
    if (final / INDEX).is_file():
        return final
    root.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(root, name)
    tmp = Path(tempfile.mkdtemp(prefix=f".{name}-building-{os.getpid()}-", dir=root))
    try:
        start = time.perf_counter()
        index = builder(tmp)
        index.update(name=name, version=version, options=options,
                     build_seconds=round(time.perf_counter() - start, 2))
        with open(tmp / INDEX, "w") as f:  # written last: its presence marks a complete build
            json.dump(index, f, indent=1)
        if final.exists() and not (final / INDEX).is_file():
            shutil.rmtree(final)  # an incomplete folder from elsewhere: not a finished build
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / INDEX).is_file():  # not a concurrent build that finished first
                raise
            shutil.rmtree(tmp, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    BUILD_COUNTS[name] += 1
    return final


def _pad_square(im: Image.Image, size: int, fill) -> Image.Image:
    """Resize so the longer side is ``size`` (aspect kept), centre on a ``size`` x ``size`` canvas."""
    w, h = im.size
    scale = size / max(w, h)
    nw, nh = max(1, round(w * scale)), max(1, round(h * scale))
    im = im.resize((nw, nh), Image.LANCZOS)
    out = Image.new(im.mode, (size, size), fill)
    out.paste(im, ((size - nw) // 2, (size - nh) // 2))
    return out


class EmbeddedDataset(DMLDataset):
    """A built folder read back from its ``index.json``."""

    version = 1

    def _load(self, folder: Path) -> None:
        with open(folder / INDEX) as f:
            index = json.load(f)
        self.folder = self.base_dir = folder
        self.build_seconds = index.get("build_seconds")
        self.build_info = {k: v for k, v in index.items() if k not in ("items", "class_names")}
        self._set_items([folder / rel for rel, _ in index["items"]], [lab for _, lab in index["items"]],
                        index["class_names"])


def _check_size(image_size) -> int:
    if not isinstance(image_size, int) or isinstance(image_size, bool) or image_size < 8:
        raise ValueError(f"image_size must be an int >= 8, got {image_size!r}")
    return image_size


# ---------------------------------------------------------------------------------------------
# playing cards

SUITS = ("club", "diamond", "heart", "spade")
RANKS = tuple(str(r) for r in range(1, 11)) + ("jack", "queen", "king")
# suit-major class order: clubs+diamonds are the protocol's train/val half, hearts+spades the test
# half, so every rank (face cards too) is seen in training (docs/data.md)
CARD_IDS = tuple(f"{rank}_{suit}" for suit in SUITS for rank in RANKS)
# all decks of kdegames-card-data-kf5 except konqi-modern and xskat-french ("has no dimensions"
# in rsvg-convert) and future (abstract design); see docs/data.md
CARD_DECKS = ("ancient-egyptians", "dondorf", "gm-paris", "jolly-royal", "nicu-ornamental", "nicu-white",
              "oxygen", "oxygen-air", "oxygen-white", "penguins", "standard", "tigullio-international",
              "xskat-german")
CARD_PACKAGES = "kdegames-card-data-kf5 librsvg2-bin"
DECK_DIR = Path("/usr/share/carddecks")


def _rsvg_convert() -> str:
    exe = shutil.which("rsvg-convert")
    if exe is None:
        raise FileNotFoundError(f"rsvg-convert not found: the cards data set needs it; "
                                f"install with: sudo apt-get install {CARD_PACKAGES}")
    return exe


def _deck_file(deck_dir: Path, deck: str) -> Path:
    files = sorted((deck_dir / f"svg-{deck}").glob("*.svgz"))
    if not files:
        raise FileNotFoundError(f"card deck {deck!r} not found (expected {deck_dir}/svg-{deck}/*.svgz); "
                                f"install with: sudo apt-get install {CARD_PACKAGES}")
    return files[0]


def render_card(exe: str, svg: Path, card_id: str, zoom: float) -> Image.Image:
    """``rsvg-convert -i card_id -z zoom`` -> the card cropped to its alpha bounding box, on white (RGB)."""
    res = subprocess.run([exe, "-i", card_id, "-z", f"{zoom:g}", str(svg)], capture_output=True)
    if res.returncode != 0 or not res.stdout:
        raise RuntimeError(f"rsvg-convert could not render {card_id!r} of {svg.name}: "
                           f"{res.stderr.decode(errors='replace').strip()}")
    with Image.open(io.BytesIO(res.stdout)) as im:
        rgba = im.convert("RGBA")
    box = rgba.getchannel("A").getbbox()
    if box is None:
        raise RuntimeError(f"rsvg-convert rendered {card_id!r} of {svg.name} as an empty image")
    card = rgba.crop(box)
    white = Image.new("RGB", card.size, (255, 255, 255))
    white.paste(card, mask=card.getchannel("A"))
    return white


CARD_FRAMINGS = ("margins", "fill", "aspect")


def card_image(exe: str, svg: Path, card_id: str, zoom: float, image_size: int, framing: str = "margins") -> Image.Image:
    """One stored card, rendered and cropped to its outline, then framed (``framing``):

    * ``margins``: longer side ``image_size``, padded to a square on white (the card fills the height only);
    * ``fill``: resized whole to ``image_size`` x ``image_size`` (the card fills the frame; its aspect changes);
    * ``aspect``: longer side ``image_size``, its own aspect kept, no padding (the transforms pad it: docs/data.md).
    """
    card = render_card(exe, svg, card_id, zoom)
    if framing == "margins":
        return _pad_square(card, image_size, (255, 255, 255))
    if framing == "fill":
        return card.resize((image_size, image_size), Image.LANCZOS)
    if framing == "aspect":
        w, h = card.size
        scale = image_size / max(w, h)
        return card.resize((max(1, round(w * scale)), max(1, round(h * scale))), Image.LANCZOS)
    raise ValueError(f"framing must be one of {', '.join(CARD_FRAMINGS)}, got {framing!r}")


def _build_cards(tmp: Path, decks: Sequence[str], image_size: int, deck_dir: Path, workers: int,
                 framing: str = "margins") -> Dict:
    from tqdm import tqdm

    exe = _rsvg_convert()
    svgs = {}
    for deck in decks:
        svgs[deck] = tmp / "svg" / f"{deck}.svg"
        svgs[deck].parent.mkdir(parents=True, exist_ok=True)
        svgs[deck].write_bytes(gzip.decompress(_deck_file(deck_dir, deck).read_bytes()))

    # one zoom per deck so that its cards come out at least image_size high (a 1x render is 40-225 px)
    zooms = {}
    for deck in decks:
        probe = render_card(exe, svgs[deck], CARD_IDS[0], 1.0)
        zooms[deck] = max(1.0, np.ceil(4.0 * image_size / max(probe.size)) / 4.0)

    def one(task: Tuple[str, str]) -> str:
        deck, card = task
        rel = f"{deck}/{card}.png"
        img = card_image(exe, svgs[deck], card, zooms[deck], image_size, framing)
        (tmp / deck).mkdir(exist_ok=True)
        img.save(tmp / rel)
        return rel

    tasks = [(deck, card) for deck in decks for card in CARD_IDS]
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        rels = list(tqdm(pool.map(one, tasks), total=len(tasks), desc="building cards", unit="card", mininterval=1.0,
                         disable=not PROGRESS["on"]))
    shutil.rmtree(tmp / "svg")
    version = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout.strip()
    return {"class_names": list(CARD_IDS),
            "items": [[rel, CARD_IDS.index(card)] for rel, (_, card) in zip(rels, tasks)],
            "zooms": zooms, "renderer": version}


class Cards(EmbeddedDataset):
    """52 playing-card classes (suit-major: 1..king of clubs, diamonds, hearts, spades), one
    image per deck, rendered from the SVG decks of kdegames-card-data-kf5."""

    name = "cards"

    def __init__(self, root=None, transform: Optional[Callable] = None, decks: Optional[Sequence[str]] = None,
                 image_size: int = 256, deck_dir: str = str(DECK_DIR), workers: int = 2, framing: str = "margins"):
        super().__init__(transform)
        self.decks = list(CARD_DECKS if decks is None else decks)
        if not self.decks or len(set(self.decks)) != len(self.decks):
            raise ValueError(f"decks must be a non-empty list of distinct deck names, got {decks!r}")
        self.image_size = _check_size(image_size)
        if framing not in CARD_FRAMINGS:
            raise ValueError(f"framing must be one of {', '.join(CARD_FRAMINGS)}, got {framing!r}")
        self.framing = framing
        deck_dir = Path(deck_dir)
        for deck in self.decks:
            _deck_file(deck_dir, deck)  # fail early, naming the apt packages
        folder = build_once(self.name, self.version, self.options(),
                            lambda tmp: _build_cards(tmp, self.decks, self.image_size, deck_dir, workers, framing), root)
        self._load(folder)

    def options(self) -> Dict:
        # the framing is named only when it is not the original square with margins: those folders keep their names
        return {"decks": self.decks, "image_size": self.image_size,
                **({"framing": self.framing} if self.framing != "margins" else {})}


# ---------------------------------------------------------------------------------------------
# kanji

# key -> (Debian package, file under /usr/share/fonts, face index in a collection)
KANJI_FONTS = {
    "aoyagi-kouzan-t": ("fonts-aoyagi-kouzan-t", "truetype/aoyagi-kouzan-t/AoyagiKouzanT.ttf", 0),
    "motoya-l-cedar": ("fonts-motoya-l-cedar", "truetype/motoya-l-cedar/MTLc3m.ttf", 0),
    "wqy-microhei": ("fonts-wqy-microhei", "truetype/wqy/wqy-microhei.ttc", 0),
    "seto": ("fonts-seto", "truetype/seto/setofont.ttf", 0),
}
CJK_BLOCK = (0x4E00, 0x9FFF)  # CJK Unified Ideographs (basic block only)
FONT_DIR = Path("/usr/share/fonts")


def _font_file(font_dir: Path, key: str) -> Path:
    if key not in KANJI_FONTS:
        raise ValueError(f"unknown kanji font {key!r}; known fonts: {sorted(KANJI_FONTS)}")
    package, rel, _ = KANJI_FONTS[key]
    path = font_dir / rel
    if path.is_file():
        return path
    found = sorted(font_dir.rglob(Path(rel).name)) if font_dir.is_dir() else []
    if found:
        return found[0]
    raise FileNotFoundError(f"font {key!r} not found (expected {path}); install with: sudo apt-get install "
                            f"{' '.join(KANJI_FONTS[k][0] for k in KANJI_FONTS)}")


def _covered_by_cmap(path: Path, index: int) -> Optional[set]:
    try:
        from fontTools.ttLib import TTFont
    except ImportError:
        return None
    font = TTFont(str(path), fontNumber=index, lazy=True)
    return {c for c in font.getBestCmap() if CJK_BLOCK[0] <= c <= CJK_BLOCK[1]}


def _covered_by_rendering(path: Path, index: int) -> set:
    """Fallback without fontTools: code points whose glyph differs from the .notdef glyph."""
    font = ImageFont.truetype(str(path), 32, index=index)
    notdef = font.getmask(chr(0x10FFFD)).tobytes()
    out = set()
    for c in range(CJK_BLOCK[0], CJK_BLOCK[1] + 1):
        mask = font.getmask(chr(c))
        if mask.getbbox() is not None and mask.tobytes() != notdef:
            out.add(c)
    return out


def common_codepoints(paths: Sequence[Tuple[Path, int]]) -> List[int]:
    """Sorted CJK unified ideographs that every font maps (fontTools cmap, else PIL rendering)."""
    common = None
    for path, index in paths:
        cov = _covered_by_cmap(path, index)
        if cov is None:
            cov = _covered_by_rendering(path, index)
        common = cov if common is None else common & cov
    return sorted(common or ())


def render_glyph(font: ImageFont.FreeTypeFont, ch: str, image_size: int) -> Optional[Image.Image]:
    """Black glyph on white ('L'), its ink box centred on an image_size square, shrunk only if
    larger than 90% of it; None if the glyph draws nothing."""
    canvas = 2 * image_size
    im = Image.new("L", (canvas, canvas), 255)
    ImageDraw.Draw(im).text((canvas // 2, canvas // 2), ch, font=font, fill=0, anchor="mm")
    box = ImageOps.invert(im).getbbox()
    if box is None:
        return None
    glyph = im.crop(box)
    limit = round(0.9 * image_size)
    if max(glyph.size) > limit:
        s = limit / max(glyph.size)
        glyph = glyph.resize((max(1, round(glyph.size[0] * s)), max(1, round(glyph.size[1] * s))), Image.LANCZOS)
    out = Image.new("L", (image_size, image_size), 255)
    out.paste(glyph, ((image_size - glyph.size[0]) // 2, (image_size - glyph.size[1]) // 2))
    return out


def _build_kanji(tmp: Path, fonts: Sequence[str], num_classes: int, image_size: int, seed: Optional[int],
                 font_dir: Path) -> Dict:
    from tqdm import tqdm

    files = [(_font_file(font_dir, k), KANJI_FONTS[k][2]) for k in fonts]
    candidates = common_codepoints(files)
    if seed is not None:
        candidates = [candidates[i] for i in np.random.default_rng(seed).permutation(len(candidates))]
    faces = [ImageFont.truetype(str(p), round(0.75 * image_size), index=i) for p, i in files]
    chosen: List[Tuple[int, List[Image.Image]]] = []
    bar = tqdm(total=num_classes, desc="building kanji", unit="class", mininterval=1.0, disable=not PROGRESS["on"])
    for cp in candidates:  # keep a code point only if every font draws ink for it
        imgs = [render_glyph(face, chr(cp), image_size) for face in faces]
        if all(im is not None for im in imgs):
            chosen.append((cp, imgs))
            bar.update(1)
            if len(chosen) == num_classes:
                break
    bar.close()
    if len(chosen) < num_classes:
        raise ValueError(f"num_classes={num_classes} but the fonts {list(fonts)} share only {len(chosen)} "
                         f"drawable ideographs; use num_classes <= {len(chosen)}")
    chosen.sort(key=lambda t: t[0])
    items, names = [], []
    for label, (cp, imgs) in enumerate(chosen):
        names.append(chr(cp))
        for key, im in zip(fonts, imgs):
            rel = f"{key}/{cp:05X}.png"
            (tmp / key).mkdir(exist_ok=True)
            im.save(tmp / rel)
            items.append([rel, label])
    return {"class_names": names, "items": items, "codepoints": [cp for cp, _ in chosen],
            "shared_codepoints": len(candidates)}


class Kanji(EmbeddedDataset):
    """CJK ideographs, one class per character and one image per font of a fixed font list.

    Classes: the first ``num_classes`` (by code point) ideographs of U+4E00..U+9FFF that every font
    maps and draws; with ``seed`` set, a seeded random choice of them instead (still sorted).
    """

    name = "kanji"

    def __init__(self, root=None, transform: Optional[Callable] = None, num_classes: int = 1000,
                 image_size: int = 128, fonts: Optional[Sequence[str]] = None, seed: Optional[int] = None,
                 font_dir: str = str(FONT_DIR)):
        super().__init__(transform)
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be an int >= 1, got {num_classes!r}")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed must be None or an int, got {seed!r}")
        self.num_classes_option, self.seed = num_classes, seed
        self.image_size = _check_size(image_size)
        self.fonts = list(KANJI_FONTS if fonts is None else fonts)
        if not self.fonts or len(set(self.fonts)) != len(self.fonts):
            raise ValueError(f"fonts must be a non-empty list of distinct font names, got {fonts!r}")
        font_dir = Path(font_dir)
        for key in self.fonts:
            _font_file(font_dir, key)  # fail early, naming the apt packages
        folder = build_once(self.name, self.version, self.options(),
                            lambda tmp: _build_kanji(tmp, self.fonts, num_classes, self.image_size, seed, font_dir),
                            root)
        self._load(folder)

    def options(self) -> Dict:
        return {"fonts": self.fonts, "num_classes": self.num_classes_option, "image_size": self.image_size,
                "seed": self.seed, "block": [CJK_BLOCK[0], CJK_BLOCK[1]]}


register("dataset", Cards, name="cards", aliases=["playing_cards"])
register("dataset", Kanji, name="kanji", aliases=["cjk", "glyphs"])

__all__ = ["Cards", "Kanji", "build_once", "render_card", "render_glyph", "common_codepoints",
           "CARD_DECKS", "CARD_IDS", "CARD_FRAMINGS", "KANJI_FONTS", "BUILD_COUNTS"]
