"""The fidelity and alignment protocol for generated datasets (notebook 06): every family is compared
with the same real images, on equal sample counts, as uint8 images read from their PNG files.

| column | what |
|---|---|
| `FID`, `KID_inception` | FID and KID on the TF-compatible InceptionV3 (only when its weights are on disk; otherwise NaN and `inception_note` says where they were looked for) |
| `FD_domain_clip`, `KID_domain_clip` | the same distances on the domain CLIP's image embeddings: never called FID |
| `precision`, `recall` | improved precision / recall (k = 3) on the domain CLIP's embeddings (NaN with 3 images or fewer) |
| `NIQE_generated`, `NIQE_real` | mean NIQE (LIVE's model; `niqe_block` pixels per block, reported) |
| `MS_SSIM_within_class` | mean MS-SSIM of random same-class pairs (lower: more diverse), with the real value beside it (NaN under 33 px) |
| `domain_clip_score` | mean cosine similarity of each image and its prompt in the domain CLIP, × 100 |
| `alignment_macro` | macro accuracy of the real-image classifier on the generated images (the prompt's class is the truth) |
"""

from pathlib import Path

import numpy as np
import pandas as pd

from medsyn.data.dataset import class_key, class_prompts, image_path, load_rgb, load_split, split_records
from medsyn.metrics.fidelity import (
    feature_statistics,
    frechet_distance,
    inception_features,
    inception_weights,
    kernel_distance,
    ms_ssim_diversity,
    precision_recall,
)
from medsyn.metrics.niqe import niqe

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
    if min(images.shape[1:3]) < 33:
        return float("nan"), 0
    classes = np.asarray(classes)
    values, window = [], 0
    for c in np.unique(classes):
        members = images[classes == c]
        if len(members) >= 2:
            value, window = ms_ssim_diversity(members, pairs=pairs, seed=seed)
            values.append(value)
    return (float(np.mean(values)) if values else float("nan")), window


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
) -> tuple[pd.DataFrame, str, dict]:
    """One row per generated dataset, plus a `real` row (the `reference_split` images against the
    `real_split` images: the floor every family is measured against).

    Args:
        real_dir: the curated dataset.
        generated: family -> generated dataset directory (`medsyn sample` / notebook 05).
        domain_clip_dir: the domain CLIP of 01_curate (image and text embeddings).
        probe_path: the real-image classifier of 01_curate.
        real_split: the real images every set is compared with; reference_split: the real images of the `real` row.
        inception_path: InceptionV3 weights for FID (else $MEDSYN_INCEPTION_WEIGHTS / the torch hub cache).
        niqe_block: NIQE block size (LIVE's 96 needs images of at least 96 px).
        seed: seed of the equal-count draws and of the MS-SSIM pairs.
        require_fid: raise when InceptionV3's weights are missing instead of leaving FID out.

    Returns:
        (the table, a note on the Inception weights: where they came from, or why FID is missing, and
        per family the classifier's result on its images: accuracy, macro_accuracy, per_class, n).
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
    for family, directory in generated.items():
        sets[family] = load_split(directory, GENERATED)
    real_embeddings = embed_images(clip, real.transpose(0, 3, 1, 2)).double().numpy()
    real_inception = inception_features(real, weights) if weights else None
    real_ms_ssim, window = within_class_ms_ssim(real, [class_key(r) for r in real_records], seed=seed)
    real_niqe = float(np.mean([niqe(image, niqe_block) for image in real]))

    rows, alignment = [], {}
    for family, (images, records) in sets.items():
        classes = [class_key(r) for r in records]
        unknown = sorted(set(classes) - set(prompts))
        if unknown:
            raise ValueError(f"{family}: classes that are not classes of {real_dir}'s training split: {unknown[:3]}")
        mine, theirs = equal_counts(images, real, seed)
        embeddings = embed_images(clip, images.transpose(0, 3, 1, 2))
        features = embeddings.double().numpy()
        row = {
            "family": family,
            "images": len(images),
            "compared": len(mine),
            "FD_domain_clip": frechet_distance(
                *feature_statistics(features[mine]), *feature_statistics(real_embeddings[theirs])
            ),
            "KID_domain_clip": kernel_distance(real_embeddings[theirs], features[mine], seed=seed)[0],
        }
        if len(mine) > 3:  # the k = 3 neighbourhoods need more samples
            row.update(precision_recall(real_embeddings[theirs], features[mine]))
            row.pop("f_score")
        else:
            row["precision"] = row["recall"] = float("nan")
        if weights:
            own = inception_features(images[mine], weights)
            row["FID"] = frechet_distance(*feature_statistics(own), *feature_statistics(real_inception[theirs]))
            row["KID_inception"] = kernel_distance(real_inception[theirs], own, seed=seed)[0]
        else:
            row["FID"] = row["KID_inception"] = float("nan")
        row["NIQE_generated"] = float(np.mean([niqe(image, niqe_block) for image in images[mine]]))
        row["NIQE_real"] = real_niqe
        row["MS_SSIM_within_class"], _ = within_class_ms_ssim(images, classes, seed=seed)
        row["MS_SSIM_within_class_real"] = real_ms_ssim
        row["MS_SSIM_window"] = window
        texts = embed_texts(clip, tokenizer, [prompts[c] for c in classes])
        row["domain_clip_score"] = float(100 * (embeddings * texts).sum(dim=1).mean())
        alignment[family] = probe.accuracy_of(to_probe_input(images), classes)
        row["alignment_macro"] = alignment[family]["macro_accuracy"]
        row["niqe_block"] = niqe_block
        rows.append(row)
    return pd.DataFrame(rows), note, {f: a for f, a in alignment.items() if f != "real"}


def plot_fidelity(table: pd.DataFrame):
    """One panel per metric, one bar per family (the `real` row is the floor / ceiling to compare with)."""
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
    ]
    metrics = [(m, t) for m, t in metrics if table[m].notna().any()]
    fig, axes = plt.subplots(1, len(metrics), figsize=(2.6 * len(metrics), 3.2), squeeze=False)
    colours = ["0.6" if f == "real" else f"C{i}" for i, f in enumerate(table["family"])]
    for ax, (metric, title) in zip(axes[0], metrics):
        ax.bar(range(len(table)), table[metric], color=colours)
        ax.set_xticks(range(len(table)), table["family"], rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    return fig


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
            embed_images(clip, images.transpose(0, 3, 1, 2)), groups, training_embeddings, training_groups, chunk
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


def comparison_table(figures_dir: str | Path, families: list[str]) -> pd.DataFrame:
    """One row per family from the tables notebooks 05-08 wrote into `figures_dir`: fidelity and
    alignment (`fidelity.csv`), memorisation (`privacy_table.csv`, all specialties), downstream
    utility (`downstream_bootstrap.csv`: the macro-AUROC gain of adding the family's images to the
    half real set, averaged over tasks, with the tasks' intervals) and sampling cost (`sampling.csv`).

    Raises:
        FileNotFoundError: a table is missing (the notebook that writes it has not run).
    """
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
    sampling = read["sampling"].set_index("family")
    rows = []
    for family in families:
        gain = boot[(boot["baseline"] == "real_half") & (boot["compared"] == f"real_half+{family}")]
        threshold_column = next(c for c in privacy.columns if c.startswith("pairs_at_most_"))
        rows.append(
            {
                "family": family,
                **{
                    c: fidelity.loc[family, c]
                    for c in (
                        "FID",
                        "FD_domain_clip",
                        "KID_domain_clip",
                        "precision",
                        "recall",
                        "NIQE_generated",
                        "MS_SSIM_within_class",
                        "domain_clip_score",
                        "alignment_macro",
                    )
                },
                "tiled_l2_mean": privacy.loc[family, "mean"],
                "likely_copies": f"{int(privacy.loc[family, threshold_column])} / {int(privacy.loc[family, 'pairs'])}",
                "auroc_gain_over_half_real": gain["difference"].mean() if len(gain) else float("nan"),
                "auroc_gain_intervals": "; ".join(
                    f"{t}: [{lo:+.3f}, {hi:+.3f}]" for t, lo, hi in zip(gain["task"], gain["low"], gain["high"])
                ),
                "seconds_per_image": sampling.loc[family, "seconds_per_image"],
            }
        )
    return pd.DataFrame(rows).set_index("family")


def plot_comparison(table: pd.DataFrame):
    """The cross-family comparison at a glance: one panel per criterion, one bar per family."""
    import matplotlib.pyplot as plt

    panels = [
        ("FD_domain_clip", "fidelity: FD (domain CLIP) ↓"),
        ("alignment_macro", "alignment: classifier ↑"),
        ("MS_SSIM_within_class", "diversity: MS-SSIM ↓"),
        ("tiled_l2_mean", "privacy: tiled L2 to nearest ↑"),
        ("auroc_gain_over_half_real", "utility: AUROC gain ↑"),
        ("seconds_per_image", "cost: s / image ↓"),
    ]
    panels = [(c, t) for c, t in panels if table[c].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(2.7 * len(panels), 3.0), squeeze=False)
    for ax, (column, title) in zip(axes[0], panels):
        ax.bar(range(len(table)), table[column], color=[f"C{i}" for i in range(len(table))])
        ax.set_xticks(range(len(table)), table.index, rotation=60, ha="right", fontsize=8)
        ax.set_title(title, fontsize=9)
        if column == "auroc_gain_over_half_real":
            ax.axhline(0, color="0.5", linewidth=0.8)
    fig.tight_layout()
    return fig
