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
    per_tile = np.sqrt((tiles**2).sum(axis=1) / (255.0**2 * tiles.shape[1]))
    return float(per_tile.max())


def nearest_neighbours(
    queries: torch.Tensor,
    references: torch.Tensor,
    chunk: int = 65536,
    device: str | torch.device | None = None,
    candidates: int = 4,
) -> tuple[np.ndarray, np.ndarray]:
    """Exact nearest reference of each query by cosine similarity, as a float64 search finds it (ties
    go to the lower index), at the speed of a float32 one.

    Float32 matrix products over chunks of references (so that 10⁶ references need one chunk × queries
    block in memory at a time; on a GPU when `device` names one) keep each query's `candidates` best,
    which are scored again in float64. A float32 cosine of unit vectors is within (D + 4) · 2⁻²⁴ of the
    exact one (Higham's bound for a D-term dot product, plus the rounding of the normalised inputs), so
    a reference left out can beat the float64 winner only if the last candidate's float32 score comes
    within that bound of it. Such queries (near-ties, many copies of one image) are searched again in
    float64 against every reference: the result equals a float64 search by construction.

    Args:
        queries: Q x D embeddings; references: R x D embeddings (any norm: both are normalised here).
        chunk: references per matrix product.
        device: where the float32 products run (default: the CPU).
        candidates: float32 candidates per query scored again in float64.

    Returns:
        (index of the nearest reference, its cosine similarity), one per query.
    """
    if len(references) == 0:
        raise ValueError("no reference embeddings to search")
    if candidates < 1:
        raise ValueError(f"candidates must be at least 1, not {candidates}")
    device = torch.device(device or "cpu")
    k = min(candidates, len(references))
    previous = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("highest")  # no TF32 / bf16 products: the bound below is float32's
    try:
        q = torch.nn.functional.normalize(queries.to(device, torch.float32), dim=1)
        kept = torch.full((len(q), k), -3.0, device=device)
        where = torch.zeros((len(q), k), dtype=torch.long, device=device)
        for start in range(0, len(references), chunk):
            r = torch.nn.functional.normalize(references[start : start + chunk].to(device, torch.float32), dim=1)
            kept, index = torch.cat([kept, q @ r.T], dim=1).topk(k, dim=1)
            where = torch.where(index < k, torch.gather(where, 1, index.clamp(max=k - 1)), index - k + start)
    finally:
        torch.set_float32_matmul_precision(previous)
    kept, where = kept.double().cpu().numpy(), where.cpu().numpy()
    q64 = _unit64(queries)
    exact = np.einsum(
        "qd,qkd->qk", q64, _unit64(references[torch.from_numpy(where.reshape(-1))]).reshape(*where.shape, -1)
    )
    first = np.lexsort((where, -exact), axis=1)[:, 0]  # the best in float64, the lower index among equals
    rows = np.arange(len(q64))
    index, similarity = where[rows, first], exact[rows, first]
    bound = (queries.shape[1] + 4) * 2.0**-24
    doubtful = np.flatnonzero(kept[:, -1] >= similarity - bound) if k < len(references) else np.array([], int)
    if len(doubtful):  # float32 cannot decide these: every reference in float64
        index[doubtful], similarity[doubtful] = _nearest64(q64[doubtful], references, chunk)
    return index, similarity


def _unit64(x: torch.Tensor) -> np.ndarray:
    x = x.detach().cpu().double().numpy()
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)  # torch's normalize: 0 stays 0


def _nearest64(q64: np.ndarray, references: torch.Tensor, chunk: int) -> tuple[np.ndarray, np.ndarray]:
    """A plain float64 search (the lower index among equals)."""
    best, where = np.full(len(q64), -np.inf), np.zeros(len(q64), dtype=int)
    for start in range(0, len(references), chunk):
        similarity = q64 @ _unit64(references[start : start + chunk]).T
        found = similarity.argmax(axis=1)
        value = similarity[np.arange(len(q64)), found]
        better = value > best
        best[better], where[better] = value[better], found[better] + start
    return where, best


