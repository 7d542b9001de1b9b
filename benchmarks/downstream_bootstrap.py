"""The paired bootstrap of `08_downstream` (`medsyn.metrics.downstream.paired_bootstrap`: each resample
a count of how often it draws each test image, AUROC as the Mann–Whitney statistic with those counts
as weights, the scores sorted once per label) against resampling the rows and ranking every resample
anew (scipy's `rankdata`, the way it was computed before), on scores shaped like the `default`
profile's OCT task (455 test images, 4 classes, 5 replicates a training set, 2,000 resamples). The
intervals must be the same: the `identical` column is 1 when every bound agrees to 1e-9, and the
script fails if one does not. The arithmetic runs on the CPU at either scale, as it does in 08.

    python -m benchmarks.downstream_bootstrap --scale cpu
"""

import time

import numpy as np

from benchmarks.common import arguments, finish, row

# the same at both scales: the arithmetic is on the CPU either way
SETTINGS = {scale: {"images": 455, "classes": 4, "replicates": 5, "resamples": 2000} for scale in ("cpu", "gpu")}


def scores(images: int, classes: int, replicates: int, seed: int = 0):
    """Class targets and two training sets' softmax-like scores, B a little better than A."""
    rng = np.random.default_rng(seed)
    targets = rng.integers(0, classes, images)
    a = [np.eye(classes)[targets] * 0.2 + rng.dirichlet(np.ones(classes), images) for _ in range(replicates)]
    b = [np.eye(classes)[targets] * 0.3 + rng.dirichlet(np.ones(classes), images) for _ in range(replicates)]
    return targets, a, b


def ranked_rows(onehot: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The baseline: macro AUROC of each row of R x n x L resampled targets and scores, every row
    ranked by scipy."""
    from scipy.stats import rankdata

    per_label = []
    for j in range(onehot.shape[2]):
        y, ranks = onehot[:, :, j] > 0, rankdata(scores[:, :, j], axis=1)
        positives, negatives = y.sum(axis=1), (~y).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            u = (ranks * y).sum(axis=1) - positives * (positives + 1) / 2
            per_label.append(np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan))
    return np.nanmean(np.stack(per_label, axis=1), axis=1)


def ranked_bootstrap(targets, scores_a, scores_b, resamples: int, seed: int = 0) -> tuple[float, float]:
    """The baseline's interval: the same draws as `paired_bootstrap` (test images, then replicates)."""
    onehot = np.eye(scores_a[0].shape[1])[targets]
    rng = np.random.default_rng(seed)
    index = rng.integers(0, len(targets), (resamples, len(targets)))
    per_replicate = np.stack(
        [
            ranked_rows(onehot[index], b[index]) - ranked_rows(onehot[index], a[index])
            for a, b in zip(scores_a, scores_b)
        ]
    )
    picks = rng.integers(0, len(scores_a), (resamples, len(scores_a)))
    resampled = np.take_along_axis(per_replicate.T, picks, axis=1).mean(axis=1)
    low, high = np.percentile(resampled, [2.5, 97.5])
    return float(low), float(high)


def measure(args, rows: list | None = None) -> list[dict]:
    from medsyn.metrics.downstream import paired_bootstrap

    s = SETTINGS[args.scale]
    targets, a, b = scores(s["images"], s["classes"], s["replicates"])
    model = f"{s['images']} test images × {s['classes']} classes, {s['replicates']} replicates"
    rows = [] if rows is None else rows
    intervals = {}

    def medsyn_interval() -> tuple[float, float]:
        result = paired_bootstrap(targets, a, b, False, s["resamples"])
        return result["low"], result["high"]

    for variant, compute in (
        (
            "baseline: every resample's rows ranked (scipy rankdata)",
            lambda: ranked_bootstrap(targets, a, b, s["resamples"]),
        ),
        ("medsyn: draw counts as weights, scores sorted once", medsyn_interval),
    ):
        began = time.perf_counter()
        intervals[variant] = compute()
        elapsed = time.perf_counter() - began
        first = next(iter(intervals.values()))
        identical = float(np.allclose(intervals[variant], first, rtol=1e-9, atol=1e-12))
        print(f"  {variant}: {elapsed:.2f} s, identical {identical}", flush=True)
        rows.append(
            row(
                "downstream bootstrap",
                model,
                variant,
                batch=s["resamples"],
                throughput=s["resamples"] / elapsed,
                unit="resamples/s",
                identical=identical,
                note=f"one paired comparison: {elapsed:.2f} s",
            )
        )
        if identical != 1.0:
            raise AssertionError(f"{variant} gives another interval than the baseline: {intervals}")
    return rows


if __name__ == "__main__":
    arguments_ = arguments(__doc__.splitlines()[0])
    finish(measure(arguments_), arguments_, {"settings": SETTINGS[arguments_.scale]})
