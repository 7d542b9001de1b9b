"""A generic procedural image-text corpus to pretrain on: coloured shapes on textured backgrounds, each
caption saying what is drawn ("a small red ring on a striped blue background").

It is the embedded profiles' stand-in for the web-scale data a pretrained Stable Diffusion has seen
before MediSyn fine-tunes it. It holds no medical image and shares no source, class, patient or
caption with any curated dataset, so a model pretrained on it and then fine-tuned on a curated dataset
starts from something the evaluation never uses, and fine-tuning and training from scratch are
different treatments. What it can teach is generic: binding colour words, shape words and texture
words in a caption to pixels.

The corpus is a medsyn dataset (`medsyn.data.dataset`, one `train` split, kind 'pretraining'), so
every training loop reads it as it reads a curated one; each image is a function of (seed, index).
"""

import hashlib
import io
import json
from pathlib import Path

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from medsyn.data.corpus import _noise, _rng, _to_uint8
from medsyn.data.dataset import image_file_name, image_path, is_dataset, read_records, write_records

# named colours (sRGB, 0-255); shapes are drawn in the first eight, backgrounds in the last four. A
# background's texture keeps its shade within 0.5-1.5 times its colour, which stays over 75 (in RGB)
# from every shape colour, so a caption's colour words name what is visibly there
COLOURS = {
    "red": (215, 38, 38),
    "orange": (240, 140, 30),
    "yellow": (235, 220, 50),
    "green": (40, 170, 60),
    "cyan": (40, 200, 210),
    "blue": (40, 70, 210),
    "purple": (140, 50, 180),
    "white": (240, 240, 240),
    "black": (20, 20, 20),
    "grey": (128, 128, 128),
    "navy": (25, 30, 90),
    "brown": (120, 80, 50),
}
SHAPE_COLOURS = tuple(COLOURS)[:8]
BACKGROUND_COLOURS = tuple(COLOURS)[8:]
SHAPES = ("disc", "ring", "square", "triangle", "blob")
TEXTURES = ("plain", "speckled", "striped")
SIZES = ("small", "large")
KIND = "pretraining"


def caption(size: str, colour: str, shape: str, texture: str, background: str) -> str:
    return f"a {size} {colour} {shape} on a {texture} {background} background"


def _shape_mask(shape: str, yy: np.ndarray, xx: np.ndarray, radius: float, angle: float, rng) -> np.ndarray:
    """A soft (anti-aliased) mask in [0, 1] of a shape centred at the origin of (yy, xx)."""
    c, s = np.cos(angle), np.sin(angle)
    u, v = c * xx + s * yy, -s * xx + c * yy
    r = np.hypot(u, v)
    if shape == "disc":
        edge = radius - r
    elif shape == "ring":
        edge = radius * 0.3 - np.abs(r - radius * 0.7)
    elif shape == "square":
        edge = radius * 0.85 - np.maximum(np.abs(u), np.abs(v))
    elif shape == "triangle":  # equilateral: inside all three half-planes
        normals = [(np.cos(a), np.sin(a)) for a in (np.pi / 2, np.pi / 2 + 2 * np.pi / 3, np.pi / 2 + 4 * np.pi / 3)]
        edge = np.min([radius * 0.55 - (u * nx + v * ny) for nx, ny in normals], axis=0)
    elif shape == "blob":  # a disc whose radius wobbles with angle
        theta = np.arctan2(v, u)
        k = rng.uniform(0, 2 * np.pi, size=3)
        wobble = 1 + 0.18 * np.sin(3 * theta + k[0]) + 0.12 * np.sin(5 * theta + k[1]) + 0.08 * np.sin(2 * theta + k[2])
        edge = radius * wobble - r
    else:
        raise ValueError(f"unknown shape {shape!r}; shapes are {SHAPES}")
    pixel = 2.0 / yy.shape[0]  # one pixel in the [-1, 1] coordinates
    return np.clip(edge / pixel + 0.5, 0.0, 1.0)


