"""MediSyn's downstream experiment (2.3 / Methods 4.3.5): does adding synthetic images to a small
real training set help a classifier?

Per task (one source of the curated dataset), a ResNet-50 (`medsyn.training.classifier`) is trained on
(i) `n_real` real images, (ii) half of them, and (iii) that half plus, class by class, as many
synthetic images of each family (`medsyn.metrics.downstream.training_sets`); each keeps the epoch with
the best validation macro-AUROC and is tested on the task's real test images. The differences in test
macro-AUROC get paired bootstrap 95 % intervals.
"""

from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd

from medsyn.data.dataset import image_path, load_images, load_rgb, read_records, split_records
from medsyn.metrics.downstream import macro_auroc, paired_bootstrap, plot_roc, task_labels, task_targets, training_sets
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
        seed: the draws of the training sets, initialisation and batch order.
        progress: show each classifier's progress bar.

    Returns:
        {'table': one row per task and training set (images, best epoch, validation and test
        macro-AUROC, initialisation), 'bootstrap': one row per compared pair of training sets, 'roc':
        task -> (test targets, scores per training set, multilabel)}.
    """
    real = read_records(curated_dir)
    synthetic = {family: split_records(directory, "train") for family, directory in generated.items()}
    results, comparisons, roc = [], [], {}
    for task in tasks:
        mine = [r for r in real if r["source"] == task]
        if not mine:
            raise ValueError(f"task {task!r}: no images of that source in {curated_dir}")
        labels, multilabel = task_labels(mine)
        split = {s: [r for r in mine if r["split"] == s] for s in ("train", "validation", "test")}
        empty = [s for s, records in split.items() if not records]
        if empty:
            raise ValueError(f"task {task!r} has no {' or '.join(empty)} images; choose a source with all three splits")
        val_x, val_y = (
            load_images(curated_dir, split["validation"]),
            task_targets(split["validation"], labels, multilabel),
        )
        test_x, test_y = load_images(curated_dir, split["test"]), task_targets(split["test"], labels, multilabel)
        runs = training_sets(split["train"], None, n_real, seed=seed)
        runs = {name: (records, None) for name, records in runs.items()}
        for family, records in synthetic.items():
            runs[f"real_half+{family}"] = (
                training_sets(split["train"], records, n_real, seed=seed)["real_half+synthetic"],
                family,
            )
        scores = {}
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
                seed=seed,
                progress=progress,
            )
            scores[label] = predict(run["model"], test_x, multilabel)
            results.append(
                {
                    "task": task,
                    "multilabel": multilabel,
                    "training_set": label,
                    "images": len(records),
                    "synthetic": sum("model" in r for r in records),
                    "best_epoch": run["best_epoch"],
                    "val_macro_auroc": max(run["val_auroc"]),
                    "test_macro_auroc": macro_auroc(test_y, scores[label], multilabel),
                    "test_images": len(test_y),
                    "initialisation": run["initialisation"],
                }
            )
        pairs = [
            ("real_half", "real"),
            *(("real_half", f"real_half+{f}") for f in generated),
            *(("real", f"real_half+{f}") for f in generated),
        ]
        for baseline, compared in pairs:
            comparisons.append(
                {
                    "task": task,
                    "baseline": baseline,
                    "compared": compared,
                    **paired_bootstrap(
                        test_y, scores[baseline], scores[compared], multilabel, bootstrap_resamples, seed
                    ),
                }
            )
        roc[task] = (test_y, scores, multilabel)
    return {
        "table": pd.DataFrame(results).set_index(["task", "training_set"]),
        "bootstrap": pd.DataFrame(comparisons).set_index(["task", "baseline", "compared"]),
        "roc": roc,
    }


def _training_images(curated_dir: str | Path, generated_dir: str | Path | None, records: list[dict]) -> np.ndarray:
    """A training set's images: real records from the curated dataset, synthetic ones (with `model`)
    from the family's generated dataset, in record order."""
    return np.stack([load_rgb(image_path(generated_dir if "model" in r else curated_dir, r)) for r in records])


def save_downstream(result: dict, figures_dir: str | Path, parameters: dict, inputs: list) -> list[Path]:
    """Write `downstream.csv`, `downstream_bootstrap.csv` and MediSyn's Fig. 5 per task
    (`downstream_roc_<task>.png`), each with its provenance. Returns the paths."""
    figures = Path(figures_dir)
    written = [
        save_table(result["table"], figures / "downstream.csv", parameters, inputs),
        save_table(result["bootstrap"], figures / "downstream_bootstrap.csv", parameters, inputs),
    ]
    for task, (targets, scores, multilabel) in result["roc"].items():
        written.append(
            save_figure(
                plot_roc(targets, scores, multilabel, f"{task}: test macro-average ROC"),
                figures / f"downstream_roc_{task}.png",
                parameters,
                inputs,
            )
        )
    return written
