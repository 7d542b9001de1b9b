"""MediSyn's dataset tables (images per specialty x split and per image type x split) and the
figures a reader looks at instead: the same counts as bars, and example images per class."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from PIL import Image

from medsyn.data.dataset import SPLITS, class_key, image_path


def count_table(records: list[dict], by: str) -> pd.DataFrame:
    """Images per `by` (e.g. 'specialty', 'image_type', 'source') x split, with totals.

    Args:
        records: `metadata.jsonl` records.
        by: record field to group by.
    """
    frame = pd.DataFrame(records)
    table = pd.crosstab(frame[by], frame["split"], margins=True, margins_name="total")
    columns = [s for s in SPLITS if s in table.columns] + ["total"]
    return table[columns]


def plot_count_table(table: pd.DataFrame, title: str):
    """Horizontal stacked bars of a `count_table` (totals row and column dropped)."""
    data = table.drop(index="total", columns="total")
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(data) + 1.2))
    data.plot.barh(stacked=True, ax=ax, color=["#4C72B0", "#DD8452", "#55A868"][: data.shape[1]])
    ax.set_xlabel("images")
    ax.set_ylabel("")
    ax.set_title(title)
    ax.invert_yaxis()
    fig.tight_layout()
    return fig


def plot_examples(dataset_dir: str | Path, records: list[dict], per_class: int = 6, max_classes: int = 40):
    """Grid of example images, one row per class (source + labels), captioned with the class.

    Args:
        dataset_dir: the dataset directory the records' `file_name`s are relative to.
        records: the records to draw from (first `per_class` of each class, in record order).
        per_class: images per row.
        max_classes: rows at most.
    """
    by_class: dict[str, list[dict]] = {}
    for record in records:
        by_class.setdefault(class_key(record), []).append(record)
    classes = sorted(by_class)[:max_classes]
    fig, axes = plt.subplots(
        len(classes), per_class, figsize=(per_class * 1.1 + 3.2, len(classes) * 1.1), squeeze=False
    )
    for row, name in enumerate(classes):
        for col in range(per_class):
            ax = axes[row, col]
            ax.axis("off")
            if col < len(by_class[name]):
                image = np.asarray(Image.open(image_path(dataset_dir, by_class[name][col])))
                ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=255)
        axes[row, 0].text(
            -0.1,
            0.5,
            f"{name} ({len(by_class[name])})",
            transform=axes[row, 0].transAxes,
            ha="right",
            va="center",
            fontsize=7,
        )
    fig.subplots_adjust(left=0.3, wspace=0.05, hspace=0.05)
    return fig


def save_dataset_tables(
    records: list[dict], figures_dir: str | Path, parameters: dict, inputs: list
) -> dict[str, pd.DataFrame]:
    """MediSyn's two dataset tables, images per specialty x split and per image type x split, each as
    `dataset_<by>_by_split.csv` and a bar chart `.png` with provenance. Returns the tables by field."""
    from medsyn.records import save_figure, save_table

    tables = {}
    for by, title in (("specialty", "Images per specialty"), ("image_type", "Images per image type")):
        tables[by] = count_table(records, by)
        save_table(tables[by], Path(figures_dir) / f"dataset_{by}_by_split.csv", parameters, inputs)
        save_figure(
            plot_count_table(tables[by], title), Path(figures_dir) / f"dataset_{by}_by_split.png", parameters, inputs
        )
    return tables
