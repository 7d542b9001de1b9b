"""95 % intervals for every number of the comparison: bootstrap intervals computed by scipy
(`scipy.stats.bootstrap`), resampling the rows a metric is computed from (generated images, real
images, image pairs), and paired intervals for the difference between two families whose images
share prompts and seeds (each resample draws the same prompt-and-seed slots from both).

The interval is the percentile interval shifted by the bootstrap's estimate of bias (the estimate
minus the resamples' mean). A resample repeats images, which inflates a Fréchet distance and shrinks
k-nearest-neighbour radii: the plain percentile interval of the real-vs-real FD can lie wholly above
the estimate. Shifted, it measures the size of the noise around the estimate; for a mean the shift
is negligible.

A statistic here is a function of index arrays: `bootstrap_interval` resamples the indices, the
statistic looks the rows up, so a metric of two sets (a Fréchet distance of generated against real
features) resamples each set on its own.
"""

from collections.abc import Callable

import numpy as np

CONFIDENCE = 0.95


def bootstrap_interval(
    statistic: Callable[..., float],
    sizes: tuple[int, ...],
    resamples: int = 1000,
    seed: int = 0,
    paired: bool = False,
    bounds: tuple[float, float] = (-np.inf, np.inf),
) -> tuple[float, float]:
    """The 95 % bias-shifted percentile bootstrap interval of `statistic(*index_arrays)`, clipped to
    the statistic's `bounds` (a share cannot pass 1, a distance cannot fall below 0).

    Args:
        statistic: a function of one index array per sample (rows drawn with replacement).
        sizes: the number of rows of each sample.
        resamples: bootstrap resamples.
        seed: seed of the resampling.
        paired: resample all samples with the same indices (they must be equally long).
        bounds: the statistic's range.
    """
    from scipy.stats import bootstrap

    indices = tuple(np.arange(n) for n in sizes)
    result = bootstrap(
        indices,
        statistic,
        n_resamples=resamples,
        paired=paired,
        vectorized=False,
        method="percentile",
        confidence_level=CONFIDENCE,
        rng=np.random.default_rng(seed),
    )
    shift = statistic(*indices) - float(np.nanmean(result.bootstrap_distribution))
    low, high = (
        float(np.clip(v + shift, *bounds)) for v in (result.confidence_interval.low, result.confidence_interval.high)
    )
    return low, high


def mean_interval(values: np.ndarray, resamples: int = 1000, seed: int = 0) -> tuple[float, float]:
    """The bootstrap interval of the mean of per-row values (NaN rows left out)."""
    values = np.asarray(values, np.float64)
    values = values[~np.isnan(values)]
    if len(values) < 2:
        return float("nan"), float("nan")
    return bootstrap_interval(lambda i: values[i].mean(), (len(values),), resamples, seed)


def macro_mean(values: np.ndarray, classes: np.ndarray) -> float:
    """The mean over classes of each class's mean value: the macro accuracy for 0/1 values. One pass
    of `np.bincount` (a bootstrap calls it for every resample; integer class codes are fastest)."""
    _, inverse = np.unique(classes, return_inverse=True)
    return float(np.mean(np.bincount(inverse, weights=values) / np.bincount(inverse)))


def proportion_interval(successes: int, total: int) -> tuple[float, float]:
    """The Wilson score 95 % interval of a proportion (scipy), for counts such as likely copies."""
    from scipy.stats import binomtest

    if total == 0:
        return float("nan"), float("nan")
    interval = binomtest(int(successes), int(total)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return float(interval.low), float(interval.high)


def combined_mean_interval(estimates: list[float], lows: list[float], highs: list[float]) -> tuple[float, float]:
    """An interval for the mean of independent estimates (one per task, each with its own test set)
    from their 95 % intervals: each interval's half-width gives its standard error, the mean's
    standard error is the root of their summed squares over the count (normal approximation)."""
    from scipy.stats import norm

    if not estimates:
        return float("nan"), float("nan")
    z = norm.ppf(0.5 + CONFIDENCE / 2)
    errors = np.array([standard_error_from_interval(low, high) for low, high in zip(lows, highs)])
    mean, error = float(np.mean(estimates)), float(np.sqrt((errors**2).sum()) / len(estimates))
    return mean - z * error, mean + z * error


def resolved(low: float, high: float) -> bool:
    """An interval of a difference resolves it when it excludes 0."""
    return bool(low > 0 or high < 0)


POWER = 0.8


def minimum_detectable_difference(standard_error: float, power: float = POWER) -> float:
    """The smallest true difference that a 95 % interval with this standard error excludes from 0
    with probability `power` (two-sided, normal approximation): (z_0.975 + z_power) × standard error,
    2.80 standard errors at 80 % power. A difference smaller than this can exist and go unresolved."""
    from scipy.stats import norm

    if not np.isfinite(standard_error) or standard_error < 0:
        return float("nan")
    return float((norm.ppf(0.5 + CONFIDENCE / 2) + norm.ppf(power)) * standard_error)


def standard_error_from_interval(low: float, high: float) -> float:
    """The standard error that a 95 % interval's half-width implies (normal approximation)."""
    from scipy.stats import norm

    return float((high - low) / (2 * norm.ppf(0.5 + CONFIDENCE / 2)))
