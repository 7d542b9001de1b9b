"""Per-class alignment of generated images: the share of each class prompt's images that the class
probe (`medsyn.models.class_probe`) assigns to the prompted class and, beside it, the colour-texture
judge's ratio (`medsyn.metrics.colour`), as tables and bar charts; and vq-ar's ablation of visual
clues and guidance, with intervals."""

from pathlib import Path

import numpy as np
import pandas as pd

from medsyn.intervals import bootstrap_interval, macro_mean
from medsyn.records import save_figure, save_table


def alignment_table(result: dict, family: str) -> pd.DataFrame:
    """Per-class accuracy of a probe on generated images, with the macro mean as the last row; with
    the colour-texture judge's result (`fidelity_table`), its floor, ratio and verdict per class and,
    in the last row, the median ratio and the number of classes within 2x."""
    table = pd.DataFrame({"class": list(result["per_class"]), family: list(result["per_class"].values())})
    macro = pd.DataFrame({"class": ["macro mean"], family: [result["macro_accuracy"]]})
    table = pd.concat([table, macro], ignore_index=True).set_index("class")
    judged = result.get("colour_texture")
    if judged is not None:
        table = table.join(judged[["floor", "colour_texture_ratio", "within_2x", "note"]])
        table.loc["macro mean", "colour_texture_ratio"] = float(judged["colour_texture_ratio"].median())
        table["within_2x"] = table["within_2x"].astype(object)
        table.loc["macro mean", "within_2x"] = f"{int(judged['within_2x'].sum())} of {len(judged)}"
        table.loc["macro mean", "note"] = "median ratio over classes; classes within 2x"
    return table


def plot_per_class_accuracy(result: dict, title: str = "Held-out accuracy of a classifier trained on real images"):
    """Horizontal bars of `TrainedProbe.accuracy(...)['per_class']`, with the macro mean as a line."""
    import matplotlib.pyplot as plt

    names = sorted(result["per_class"])
    values = [result["per_class"][n] for n in names]
    judged = result.get("colour_texture")
    if judged is None:
        fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.2))
    else:
        fig, (ax, right) = plt.subplots(
            1, 2, figsize=(10, 0.28 * len(names) + 1.2), sharey=True, gridspec_kw={"width_ratios": [3, 2]}
        )
        ratios = judged["colour_texture_ratio"].reindex(names)
        right.barh(names, ratios, color=["#4C72B0" if r <= 2 else "#C44E52" for r in ratios])
        right.axvline(1, color="0.5", ls=":", lw=1, label="real held-out (1)")
        right.axvline(2, color="k", ls="--", lw=1, label="2x")
        right.set_xlabel("colour-texture distance / real floor")
        right.set_title(f"{int(judged['within_2x'].sum())} of {len(judged)} classes within 2x", fontsize=10)
        right.legend(loc="lower right", fontsize=7)
    ax.barh(names, values, color="#4C72B0")
    ax.axvline(result["macro_accuracy"], color="k", ls="--", lw=1, label=f"macro {result['macro_accuracy']:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def save_alignment(
    alignment: dict[str, dict], figures_dir: str | Path, parameters: dict, inputs: dict[str, list]
) -> list[Path]:
    """Write `alignment_<family>.csv` and `.png` for each family's probe result (`fidelity_table`'s
    third value); `inputs` gives each family's input files for the provenance. Returns the paths."""
    written = []
    for family, result in alignment.items():
        stem = Path(figures_dir) / f"alignment_{family.replace('-', '_')}"
        written.append(
            save_table(alignment_table(result, family), stem.with_suffix(".csv"), parameters, inputs[family])
        )
        title = f"{family}: generated images recognised as their prompted class"
        written.append(
            save_figure(plot_per_class_accuracy(result, title), stem.with_suffix(".png"), parameters, inputs[family])
        )
    return written


