"""The dataset format every stage reads and writes (README: "The data contract").

A medsyn dataset, curated or generated, is a Hugging Face `imagefolder` laid out by split:

    <dataset>/train/metadata.jsonl        one JSON record per image; `file_name` is relative to train/
    <dataset>/train/ab/ab12....png        images, named by the SHA-256 of their PNG bytes
    <dataset>/validation/...              the same for each split that has images
    <dataset>/test/...
    <dataset>/medsyn_dataset.json         the completion marker: records per split, written last

so that `datasets.load_dataset("imagefolder", data_dir=<dataset>)` yields the `train`, `validation`
and `test` splits with their own records, and diffusers' training scripts pointed at `<dataset>/train`
train on the training split only. A dataset whose marker is missing (an interrupted write) or whose
`metadata.jsonl` files disagree with it is refused by `read_records`, naming the file.

A record's class is its source plus its sorted labels (`class_key`). A generated record carries the
`source` and `labels` of the class its prompt names, plus `model`, `seed` and `prompt_id`, so real and
generated records are classified the same way.
"""

import json
import os
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image

SPLITS = ("train", "validation", "test")
METADATA = "metadata.jsonl"
MARKER = "medsyn_dataset.json"


class DatasetError(ValueError):
    """A dataset directory that is not a complete medsyn dataset."""


# ---------------------------------------------------------------- records


def read_records(dataset_dir: str | Path, split: str | None = None) -> list[dict]:
    """The records of a dataset (all splits, in split order) or of one split.

    Raises:
        DatasetError: the completion marker is missing, or a split's `metadata.jsonl` is missing or
            holds another number of records than the marker says (an interrupted or altered write).
    """
    dataset_dir = Path(dataset_dir)
    marker = dataset_dir / MARKER
    if not marker.is_file():
        raise DatasetError(
            f"{marker} not found: {dataset_dir} is not a complete medsyn dataset "
            "(never written, or its writing was interrupted)"
        )
    counts = json.loads(marker.read_text())["splits"]
    if split is not None and split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; choose from {SPLITS}")
    records = []
    for name in [split] if split else SPLITS:
        expected = counts.get(name, 0)
        if not expected:
            continue
        path = dataset_dir / name / METADATA
        if not path.is_file():
            raise DatasetError(f"{path} not found, although {marker} lists {expected} '{name}' records")
        with open(path) as f:
            mine = [json.loads(line) for line in f if line.strip()]
        if len(mine) != expected:
            raise DatasetError(f"{path} holds {len(mine)} records, {marker} says {expected}")
        records += mine
    return records


def split_records(dataset_dir: str | Path, split: str) -> list[dict]:
    """The records of one split, which must not be empty."""
    records = read_records(dataset_dir, split)
    if not records:
        raise DatasetError(f"no '{split}' records in {dataset_dir}")
    return records


def write_records(dataset_dir: str | Path, records: list[dict], kind: str) -> Path:
    """Write each split's `metadata.jsonl` (records in the order given), then the completion marker.

    The images must already be in place (`image_path`). Each file is written under a temporary name
    and renamed, and the marker comes last, so a reader never sees a half-written dataset as complete.

    Args:
        dataset_dir: the dataset directory.
        records: records with `split` and `file_name` (relative to the split folder).
        kind: 'curated' or 'generated', recorded in the marker.

    Returns:
        the marker's path.
    """
    dataset_dir = Path(dataset_dir)
    unknown = sorted({r.get("split") for r in records} - set(SPLITS), key=str)
    if unknown:
        raise ValueError(f"records with unknown splits {unknown}; splits are {SPLITS}")
    marker = dataset_dir / MARKER
    if marker.exists():
        marker.unlink()  # the dataset is incomplete from here until the new marker is written
    counts = Counter(r["split"] for r in records)
    for split in SPLITS:
        if counts[split]:
            lines = "".join(json.dumps(r) + "\n" for r in records if r["split"] == split)
            _write_atomically(dataset_dir / split / METADATA, lines)
    _write_atomically(
        marker,
        json.dumps(
            {"format": "medsyn imagefolder by split", "kind": kind, "splits": {s: counts[s] for s in SPLITS}}, indent=2
        ),
    )
    return marker


def _write_atomically(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    with open(temporary, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(temporary, path)


def is_dataset(dataset_dir: str | Path) -> bool:
    """True when the directory holds a complete medsyn dataset's marker."""
    return (Path(dataset_dir) / MARKER).is_file()


# ---------------------------------------------------------------- images


def image_file_name(sha256: str, suffix: str = "") -> str:
    """A record's `file_name` for an image whose PNG bytes hash to `sha256`: hexadecimal only, since
    the `datasets` loader would read the words train / test in a path as a split."""
    return f"{sha256[:2]}/{sha256[:24]}{suffix}.png"


def image_path(dataset_dir: str | Path, record: dict) -> Path:
    """Where a record's image lies: `<dataset>/<split>/<file_name>`."""
    return Path(dataset_dir) / record["split"] / record["file_name"]


def load_rgb(path: str | Path) -> np.ndarray:
    """An image file as uint8 H x W x 3 (grey repeated): every generator and metric works in RGB."""
    return np.asarray(Image.open(path).convert("RGB"))


def load_images(dataset_dir: str | Path, records: list[dict]) -> np.ndarray:
    """The records' images as uint8 N x H x W x 3."""
    if not records:
        raise ValueError(f"no records to load from {dataset_dir}")
    return np.stack([load_rgb(image_path(dataset_dir, r)) for r in records])


def load_split(dataset_dir: str | Path, split: str) -> tuple[np.ndarray, list[dict]]:
    """The images (uint8 N x H x W x 3) and records of one split, which must not be empty; a generated
    dataset's images are its `train` split."""
    records = split_records(dataset_dir, split)
    return load_images(dataset_dir, records), records


# ---------------------------------------------------------------- classes


def class_key(record: dict) -> str:
    """A record's class: its source plus its sorted labels (a generated record carries the source and
    labels of the class its prompt names)."""
    return f"{record['source']}: " + " + ".join(sorted(record["labels"]))


def class_prompts(records: list[dict]) -> dict[str, str]:
    """Each class (`class_key`) and its prompt, in class order: the label template (`class_text`) of a
    curated record, whose `text` may add a description of that one image, or the `text` of a generated
    one. A class with two prompts is an error, since the prompt would not name one class."""
    prompts: dict[str, str] = {}
    for record in records:
        key, prompt = class_key(record), record.get("class_text", record["text"])
        if prompts.setdefault(key, prompt) != prompt:
            raise ValueError(f"class {key!r} has two captions: {prompts[key]!r} and {prompt!r}")
    return dict(sorted(prompts.items()))


def class_fields(records: list[dict]) -> dict[str, dict]:
    """Per class (in `class_prompts` order), the fields a generated image of that class inherits:
    `text` (the prompt), `report` (the class's report prompt, `class_report`, for a family trained on
    reports; the prompt where a dataset has none), `source`, `specialty`, `image_type` and `labels`."""
    prompts = class_prompts(records)
    first: dict[str, dict] = {}
    for record in records:
        first.setdefault(class_key(record), record)
    return {
        key: {
            "text": prompt,
            "report": first[key].get("class_report", prompt),
            **{f: first[key].get(f) for f in ("source", "specialty", "image_type")},
            "labels": list(first[key]["labels"]),
        }
        for key, prompt in prompts.items()
    }
