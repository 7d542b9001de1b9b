"""NIQE, the Natural Image Quality Evaluator (Mittal, Soundararajan and Bovik, IEEE Signal Processing
Letters 2013), in numpy/scipy, following the LIVE release's MATLAB code (`computequality.m`): grey
image as MATLAB's `rgb2gray` makes it, cropped to whole 96 x 96 blocks; at two scales (the second
from MATLAB's antialiased bicubic `imresize(im, 0.5)`), mean-subtracted contrast-normalised
coefficients; per block 18 features (asymmetric generalised Gaussian fits to the coefficients and
to products of neighbours in four directions); the quality is the Mahalanobis-like distance between
the multivariate Gaussian of the image's block features and LIVE's pristine model. Lower is better.

The pristine model (`data/niqe_pris_params.npz`: `mu_pris_param`, `cov_pris_param`) is LIVE's
`modelparameters.mat` as the basicsr 1.4.2 source package on PyPI carries it; LIVE's copyright notice
is `data/NIQE_NOTICE.txt`, and research that reports NIQE should cite the two references there.
"""

from functools import lru_cache
from pathlib import Path

import numpy as np
from scipy import ndimage
from scipy.special import gamma

MODEL_PATH = Path(__file__).parent / "data" / "niqe_pris_params.npz"
# MATLAB rgb2gray: the first row of the inverse of the NTSC YIQ matrix
RGB2GRAY = np.array([0.298936021293775, 0.587043074451121, 0.114020904255103])
# the AGGD shape grid of estimateaggdparam.m, 0.2:0.001:10, as MATLAB's colon operator builds it
SHAPES = 0.2 + 0.001 * np.arange(9801)
SHAPE_RATIOS = gamma(2 / SHAPES) ** 2 / (gamma(1 / SHAPES) * gamma(3 / SHAPES))


@lru_cache(maxsize=1)
def pristine_model() -> tuple[np.ndarray, np.ndarray]:
    """LIVE's pristine multivariate Gaussian: mean (36,) and covariance (36, 36)."""
    params = np.load(MODEL_PATH)
    return params["mu_pris_param"].ravel(), params["cov_pris_param"]


def rgb2gray(image: np.ndarray) -> np.ndarray:
    """MATLAB's `rgb2gray` of a uint8 RGB image: the weighted sum, rounded back to uint8."""
    grey = image[..., :3].astype(np.float64) @ RGB2GRAY
    return np.floor(grey + 0.5).clip(0, 255).astype(np.uint8)


def gaussian_window(size: int = 7, sigma: float = 7 / 6) -> np.ndarray:
    """MATLAB's `fspecial('gaussian', size, sigma)`."""
    x = np.arange(size) - (size - 1) / 2
    window = np.exp(-(x[:, None] ** 2 + x[None, :] ** 2) / (2 * sigma**2))
    return window / window.sum()


def _cubic(x: np.ndarray) -> np.ndarray:
    a = np.abs(x)
    return (1.5 * a**3 - 2.5 * a**2 + 1) * (a <= 1) + (-0.5 * a**3 + 2.5 * a**2 - 4 * a + 2) * ((a > 1) & (a <= 2))


def _resize_weights(length: int, scale: float) -> tuple[np.ndarray, np.ndarray]:
    """MATLAB imresize's contributions along one axis (bicubic, antialiased when shrinking):
    for each output sample, input indices (mirrored at the borders) and normalised weights."""
    out_length = int(np.ceil(length * scale))
    width = 4.0 / scale if scale < 1 else 4.0
    u = np.arange(1, out_length + 1) / scale + 0.5 * (1 - 1 / scale)  # 1-based input coordinate
    left = np.floor(u - width / 2)
    indices = left[:, None] + np.arange(int(np.ceil(width)) + 2)[None, :]
    distance = u[:, None] - indices
    weights = scale * _cubic(scale * distance) if scale < 1 else _cubic(distance)
    weights /= weights.sum(axis=1, keepdims=True)
    mirror = np.concatenate([np.arange(length), np.arange(length)[::-1]])
    indices = mirror[np.mod(indices.astype(int) - 1, 2 * length)]
    keep = np.any(weights != 0, axis=0)
    return indices[:, keep], weights[:, keep]


def imresize_half(image: np.ndarray) -> np.ndarray:
    """MATLAB's `imresize(image, 0.5)` of a float image (bicubic, antialiased): rows first, then columns."""
    rows_idx, rows_w = _resize_weights(image.shape[0], 0.5)
    image = np.einsum("ok,okc->oc", rows_w, image[rows_idx])
    cols_idx, cols_w = _resize_weights(image.shape[1], 0.5)
    return np.einsum("ok,rok->ro", cols_w, image[:, cols_idx])


