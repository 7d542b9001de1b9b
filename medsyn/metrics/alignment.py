"""Per-class alignment of generated images: the share of each class prompt's images that the class
probe (`medsyn.models.class_probe`) assigns to the prompted class, as tables and bar charts."""

from pathlib import Path

import pandas as pd

from medsyn.records import save_figure, save_table


def alignment_table(result: dict, family: str) -> pd.DataFrame:
    """Per-class accuracy of a probe on generated images, with the macro mean as the last row."""
    table = pd.DataFrame({"class": list(result["per_class"]), family: list(result["per_class"].values())})
    macro = pd.DataFrame({"class": ["macro mean"], family: [result["macro_accuracy"]]})
    return pd.concat([table, macro], ignore_index=True).set_index("class")


def plot_per_class_accuracy(result: dict, title: str = "Held-out accuracy of a classifier trained on real images"):
    """Horizontal bars of `TrainedProbe.accuracy(...)['per_class']`, with the macro mean as a line."""
    import matplotlib.pyplot as plt

    names = sorted(result["per_class"])
    values = [result["per_class"][n] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.2))
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
