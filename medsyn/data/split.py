"""Patient-level train/validation/test split (MediSyn Methods 4.1: no patient in two splits)."""

import hashlib

import numpy as np

SPLITS = ("train", "validation", "test")


def patient_split(group_sizes: dict[str, int], fractions=(0.8, 0.1, 0.1), seed: int = 0,
                  salt: str = "") -> dict[str, str]:
    """Assign whole groups (patients) to train/validation/test so image counts follow `fractions`.

    Groups are put in a random order drawn from `seed` (and `salt`, e.g. the source name, so that two
    sources with the same seed are shuffled independently); then each group goes to the split whose
    image count is furthest below its target. Deterministic for a seed; every group lands in exactly
    one split.

    Args:
        group_sizes: group key -> number of images.
        fractions: target fractions of images for train, validation, test; they must sum to 1.
        seed: random seed.
        salt: extra string mixed into the seed.
    """
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) < 0:
        raise ValueError(f"fractions must be three non-negative numbers summing to 1, got {fractions}")
    keys = sorted(group_sizes)
    mixed = int.from_bytes(hashlib.sha256(f"{seed}:{salt}".encode()).digest()[:8], "little")
    order = np.random.default_rng(mixed).permutation(len(keys))
    total = sum(group_sizes.values())
    targets = np.asarray(fractions, dtype=float) * total
    counts = np.zeros(3)
    assignment = {}
    for i in order:
        key = keys[i]
        # fill the split with the largest remaining deficit; ties go to the earlier split
        choice = int(np.argmax(targets - counts))
        assignment[key] = SPLITS[choice]
        counts[choice] += group_sizes[key]
    return assignment
