"""MediSyn's downstream experiment (2.3 / Methods 4.3.5): does adding synthetic images to a small
real training set help a classifier?

Per task (one source of the curated dataset), a classifier (`medsyn.training.classifier`: ResNet-50,
or a compact CNN for small images) is trained on (i) `n_real` real images ("2N real"), (ii) half of
them ("N real"), and (iii) that half plus, class by class, as many synthetic images of each family
("N real + N <family>"; `medsyn.metrics.downstream.training_sets`); each keeps the epoch with the best
validation macro-AUROC and is tested on the task's real test images. Every training set is trained
`replicates` times (seed `seed + k`: the draw of the real images, initialisation and batch order), so
that a difference is not one lucky initialisation. The differences in test macro-AUROC get paired
two-level bootstrap 95 % intervals (test images and replicates), and from their standard errors the
smallest difference the experiment can resolve (`medsyn.intervals.minimum_detectable_difference`).

The comparison the experiment exists for is (i) against (ii): if twice the real data does not
resolve better, the task cannot show whether synthetic data helps, and `describe_downstream` says so.
"""

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
from tqdm.auto import tqdm

from medsyn.data.dataset import image_path, load_images, load_rgb, read_records, split_records
from medsyn.intervals import minimum_detectable_difference
from medsyn.metrics.downstream import (
    macro_auroc,
    paired_bootstrap,
    plot_gaps,
    plot_roc,
    task_labels,
    task_targets,
    training_sets,
)
from medsyn.records import save_figure, save_table
from medsyn.training.classifier import predict, train_classifier


def run_downstream(
    curated_dir: str | Path,
    generated: dict[str, str | Path],
    tasks: list[str],
    n_real: int,
    epochs: int = 15,
    learning_rate: float = 1e-4,
    batch_size: int = 32,
    imagenet_weights: str | Path | None = None,
    bootstrap_resamples: int = 2000,
    seed: int = 0,
    progress: bool = False,
    architecture: str = "resnet50",
    replicates: int = 1,
    held_out_dir: str | Path | None = None,
) -> dict:
    """Train and test every training set of every task.

    Args:
        curated_dir: the curated dataset (real training, validation and test images).
        generated: family -> generated dataset directory (`medsyn.sampling.sample_families`).
        tasks: sources of the curated dataset, one classifier task each.
        n_real: real images of training set (i); (ii) and the synthetic share are half.
        epochs, learning_rate, batch_size: the classifier's schedule (MediSyn: 15, 1e-4, 32).
        imagenet_weights: a local ResNet-50 ImageNet weights file; None: random initialisation.
        bootstrap_resamples: paired bootstrap resamples of the test set (MediSyn: 2,000).
        seed: the first replicate's seed (draw of the training sets, initialisation and batch order).
        progress: show a progress bar over the classifiers.
        architecture: 'resnet50' (MediSyn's) or 'compact' (`medsyn.training.classifier.build_classifier`).
        replicates: trainings of every training set, with seeds `seed`, `seed + 1`, ...
        held_out_dir: a curated dataset of other patients (`medsyn.data.curate.curate_held_out`)
            whose validation and test images replace the curated dataset's; None: the curated
            dataset's own.

    Returns:
        {'table': one row per task, training set and replicate (images, best epoch, validation and
        test macro-AUROC, classifier), 'bootstrap': one row per compared pair of training sets (the
        mean difference over replicates, its interval, standard error, the replicates' spread and the
        smallest resolvable difference), 'roc': task -> (test targets, scores per training set (one
        array per replicate), multilabel), 'n_real', 'families'}.
    """
    if replicates < 1:
        raise ValueError(f"replicates must be at least 1, got {replicates}")
    real = read_records(curated_dir)
    evaluation_dir = Path(held_out_dir) if held_out_dir is not None else Path(curated_dir)
    evaluation = read_records(evaluation_dir) if held_out_dir is not None else real
    synthetic = {family: split_records(directory, "train") for family, directory in generated.items()}
    results, comparisons, roc = [], [], {}
    bar = tqdm(
        total=len(tasks) * replicates * (2 + len(generated)), desc="downstream", unit="classifier", disable=not progress
    )
    for task in tasks:
        mine = [r for r in real if r["source"] == task]
        if not mine:
            raise ValueError(f"task {task!r}: no images of that source in {curated_dir}")
        labels, multilabel = task_labels(mine)
        split = {"train": [r for r in mine if r["split"] == "train"]}
        split |= {s: [r for r in evaluation if r["source"] == task and r["split"] == s] for s in ("validation", "test")}
        empty = [s for s, records in split.items() if not records]
        if empty:
            raise ValueError(
                f"task {task!r} has no {' or '.join(empty)} images; choose a source with all three splits"
                + (f" (validation and test from {evaluation_dir})" if held_out_dir is not None else "")
            )
        unknown = sorted({x for r in split["validation"] + split["test"] for x in r["labels"]} - set(labels))
        if unknown:
            raise ValueError(f"task {task!r}: held-out labels {unknown} never occur in its training images")
        val_x, val_y = (
            load_images(evaluation_dir, split["validation"]),
            task_targets(split["validation"], labels, multilabel),
        )
        test_x, test_y = load_images(evaluation_dir, split["test"]), task_targets(split["test"], labels, multilabel)
        scores: dict[str, list[np.ndarray]] = {}
        for replicate in range(replicates):
            draw = seed + replicate
            runs = {
                name: (records, None) for name, records in training_sets(split["train"], None, n_real, draw).items()
            }
            for family, records in synthetic.items():
                runs[f"real_half+{family}"] = (
                    training_sets(split["train"], records, n_real, seed=draw)["real_half+synthetic"],
                    family,
                )
            for label, (records, family) in runs.items():
                images = _training_images(curated_dir, generated.get(family), records)
                run = train_classifier(
                    images,
                    task_targets(records, labels, multilabel),
                    val_x,
                    val_y,
                    len(labels),
                    multilabel,
                    partial(macro_auroc, multilabel=multilabel),
                    epochs=epochs,
                    lr=learning_rate,
                    batch_size=batch_size,
                    imagenet_weights=imagenet_weights,
                    seed=draw,
                    progress=False,
                    architecture=architecture,
                )
                bar.update()
                scores.setdefault(label, []).append(predict(run["model"], test_x, multilabel))
                results.append(
                    {
                        "task": task,
                        "multilabel": multilabel,
                        "training_set": label,
                        "replicate": replicate,
                        "seed": draw,
                        "images": len(records),
                        "synthetic": sum("model" in r for r in records),
                        "best_epoch": run["best_epoch"],
                        "val_macro_auroc": max(run["val_auroc"]),
                        "test_macro_auroc": macro_auroc(test_y, scores[label][-1], multilabel),
                        "validation_images": len(val_y),
                        "test_images": len(test_y),
                        "classifier": run["initialisation"],
                    }
                )
        pairs = [
            ("real_half", "real"),
            *(("real_half", f"real_half+{f}") for f in generated),
            *(("real", f"real_half+{f}") for f in generated),
        ]
        for baseline, compared in pairs:
            result = paired_bootstrap(test_y, scores[baseline], scores[compared], multilabel, bootstrap_resamples, seed)
            comparisons.append(
                {
                    "task": task,
                    "baseline": baseline,
                    "compared": compared,
                    **result,
                    "resolved": bool(result["low"] > 0 or result["high"] < 0),
                    "detectable": minimum_detectable_difference(result["se"]),
                    "test_images": len(test_y),
                    "n_real": n_real,
                }
            )
        roc[task] = (test_y, scores, multilabel)
    bar.close()
    return {
        "table": pd.DataFrame(results).set_index(["task", "training_set", "replicate"]),
        "bootstrap": pd.DataFrame(comparisons).set_index(["task", "baseline", "compared"]),
        "roc": roc,
        "n_real": n_real,
        "families": list(generated),
    }


