"""A second judge of alignment, blind to shape: does a generated image have the colour and texture of
its prompted class?

The class probe (`medsyn.models.class_probe`) can name a class by its shape alone: a grey swirl in the
place of a blue dyed polyp still passes. This judge sees only global statistics of each image
(`colour_texture_features`: per-channel means, spreads and percentiles, saturation and value, the
saturation-weighted hue, colourfulness, and the energy of the Laplacian at two scales), standardised
by the real training images. A class's **floor** is the median distance of its real held-out images
from the centroid of its real training images: how far a real image of the class lies from its own
kind. A generated image's **ratio** is its distance from its prompted class's centroid over that
floor; a class passes when the median ratio of its generated images is at most `WITHIN` (2).
"""

import numpy as np
import pandas as pd

WITHIN = 2.0  # a class's generated images pass when their median ratio is at most this


def colour_texture_features(images: np.ndarray) -> np.ndarray:
    """Global colour and texture statistics of uint8 N x H x W x 3 images: N x 29 float64.

    Per RGB channel the mean, standard deviation and 10th / 50th / 90th percentiles (15); saturation
    and value mean and standard deviation (4); the saturation-weighted mean hue as a vector (2);
    Hasler and Süsstrunk's colourfulness (1); the mean absolute Laplacian per channel at full and half
    resolution (6); the mean grey level of the brightest 1 % (1), which keeps small bright structures.
    """
    from matplotlib.colors import rgb_to_hsv

    x = np.asarray(images, np.float64) / 255
    flat = x.reshape(len(x), -1, 3)
    percentiles = np.percentile(flat, [10, 50, 90], axis=1).transpose(1, 0, 2).reshape(len(x), 9)
    hsv = rgb_to_hsv(x).reshape(len(x), -1, 3)
    hue, saturation, value = 2 * np.pi * hsv[..., 0], hsv[..., 1], hsv[..., 2]
    rg, yb = flat[..., 0] - flat[..., 1], 0.5 * (flat[..., 0] + flat[..., 1]) - flat[..., 2]
    colourfulness = np.hypot(rg.std(1), yb.std(1)) + 0.3 * np.hypot(rg.mean(1), yb.mean(1))
    half = 0.25 * (x[:, 0::2, 0::2] + x[:, 1::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 1::2])
    grey = flat.mean(2)
    brightest = np.sort(grey, axis=1)[:, -max(1, grey.shape[1] // 100) :].mean(1)
    return np.column_stack(
        [
            flat.mean(1),
            flat.std(1),
            percentiles,
            saturation.mean(1),
            saturation.std(1),
            value.mean(1),
            value.std(1),
            (saturation * np.cos(hue)).mean(1),
            (saturation * np.sin(hue)).mean(1),
            colourfulness,
            _laplacian_energy(x),
            _laplacian_energy(half),
            brightest,
        ]
    )


def _laplacian_energy(x: np.ndarray) -> np.ndarray:
    """Mean absolute 4-neighbour Laplacian of N x H x W x 3 images, per channel: N x 3."""
    centre = x[:, 1:-1, 1:-1]
    laplacian = x[:, :-2, 1:-1] + x[:, 2:, 1:-1] + x[:, 1:-1, :-2] + x[:, 1:-1, 2:] - 4 * centre
    return np.abs(laplacian).mean(axis=(1, 2))


class ColourTextureJudge:
    """The judge, fitted on real images: class centroids from the training images, class floors from
    the held-out ones (`medsyn.metrics.evaluate.fidelity_table` fits it on the curated dataset)."""

    def __init__(self, train: np.ndarray, train_classes, held_out: np.ndarray, held_out_classes):
        features = colour_texture_features(train)
        self.mean, self.scale = features.mean(0), features.std(0) + 1e-6
        train_classes, held_out_classes = np.asarray(train_classes), np.asarray(held_out_classes)
        standard = self._standard(features)
        self.centroids = {c: standard[train_classes == c].mean(0) for c in np.unique(train_classes)}
        missing = sorted(set(np.unique(held_out_classes)) - set(self.centroids))
        if missing:
            raise ValueError(f"held-out classes without training images: {missing[:3]}")
        distances = self._distances(self._standard(colour_texture_features(held_out)), held_out_classes)
        self.floors = {c: float(np.median(distances[held_out_classes == c])) for c in np.unique(held_out_classes)}

    def _standard(self, features: np.ndarray) -> np.ndarray:
        return (features - self.mean) / self.scale

    def _distances(self, standard: np.ndarray, classes: np.ndarray) -> np.ndarray:
        centroids = np.stack([self.centroids[c] for c in classes])
        return np.linalg.norm(standard - centroids, axis=1) / np.sqrt(standard.shape[1])

    def ratios(self, images: np.ndarray, classes) -> np.ndarray:
        """Each image's distance from its class's centroid over the class's floor (NaN for a class
        without held-out images)."""
        classes = np.asarray(classes)
        unknown = sorted(set(np.unique(classes)) - set(self.centroids))
        if unknown:
            raise ValueError(f"classes the judge has no real training images of: {unknown[:3]}")
        distances = self._distances(self._standard(colour_texture_features(images)), classes)
        floors = np.array([self.floors.get(c, np.nan) for c in classes])
        return distances / floors

    def per_class(self, ratios: np.ndarray, classes) -> pd.DataFrame:
        """Per class: images, floor, the median ratio, whether it is within `WITHIN`, and a note for a
        class that cannot be judged (no held-out real images, so no floor; counted as not within)."""
        classes = np.asarray(classes)
        rows = []
        for c in sorted(np.unique(classes)):
            median = float(np.median(ratios[classes == c]))
            rows.append(
                {
                    "class": c,
                    "images": int((classes == c).sum()),
                    "floor": self.floors.get(c, np.nan),
                    "colour_texture_ratio": median,
                    "within_2x": bool(median <= WITHIN),
                    "note": "" if c in self.floors else "no held-out real images: no floor",
                }
            )
        return pd.DataFrame(rows).set_index("class")


def _class_medians(ratios: np.ndarray, classes: np.ndarray) -> np.ndarray:
    """Each class's median ratio, for the classes that have a floor (held-out real images)."""
    ratios = np.asarray(ratios, np.float64)
    _, inverse = np.unique(np.asarray(classes), return_inverse=True)
    # one sort by class, then by ratio; each class's median from the middle of its run (a class whose
    # ratios hold a NaN has no median, as np.median says)
    order = np.lexsort((ratios, inverse))
    values, groups = ratios[order], inverse[order]
    starts = np.flatnonzero(np.r_[True, groups[1:] != groups[:-1]])
    counts = np.diff(np.r_[starts, len(groups)])
    medians = 0.5 * (values[starts + (counts - 1) // 2] + values[starts + counts // 2])
    medians[np.bincount(inverse, weights=np.isnan(ratios)) > 0] = np.nan
    return medians[~np.isnan(medians)]


def median_ratio(ratios: np.ndarray, classes: np.ndarray) -> float:
    """The median over classes of each class's median ratio: the family's colour-texture score (1
    is a real held-out image's; lower is closer to the real class). Classes without a floor are left
    out; NaN when none has one."""
    medians = _class_medians(ratios, classes)
    return float(np.median(medians)) if len(medians) else float("nan")


def share_within(ratios: np.ndarray, classes: np.ndarray, within: float = WITHIN) -> float:
    """The share of classes (with a floor) whose generated images' median ratio is at most `within`."""
    medians = _class_medians(ratios, classes)
    return float(np.mean(medians <= within)) if len(medians) else float("nan")
