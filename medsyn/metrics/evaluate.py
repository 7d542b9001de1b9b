"""The fidelity and alignment protocol for generated datasets (notebook 06): every family is compared
with the same real images, on equal sample counts, as uint8 images read from their PNG files.

| column | what |
|---|---|
| `FID`, `KID_inception` | FID and KID on the TF-compatible InceptionV3 (only when its weights are on disk; otherwise NaN and `inception_note` says where they were looked for) |
| `FD_domain_clip`, `KID_domain_clip` | the same distances on the domain CLIP's image embeddings: never called FID |
| `precision`, `recall` | improved precision / recall (k = 3) on the domain CLIP's embeddings (NaN with 3 images or fewer) |
| `NIQE_generated`, `NIQE_real` | mean NIQE (LIVE's model; `niqe_block` pixels per block, reported) over the images it is defined on |
| `NIQE_flat`, `NIQE_flat_real` | how many of the compared generated images and of the real ones NIQE is undefined on (flat: fewer than two blocks with texture) |
| `MS_SSIM_within_class` | mean MS-SSIM of random same-class pairs (lower: more diverse), with the real value beside it (NaN under 33 px) |
| `domain_clip_score` | mean cosine similarity of each image and its prompt in the domain CLIP, × 100 |
| `alignment_macro` | macro accuracy of the real-image classifier on the generated images (the prompt's class is the truth) |
"""

import hashlib
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from medsyn.data.dataset import class_key, class_prompts, image_path, load_rgb, load_split, split_records
from medsyn.intervals import bootstrap_interval, macro_mean, resolved
from medsyn.metrics.colour import ColourTextureJudge, median_ratio, share_within
from medsyn.metrics.fidelity import (
    FrechetDistanceOfDraws,
    KernelDistanceOfDraws,
    PrecisionRecallOfDraws,
    inception_features,
    inception_weights,
    ms_ssim_pairs,
)
from medsyn.metrics.niqe import FlatImageError, niqe

# a generated dataset holds its images in one split
GENERATED = "train"