def clue_guidance_ablation(
    pipeline_dir: str | Path,
    dataset_dir: str | Path,
    probe_path: str | Path,
    per_class: int,
    guidance_scale: float,
    seed: int = 0,
    batch_size: int = 32,
    resamples: int = 1000,
) -> pd.DataFrame:
    """arXiv 2403.06835's ablation for a vq-ar pipeline: the real-image classifier's macro accuracy on
    images sampled with and without visual clues, with and without classifier-free guidance, each with
    its 95 % bootstrap interval, and its paired difference from the full model (clues and guidance):
    every condition draws the same prompts and seeds, and the resamples draw the same slots from both.

    Args:
        pipeline_dir: a saved `VQARPipeline` (trained with `clue_dropout` > 0, so that it has also
            seen its prompts without clues).
        dataset_dir: the curated dataset; each class of its training split is prompted as the
            pipeline was trained (`prompt_field`: caption or report).
        probe_path: the class probe of 01.
        per_class: images per class and condition.
        guidance_scale: the guided conditions' scale (the unguided ones use 1).
        seed, batch_size: of the sampling; resamples: of the intervals.

    Returns:
        one row per condition: clues, guidance_scale, images, macro_accuracy and its interval
        (`_low`, `_high`), difference_from_full and its interval.
    """
    from medsyn.data.dataset import class_fields, split_records
    from medsyn.models.class_probe import TrainedProbe, to_probe_input
    from medsyn.sampling import generate, load_pipeline

    classes = class_fields(split_records(dataset_dir, "train"))
    pipeline = load_pipeline(pipeline_dir)
    if not hasattr(pipeline, "prompt_field"):
        raise ValueError(f"{pipeline_dir} is not a vq-ar pipeline: visual clues are vq-ar's")
    prompts = [fields[pipeline.prompt_field] for fields in classes.values()]
    probe = TrainedProbe.load(probe_path)
    names = np.asarray(probe.classes)
    conditions = [(True, guidance_scale), (True, 1.0), (False, guidance_scale), (False, 1.0)]
    wanted = np.asarray(list(classes)).repeat(per_class)  # every condition's slots, prompt by prompt
    correct = {}
    for clues, scale in conditions:
        samples = generate(
            pipeline,
            prompts,
            per_class,
            seed,
            guidance_scale=scale,
            batch_size=batch_size,
            call_options={"clues": clues},
        )
        predicted = names[probe.predict(to_probe_input(np.stack([s["image"] for s in samples])))]
        correct[(clues, scale)] = (predicted == wanted).astype(np.float64)
    full = correct[conditions[0]]
    rows = []
    for clues, scale in conditions:
        mine = correct[(clues, scale)]
        accuracy = macro_mean(mine, wanted)
        low, high = bootstrap_interval(
            lambda i, mine=mine: macro_mean(mine[i], wanted[i]), (len(mine),), resamples, seed, bounds=(0, 1)
        )
        difference = accuracy - macro_mean(full, wanted)
        d_low, d_high = (0.0, 0.0)
        if (clues, scale) != conditions[0]:
            d_low, d_high = bootstrap_interval(
                lambda i, mine=mine: macro_mean(mine[i], wanted[i]) - macro_mean(full[i], wanted[i]),
                (len(mine),),
                resamples,
                seed,
                bounds=(-1, 1),
            )
        rows.append(
            {
                "clues": clues,
                "guidance_scale": scale,
                "images": len(mine),
                "macro_accuracy": accuracy,
                "macro_accuracy_low": low,
                "macro_accuracy_high": high,
                "difference_from_full": difference,
                "difference_low": d_low,
                "difference_high": d_high,
            }
        )
    return pd.DataFrame(rows)


def plot_clue_guidance_ablation(table: pd.DataFrame, title: str = "vq-ar: visual clues and guidance"):
    """Bars of the ablation's macro accuracy per condition, with 95 % intervals."""
    import matplotlib.pyplot as plt

    labels = []
    for row in table.itertuples():
        guidance = f"guidance {row.guidance_scale:g}" if row.guidance_scale != 1 else "no guidance"
        labels.append(f"{'clues' if row.clues else 'no clues'}\n{guidance}")
    values = table["macro_accuracy"].to_numpy()
    errors = np.stack([values - table["macro_accuracy_low"], table["macro_accuracy_high"] - values])
    fig, ax = plt.subplots(figsize=(6, 3.6))
    ax.bar(labels, values, yerr=errors, capsize=4, color=["#4C72B0", "#8DA0CB", "#DD8452", "#F2B880"])
    for x, row in enumerate(table.itertuples()):
        note = f"{row.macro_accuracy:.2f}"
        if x:
            note += f"\n{row.difference_from_full:+.2f} [{row.difference_low:+.2f}, {row.difference_high:+.2f}]"
        ax.text(x, min(row.macro_accuracy_high + 0.03, 1.02), note, ha="center", va="bottom", fontsize=7)
    ax.set_ylim(0, 1.2)
    ax.set_yticks(np.linspace(0, 1, 6))
    ax.set_ylabel("classifier macro accuracy")
    ax.set_title(
        f"{title}: macro accuracy; difference from the first bar ({int(table['images'].iloc[0])} images each)",
        fontsize=9,
    )
    fig.tight_layout()
    return fig
