"""Intensity mapping, resizing and tiling: the preprocessing that turns raw pixels into curated images.

MediSyn (Cho et al., Methods 4.1) windows CT, rescales other modalities to 8 bits, resizes the shorter
side and centre-crops; whole-slide histology is tiled. Each step is one function here.
"""

import math

import numpy as np
from PIL import Image


def hounsfield_window(hu: np.ndarray, width: float = 700, level: float = 100) -> np.ndarray:
    """Map Hounsfield units to uint8 through a CT window: clip((HU - (L - W/2)) / W, 0, 1) * 255.

    The default, W = 700 / L = 100, shows soft tissue, contrast-filled vessels and bone together
    (the mediastinal-to-bone range used for CT pulmonary angiography).

    Args:
        hu: array in Hounsfield units (any shape).
        width: window width W in HU, > 0.
        level: window centre L in HU.
    """
    if width <= 0:
        raise ValueError(f"window width must be positive, got {width}")
    scaled = np.clip((np.asarray(hu, dtype=np.float64) - (level - width / 2)) / width, 0.0, 1.0)
    return np.rint(scaled * 255).astype(np.uint8)


def voi_window(values: np.ndarray, center: float, width: float) -> np.ndarray:
    """Apply a DICOM VOI linear window (PS3.3 C.11.2.1.2.1) and return uint8.

    This is the window a viewer opens a radiograph or MR image with, read from the file's
    Window Center / Window Width.

    Args:
        values: pixel values after the modality LUT.
        center: Window Center.
        width: Window Width, >= 1.
    """
    if width < 1:
        raise ValueError(f"VOI window width must be >= 1, got {width}")
    x = np.asarray(values, dtype=np.float64)
    scaled = np.clip(((x - (center - 0.5)) / (width - 1)) + 0.5, 0.0, 1.0)
    return np.rint(scaled * 255).astype(np.uint8)


def percentile_rescale(
    values: np.ndarray, low: float = 0.5, high: float = 99.5, reference: np.ndarray | None = None
) -> np.ndarray:
    """Clip to the low/high percentiles and rescale linearly to 0..255 uint8.

    Used for MRI (NIfTI) and for DICOM without a VOI window. With `reference`, the percentiles are
    taken over it (e.g. the whole volume) so that slices of one volume share one mapping.

    Args:
        values: array to map.
        low: lower percentile in [0, 100).
        high: upper percentile in (low, 100].
        reference: array the percentiles are computed over; `values` itself when None.
    """
    if not 0 <= low < high <= 100:
        raise ValueError(f"need 0 <= low < high <= 100, got low={low}, high={high}")
    ref = np.asarray(values if reference is None else reference, dtype=np.float64)
    lo, hi = np.percentile(ref, [low, high])
    x = np.asarray(values, dtype=np.float64)
    if hi <= lo:  # constant image: map to black rather than divide by zero
        return np.zeros(x.shape, dtype=np.uint8)
    return np.rint(np.clip((x - lo) / (hi - lo), 0.0, 1.0) * 255).astype(np.uint8)


def resize_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize so the shorter side equals `size` (bicubic, antialiased), then centre-crop to size x size.

    An image that is already size x size is returned unchanged (no resampling), so windowed pixels
    survive curation exactly.

    Args:
        image: uint8 array H x W or H x W x 3.
        size: output side in pixels.
    """
    if image.dtype != np.uint8:
        raise ValueError(f"resize_center_crop expects uint8, got {image.dtype}")
    h, w = image.shape[:2]
    if (h, w) == (size, size):
        return image
    scale = size / min(h, w)
    new_h, new_w = max(size, round(h * scale)), max(size, round(w * scale))
    if (new_h, new_w) != (h, w):
        image = np.asarray(Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC))
    top, left = (new_h - size) // 2, (new_w - size) // 2
    return image[top : top + size, left : left + size]


def tile_origins(length: int, tile: int, max_overlap: float = 0.1) -> list[int]:
    """Start offsets of tiles along one axis, evenly spread, overlapping by at most `max_overlap`.

    The fewest tiles that cover the axis are used; if their overlap would exceed `max_overlap`, one
    tile fewer is used and the small uncovered remainder is spread between tiles instead.

    Args:
        length: axis length in pixels.
        tile: tile side in pixels.
        max_overlap: largest allowed overlap as a fraction of `tile`.
    """
    if length <= tile:
        return [0] if length == tile else []
    n = 1 + math.ceil((length - tile) / tile)
    if tile - (length - tile) / (n - 1) > max_overlap * tile:
        n -= 1
    if n == 1:
        return [(length - tile) // 2]
    stride = (length - tile) / (n - 1)
    return [round(i * stride) for i in range(n)]


def tile_image(image: np.ndarray, tile: int, max_overlap: float = 0.1) -> list[tuple[int, int, np.ndarray]]:
    """Cut a large image into tile x tile pieces with at most `max_overlap` overlap.

    Returns (y, x, tile) triples; an image smaller than one tile gives no tiles.

    Args:
        image: H x W or H x W x C array.
        tile: tile side in pixels.
        max_overlap: largest allowed overlap between neighbours, as a fraction of `tile`.
    """
    ys = tile_origins(image.shape[0], tile, max_overlap)
    xs = tile_origins(image.shape[1], tile, max_overlap)
    return [(y, x, image[y : y + tile, x : x + tile]) for y in ys for x in xs]


def tissue_fraction(tile: np.ndarray, background_level: int = 220) -> float:
    """Fraction of pixels darker than `background_level` in grey: tissue versus empty glass in histology.

    Args:
        tile: uint8 H x W or H x W x 3.
        background_level: grey level at and above which a pixel counts as background.
    """
    grey = tile if tile.ndim == 2 else tile[..., :3].mean(axis=-1)
    return float((grey < background_level).mean())