def equal_counts(a: np.ndarray, b: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of equally many rows of each (the smaller count; a seeded draw without replacement)."""
    n = min(len(a), len(b))
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(a), n, replace=False)), np.sort(rng.choice(len(b), n, replace=False))


def within_class_ms_ssim(images: np.ndarray, classes: list[str], pairs: int = 50, seed: int = 0) -> tuple[float, int]:
    """Mean over classes (with at least two images) of the MS-SSIM of random same-class pairs, and the
    window used; (NaN, 0) for images under 33 pixels, too small for five MS-SSIM scales."""
    values, pair_classes, window = within_class_ms_ssim_pairs(images, classes, pairs, seed)
    return (macro_mean(values, pair_classes) if len(values) else float("nan")), window


def within_class_ms_ssim_pairs(
    images: np.ndarray, classes: list[str], pairs: int = 50, seed: int = 0
) -> tuple[np.ndarray, np.ndarray, int]:
    """The MS-SSIM of each random same-class pair, the class of each pair, and the window."""
    if min(images.shape[1:3]) < 33:
        return np.zeros(0), np.zeros(0, dtype=object), 0
    classes = np.asarray(classes)
    values, owners, window = [], [], 0
    for c in np.unique(classes):
        members = images[classes == c]
        if len(members) >= 2:
            found, window = ms_ssim_pairs(members, pairs=pairs, seed=seed)
            values.append(found)
            owners += [c] * len(found)
    if not values:
        return np.zeros(0), np.zeros(0, dtype=object), 0
    return np.concatenate(values), np.asarray(owners), window


# the range of each metric, to which its interval is clipped
RANGES = {
    "FID": (0.0, np.inf),
    "FD_domain_clip": (0.0, np.inf),
    "precision": (0.0, 1.0),
    "recall": (0.0, 1.0),
    "NIQE_generated": (0.0, np.inf),
    "MS_SSIM_within_class": (0.0, 1.0),
    "alignment_macro": (0.0, 1.0),
    "colour_texture_ratio": (0.0, np.inf),
    "colour_texture_within_2x": (0.0, 1.0),
}

# each metric of the table: whether lower is better, for the words of the report
LOWER_IS_BETTER = {
    "FID": True,
    "KID_inception": True,
    "FD_domain_clip": True,
    "KID_domain_clip": True,
    "precision": False,
    "recall": False,
    "NIQE_generated": True,
    "MS_SSIM_within_class": True,
    "domain_clip_score": False,
    "alignment_macro": False,
    "colour_texture_ratio": True,
    "colour_texture_within_2x": False,
}

# the metrics that are shares, drawn on 0-1
SHARES = ("precision", "recall", "alignment_macro", "colour_texture_within_2x")

# the statistics over classes that the table computes on every image of a set (the paired
# differences use the prompt-and-seed slots the two families share)
OVER_ALL_IMAGES = ("alignment_macro", "colour_texture_ratio", "colour_texture_within_2x")


def _set_measures(features, real_features, inception, real_inception, niqes, scores, correct, classes, pairs, ratios):
    """The table's statistics of one image set as functions of index arrays: (generated rows, real
    rows) for the two-set metrics, rows for the per-image ones, pairs for MS-SSIM."""
    kid = KernelDistanceOfDraws(real_features, features)
    two = {
        "FD_domain_clip": FrechetDistanceOfDraws(features, real_features),
        "KID_domain_clip": lambda g, r: kid(r, g, subsets=10)[0],
    }
    if len(features) > 3:
        # precision and recall come from one computation; their bootstraps draw the same rows (one seed)
        manifolds, measured = PrecisionRecallOfDraws(real_features, features), {}

        def precision_and_recall(g, r):
            key = hashlib.blake2b(g.tobytes() + b"|" + r.tobytes(), digest_size=16).digest()
            if key not in measured:
                measured[key] = manifolds(r, g)
            return measured[key]

        two["precision"] = lambda g, r: precision_and_recall(g, r)["precision"]
        two["recall"] = lambda g, r: precision_and_recall(g, r)["recall"]
    if inception is not None:
        inception_kid = KernelDistanceOfDraws(real_inception, inception)
        two["FID"] = FrechetDistanceOfDraws(inception, real_inception)
        two["KID_inception"] = lambda g, r: inception_kid(r, g, subsets=10)[0]
    one = {
        "NIQE_generated": lambda i: _defined_mean(niqes[i]),
        "domain_clip_score": lambda i: float(scores[i].mean()),
        **_class_statistics(correct, classes, ratios),
    }
    return two, one, pairs


def niqe_scores(images, block_size: int) -> np.ndarray:
    """NIQE of each image; NaN where it is undefined (a flat image), which the table counts."""
    scores = []
    for image in images:
        try:
            scores.append(niqe(image, block_size))
        except FlatImageError:
            scores.append(float("nan"))
    return np.array(scores)


def _defined_mean(values: np.ndarray) -> float:
    """The mean over the values that are not NaN (NaN when none is)."""
    defined = values[~np.isnan(values)]
    return float(defined.mean()) if len(defined) else float("nan")


def _class_statistics(correct: np.ndarray, classes: np.ndarray, ratios: np.ndarray) -> dict:
    """The statistics over classes, as functions of index arrays: the classifier's macro accuracy and
    the colour-texture judge's median ratio and share of classes within 2x (`medsyn.metrics.colour`)."""
    codes = np.unique(classes, return_inverse=True)[1]  # integer classes: a resample's grouping is cheap
    return {
        "alignment_macro": lambda i: macro_mean(correct[i], codes[i]),
        "colour_texture_ratio": lambda i: median_ratio(ratios[i], codes[i]),
        "colour_texture_within_2x": lambda i: share_within(ratios[i], codes[i]),
    }