# MediSyn's threshold: a pair this close in every tile is a likely copy
COPY_THRESHOLD = 0.15


def nearest_in_group(
    queries: torch.Tensor,
    query_groups: list,
    references: torch.Tensor,
    reference_groups: list,
    chunk: int = 65536,
    device: str | torch.device | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`nearest_neighbours` restricted to references of the query's own group (MediSyn: the same
    specialty and image type). A query whose group has no reference gets index −1 and similarity NaN,
    so that it is reported rather than matched across groups.

    Args:
        queries, references: Q x D and R x D embeddings.
        query_groups, reference_groups: a hashable group per row, e.g. (specialty, image_type).
        chunk: references per matrix product.
        device: where the float32 products run (default: the CPU).

    Returns:
        (index into `references`, cosine similarity), one per query.
    """
    if len(query_groups) != len(queries) or len(reference_groups) != len(references):
        raise ValueError("one group per embedding row is needed")
    code = {group: i for i, group in enumerate(dict.fromkeys([*query_groups, *reference_groups]))}
    query_groups = np.array([code[g] for g in query_groups], dtype=int)
    reference_groups = np.array([code[g] for g in reference_groups], dtype=int)
    index, similarity = np.full(len(queries), -1), np.full(len(queries), np.nan)
    for group in np.unique(query_groups):
        mine = np.flatnonzero(query_groups == group)
        theirs = np.flatnonzero(reference_groups == group)
        if len(theirs):
            found, best = nearest_neighbours(queries[mine], references[theirs], chunk, device)
            index[mine], similarity[mine] = theirs[found], best
    return index, similarity


def memorisation_table(distances: np.ndarray, specialties: list[str], threshold: float = COPY_THRESHOLD):
    """MediSyn's Table 1: per specialty (and over all), the tiled distance of each generated image to
    its nearest training image as mean ± sd with the mean's 95 % bootstrap interval, the number of
    pairs, the pairs at or below `threshold` with the Wilson interval of their share, and the one-sided
    Wilcoxon signed-rank test that the distances exceed the threshold (p-value; small p: the
    specialty's images are not copies).

    Returns:
        a pandas DataFrame, one row per specialty plus 'all'.
    """
    import pandas as pd
    from scipy.stats import wilcoxon

    from medsyn.intervals import mean_interval, proportion_interval

    distances, specialties = np.asarray(distances, np.float64), np.asarray(specialties, dtype=object)
    if len(distances) != len(specialties):
        raise ValueError("one specialty per distance is needed")
    rows = []
    for name in [*sorted(set(specialties.tolist())), "all"]:
        d = distances if name == "all" else distances[specialties == name]
        differences = d - threshold
        p = wilcoxon(differences, alternative="greater").pvalue if np.any(differences) and len(d) > 1 else np.nan
        low, high = mean_interval(d)
        copies = int(np.sum(d <= threshold))
        share_low, share_high = proportion_interval(copies, len(d))
        rows.append(
            {
                "specialty": name,
                "pairs": len(d),
                "mean": d.mean(),
                "mean_low": low,
                "mean_high": high,
                "sd": d.std(ddof=1) if len(d) > 1 else np.nan,
                f"pairs_at_most_{threshold:g}": copies,
                "share_at_most_low": share_low,
                "share_at_most_high": share_high,
                "wilcoxon_p_greater": p,
            }
        )
    return pd.DataFrame(rows)


def memorisation_tables(pairs, threshold: float = COPY_THRESHOLD):
    """`memorisation_table` for every family of `memorisation_pairs`' output (planted controls and
    images of a kind with no training image left out), indexed by (family, specialty)."""
    import pandas as pd

    measured = pairs[~pairs["planted"] & pairs["tiled_l2"].notna()]
    families = list(dict.fromkeys(pairs["family"]))
    return pd.concat(
        [
            memorisation_table(
                measured.loc[measured["family"] == f, "tiled_l2"],
                measured.loc[measured["family"] == f, "specialty"].tolist(),
                threshold,
            ).assign(family=f)
            for f in families
        ],
        ignore_index=True,
    ).set_index(["family", "specialty"])
