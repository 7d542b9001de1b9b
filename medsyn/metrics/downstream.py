"""The measures of MediSyn's downstream experiment (2.3 / Methods 4.3.5; run by
`medsyn.experiments.downstream`): the three training sets, task targets, macro-AUROC, the paired
bootstrap of AUROC differences (resampling the test images, 2,000 times in the paper) and the ROC
figure.

A task is one source of the curated dataset: multi-label when its images carry several labels
(CheXpert's observations), multi-class otherwise.
"""

import numpy as np

from medsyn.data.dataset import class_key


def task_targets(records: list[dict], labels: list[str], multilabel: bool) -> np.ndarray:
    """Multi-hot N x L targets (multi-label) or class indices N (multi-class) over `labels`."""
    if multilabel:
        return np.array([[label in r["labels"] for label in labels] for r in records], dtype=np.float32)
    unknown = {tuple(r["labels"]) for r in records if len(r["labels"]) != 1 or r["labels"][0] not in labels}
    if unknown:
        raise ValueError(f"multi-class records need exactly one known label; got {sorted(unknown)[:3]}")
    return np.array([labels.index(r["labels"][0]) for r in records])


def task_labels(records: list[dict]) -> tuple[list[str], bool]:
    """A source's label vocabulary and whether it is multi-label (some image carries several labels)."""
    labels = sorted({label for r in records for label in r["labels"]})
    return labels, any(len(r["labels"]) > 1 for r in records)


