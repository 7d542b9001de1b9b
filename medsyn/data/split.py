"""Patient-level train/validation/test split (MediSyn Methods 4.1: no patient in two splits)."""

import hashlib

import numpy as np

from medsyn.data.dataset import SPLITS


def patient_split(
    group_sizes: dict[str, int],
    fractions=(0.8, 0.1, 0.1),
    seed: int = 0,
    salt: str = "",
    strata: dict[str, str] | None = None,
) -> dict[str, str]:
    """Assign whole groups (patients) to train/validation/test so image counts follow `fractions`.

    Groups are put in a random order drawn from `seed` (and `salt`, e.g. the source name, so that two
    sources with the same seed are shuffled independently); then each group goes to the split whose
    image count is furthest below its target. With `strata` (group -> class), this is done within each
    stratum, so every class is split in the same proportions and a class with only one or two
    patients lands in train rather than only in test; a class with at least three patients gets at
    least one in every split the fractions call for. Deterministic for a seed; every group lands in
    exactly one split.

    Args:
        group_sizes: group key -> number of images.
        fractions: target fractions of images for train, validation, test; they must sum to 1.
        seed: random seed.
        salt: extra string mixed into the seed.
        strata: optional group key -> stratum (e.g. the patient's most frequent class).
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    strata = strata or {}
    assignment = {}
    for stratum in sorted({strata.get(k, "") for k in group_sizes}):
        keys = sorted(k for k in group_sizes if strata.get(k, "") == stratum)
        mixed = int.from_bytes(hashlib.sha256(f"{seed}:{salt}:{stratum}".encode()).digest()[:8], "little")
        order = np.random.default_rng(mixed).permutation(len(keys))
        targets = np.asarray(fractions, dtype=float) * sum(group_sizes[k] for k in keys)
        counts = np.zeros(3)
        for i in order:
            key = keys[i]
            # fill the split with the largest remaining deficit; ties go to the earlier split (train);
            # a split whose fraction is 0 never gets a group, even when every other is full
            choice = int(np.argmax(np.where(np.asarray(fractions) > 0, targets - counts, -np.inf)))
            assignment[key] = SPLITS[choice]
            counts[choice] += group_sizes[key]
        _fill_empty_splits(keys, group_sizes, fractions, assignment)
    return assignment


def _fill_empty_splits(keys: list[str], group_sizes: dict[str, int], fractions, assignment: dict[str, str]) -> None:
    """With at least as many groups as splits that the fractions call for, give each of those splits at
    least one group: the smallest group of the split holding the most groups moves to an empty one.
    (Filling by deficit alone can leave test empty for a class of five patients.)"""
    wanted = [SPLITS[i] for i, fraction in enumerate(fractions) if fraction > 0]
    if len(keys) < len(wanted):
        return
    for empty in wanted:
        members = {split: [k for k in keys if assignment[k] == split] for split in wanted}
        if members[empty]:
            continue
        donor = max(wanted, key=lambda split: len(members[split]))
        moved = min(members[donor], key=lambda k: (group_sizes[k], k))
        assignment[moved] = empty
