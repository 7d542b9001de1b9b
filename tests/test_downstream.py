"""Downstream utility pieces: AUROC against pair counting, the paired bootstrap against hand-made
cases, the three training sets, and a ResNet-50 that learns two classes and keeps its best epoch."""

import numpy as np
import pytest
import torch

from medsyn.metrics.downstream import macro_auroc, paired_bootstrap, plot_roc, task_labels, task_targets, training_sets
from medsyn.training.classifier import predict, resnet50, train_classifier


def _auroc_by_pairs(y, s):
    """The share of (positive, negative) pairs ordered correctly, ties counting half."""
    pos, neg = s[y == 1], s[y == 0]
    return np.mean([(p > n) + 0.5 * (p == n) for p in pos for n in neg])


def test_macro_auroc_is_the_mean_of_per_label_pair_counts():
    rng = np.random.default_rng(0)
    targets = (rng.random((40, 3)) < 0.4).astype(np.float32)
    scores = np.round(targets * 0.3 + rng.random((40, 3)), 1)  # rounded: some ties
    expected = np.mean([_auroc_by_pairs(targets[:, j], scores[:, j]) for j in range(3)])
    assert macro_auroc(targets, scores, multilabel=True) == pytest.approx(expected)
    classes = rng.integers(0, 3, 40)
    probabilities = rng.dirichlet(np.ones(3), 40)
    expected = np.mean([_auroc_by_pairs((classes == j).astype(int), probabilities[:, j]) for j in range(3)])
    assert macro_auroc(classes, probabilities, multilabel=False) == pytest.approx(expected)
    with pytest.raises(ValueError, match="undefined"):
        macro_auroc(np.ones((5, 2)), rng.random((5, 2)), multilabel=True)


def test_paired_bootstrap():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 2, 80)
    noisy = np.stack([1 - y + rng.normal(0, 1, 80), y + rng.normal(0, 1, 80)], axis=1)
    clean = np.stack([1 - y + rng.normal(0, 0.2, 80), y + rng.normal(0, 0.2, 80)], axis=1)
    same = paired_bootstrap(y, noisy, noisy, multilabel=False, resamples=200)
    assert same["difference"] == 0 and same["low"] == 0 and same["high"] == 0  # paired: identical scores never differ
    better = paired_bootstrap(y, noisy, clean, multilabel=False, resamples=200)
    assert better["low"] > 0 and better["low"] <= better["difference"] <= better["high"]
    assert better["resamples"] == 200
    assert paired_bootstrap(y, noisy, clean, False, resamples=200) == better  # seeded


def _records(n, source="derm", labels=("melanoma", "nevus"), synthetic=False):
    return [
        {
            "file_name": f"{i}.png",
            "source": source,
            "labels": [labels[i % 2]],
            "text": f"Dermoscopy image showing {labels[i % 2]}.",
            **({"model": "x"} if synthetic else {}),
        }
        for i in range(n)
    ]


def test_training_sets_are_nested_and_class_matched():
    real, synthetic = _records(40), _records(30, synthetic=True)  # a generated record carries its class's source
    sets = training_sets(real, synthetic, n_real=20, seed=3)
    assert len(sets["real"]) == 20 and len(sets["real_half"]) == 10
    assert all(r in sets["real"] for r in sets["real_half"])
    added = sets["real_half+synthetic"][10:]
    assert len(added) == 10 and all("model" in r for r in added)
    half_labels = sorted(r["labels"][0] for r in sets["real_half"])
    assert sorted(r["labels"][0] for r in added) == half_labels  # the same classes, image for image
    with pytest.raises(ValueError, match="synthetic images needed"):
        training_sets(real, synthetic[:4], n_real=20)
    with pytest.raises(ValueError, match="available"):
        training_sets(real, synthetic, n_real=50)


def test_task_targets():
    records = [{"labels": ["effusion"]}, {"labels": ["cardiomegaly", "effusion"]}, {"labels": ["no finding"]}]
    labels, multilabel = task_labels(records)
    assert multilabel and labels == ["cardiomegaly", "effusion", "no finding"]
    assert task_targets(records, labels, True).tolist() == [[0, 1, 0], [1, 1, 0], [0, 0, 1]]
    assert task_targets(records[::2], labels, False).tolist() == [1, 2]
    with pytest.raises(ValueError, match="exactly one"):
        task_targets(records, labels, False)


