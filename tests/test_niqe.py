"""NIQE against the LIVE release's MATLAB scores of its four example images, and its pieces against
independent computations (hand-worked values, closed forms, scipy's generalised Gaussian)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from scipy import stats

from medsyn.metrics import niqe
from medsyn.metrics.niqe import MODEL_PATH, FlatImageError, aggd_parameters, gaussian_window, imresize_half, rgb2gray

REFERENCE = Path(__file__).parent / "data" / "niqe"  # LIVE's release images, with its notice in README.md
MATLAB = {"image1.png": 5.0290, "image2.png": 17.8659, "image3.png": 8.0362, "image4.png": 2.6571}


def test_matches_matlab_on_the_live_release_images():
    scores = {name: niqe(np.asarray(Image.open(REFERENCE / name))) for name in MATLAB}
    close = [name for name in MATLAB if abs(scores[name] - MATLAB[name]) <= 0.01]
    assert len(close) >= 3, scores
    # image3 is ill-conditioned (the reference notes say float differences move it by ~0.2)
    assert abs(scores["image3.png"] - MATLAB["image3.png"]) < 0.25, scores


def test_rgb2gray_is_matlabs_rounded_weighted_sum():
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255], [10, 20, 30]]], np.uint8)
    # 0.298936·255 = 76.23, 0.587043·255 = 149.70, 0.114021·255 = 29.08, 10·0.2989 + 20·0.5870 + 30·0.1140 = 18.15
    assert rgb2gray(pixels).tolist() == [[76, 150, 29, 255, 18]]


def test_bicubic_half_size_keeps_a_linear_ramp_linear():
    """Cubic convolution reproduces linear functions, so away from the mirrored borders output
    pixel i (1-based) of imresize(·, 0.5) samples the ramp at input coordinate 2i − 0.5."""
    ramp = np.tile(np.arange(1, 41, dtype=np.float64)[:, None], (1, 40))  # value = 1-based row
    half = imresize_half(ramp)
    assert half.shape == (20, 20)
    inner = np.arange(4, 17)  # 0-based output rows whose 8-tap support stays inside the image
    np.testing.assert_allclose(half[inner, 5], 2 * (inner + 1) - 0.5, atol=1e-12)
    np.testing.assert_allclose(imresize_half(np.full((30, 50), 7.0)), 7.0, atol=1e-12)


def test_window_and_model_file():
    window = gaussian_window()
    assert window.shape == (7, 7) and abs(window.sum() - 1) < 1e-12
    stored = np.load(MODEL_PATH)  # basicsr ships MATLAB's fspecial('gaussian', 7, 7/6) beside the model
    np.testing.assert_allclose(window, stored["gaussian_window"], atol=1e-12)
    assert stored["mu_pris_param"].size == 36 and stored["cov_pris_param"].shape == (36, 36)


@pytest.mark.parametrize("shape", [0.8, 2.0, 3.0])
def test_aggd_fit_recovers_a_generalised_gaussian(shape):
    values = stats.gennorm.rvs(shape, scale=1.5, size=200_000, random_state=np.random.default_rng(0))
    alpha, left, right = aggd_parameters(values)
    assert abs(alpha - shape) < 0.05 * shape
    assert abs(left - 1.5) < 0.03 and abs(right - 1.5) < 0.03  # symmetric: both scales are the scale


def test_grey_and_rgb_inputs_and_bad_input():
    rng = np.random.default_rng(0)
    grey = (rng.random((192, 192)) * 255).astype(np.uint8)
    score = niqe(grey)
    assert np.isfinite(score) and score > 0
    assert niqe(np.repeat(grey[..., None], 3, axis=2)) == pytest.approx(score, abs=1e-12)
    smoother = np.asarray(Image.fromarray(grey).resize((48, 48)).resize((192, 192), Image.BICUBIC))
    assert niqe(smoother) != pytest.approx(score, abs=0.5)
    with pytest.raises(ValueError, match="uint8"):
        niqe(grey.astype(np.float32))
    with pytest.raises(ValueError, match="at least 96 x 96"):
        niqe(grey[:64, :64])
    assert np.isfinite(niqe(grey[:64, :64], block_size=32))
    with pytest.raises(FlatImageError, match="flat"):
        niqe(np.full((192, 192), 128, np.uint8))


def test_a_flat_image_is_counted_not_fatal():
    """A generator's flat image (a collapsed sample) has no NIQE: 06 scores it NaN, averages the others
    and counts it (`NIQE_flat`), instead of stopping the fidelity notebook."""
    from medsyn.metrics.evaluate import _defined_mean, niqe_scores

    textured = (np.random.default_rng(1).random((64, 64)) * 255).astype(np.uint8)
    scores = niqe_scores([textured, np.full((64, 64), 90, np.uint8), textured], 32)
    assert np.isnan(scores[1]) and scores[0] == scores[2] == niqe(textured, 32)
    assert _defined_mean(scores) == scores[0] and np.isnan(_defined_mean(scores[1:2]))
    with pytest.raises(ValueError, match="uint8"):  # anything else still stops it
        niqe_scores([textured.astype(np.float32)], 32)