def aggd_parameters(values: np.ndarray) -> tuple[float, float, float]:
    """Shape α and left / right scales of an asymmetric generalised Gaussian fitted by moment
    matching on the grid of `estimateaggdparam.m`."""
    values = values.ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        left = np.sqrt(np.mean(values[values < 0] ** 2)) if np.any(values < 0) else np.nan
        right = np.sqrt(np.mean(values[values > 0] ** 2)) if np.any(values > 0) else np.nan
        ratio = left / right
        rhat = np.mean(np.abs(values)) ** 2 / np.mean(values**2)
        rhat_norm = rhat * (ratio**3 + 1) * (ratio + 1) / (ratio**2 + 1) ** 2
    if not np.isfinite(rhat_norm):
        return np.nan, np.nan, np.nan
    alpha = SHAPES[np.argmin((SHAPE_RATIOS - rhat_norm) ** 2)]
    spread = np.sqrt(gamma(1 / alpha) / gamma(3 / alpha))
    return alpha, left * spread, right * spread


def block_features(block: np.ndarray) -> list[float]:
    """The 18 features of `computefeature.m` for one block of normalised coefficients."""
    alpha, left, right = aggd_parameters(block)
    features = [alpha, (left + right) / 2]
    for shift in ((0, 1), (1, 0), (1, 1), (-1, 1)):  # MATLAB circshift within the block
        alpha, left, right = aggd_parameters(block * np.roll(block, shift, axis=(0, 1)))
        mean = (right - left) * gamma(2 / alpha) / gamma(1 / alpha)
        features += [alpha, mean, left, right]
    return features


def _scale_features(image: np.ndarray, block: int) -> np.ndarray:
    window = gaussian_window()
    mu = ndimage.correlate(image, window, mode="nearest")  # imfilter(..., 'replicate')
    sigma = np.sqrt(np.abs(ndimage.correlate(image * image, window, mode="nearest") - mu * mu))
    coefficients = (image - mu) / (sigma + 1)
    rows, cols = image.shape[0] // block, image.shape[1] // block
    # blkproc's order: blocks down each column of blocks, then across
    return np.array(
        [
            block_features(coefficients[r * block : (r + 1) * block, c * block : (c + 1) * block])
            for c in range(cols)
            for r in range(rows)
        ]
    )


class FlatImageError(ValueError):
    """NIQE is undefined: fewer than two of the image's blocks have texture (a flat or nearly flat image)."""


def niqe(image: np.ndarray, block_size: int = 96) -> float:
    """NIQE of one uint8 image (H x W grey or H x W x 3 RGB), as LIVE's MATLAB `computequality` with
    `block_size` x `block_size` blocks and no overlap. Lower is better.

    Raises:
        ValueError: not uint8, wrong shape, or smaller than one block (NIQE needs at least
            `block_size` pixels each way; `block_size` must be even, the second scale halves it).
        FlatImageError: fewer than two blocks have texture, so NIQE is undefined.
    """
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"niqe takes a uint8 image, not {image.dtype}")
    if image.ndim == 3 and image.shape[2] in (3, 4):
        image = rgb2gray(image)
    elif image.ndim != 2:
        raise ValueError(f"niqe takes an H x W or H x W x 3 image, not shape {image.shape}")
    if block_size % 2:
        raise ValueError(f"block_size must be even, not {block_size}")
    rows, cols = image.shape[0] // block_size, image.shape[1] // block_size
    if rows == 0 or cols == 0:
        raise ValueError(
            f"NIQE needs at least {block_size} x {block_size} pixels; the image is {image.shape[0]} x "
            f"{image.shape[1]} (pass a smaller block_size, and report it)"
        )
    grey = image[: rows * block_size, : cols * block_size].astype(np.float64)
    features = np.hstack([_scale_features(grey, block_size), _scale_features(imresize_half(grey), block_size // 2)])
    # the MATLAB code's nanmean (per feature) and nancov (over blocks with every feature defined): a
    # flat block has undefined features
    complete = features[np.all(np.isfinite(features), axis=1)]
    if len(complete) < 2:
        raise FlatImageError("NIQE needs at least two blocks with texture; this image is (nearly) flat")
    mu_pristine, cov_pristine = pristine_model()
    difference = mu_pristine - np.nanmean(features, axis=0)
    covariance = (cov_pristine + np.cov(complete, rowvar=False)) / 2
    return float(np.sqrt(difference @ np.linalg.pinv(covariance) @ difference))