def _red_squares(seed: int) -> tuple[np.ndarray, np.ndarray]:
    """48 noisy 32-px images, every second one with a red square (class 1), and their classes."""
    rng = np.random.default_rng(seed)
    y = np.arange(48) % 2
    images = np.full((48, 32, 32, 3), 40, np.uint8)
    images[y == 1, 8:24, 8:24] = (230, 80, 80)
    return np.clip(images + rng.normal(0, 8, images.shape), 0, 255).astype(np.uint8), y


def test_resnet50_learns_two_classes_and_keeps_its_best_epoch(tmp_path):
    images, y = _red_squares(seed=2)
    result = train_classifier(
        images[:32],
        y[:32],
        images[32:],
        y[32:],
        outputs=2,
        multilabel=False,
        validation_metric=lambda t, s: macro_auroc(t, s, False),
        epochs=4,
        lr=1e-3,
        batch_size=16,
        progress=False,
    )
    assert (
        max(result["val_auroc"]) > 0.95
        and result["initialisation"] == "ResNet-50, random initialisation (no ImageNet weights given)"
    )
    assert result["best_epoch"] == int(np.argmax(result["val_auroc"])) + 1
    assert macro_auroc(y[32:], predict(result["model"], images[32:], False), False) == max(result["val_auroc"])
    assert plot_roc(y[32:], {"a": predict(result["model"], images[32:], False)}, False, "t").axes
    # ImageNet weights only from a local file
    torch.save(resnet50(1000)[0].state_dict(), tmp_path / "imagenet.pth")
    assert resnet50(2, tmp_path / "imagenet.pth")[1] == f"ImageNet weights from {tmp_path / 'imagenet.pth'}"
    with pytest.raises(FileNotFoundError, match="never downloads"):
        resnet50(2, tmp_path / "missing.pth")


def test_real_sets_do_not_depend_on_the_synthetic_pool():
    real, synthetic = _records(40), _records(30, synthetic=True)
    alone = training_sets(real, None, n_real=20, seed=5)
    assert set(alone) == {"real", "real_half"}
    with_synthetic = training_sets(real, synthetic, n_real=20, seed=5)
    assert alone["real"] == with_synthetic["real"] and alone["real_half"] == with_synthetic["real_half"]


def test_vectorised_bootstrap_equals_scikit_learn_resample_by_resample():
    """The all-at-once Mann-Whitney AUROC against roc_auc_score, one resample at a time."""
    rng = np.random.default_rng(7)
    targets = (rng.random((30, 3)) < 0.3).astype(np.float32)
    a, b = np.round(rng.random((30, 3)), 1), np.round(targets * 0.5 + rng.random((30, 3)), 1)  # ties on purpose
    result = paired_bootstrap(targets, a, b, multilabel=True, resamples=300, seed=11)
    index = np.random.default_rng(11).integers(0, 30, (300, 30))
    differences = []
    for rows in index:
        try:
            differences.append(macro_auroc(targets[rows], b[rows], True) - macro_auroc(targets[rows], a[rows], True))
        except ValueError:
            continue
    assert result["resamples"] == len(differences)
    assert result["low"] == pytest.approx(np.percentile(differences, 2.5))
    assert result["high"] == pytest.approx(np.percentile(differences, 97.5))


def test_replicated_bootstrap_equals_a_plain_two_level_loop():
    """Three replicates: each resample draws test images and then replicates with replacement; the
    vectorised result against scikit-learn on the same draws, one resample at a time."""
    rng = np.random.default_rng(3)
    classes = rng.integers(0, 3, 40)
    a = [rng.dirichlet(np.ones(3), 40) for _ in range(3)]
    b = [np.eye(3)[classes] * 0.3 * k + rng.dirichlet(np.ones(3), 40) for k in range(1, 4)]
    result = paired_bootstrap(classes, a, b, multilabel=False, resamples=250, seed=4)
    draws = np.random.default_rng(4)
    index = draws.integers(0, 40, (250, 40))
    picks = draws.integers(0, 3, (250, 3))
    differences = [
        np.mean(
            [macro_auroc(classes[rows], b[k][rows], False) - macro_auroc(classes[rows], a[k][rows], False) for k in ks]
        )
        for rows, ks in zip(index, picks)
    ]
    assert result["low"] == pytest.approx(np.percentile(differences, 2.5))
    assert result["high"] == pytest.approx(np.percentile(differences, 97.5))
    assert result["se"] == pytest.approx(np.std(differences, ddof=1))
    each = [macro_auroc(classes, b[k], False) - macro_auroc(classes, a[k], False) for k in range(3)]
    assert result["difference"] == pytest.approx(np.mean(each))
    assert result["replicate_sd"] == pytest.approx(np.std(each, ddof=1)) and result["replicates"] == 3
    # the replicates' spread widens the interval beyond resampling the test images alone
    test_only = [
        np.mean(
            [
                macro_auroc(classes[rows], b[k][rows], False) - macro_auroc(classes[rows], a[k][rows], False)
                for k in range(3)
            ]
        )
        for rows in index
    ]
    assert np.subtract(*np.percentile(test_only, [97.5, 2.5])) < result["high"] - result["low"]
    with pytest.raises(ValueError, match="paired replicates"):
        paired_bootstrap(classes, a, b[:2], multilabel=False)


