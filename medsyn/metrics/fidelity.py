"""Distribution distances between real and generated image features: the Fréchet distance (FID when
the features are InceptionV3's pool3, "FD_<encoder>" for any other encoder), the kernel inception
distance (KID, Bińkowski et al. 2018; unbiased, for small sample counts), improved precision and
recall (Kynkäänniemi et al. 2019) and MS-SSIM diversity. The arithmetic is torch-fidelity's
(Obukhov et al.), the standard the FID literature is compared on; its TF-compatible InceptionV3 loads
from a local file only (`inception_weights`), never from the network. For the thousands of index
draws of a bootstrap, `FrechetDistanceOfDraws`, `KernelDistanceOfDraws` and `PrecisionRecallOfDraws`
give torch-fidelity's numbers on the drawn rows (tested against it) from what is computed once per
pair of sets.
"""

from pathlib import Path

import numpy as np
import torch

from medsyn.paths import INCEPTION_ENV, inception_weights_from_environment

# torch-fidelity's port of the TensorFlow FID Inception (2015-12-05), the file its own download writes
INCEPTION_FILE = "weights-inception-2015-12-05-6726825d.pth"


def frechet_distance(mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray) -> float:
    """Fréchet distance between N(μ₁, Σ₁) and N(μ₂, Σ₂): ‖μ₁ − μ₂‖² + tr(Σ₁ + Σ₂ − 2 (Σ₁Σ₂)^½)
    (Dowson & Landau 1982; Heusel et al. 2017), computed by torch-fidelity (the trace of the square
    root from the eigenvalues of Σ₁Σ₂)."""
    from torch_fidelity.metric_fid import KEY_METRIC_FID, fid_statistics_to_metric

    mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
    sigma1, sigma2 = np.atleast_2d(np.asarray(sigma1, np.float64)), np.atleast_2d(np.asarray(sigma2, np.float64))
    if mu1.shape != mu2.shape or sigma1.shape != sigma2.shape or sigma1.shape != (len(mu1), len(mu1)):
        raise ValueError(f"shapes do not match: mu {mu1.shape} {mu2.shape}, sigma {sigma1.shape} {sigma2.shape}")
    return fid_statistics_to_metric({"mu": mu1, "sigma": sigma1}, {"mu": mu2, "sigma": sigma2}, False)[KEY_METRIC_FID]