def generic_image(seed: int, index: int, size: int) -> tuple[np.ndarray, dict]:
    """Image `index` of the corpus: uint8 size x size x 3 and what it shows (size, colour, shape,
    texture, background)."""
    rng = _rng(seed, "generic", index)
    what = {
        "size": SIZES[rng.integers(len(SIZES))],
        "colour": SHAPE_COLOURS[rng.integers(len(SHAPE_COLOURS))],
        "shape": SHAPES[rng.integers(len(SHAPES))],
        "texture": TEXTURES[rng.integers(len(TEXTURES))],
        "background": BACKGROUND_COLOURS[rng.integers(len(BACKGROUND_COLOURS))],
    }
    yy, xx = np.meshgrid(np.linspace(-1, 1, size), np.linspace(-1, 1, size), indexing="ij")
    background = np.array(COLOURS[what["background"]], dtype=np.float64)
    if what["texture"] == "speckled":
        shade = 1 + 0.25 * np.clip(_noise(rng, (size, size), 0.6), -2, 2)
    elif what["texture"] == "striped":
        angle, cycles = rng.uniform(0, np.pi), rng.uniform(3, 7)
        shade = 1 + 0.3 * np.sin(np.pi * cycles * (np.cos(angle) * xx + np.sin(angle) * yy) + rng.uniform(0, 6.3))
    else:
        shade = np.ones((size, size))
    # dark backgrounds vary around a lifted level, so their texture stays visible
    image = (np.maximum(background, 40.0)[None, None, :] * shade[..., None]) - np.where(background < 40, 25.0, 0.0)
    radius = rng.uniform(0.18, 0.3) if what["size"] == "small" else rng.uniform(0.42, 0.6)
    centre = rng.uniform(-0.85 + radius, 0.85 - radius, size=2)
    mask = _shape_mask(what["shape"], yy - centre[0], xx - centre[1], radius, rng.uniform(0, 2 * np.pi), rng)
    foreground = np.array(COLOURS[what["colour"]], dtype=np.float64) * (1 + 0.08 * (yy - xx))[..., None]
    image = image * (1 - mask[..., None]) + foreground * mask[..., None]
    image += rng.normal(0, 3.0, size=image.shape)  # sensor-like grain
    return _to_uint8(image), what


def write_generic_corpus(out_dir: str | Path, images: int, size: int, seed: int = 0, progress: bool = True) -> Path:
    """Write `images` corpus images as a medsyn dataset (all `train`). An existing complete corpus with
    the same settings is kept; one this function left unfinished with the same settings (its settings
    file is written first) is written again, image by image the same; anything else in `out_dir` is
    refused rather than overwritten.

    Returns:
        the dataset directory.
    """
    out_dir = Path(out_dir)
    settings = {"images": images, "size": size, "seed": seed}
    stamp = out_dir / "generic_corpus.json"
    ours = stamp.is_file() and json.loads(stamp.read_text()) == settings
    if is_dataset(out_dir):
        if ours:
            read_records(out_dir)  # complete and consistent, or an error naming the file
            return out_dir
        raise FileExistsError(f"{out_dir} holds another dataset: write the generic corpus to a new directory")
    if not ours and out_dir.exists() and any(p != stamp for p in out_dir.iterdir()):
        raise FileExistsError(
            f"{out_dir} is not empty and holds no corpus of these settings: remove it or choose another"
        )
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp.write_text(json.dumps(settings))  # before the marker, so a complete corpus always has it
    records = []
    for index in tqdm(range(images), desc="generic corpus", disable=not progress):
        pixels, what = generic_image(seed, index, size)
        buffer = io.BytesIO()
        Image.fromarray(pixels).save(buffer, format="PNG")
        digest = hashlib.sha256(buffer.getvalue()).hexdigest()
        record = {
            "file_name": image_file_name(digest),
            "split": "train",
            "text": caption(**what),
            "source": "generic",
            "labels": [what["shape"]],
            "patient_id": f"generic-{index:06d}",
            "sha256": digest,
            **{f"drawn_{k}": v for k, v in what.items()},
        }
        path = image_path(out_dir, record)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(buffer.getvalue())
        records.append(record)
    write_records(out_dir, records, kind=KIND)
    return out_dir