def fidelity_table(
    real_dir: str | Path,
    generated: dict[str, str | Path],
    domain_clip_dir: str | Path,
    probe_path: str | Path,
    real_split: str = "test",
    reference_split: str = "train",
    inception_path: str | Path | None = None,
    niqe_block: int = 96,
    seed: int = 0,
    require_fid: bool = False,
    resamples: int = 500,
) -> tuple[pd.DataFrame, str, dict, pd.DataFrame]:
    """One row per generated dataset, plus a `real` row (the `reference_split` images against the
    `real_split` images: the floor every family is measured against); every metric with its 95 %
    percentile bootstrap interval (`<metric>_low`, `<metric>_high`): generated and real images
    resampled on their own for the distances, images for the per-image means, same-class pairs for
    MS-SSIM (`medsyn.intervals`).

    Args:
        real_dir: the curated dataset.
        generated: family -> generated dataset directory (`medsyn sample` / notebook 05).
        domain_clip_dir: the domain CLIP of 01_curate (image and text embeddings).
        probe_path: the real-image classifier of 01_curate.
        real_split: the real images every set is compared with; reference_split: the real images of the `real` row.
        inception_path: InceptionV3 weights for FID (else $MEDSYN_INCEPTION_WEIGHTS / the torch hub cache).
        niqe_block: NIQE block size (LIVE's 96 needs images of at least 96 px).
        seed: seed of the equal-count draws, of the MS-SSIM pairs and of the resampling.
        require_fid: raise when InceptionV3's weights are missing instead of leaving FID out.
        resamples: bootstrap resamples of every interval.

    Returns:
        (the table, a note on the Inception weights: where they came from, or why FID is missing,
        per family the classifier's result on its images: accuracy, macro_accuracy, per_class, n,
        and the paired differences of every two families: `fidelity_differences`'s table).
    """
    from medsyn.models.class_probe import TrainedProbe, to_probe_input
    from medsyn.models.domain_clip import embed_images, embed_texts, load_domain_clip

    clip, tokenizer = load_domain_clip(domain_clip_dir)
    probe = TrainedProbe.load(probe_path)
    prompts = class_prompts(split_records(real_dir, "train"))
    try:
        weights = inception_weights(inception_path)
        note = f"InceptionV3 weights: {weights}"
    except FileNotFoundError as error:
        if require_fid:
            raise
        weights, note = None, f"FID not computed: {error}"

    real, real_records = load_split(real_dir, real_split)
    sets = {"real": load_split(real_dir, reference_split)}
    held_out, held_out_records = load_split(real_dir, "validation")
    judge = ColourTextureJudge(
        sets["real"][0],
        [class_key(r) for r in sets["real"][1]],
        np.concatenate([held_out, real]),
        [class_key(r) for r in held_out_records + real_records],
    )
    for family, directory in generated.items():
        sets[family] = load_split(directory, GENERATED)
    real_embeddings = embed_images(clip, real.transpose(0, 3, 1, 2)).double().numpy()
    real_inception = inception_features(real, weights) if weights else None
    real_ms_ssim, window = within_class_ms_ssim(real, [class_key(r) for r in real_records], seed=seed)
    real_niqes = niqe_scores(real, niqe_block)

    rows, alignment, measured = [], {}, {}
    for family, (images, records) in sets.items():
        classes = [class_key(r) for r in records]
        unknown = sorted(set(classes) - set(prompts))
        if unknown:
            raise ValueError(f"{family}: classes that are not classes of {real_dir}'s training split: {unknown[:3]}")
        mine, theirs = equal_counts(images, real, seed)
        embeddings = embed_images(clip, images.transpose(0, 3, 1, 2))
        features = embeddings.double().numpy()
        texts = embed_texts(clip, tokenizer, [prompts[c] for c in classes])
        predicted = np.asarray(probe.classes)[probe.predict(to_probe_input(images))]
        correct = (predicted == np.asarray(classes)).astype(np.float64)
        ratios = judge.ratios(images, classes)
        pair_values, pair_classes, _ = within_class_ms_ssim_pairs(images, classes, seed=seed)
        niqes = niqe_scores(images[mine], niqe_block)
        two, one, pairs = _set_measures(
            features[mine],
            real_embeddings[theirs],
            inception_features(images[mine], weights) if weights else None,
            real_inception[theirs] if weights else None,
            niqes,
            (100 * (embeddings * texts).sum(dim=1)).double().numpy()[mine],
            correct[mine],
            np.asarray(classes)[mine],
            (pair_values, pair_classes),
            ratios[mine],
        )
        n = len(mine)
        measured[family] = {"records": [records[i] for i in mine], "two": two, "one": one, "n_real": len(theirs)}
        row = {"family": family, "images": len(images), "compared": n}
        for name, statistic in two.items():
            row[name] = statistic(np.arange(n), np.arange(len(theirs)))
            row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(
                statistic, (n, len(theirs)), resamples, seed, bounds=RANGES.get(name, (-np.inf, np.inf))
            )
        for name in ("precision", "recall", "FID", "KID_inception"):
            row.setdefault(name, float("nan"))
        whole = _class_statistics(correct, np.asarray(classes), ratios)
        for name, statistic in one.items():
            if name in OVER_ALL_IMAGES:  # the table's: every image of the set, not the compared ones
                statistic = whole[name]
            size = len(classes) if name in OVER_ALL_IMAGES else n
            row[name] = statistic(np.arange(size))
            row[f"{name}_low"], row[f"{name}_high"] = bootstrap_interval(
                statistic, (size,), resamples, seed, bounds=RANGES.get(name, (-np.inf, np.inf))
            )
        row["NIQE_real"] = _defined_mean(real_niqes)
        row["NIQE_flat"], row["NIQE_flat_real"] = int(np.isnan(niqes).sum()), int(np.isnan(real_niqes).sum())
        row["MS_SSIM_within_class"] = macro_mean(*pairs) if len(pairs[0]) else float("nan")
        if len(pairs[0]) > 1:
            row["MS_SSIM_within_class_low"], row["MS_SSIM_within_class_high"] = bootstrap_interval(
                lambda i, pairs=pairs: macro_mean(pairs[0][i], pairs[1][i]),
                (len(pairs[0]),),
                resamples,
                seed,
                bounds=RANGES["MS_SSIM_within_class"],
            )
        row["MS_SSIM_within_class_real"] = real_ms_ssim
        row["MS_SSIM_window"] = window
        alignment[family] = probe.accuracy_of(to_probe_input(images), classes)
        alignment[family]["colour_texture"] = judge.per_class(ratios, classes)
        row["niqe_block"] = niqe_block
        rows.append(row)
    differences = fidelity_differences(measured, resamples, seed)
    return pd.DataFrame(rows), note, {f: a for f, a in alignment.items() if f != "real"}, differences


