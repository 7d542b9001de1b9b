"""The colour-texture judge: its features against a pixel-by-pixel computation, and its verdicts on
real held-out images, a recoloured copy of a class and a blurred copy of a textured class."""

import colorsys

import numpy as np
import pytest
from scipy import ndimage

from medsyn.data.corpus import write_corpus
from medsyn.data.curate import curate
from medsyn.data.dataset import class_key, load_images
from medsyn.metrics.colour import ColourTextureJudge, colour_texture_features, median_ratio, share_within
from medsyn.paths import MANIFESTS_DIR


def test_features_match_a_pixel_by_pixel_computation():
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (2, 6, 8, 3), dtype=np.uint8)
    features = colour_texture_features(images)
    assert features.shape == (2, 29)
    for image, row in zip(images, features):
        x = image.astype(float) / 255
        pixels = x.reshape(-1, 3)
        hsv = np.array([colorsys.rgb_to_hsv(*p) for p in pixels])
        hue, saturation = 2 * np.pi * hsv[:, 0], hsv[:, 1]
        laplacian = [
            np.abs(ndimage.convolve(x[..., c], [[0, 1, 0], [1, -4, 1], [0, 1, 0]], mode="constant")[1:-1, 1:-1]).mean()
            for c in range(3)
        ]
        assert row[0:3] == pytest.approx(pixels.mean(0))
        assert row[6:9] == pytest.approx(np.percentile(pixels, 10, axis=0))
        assert row[15] == pytest.approx(saturation.mean()) and row[17] == pytest.approx(hsv[:, 2].mean())
        assert row[19:21] == pytest.approx([(saturation * np.cos(hue)).mean(), (saturation * np.sin(hue)).mean()])
        assert row[22:25] == pytest.approx(laplacian)
        assert row[28] == pytest.approx(np.sort(pixels.mean(1))[-1])  # the brightest 1 % of 48 pixels: one


def test_the_judge_passes_real_images_and_fails_wrong_colour_or_lost_texture(tmp_path):
    sources = ("kvasir_v2", "camelyon16")
    write_corpus(tmp_path / "raw", patients=24, seed=1, size=64, sources=sources, progress=False)
    result = curate(
        [MANIFESTS_DIR / f"{s}.yaml" for s in sources], tmp_path / "raw", tmp_path / "data", size=32, progress=False
    )
    records, out = result.records, tmp_path / "data"
    by_split = {s: [r for r in records if r["split"] == s] for s in ("train", "validation", "test")}
    # the floors from the validation patients; the test patients, real images the judge never saw, pass
    train, validation, test = by_split["train"], by_split["validation"], by_split["test"]
    judge = ColourTextureJudge(
        load_images(out, train),
        [class_key(r) for r in train],
        load_images(out, validation),
        [class_key(r) for r in validation],
    )
    images, classes = load_images(out, test), np.array([class_key(r) for r in test])
    ratios = judge.ratios(images, classes)
    assert share_within(ratios, classes) == 1.0 and 0.5 < median_ratio(ratios, classes) < 1.6
    table = judge.per_class(ratios, classes)
    assert table["within_2x"].all() and (table["floor"] > 0).all() and len(table) == 6
    # a dyed polyp drawn in the wrong colour (red and blue swapped) and lymph-node tissue blurred smooth
    dyed = np.array(["dyed" in c for c in classes])
    tissue = np.array([c.startswith("camelyon16") for c in classes])
    assert dyed.any() and tissue.any()
    recoloured = images[dyed][..., ::-1]
    blurred = np.stack([ndimage.gaussian_filter(image.astype(float), (1.5, 1.5, 0)) for image in images[tissue]])
    assert share_within(judge.ratios(recoloured, classes[dyed]), classes[dyed]) == 0
    assert share_within(judge.ratios(blurred.astype(np.uint8), classes[tissue]), classes[tissue]) == 0
    with pytest.raises(ValueError, match="no real training images"):
        judge.ratios(images[:1], ["nowhere: nothing"])


def test_class_statistics_match_a_class_by_class_computation():
    # the bootstrap's fast grouping (one sort, one bincount) against np.median and np.mean per class,
    # with string and integer classes, single-image classes and a class without a floor (NaN ratios)
    from medsyn.intervals import macro_mean

    rng = np.random.default_rng(0)
    for _ in range(50):
        n, k = int(rng.integers(1, 120)), int(rng.integers(1, 12))
        codes = rng.integers(0, k, n)
        classes = np.array([f"class {c}" for c in codes])
        ratios, correct = rng.gamma(2.0, 1.0, n), (rng.random(n) < 0.6).astype(float)
        ratios[classes == classes[0]] = np.nan
        names = np.unique(classes)
        medians = np.array([np.median(ratios[classes == c]) for c in names])
        medians = medians[~np.isnan(medians)]
        for labels in (classes, codes):
            if len(medians):
                assert median_ratio(ratios, labels) == pytest.approx(np.median(medians))
                assert share_within(ratios, labels) == pytest.approx(np.mean(medians <= 2.0))
            else:
                assert np.isnan(median_ratio(ratios, labels)) and np.isnan(share_within(ratios, labels))
            assert macro_mean(correct, labels) == pytest.approx(np.mean([correct[classes == c].mean() for c in names]))
