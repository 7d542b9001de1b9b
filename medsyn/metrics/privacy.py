"""Memorisation checks (MediSyn, Methods 4.3.4): nearest training image of each generated image by
embedding cosine similarity, then the tiled pixel distance of Carlini et al. (2023) between the two.
"""

import numpy as np
import torch


def tiled_l2(a: np.ndarray, b: np.ndarray, grid: int = 4) -> float:
    """Carlini et al.'s tiled distance: cut both images into a grid × grid of tiles and return the
    largest normalised L2 distance over tiles, d = max_tiles ‖P₁ − P₂‖₂ / √(255² · N), N the number of
    values in a tile. 0 for identical images, 1 for black against white; a copy differs in no tile.

    Args:
        a, b: uint8 arrays of the same shape, H x W or H x W x C.
        grid: tiles per side (MediSyn: 4).
    """
    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape:
        raise ValueError(f"images differ in shape: {a.shape} vs {b.shape}")
    if a.dtype != np.uint8 or b.dtype != np.uint8:
        raise ValueError("tiled_l2 compares uint8 images (0-255)")
    h, w = a.shape[:2]
    if h % grid or w % grid:
        raise ValueError(f"a {h} x {w} image does not split into a {grid} x {grid} grid")
    th, tw = h // grid, w // grid
    diff = a.astype(np.float64) - b.astype(np.float64)
    # (grid, th, grid, tw, ...) -> one row per tile
    tiles = diff.reshape(grid, th, grid, tw, -1).transpose(0, 2, 1, 3, 4).reshape(grid * grid, -1)
    per_tile = np.sqrt((tiles ** 2).sum(axis=1) / (255.0 ** 2 * tiles.shape[1]))
    return float(per_tile.max())


def nearest_neighbours(queries: torch.Tensor, references: torch.Tensor, chunk: int = 65536) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest reference of each query by cosine similarity, in chunks of references, so that
    10⁶ references need only one chunk × queries similarity block in memory at a time.

    Args:
        queries: Q x D embeddings; references: R x D embeddings (any norm: both are normalised here).
        chunk: references per matrix product.

    Returns:
        (index of the nearest reference, its cosine similarity), one per query.
    """
    if len(references) == 0:
        raise ValueError("no reference embeddings to search")
    q = torch.nn.functional.normalize(queries.float(), dim=1)
    best = torch.full((len(q),), -2.0)
    where = torch.zeros(len(q), dtype=torch.long)
    for start in range(0, len(references), chunk):
        r = torch.nn.functional.normalize(references[start:start + chunk].float(), dim=1)
        similarity, index = (q @ r.T).max(dim=1)
        better = similarity > best
        best[better], where[better] = similarity[better], index[better] + start
    return where.numpy(), best.numpy()