def fidelity_differences(measured: dict, resamples: int = 500, seed: int = 0) -> pd.DataFrame:
    """For every two families, each metric's difference (family − other) with a paired 95 % interval:
    the images of the two are matched by prompt and seed (the same slot of one sampling plan), and
    each resample draws the same slots from both (and the real images independently, for the
    distances). A difference is resolved when its interval excludes 0; `better` names the family the
    metric favours then."""
    families = [f for f in measured if f != "real"]
    rows = []
    for a_index, family in enumerate(families):
        for other in families[a_index + 1 :]:
            a, b = measured[family], measured[other]
            slot_a = {(r.get("prompt_id"), r.get("seed")): i for i, r in enumerate(a["records"])}
            slot_b = {(r.get("prompt_id"), r.get("seed")): i for i, r in enumerate(b["records"])}
            shared = sorted(set(slot_a) & set(slot_b), key=str)
            if len(shared) < 4:
                continue
            ia = np.array([slot_a[k] for k in shared])
            ib = np.array([slot_b[k] for k in shared])
            for name in a["two"]:
                if name not in b["two"]:
                    continue

                def statistic(s, r, fa=a["two"][name], fb=b["two"][name], ia=ia, ib=ib):
                    return fa(ia[s], r) - fb(ib[s], r)

                rows.append(_difference(name, family, other, statistic, (len(shared), a["n_real"]), resamples, seed))
            for name in a["one"]:

                def statistic(s, fa=a["one"][name], fb=b["one"][name], ia=ia, ib=ib):
                    return fa(ia[s]) - fb(ib[s])

                rows.append(_difference(name, family, other, statistic, (len(shared),), resamples, seed))
    columns = ["metric", "family", "other", "pairs", "difference", "low", "high", "resolved", "better"]
    return pd.DataFrame(rows, columns=columns)


def _difference(name, family, other, statistic, sizes, resamples, seed) -> dict:
    difference = statistic(*(np.arange(n) for n in sizes))
    low, high = bootstrap_interval(statistic, sizes, resamples, seed)
    settled = resolved(low, high)
    lower_wins = LOWER_IS_BETTER[name]
    better = "" if not settled else (family if (difference < 0) == lower_wins else other)
    return {
        "metric": name,
        "family": family,
        "other": other,
        "pairs": sizes[0],
        "difference": difference,
        "low": low,
        "high": high,
        "resolved": settled,
        "better": better,
    }


def describe_differences(differences: pd.DataFrame) -> str:
    """In words, per metric: which differences between families the intervals resolve (and which
    family is better), and which they do not."""
    lines = []
    for metric, group in differences.groupby("metric", sort=False):
        settled = group[group["resolved"]]
        open_ = group[~group["resolved"]]
        said = [f"{r.better} better than {r.other if r.better == r.family else r.family}" for r in settled.itertuples()]
        unsaid = [f"{r.family} vs {r.other}" for r in open_.itertuples()]
        lines.append(
            f"- **{metric}**: "
            + (f"resolved: {'; '.join(said)}" if said else "no difference resolved")
            + (f"; not resolved (intervals hold 0): {', '.join(unsaid)}" if unsaid else "")
            + "."
        )
    return "\n".join(lines) if lines else "No two families share prompts and seeds: no paired differences."