def describe_downstream(bootstrap: pd.DataFrame) -> list[str]:
    """In words, per task: whether twice the real data resolves better (the check that the task can
    show anything) and, only where it does, what each family's synthetic images do against N and 2N
    real images. `bootstrap` is `run_downstream`'s (or `downstream_bootstrap.csv` indexed by task,
    baseline and compared)."""
    n = int(bootstrap["n_real"].iloc[0]) // 2
    sentences = []
    for task, rows in bootstrap.groupby(level="task", sort=False):
        rows = rows.droplevel("task")
        gap = rows.loc[("real_half", "real")]
        interval = f"{gap['difference']:+.3f} [{gap['low']:+.3f}, {gap['high']:+.3f}]"
        if not (gap["resolved"] and gap["difference"] > 0):
            sentences.append(
                f"{task}: {2 * n} real images do not resolve better than {n} (macro-AUROC {interval}); "
                f"this task cannot show whether synthetic images help, and no conclusion is drawn from it."
            )
            continue
        parts = []
        for (baseline, compared), row in rows.iterrows():
            if compared == "real":
                continue
            against = f"{n} real" if baseline == "real_half" else f"{2 * n} real"
            verdict = (
                ("better than" if row["difference"] > 0 else "worse than") if row["resolved"] else "not resolved from"
            )
            parts.append(
                f"{n} real + {n} {compared.removeprefix('real_half+')} is {verdict} {against} "
                f"({row['difference']:+.3f} [{row['low']:+.3f}, {row['high']:+.3f}])"
            )
        sentences.append(
            f"{task}: {2 * n} real images beat {n} by {interval}, so the task can show utility; "
            + "; ".join(parts)
            + "."
        )
    return sentences


def _training_images(curated_dir: str | Path, generated_dir: str | Path | None, records: list[dict]) -> np.ndarray:
    """A training set's images: real records from the curated dataset, synthetic ones (with `model`)
    from the family's generated dataset, in record order."""
    return np.stack([load_rgb(image_path(generated_dir if "model" in r else curated_dir, r)) for r in records])


def save_downstream(result: dict, figures_dir: str | Path, parameters: dict, inputs: list) -> list[Path]:
    """Write `downstream.csv`, `downstream_bootstrap.csv`, MediSyn's Fig. 5 per task
    (`downstream_roc_<task>.png`) and the gaps with their intervals (`downstream_gaps.png`), each
    with its provenance. Returns the paths."""
    figures = Path(figures_dir)
    written = [
        save_table(result["table"], figures / "downstream.csv", parameters, inputs),
        save_table(result["bootstrap"], figures / "downstream_bootstrap.csv", parameters, inputs),
        save_figure(plot_gaps(result["bootstrap"]), figures / "downstream_gaps.png", parameters, inputs),
    ]
    for task, (targets, scores, multilabel) in result["roc"].items():
        replicates = len(next(iter(scores.values())))
        written.append(
            save_figure(
                plot_roc(
                    targets,
                    scores,
                    multilabel,
                    f"{task}: test macro-average ROC ({len(targets)} images"
                    + (f", mean of {replicates} replicates)" if replicates > 1 else ")"),
                ),
                figures / f"downstream_roc_{task}.png",
                parameters,
                inputs,
            )
        )
    return written