def feature_statistics(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (unbiased, as the reference FID code) of N x D features."""
    features = np.asarray(features, np.float64)
    return features.mean(axis=0), np.cov(features, rowvar=False)


def kernel_distance(
    real: np.ndarray, generated: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
) -> tuple[float, float]:
    """KID: the unbiased estimate of MMD² with the cubic polynomial kernel k(x, y) = (xᵀy / d + 1)³,
    averaged over random subsets (torch-fidelity's estimator).

    Args:
        real, generated: N x D and M x D features.
        subsets, subset_size: number and size of the random subsets (size capped at the smaller N, M).
        seed: seed of the subset draws.

    Returns:
        (mean, standard deviation) over subsets.
    """
    from torch_fidelity.metric_kid import KEY_METRIC_KID_MEAN, KEY_METRIC_KID_STD, kid_features_to_metric

    real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
    n = min(len(real), len(generated), subset_size)
    if n < 2:
        raise ValueError("KID needs at least 2 samples on each side")
    out = kid_features_to_metric(
        torch.from_numpy(real),
        torch.from_numpy(generated),
        kid_subsets=subsets,
        kid_subset_size=n,
        rng_seed=seed,
        verbose=False,
    )
    return out[KEY_METRIC_KID_MEAN], out[KEY_METRIC_KID_STD]


def trace_sqrt_product(sigma1: np.ndarray, sigma2: np.ndarray) -> float:
    """tr((Σ₁Σ₂)^½) of two covariance matrices, from a symmetric eigenproblem: with Σ₁ = L Lᵀ
    (Cholesky), Σ₁Σ₂ is similar to Lᵀ Σ₂ L, which is symmetric positive semi-definite, so the trace is
    the sum of the square roots of its eigenvalues (`eigvalsh`, negative rounding clipped to 0). The
    same number as torch-fidelity's sum over the eigenvalues of the non-symmetric Σ₁Σ₂ up to rounding,
    at about a third of the cost (a bootstrap takes it thousands of times). A Σ₁ that is not positive
    definite (fewer samples than dimensions) takes its symmetric square root instead."""
    try:
        root = np.linalg.cholesky(sigma1)
    except np.linalg.LinAlgError:
        values, vectors = np.linalg.eigh(sigma1)
        root = vectors * np.sqrt(np.clip(values, 0, None))
    return float(np.sqrt(np.clip(np.linalg.eigvalsh(root.T @ sigma2 @ root), 0, None)).sum())


class FrechetDistanceOfDraws:
    """`frechet_distance` of the rows `g` of `generated` against the rows `r` of `real`, for the many
    index draws of a bootstrap: the mean and covariance of the drawn rows as `feature_statistics`
    computes them and the trace of the square root from a symmetric eigenproblem
    (`trace_sqrt_product`). With no more drawn rows than dimensions (a small set, or 2,048 Inception
    dimensions) the covariances are singular and the trace comes from the rows instead: with A, B the
    centred rows, the non-zero eigenvalues of Σ₁Σ₂ are the squared singular values of A Bᵀ over
    (n₁ − 1)(n₂ − 1), so tr((Σ₁Σ₂)^½) = ‖A Bᵀ‖_* / √((n₁ − 1)(n₂ − 1)), an n₁ × n₂ problem in place
    of a D × D one. Equal to `frechet_distance` of the drawn rows up to rounding (tested)."""

    def __init__(self, generated: np.ndarray, real: np.ndarray):
        self.generated, self.real = np.asarray(generated, np.float64), np.asarray(real, np.float64)
        if self.generated.shape[1:] != self.real.shape[1:]:
            raise ValueError(f"feature shapes differ: {self.generated.shape[1:]} and {self.real.shape[1:]}")

    def __call__(self, g: np.ndarray, r: np.ndarray) -> float:
        a, b = self.generated[g], self.real[r]
        difference = a.mean(axis=0) - b.mean(axis=0)
        if min(len(a), len(b)) <= a.shape[1]:
            a, b = a - a.mean(axis=0), b - b.mean(axis=0)
            scale = (len(a) - 1) * (len(b) - 1)
            cross = np.linalg.svd(a @ b.T, compute_uv=False).sum() / np.sqrt(scale)
            traces = (a * a).sum() / (len(a) - 1) + (b * b).sum() / (len(b) - 1)
            return float(difference @ difference + traces - 2 * cross)
        (_, sigma1), (_, sigma2) = feature_statistics(a), feature_statistics(b)
        sigma1, sigma2 = np.atleast_2d(sigma1), np.atleast_2d(sigma2)
        return float(
            difference @ difference + np.trace(sigma1) + np.trace(sigma2) - 2 * trace_sqrt_product(sigma1, sigma2)
        )


class KernelDistanceOfDraws:
    """`kernel_distance(real[r], generated[g], ...)` for many index draws `r`, `g` of two fixed feature
    sets, as a bootstrap makes them: the polynomial kernel between every two rows is computed once, and
    each call takes the subsets torch-fidelity would take (the same RandomState draws) and evaluates
    its unbiased MMD² (`torch_fidelity.metric_kid.mmd2`) from how often each row is drawn: with c the
    count of each row in a subset, the sum of a subset's kernel block is cᵀKc and its diagonal c·diag K,
    so no block is gathered. Equal to `kernel_distance` up to the order of floating-point sums."""

    def __init__(self, real: np.ndarray, generated: np.ndarray):
        from torch_fidelity.metric_kid import kernel_poly

        real, generated = np.asarray(real, np.float64), np.asarray(generated, np.float64)
        self.real_real = kernel_poly(real, real)
        self.generated_generated = kernel_poly(generated, generated)
        self.real_generated = kernel_poly(real, generated)

    def __call__(
        self, r: np.ndarray, g: np.ndarray, subsets: int = 100, subset_size: int = 1000, seed: int = 0
    ) -> tuple[float, float]:
        n = min(len(r), len(g), subset_size)
        if n < 2:
            raise ValueError("KID needs at least 2 samples on each side")
        rng = np.random.RandomState(seed)
        real_counts = np.zeros((subsets, len(self.real_real)))
        generated_counts = np.zeros((subsets, len(self.generated_generated)))
        for i in range(subsets):  # the draws of torch-fidelity's loop, in its order
            real_counts[i] = np.bincount(r[rng.choice(len(r), n, replace=False)], minlength=real_counts.shape[1])
            generated_counts[i] = np.bincount(
                g[rng.choice(len(g), n, replace=False)], minlength=generated_counts.shape[1]
            )
        within_real = ((real_counts @ self.real_real) * real_counts).sum(axis=1)
        within_generated = ((generated_counts @ self.generated_generated) * generated_counts).sum(axis=1)
        across = ((real_counts @ self.real_generated) * generated_counts).sum(axis=1)
        off_diagonal = (
            within_real
            - real_counts @ np.diagonal(self.real_real)
            + within_generated
            - generated_counts @ np.diagonal(self.generated_generated)
        )
        mmds = off_diagonal / (n * (n - 1)) - 2 * across / (n * n)
        return float(np.mean(mmds)), float(np.std(mmds))


def precision_recall(real: np.ndarray, generated: np.ndarray, neighbourhood: int = 3) -> dict[str, float]:
    """Improved precision and recall (Kynkäänniemi et al. 2019): precision is the share of generated
    samples inside the real manifold (the union of balls reaching each real sample's k-th nearest real
    neighbour), recall the share of real samples inside the generated one. torch-fidelity's estimator.

    Returns:
        {'precision', 'recall', 'f_score'}.
    """
    from torch_fidelity.metric_prc import (
        KEY_METRIC_F_SCORE,
        KEY_METRIC_PRECISION,
        KEY_METRIC_RECALL,
        prc_features_to_metric,
    )

    real, generated = (torch.from_numpy(np.asarray(x, np.float32)) for x in (real, generated))
    if min(len(real), len(generated)) <= neighbourhood:
        raise ValueError(f"precision/recall needs more than {neighbourhood} samples on each side")
    out = prc_features_to_metric(
        generated, real, prc_neighborhood=neighbourhood, prc_batch_size=10000, save_cpu_ram=False, verbose=False
    )
    return {
        "precision": out[KEY_METRIC_PRECISION],
        "recall": out[KEY_METRIC_RECALL],
        "f_score": out[KEY_METRIC_F_SCORE],
    }


class PrecisionRecallOfDraws:
    """`precision_recall(real[r], generated[g])` for many index draws `r`, `g` of two fixed feature
    sets, as a bootstrap makes them. torch-fidelity's estimator takes every distance from
    `torch.cdist` of the drawn rows; here the three distance matrices of the whole sets are computed
    once (a drawn row's distances are the same numbers, bit for bit: `torch.cdist` of gathered rows
    equals the gathered `torch.cdist`), and each draw needs only its row counts: a drawn row's ball
    reaches its k-th nearest other drawn row (the (k+1)-th smallest distance of the drawn multiset,
    itself included, as `kthvalue(k + 1)` takes it), found by walking the row's sorted distances until
    the counts add up to k + 1. Equal to `precision_recall` of the drawn rows (tested)."""

    def __init__(self, real: np.ndarray, generated: np.ndarray, neighbourhood: int = 3):
        real, generated = (torch.from_numpy(np.asarray(x, np.float32)) for x in (real, generated))
        if min(len(real), len(generated)) <= neighbourhood:
            raise ValueError(f"precision/recall needs more than {neighbourhood} samples on each side")
        self.neighbourhood = neighbourhood
        # torch-fidelity's matrices: real-real, generated-generated and real-generated (its dist_2_1)
        self.real_generated = torch.cdist(real, generated).numpy()
        self.within = {
            "real": self._sorted(torch.cdist(real, real).numpy()),
            "generated": self._sorted(torch.cdist(generated, generated).numpy()),
        }

    @staticmethod
    def _sorted(distances: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        order = np.argsort(distances, axis=1, kind="stable")
        return order, np.take_along_axis(distances, order, axis=1)

    def _radii(self, side: str, counts: np.ndarray) -> np.ndarray:
        """Per row of the whole set, the radius of its ball among the drawn rows (`counts` of each)."""
        order, distances = self.within[side]
        reached = np.cumsum(counts[order], axis=1) >= self.neighbourhood + 1
        return distances[np.arange(len(order)), reached.argmax(axis=1)]

    def __call__(self, r: np.ndarray, g: np.ndarray) -> dict[str, float]:
        if min(len(r), len(g)) <= self.neighbourhood:
            raise ValueError(f"precision/recall needs more than {self.neighbourhood} samples on each side")
        real_counts = np.bincount(r, minlength=self.real_generated.shape[0])
        generated_counts = np.bincount(g, minlength=self.real_generated.shape[1])
        real_drawn, generated_drawn = real_counts > 0, generated_counts > 0
        real_radii = self._radii("real", real_counts)
        generated_radii = self._radii("generated", generated_counts)
        # a generated row is inside the real manifold when a drawn real row's ball reaches it, and back
        inside_real = ((self.real_generated <= real_radii[:, None]) & real_drawn[:, None]).any(axis=0)
        inside_generated = ((self.real_generated <= generated_radii[None, :]) & generated_drawn[None, :]).any(axis=1)
        # torch-fidelity's float32 mean over the drawn rows
        precision = torch.from_numpy(inside_real[g]).float().mean().item()
        recall = torch.from_numpy(inside_generated[r]).float().mean().item()
        return {
            "precision": precision,
            "recall": recall,
            "f_score": 2 * precision * recall / max(1e-5, precision + recall),
        }


def inception_places(path: str | Path | None = None) -> list[tuple[str, Path]]:
    """Where `inception_weights` looks, in order: (what the place is, the file)."""
    places = []
    if path is not None:
        places.append(("the path given", Path(path)))
    from_environment = inception_weights_from_environment()
    if from_environment is not None:
        places.append((f"${INCEPTION_ENV}", from_environment))
    places.append(("torch hub's cache", Path(torch.hub.get_dir()) / "checkpoints" / INCEPTION_FILE))
    return places


def inception_weights(path: str | Path | None = None) -> Path:
    """The TF-compatible InceptionV3 weights for FID, from (in order) `path`, the environment variable
    `MEDSYN_INCEPTION_WEIGHTS`, or torch hub's cache (`<torch.hub.get_dir()>/checkpoints/`, where
    torch-fidelity's own download puts the file). Nothing is downloaded.

    Raises:
        FileNotFoundError: none of them holds the file; the message names every place looked at.
    """
    places = inception_places(path)
    for _, place in places:
        if place.is_file():
            return place
    looked = "; ".join(f"{name}: {place}" for name, place in places)
    raise FileNotFoundError(
        f"InceptionV3 weights for FID not found (medsyn never downloads). Looked at {looked}. "
        f"Put torch-fidelity's {INCEPTION_FILE} at one of them, or set ${INCEPTION_ENV}."
    )


def inception_features(
    images, weights_path: str | Path | None = None, batch_size: int = 50, device: str | torch.device | None = None
) -> np.ndarray:
    """2048-d pool3 features of uint8 images (N x H x W x 3, or a list of H x W x 3 / H x W arrays) from
    torch-fidelity's TF-compatible InceptionV3: each image resized to 299 x 299 as TensorFlow 1.x
    does, the features FID is defined on. See `inception_weights` for where the weights come from.
    Float32 throughout on any `device` (default: a GPU when there is one): lower precision would move
    FID away from the values it is compared with."""
    weights = inception_weights(weights_path)  # first, so that missing weights fail at once
    from torch_fidelity.feature_extractor_inceptionv3 import FeatureExtractorInceptionV3

    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    extractor = FeatureExtractorInceptionV3(
        "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(weights)
    ).to(device)
    return _extract(lambda batch: extractor(batch.to(device))[0], images, batch_size)


def _extract(model, images, batch_size: int) -> np.ndarray:
    out = []
    for start in range(0, len(images), batch_size):
        batch = np.stack([_rgb(image) for image in images[start : start + batch_size]])
        with torch.no_grad():
            out.append(model(torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()).double().cpu().numpy())
    return np.concatenate(out)


def _rgb(image) -> np.ndarray:
    image = np.asarray(image)
    if image.dtype != np.uint8:
        raise ValueError(f"fidelity features are computed on uint8 images, not {image.dtype}")
    return np.repeat(image[..., None], 3, axis=2) if image.ndim == 2 else image[..., :3]


def ms_ssim_pairs(images, pairs: int = 200, seed: int = 0) -> tuple[np.ndarray, int]:
    """MS-SSIM of `pairs` random pairs of distinct images (`ms_ssim_diversity`'s pairs), one value per
    pair, and the window used."""
    from pytorch_msssim import ms_ssim

    grey = np.stack([_grey(image) for image in images]).astype(np.float32)
    if len(grey) < 2:
        raise ValueError("MS-SSIM diversity needs at least 2 images")
    side = min(grey.shape[1:])
    window = min(11, (side - 1) // 16 + 1 - ((side - 1) // 16) % 2)  # odd, with (window − 1)·16 < side
    if window < 3:
        raise ValueError(f"images of {side} pixels are too small for five-scale MS-SSIM (at least 33)")
    rng = np.random.default_rng(seed)
    first = rng.integers(0, len(grey), pairs)
    second = (first + rng.integers(1, len(grey), pairs)) % len(grey)  # never the same image
    a, b = (torch.from_numpy(grey[index])[:, None] for index in (first, second))
    return ms_ssim(a, b, data_range=255, size_average=False, win_size=window).double().numpy(), window


def ms_ssim_diversity(images, pairs: int = 200, seed: int = 0) -> tuple[float, int]:
    """Mean MS-SSIM over random pairs of distinct images (lower: more diverse; Odena et al. 2017),
    computed by pytorch-msssim on grey uint8 images: five scales, the standard weights.

    The standard 11-pixel window needs images larger than 160 pixels (four halvings); smaller images
    get the largest odd window that fits (3 pixels at 64 px), returned so that it can be reported.

    Returns:
        (mean MS-SSIM, window size).
    """
    values, window = ms_ssim_pairs(images, pairs, seed)
    return float(values.mean()), window


def _grey(image) -> np.ndarray:
    image = _rgb(image)
    return image.astype(np.float64) @ np.array([0.299, 0.587, 0.114])