def plot_fidelity(table: pd.DataFrame):
    """One panel per metric, one bar per family with its 95 % interval (the `real` row is the floor /
    ceiling to compare with)."""
    import matplotlib.pyplot as plt

    metrics = [
        ("FD_domain_clip", "FD (domain CLIP) ↓"),
        ("KID_domain_clip", "KID (domain CLIP) ↓"),
        ("FID", "FID (InceptionV3) ↓"),
        ("precision", "precision ↑"),
        ("recall", "recall ↑"),
        ("NIQE_generated", "NIQE ↓"),
        ("MS_SSIM_within_class", "MS-SSIM within class ↓ (diversity)"),
        ("domain_clip_score", "domain CLIP score ↑"),
        ("alignment_macro", "classifier alignment ↑"),
        ("colour_texture_ratio", "colour-texture ratio ↓"),
        ("colour_texture_within_2x", "classes within 2x (colour) ↑"),
    ]
    metrics = [(m, t) for m, t in metrics if table[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), squeeze=False)
    colours = ["0.6" if f == "real" else f"C{i}" for i, f in enumerate(table["family"])]
    for ax, (metric, title) in zip(axes[0], metrics):
        ax.bar(range(len(table)), table[metric], color=colours, yerr=_error_bars(table, metric), capsize=3)
        ax.set_xticks(range(len(table)), table["family"], rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if metric in SHARES:
            ax.set_ylim(0, 1.05)
    fig.suptitle("bars: 95 % bootstrap intervals", fontsize=8)
    fig.tight_layout()
    return fig


def _error_bars(table: pd.DataFrame, column: str) -> np.ndarray | None:
    """matplotlib's yerr (distances below and above the value) from `<column>_low` / `_high`."""
    if f"{column}_low" not in table:
        return None
    values = table[column].to_numpy(np.float64)
    low = table[f"{column}_low"].to_numpy(np.float64)
    high = table[f"{column}_high"].to_numpy(np.float64)
    return np.nan_to_num(np.vstack([values - low, high - values]).clip(min=0))


def plot_real_and_generated(
    real_dir: str | Path, generated: dict[str, str | Path], per_cell: int = 2, split: str = "test"
):
    """One row per class, one column block per image source: `per_cell` real images of the class
    (from `split`) beside `per_cell` generated images of each family for the class's prompt."""
    import matplotlib.pyplot as plt

    prompts = class_prompts(split_records(real_dir, "train"))
    sources = {"real": (real_dir, split_records(real_dir, split))}
    sources |= {family: (directory, split_records(directory, GENERATED)) for family, directory in generated.items()}
    sources = {
        name: (directory, {k: [r for r in records if class_key(r) == k][:per_cell] for k in prompts})
        for name, (directory, records) in sources.items()
    }
    columns = len(sources) * per_cell
    fig, axes = plt.subplots(len(prompts), columns, figsize=(columns * 0.9 + 2.8, len(prompts) * 0.9), squeeze=False)
    for row, key in enumerate(prompts):
        for block, (name, (directory, by_class)) in enumerate(sources.items()):
            for k in range(per_cell):
                ax = axes[row, block * per_cell + k]
                ax.axis("off")
                if k < len(by_class[key]):
                    ax.imshow(load_rgb(image_path(directory, by_class[key][k])))
                if row == 0 and k == 0:
                    ax.set_title(name, fontsize=8, loc="left")
        axes[row, 0].text(-0.1, 0.5, key, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=6)
    fig.subplots_adjust(left=0.25, wspace=0.04, hspace=0.04)
    return fig


# ---------------------------------------------------------------- memorisation (notebook 07)


def memorisation_pairs(
    real_dir: str | Path,
    generated: dict[str, str | Path],
    domain_clip_dir: str | Path,
    grid: int = 4,
    plant_copy: bool = True,
    seed: int = 0,
    chunk: int = 65536,
) -> pd.DataFrame:
    """MediSyn's memorisation check (Methods 4.3.4) for each generated dataset: every generated image's
    nearest training image by cosine similarity of image embeddings, searched only among training
    images of the same specialty and image type, and the tiled distance of the pair.

    With `plant_copy`, one training image per family (a seeded draw) is added to that family's images
    as a control, marked `planted`; it must come out as its own neighbour at distance 0.

    Returns:
        one row per generated image: family, file, specialty, image_type, planted, nearest training
        file, cosine similarity, tiled distance; a generated image whose kind has no training image
        is kept with an empty neighbour and NaN distance.
    """
    from medsyn.metrics.privacy import nearest_in_group, tiled_l2
    from medsyn.models.domain_clip import embed_images, load_domain_clip

    clip, _ = load_domain_clip(domain_clip_dir)
    training, training_records = load_split(real_dir, "train")
    training_embeddings = embed_images(clip, training.transpose(0, 3, 1, 2))
    training_groups = [(r.get("specialty"), r.get("image_type")) for r in training_records]
    rng = np.random.default_rng(seed)
    rows = []
    for family, directory in generated.items():
        images, records = load_split(directory, GENERATED)
        planted = np.zeros(len(images), dtype=bool)
        if plant_copy:
            k = int(rng.integers(len(training)))
            images = np.concatenate([images, training[k : k + 1]])
            records = [
                *records,
                {**training_records[k], "file_name": f"planted copy of {training_records[k]['file_name']}"},
            ]
            planted = np.append(planted, True)
        groups = [(r.get("specialty"), r.get("image_type")) for r in records]
        index, similarity = nearest_in_group(
            embed_images(clip, images.transpose(0, 3, 1, 2)),
            groups,
            training_embeddings,
            training_groups,
            chunk,
            "cuda" if torch.cuda.is_available() else None,  # a GPU's float32 products, exact all the same
        )
        for i, record in enumerate(records):
            j = index[i]
            rows.append(
                {
                    "family": family,
                    "file_name": record["file_name"],
                    "specialty": record.get("specialty"),
                    "image_type": record.get("image_type"),
                    "planted": bool(planted[i]),
                    "nearest_training": training_records[j]["file_name"] if j >= 0 else "",
                    "cosine": similarity[i],
                    "tiled_l2": tiled_l2(images[i], training[j], grid) if j >= 0 else np.nan,
                }
            )
    return pd.DataFrame(rows)


def plot_distances(pairs: pd.DataFrame, threshold: float):
    """MediSyn Fig. 4: the tiled distance of each generated image to its nearest training image, by
    specialty, one box per family with every image as a point, and the copy threshold. Planted
    controls and images of a kind without training images are left out."""
    import matplotlib.pyplot as plt
    import seaborn as sns

    measured = pairs[~pairs["planted"] & pairs["tiled_l2"].notna()]
    order = sorted(measured["specialty"].dropna().unique())
    families = list(dict.fromkeys(measured["family"]))
    fig, ax = plt.subplots(figsize=(1.0 + 0.55 * len(order) * max(2, len(families)), 3.8))
    common = {
        "data": measured,
        "x": "specialty",
        "y": "tiled_l2",
        "hue": "family",
        "order": order,
        "hue_order": families,
        "ax": ax,
    }
    sns.boxplot(**common, showfliers=False, fill=False)
    sns.stripplot(**common, dodge=True, size=2, alpha=0.5, legend=False)
    ax.axhline(threshold, color="C3", linestyle="--", label=f"copy threshold {threshold:g}")
    ax.set_xlabel("")
    ax.set_ylabel("tiled L2 to the nearest training image")
    ax.tick_params(axis="x", rotation=30)
    ax.legend(fontsize=8, loc="upper right")
    fig.tight_layout()
    return fig


def plot_closest_pairs(
    pairs: pd.DataFrame, real_dir: str | Path, generated: dict[str, str | Path], per_family: int = 6
):
    """MediSyn Extended Data Fig. 1: each family's closest generated / training pairs side by side."""
    import matplotlib.pyplot as plt

    pairs = pairs[~pairs["planted"] & pairs["tiled_l2"].notna()]
    families = list(generated)
    fig, axes = plt.subplots(
        len(families), 2 * per_family, figsize=(2 * per_family * 0.95, len(families) * 1.25), squeeze=False
    )
    for row, family in enumerate(families):
        closest = pairs[pairs["family"] == family].nsmallest(per_family, "tiled_l2")
        for k in range(per_family):
            for side in (0, 1):
                ax = axes[row, 2 * k + side]
                ax.axis("off")
                if k < len(closest):
                    pair = closest.iloc[k]
                    directory = generated[family] if side == 0 else real_dir
                    name = pair["file_name"] if side == 0 else pair["nearest_training"]
                    # both lie in their dataset's train split (GENERATED: a generated dataset has no other)
                    ax.imshow(load_rgb(Path(directory) / GENERATED / name))
                    ax.set_title(f"d={pair['tiled_l2']:.2f}" if side == 0 else "training", fontsize=6)
        axes[row, 0].text(-0.15, 0.5, family, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=8)
    fig.subplots_adjust(left=0.12, wspace=0.05, hspace=0.3)
    return fig


# ---------------------------------------------------------------- the cross-family comparison (notebook 09)


COMPARED = (
    "FID",
    "FD_domain_clip",
    "KID_domain_clip",
    "precision",
    "recall",
    "NIQE_generated",
    "MS_SSIM_within_class",
    "domain_clip_score",
    "alignment_macro",
    "colour_texture_ratio",
    "colour_texture_within_2x",
)


def comparison_table(figures_dir: str | Path, families: list[str]) -> pd.DataFrame:
    """One row per family from the tables notebooks 05-08 wrote into `figures_dir`, every number with
    its 95 % interval (`<column>_low`, `<column>_high`): fidelity and alignment (`fidelity.csv`,
    bootstrap intervals), memorisation (`privacy_table.csv`, all specialties: the mean tiled distance
    with its bootstrap interval, the share of likely copies with its Wilson interval), downstream
    utility (`downstream_bootstrap.csv`: the macro-AUROC of N real + N of the family's images against
    N real and against 2N real, averaged over the tasks that can show utility, those where 2N real
    resolves better than N, with intervals combined from the tasks' paired bootstrap intervals; the
    tasks used are listed in `downstream_tasks`) and sampling cost (`sampling.csv`: seconds per image,
    its interval over batches).

    Raises:
        FileNotFoundError: a table is missing (the notebook that writes it has not run).
    """
    from medsyn.intervals import combined_mean_interval

    figures = Path(figures_dir)
    read = {}
    for name in ("fidelity", "privacy_table", "downstream_bootstrap", "sampling"):
        path = figures / f"{name}.csv"
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing: run the notebook that writes it first")
        read[name] = pd.read_csv(path)
    fidelity = read["fidelity"].set_index("family")
    privacy = read["privacy_table"]
    privacy = privacy[privacy["specialty"] == "all"].set_index("family")
    boot = read["downstream_bootstrap"]
    informative = informative_tasks(boot)
    boot = boot[boot["task"].isin(informative)]
    sampling = read["sampling"].set_index("family")
    threshold_column = next(c for c in privacy.columns if c.startswith("pairs_at_most_"))
    rows = []
    for family in families:
        row = {"family": family}
        for column in COMPARED:
            row[column] = fidelity.loc[family, column]
            for end in ("low", "high"):
                row[f"{column}_{end}"] = fidelity.loc[family].get(f"{column}_{end}", float("nan"))
        copies, pairs = int(privacy.loc[family, threshold_column]), int(privacy.loc[family, "pairs"])
        row |= {
            "tiled_l2_mean": privacy.loc[family, "mean"],
            "tiled_l2_mean_low": privacy.loc[family, "mean_low"],
            "tiled_l2_mean_high": privacy.loc[family, "mean_high"],
            "likely_copies": f"{copies} / {pairs}",
            "likely_copies_share": copies / pairs if pairs else float("nan"),
            "likely_copies_share_low": privacy.loc[family, "share_at_most_low"],
            "likely_copies_share_high": privacy.loc[family, "share_at_most_high"],
        }
        for baseline, column in (("real_half", "auroc_gain_over_half_real"), ("real", "auroc_gain_over_double_real")):
            gain = boot[(boot["baseline"] == baseline) & (boot["compared"] == f"real_half+{family}")]
            low, high = combined_mean_interval(gain["difference"].tolist(), gain["low"].tolist(), gain["high"].tolist())
            row |= {
                column: gain["difference"].mean() if len(gain) else float("nan"),
                f"{column}_low": low,
                f"{column}_high": high,
            }
            if baseline == "real_half":
                row["auroc_gain_intervals"] = "; ".join(
                    f"{t}: [{lo:+.3f}, {hi:+.3f}]" for t, lo, hi in zip(gain["task"], gain["low"], gain["high"])
                )
        row |= {
            "downstream_tasks": ", ".join(informative) if informative else "none (no task resolves 2N real over N)",
            "seconds_per_image": sampling.loc[family, "seconds_per_image"],
            "seconds_per_image_low": sampling.loc[family].get("seconds_per_image_low", float("nan")),
            "seconds_per_image_high": sampling.loc[family].get("seconds_per_image_high", float("nan")),
        }
        rows.append(row)
    return pd.DataFrame(rows).set_index("family")


def informative_tasks(bootstrap: pd.DataFrame) -> list[str]:
    """The downstream tasks that can show utility: those where 2N real images resolve better than N
    (the `real_half` -> `real` row of `downstream_bootstrap.csv` has an interval above 0)."""
    gaps = bootstrap[(bootstrap["baseline"] == "real_half") & (bootstrap["compared"] == "real")]
    return [row.task for row in gaps.itertuples() if row.low > 0]


def power_table(figures_dir: str | Path) -> pd.DataFrame:
    """What the benchmark can resolve, from the spread the run itself observed: per fidelity and
    alignment metric (`fidelity_differences.csv`, families paired by prompt and seed) and per
    downstream task (`downstream_bootstrap.csv`, training sets paired by test image and replicate),
    the median standard error of a difference (from the 95 % intervals) and the smallest true
    difference a comparison resolves with 80 % probability
    (`medsyn.intervals.minimum_detectable_difference`), beside the largest difference observed."""
    from medsyn.intervals import minimum_detectable_difference, standard_error_from_interval

    figures = Path(figures_dir)
    rows = []
    differences = pd.read_csv(figures / "fidelity_differences.csv")
    for metric, group in differences.groupby("metric", sort=False):
        errors = [standard_error_from_interval(lo, hi) for lo, hi in zip(group["low"], group["high"])]
        rows.append(
            {
                "measure": metric,
                "compared": "two families, paired by prompt and seed",
                "units": f"{int(group['pairs'].median())} prompt-seed slots",
                "standard_error": float(np.median(errors)),
                "detectable": minimum_detectable_difference(float(np.median(errors))),
                "largest_observed": float(group["difference"].abs().max()),
                "resolved": f"{int(group['resolved'].sum())} of {len(group)}",
            }
        )
    boot = pd.read_csv(figures / "downstream_bootstrap.csv")
    for task, group in boot.groupby("task", sort=False):
        errors = (
            group["se"]
            if "se" in group
            else [standard_error_from_interval(lo, hi) for lo, hi in zip(group["low"], group["high"])]
        )
        resolved = (group["low"] > 0) | (group["high"] < 0)
        rows.append(
            {
                "measure": f"test macro-AUROC ({task})",
                "compared": "two training sets, paired by test image"
                + (f" and {int(group['replicates'].iloc[0])} replicates" if "replicates" in group else ""),
                "units": f"{int(group['test_images'].iloc[0])} test images" if "test_images" in group else "",
                "standard_error": float(np.median(errors)),
                "detectable": minimum_detectable_difference(float(np.median(errors))),
                "largest_observed": float(group["difference"].abs().max()),
                "resolved": f"{int(resolved.sum())} of {len(group)}",
            }
        )
    return pd.DataFrame(rows).set_index("measure")


def plot_comparison(table: pd.DataFrame):
    """The cross-family comparison at a glance: one panel per criterion, one bar per family with its
    95 % interval."""
    import matplotlib.pyplot as plt

    panels = [
        ("FD_domain_clip", "fidelity: FD (domain CLIP) ↓"),
        ("alignment_macro", "alignment: classifier ↑"),
        ("colour_texture_within_2x", "alignment: colour within 2x ↑"),
        ("MS_SSIM_within_class", "diversity: MS-SSIM ↓"),
        ("tiled_l2_mean", "privacy: tiled L2 to nearest ↑"),
        ("auroc_gain_over_half_real", "utility: AUROC vs N real ↑"),
        ("auroc_gain_over_double_real", "utility: AUROC vs 2N real ↑"),
        ("seconds_per_image", "cost: s / image ↓"),
    ]
    panels = [(c, t) for c, t in panels if table[c].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.7 * len(panels), 3.0), squeeze=False)
    for ax, (column, title) in zip(axes[0], panels):
        ax.bar(
            range(len(table)),
            table[column],
            color=[f"C{i}" for i in range(len(table))],
            yerr=_error_bars(table, column),
            capsize=3,
        )
        ax.set_xticks(range(len(table)), table.index, rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if column in SHARES:  # a share of all-zero bars is drawn on its whole range, not on 0-0.04
            ax.set_ylim(0, 1.05)
        if column.startswith("auroc_gain"):
            ax.axhline(0, color="0.5", linewidth=0.8)
    fig.suptitle("bars: 95 % intervals", fontsize=8)
    fig.tight_layout()
    return fig