def test_minimum_detectable_difference_is_resolved_four_times_in_five():
    """At the detectable difference, a 95 % interval of +-1.96 standard errors excludes 0 in 80 % of
    simulated experiments (normal estimates, 40,000 draws: the share within 0.01 of 0.8)."""
    from medsyn.intervals import minimum_detectable_difference, standard_error_from_interval

    se = 0.013
    detectable = minimum_detectable_difference(se)
    assert detectable == pytest.approx(2.8016 * se, rel=1e-4)
    estimates = np.random.default_rng(0).normal(detectable, se, 40_000)
    assert np.mean(estimates - 1.959964 * se > 0) == pytest.approx(0.8, abs=0.01)
    assert standard_error_from_interval(-1.959964, 1.959964) == pytest.approx(1.0)
    assert np.isnan(minimum_detectable_difference(float("nan")))


def _bootstrap_rows(gap_low):
    import pandas as pd

    rows = [("real_half", "real", 0.08, gap_low, 0.14), ("real_half", "real_half+f", 0.05, 0.01, 0.09)]
    rows.append(("real", "real_half+f", -0.03, -0.09, 0.02))
    frame = pd.DataFrame(
        [
            {
                "task": "t",
                "baseline": b,
                "compared": c,
                "difference": d,
                "low": lo,
                "high": hi,
                "n_real": 64,
                "resolved": lo > 0 or hi < 0,
                "test_images": 300,
            }
            for b, c, d, lo, hi in rows
        ]
    )
    return frame.set_index(["task", "baseline", "compared"])


def test_downstream_is_read_only_where_twice_the_real_data_resolves():
    from medsyn.experiments.downstream import describe_downstream
    from medsyn.metrics.downstream import plot_gaps

    (told,) = describe_downstream(_bootstrap_rows(gap_low=0.02))
    assert told.startswith("t: 64 real images beat 32 by +0.080 [+0.020, +0.140]")
    assert "32 real + 32 f is better than 32 real (+0.050" in told
    assert "32 real + 32 f is not resolved from 64 real (-0.030" in told
    (told,) = describe_downstream(_bootstrap_rows(gap_low=-0.01))
    assert told == (
        "t: 64 real images do not resolve better than 32 (macro-AUROC +0.080 [-0.010, +0.140]); "
        "this task cannot show whether synthetic images help, and no conclusion is drawn from it."
    )
    figure = plot_gaps(_bootstrap_rows(gap_low=0.02))
    labels = [t.get_text() for t in figure.axes[0].get_yticklabels()]
    assert labels == ["64 real − 32 real", "32 real + 32 f − 32 real", "32 real + 32 f − 64 real"]


def test_compact_classifier_learns_and_refuses_imagenet_weights(tmp_path):
    from medsyn.training.classifier import build_classifier

    images, y = _red_squares(seed=5)
    result = train_classifier(
        images[:32],
        y[:32],
        images[32:],
        y[32:],
        2,
        False,
        lambda t, s: macro_auroc(t, s, False),
        epochs=4,
        lr=1e-3,
        batch_size=16,
        progress=False,
        architecture="compact",
    )
    assert max(result["val_auroc"]) > 0.95 and result["initialisation"].startswith("compact CNN")
    with pytest.raises(ValueError, match="random weights"):
        build_classifier("compact", 2, tmp_path / "imagenet.pth")
    with pytest.raises(ValueError, match="unknown classifier"):
        build_classifier("vit", 2)
