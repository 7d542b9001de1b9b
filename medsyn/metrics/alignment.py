"""Per-class alignment of generated images: the share of each class prompt's images that the class
probe (`medsyn.models.class_probe`) assigns to the prompted class and, beside it, the colour-texture
judge's ratio (`medsyn.metrics.colour`), as tables and bar charts."""

from pathlib import Path

import pandas as pd

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