def training_sets(real: list[dict], synthetic: list[dict] | None, n_real: int, seed: int = 0) -> dict[str, list[dict]]:
    """The three training sets: 'real' (n_real real records), 'real_half' (half of those) and
    'real_half+synthetic' (that half plus, class by class, as many synthetic records of the same
    class, `class_key`). The real sets
    depend only on (real, n_real, seed); with `synthetic` None only they are returned.

    Raises:
        ValueError: fewer real records than n_real, or too few synthetic images of a class.
    """
    if len(real) < n_real:
        raise ValueError(f"{n_real} real training images asked for, {len(real)} available")
    rng = np.random.default_rng(seed)
    full = [real[i] for i in sorted(rng.choice(len(real), n_real, replace=False))]
    half = [full[i] for i in sorted(rng.choice(n_real, n_real // 2, replace=False))]
    if synthetic is None:
        return {"real": full, "real_half": half}
    by_class: dict[str, list[dict]] = {}
    for record in synthetic:
        by_class.setdefault(class_key(record), []).append(record)
    added = []
    for key, count in sorted(_counts(half).items()):
        pool = by_class.get(key, [])
        if len(pool) < count:
            raise ValueError(
                f"class {key!r}: {count} synthetic images needed, {len(pool)} generated; sample more per prompt"
            )
        added += [pool[i] for i in sorted(rng.choice(len(pool), count, replace=False))]
    return {"real": full, "real_half": half, "real_half+synthetic": half + added}


def _counts(records: list[dict]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for record in records:
        counts[class_key(record)] = counts.get(class_key(record), 0) + 1
    return counts


def macro_auroc(targets: np.ndarray, scores: np.ndarray, multilabel: bool) -> float:
    """Macro-averaged AUROC (scikit-learn): per label (multi-label) or one-vs-rest per class
    (multi-class), over the labels / classes present with both outcomes in `targets`."""
    from sklearn.metrics import roc_auc_score

    onehot = targets if multilabel else np.eye(scores.shape[1])[targets]
    present = [j for j in range(onehot.shape[1]) if 0 < onehot[:, j].sum() < len(onehot)]
    if not present:
        raise ValueError("no label has both positive and negative test images: AUROC is undefined")
    return float(np.mean([roc_auc_score(onehot[:, j], scores[:, j]) for j in present]))


def paired_bootstrap(
    targets: np.ndarray,
    scores_a: np.ndarray | list[np.ndarray],
    scores_b: np.ndarray | list[np.ndarray],
    multilabel: bool,
    resamples: int = 2000,
    seed: int = 0,
) -> dict[str, float]:
    """Macro-AUROC of B minus A on the test set, with a 95 % percentile interval from resampling
    the test images with replacement (the same resample for both: a paired bootstrap).

    With several replicates (lists of scores: replicate k of A and of B trained with the same seed,
    on the same draw of real images), the difference is the mean over replicates, and each resample
    also draws the replicates with replacement (a two-level bootstrap: test images and training
    seeds), so the interval holds the variation between initialisations and training draws as well
    as that of the test set.

    All resamples are scored at once: a resample is a count of how often it draws each test image,
    and per label AUROC is the Mann–Whitney statistic with those counts as weights (ties counted
    half), which equals scikit-learn's `roc_auc_score` on the resampled rows (tested). The scores are
    sorted once per label, not once per resample. A label enters a resample's macro mean only when
    that resample holds both of its outcomes.

    Returns:
        {'difference', 'low', 'high', 'se' (the bootstrap standard error), 'replicate_sd' (standard
        deviation of the replicates' differences; 0 for one), 'replicates', 'resamples'} (resamples
        where no label has both outcomes are skipped and not counted).
    """
    scores_a = [scores_a] if isinstance(scores_a, np.ndarray) else list(scores_a)
    scores_b = [scores_b] if isinstance(scores_b, np.ndarray) else list(scores_b)
    if len(scores_a) != len(scores_b) or not scores_a:
        raise ValueError(f"paired replicates needed: {len(scores_a)} of A, {len(scores_b)} of B")
    onehot = targets if multilabel else np.eye(scores_a[0].shape[1])[targets]
    rng = np.random.default_rng(seed)
    n = len(targets)
    index = rng.integers(0, n, (resamples, n))
    counts = np.bincount((index + n * np.arange(resamples)[:, None]).ravel(), minlength=resamples * n)
    counts = counts.reshape(resamples, n).astype(np.float64)  # resample x test image: times drawn
    per_replicate = np.stack(
        [
            _macro_auroc_rows(onehot, b, counts) - _macro_auroc_rows(onehot, a, counts)
            for a, b in zip(scores_a, scores_b)
        ]
    )  # replicates x resamples
    picks = (
        rng.integers(0, len(scores_a), (resamples, len(scores_a)))
        if len(scores_a) > 1
        else np.zeros((resamples, 1), int)
    )
    resampled = np.take_along_axis(per_replicate.T, picks, axis=1).mean(axis=1)
    differences = resampled[~np.isnan(resampled)]
    low, high = np.percentile(differences, [2.5, 97.5])
    replicate_differences = [
        macro_auroc(targets, b, multilabel) - macro_auroc(targets, a, multilabel) for a, b in zip(scores_a, scores_b)
    ]
    return {
        "difference": float(np.mean(replicate_differences)),
        "low": float(low),
        "high": float(high),
        "se": float(np.std(differences, ddof=1)),
        "replicate_sd": float(np.std(replicate_differences, ddof=1)) if len(replicate_differences) > 1 else 0.0,
        "replicates": len(scores_a),
        "resamples": int(len(differences)),
    }


def _macro_auroc_rows(onehot: np.ndarray, scores: np.ndarray, counts: np.ndarray) -> np.ndarray:
    """Macro AUROC of each resample (a row of R x n `counts`, how often it draws each of the n test
    images) of n x L targets and scores (NaN where no label has both outcomes). Per label the images
    are sorted by score once and grouped by equal score; in each resample a positive image scores
    the weight of the negatives in lower groups and half of those in its own."""
    per_label = []
    for j in range(onehot.shape[1]):
        order = np.argsort(scores[:, j], kind="stable")
        ranked = scores[order, j]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]])
        y = onehot[order, j] > 0
        weights = counts[:, order]
        positive = np.add.reduceat(weights * y, starts, axis=1)  # R x groups
        negative = np.add.reduceat(weights * ~y, starts, axis=1)
        below = np.cumsum(negative, axis=1) - negative
        u = (positive * (below + 0.5 * negative)).sum(axis=1)
        positives, negatives = positive.sum(axis=1), negative.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            per_label.append(np.where((positives > 0) & (negatives > 0), u / (positives * negatives), np.nan))
    per_label = np.stack(per_label, axis=1)
    with np.errstate(invalid="ignore"):
        defined = np.sum(~np.isnan(per_label), axis=1)
        return np.where(defined > 0, np.nansum(per_label, axis=1) / np.maximum(defined, 1), np.nan)


def plot_roc(targets: np.ndarray, scores: dict[str, np.ndarray | list[np.ndarray]], multilabel: bool, title: str):
    """MediSyn Fig. 5: the macro-average ROC curve of each training set on the same test images; with
    several replicates per set, the curves averaged over them (vertically) and the mean AUROC."""
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_curve

    fig, ax = plt.subplots(figsize=(4.2, 4.0))
    grid = np.linspace(0, 1, 201)
    for name, replicates in scores.items():
        replicates = [replicates] if isinstance(replicates, np.ndarray) else replicates
        curves = []
        for score in replicates:
            onehot = targets if multilabel else np.eye(score.shape[1])[targets]
            for j in range(onehot.shape[1]):
                if 0 < onehot[:, j].sum() < len(onehot):
                    fpr, tpr, _ = roc_curve(onehot[:, j], score[:, j])
                    curves.append(np.interp(grid, fpr, tpr))
        auroc = np.mean([macro_auroc(targets, score, multilabel) for score in replicates])
        ax.plot(grid, np.mean(curves, axis=0), label=f"{name} (AUROC {auroc:.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    return fig


def gap_label(baseline: str, compared: str, n: int) -> str:
    """A compared pair of training sets in words: '2N real − N real', 'N real + N fam − N real'."""

    def name(training_set: str) -> str:
        if training_set == "real":
            return f"{2 * n} real"
        if training_set == "real_half":
            return f"{n} real"
        return f"{n} real + {n} {training_set.removeprefix('real_half+')}"

    return f"{name(compared)} − {name(baseline)}"


def plot_gaps(bootstrap):
    """Per task, every compared pair's test macro-AUROC difference with its paired 95 % interval: the
    gap twice the real data makes (grey) beside what each family's synthetic images add to N real and
    how they stand against 2N real (the experiment's question). `bootstrap` is `run_downstream`'s."""
    import matplotlib.pyplot as plt

    n = int(bootstrap["n_real"].iloc[0]) // 2
    tasks = list(dict.fromkeys(bootstrap.index.get_level_values("task")))
    rows_per_task = max(len(bootstrap.loc[task]) for task in tasks)
    fig, axes = plt.subplots(
        1, len(tasks), figsize=(4.6 * len(tasks), 0.45 * rows_per_task + 1.4), squeeze=False, sharex=True
    )
    families = list(
        dict.fromkeys(c.removeprefix("real_half+") for c in bootstrap.index.get_level_values("compared") if c != "real")
    )
    colours = dict(zip(families, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for ax, task in zip(axes[0], tasks):
        rows = bootstrap.loc[task]
        for y, ((baseline, compared), row) in enumerate(rows.iterrows()):
            colour = "0.35" if compared == "real" else colours[compared.removeprefix("real_half+")]
            marker = "s" if baseline == "real" else "o"
            ax.errorbar(
                row["difference"],
                -y,
                xerr=[[row["difference"] - row["low"]], [row["high"] - row["difference"]]],
                fmt=marker,
                color=colour,
                capsize=3,
                mfc=colour if row["resolved"] else "white",
            )
        ax.axvline(0, color="0.6", linestyle=":", linewidth=1)
        ax.set_yticks([-y for y in range(len(rows))])
        ax.set_yticklabels([gap_label(b, c, n) for b, c in rows.index], fontsize=7)
        ax.set_title(f"{task} ({int(rows['test_images'].iloc[0])} test images)", fontsize=9)
        ax.set_xlabel("test macro-AUROC difference (95 % interval)", fontsize=8)
    fig.suptitle("Downstream: filled markers are resolved differences", fontsize=9)
    fig.tight_layout()
    return fig
