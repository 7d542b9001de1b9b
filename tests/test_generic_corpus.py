"""The generic pretraining corpus: reproducible, disjoint from the medical corpus, images that show
what their captions say, and a folder it did not write is never overwritten."""

import numpy as np
import pytest

from medsyn.data.corpus import SOURCES
from medsyn.data.dataset import load_images, read_records
from medsyn.data.generic import (
    BACKGROUND_COLOURS,
    COLOURS,
    SHAPE_COLOURS,
    SHAPES,
    SIZES,
    TEXTURES,
    write_generic_corpus,
)


def test_the_corpus_is_a_dataset_that_a_seed_reproduces(tmp_path):
    first = read_records(write_generic_corpus(tmp_path / "a", 40, 32, seed=3, progress=False))
    again = read_records(write_generic_corpus(tmp_path / "b", 40, 32, seed=3, progress=False))
    other = read_records(write_generic_corpus(tmp_path / "c", 40, 32, seed=4, progress=False))
    assert len(first) == 40 and {r["split"] for r in first} == {"train"}
    assert [r["sha256"] for r in first] == [r["sha256"] for r in again]
    assert not {r["sha256"] for r in first} & {r["sha256"] for r in other}
    assert load_images(tmp_path / "a", first).shape == (40, 32, 32, 3)


def test_it_shares_no_source_patient_or_word_with_the_medical_corpus(tmp_path):
    records = read_records(write_generic_corpus(tmp_path / "g", 300, 32, progress=False))
    assert {r["source"] for r in records} == {"generic"} and "generic" not in SOURCES
    vocabulary = {"a", "on", "background", *COLOURS, *SHAPES, *TEXTURES, *SIZES}
    assert all(set(r["text"].split()) <= vocabulary for r in records)
    # every word of the vocabulary is drawn, so pretraining sees each one
    drawn = {w for r in records for w in r["text"].split()}
    assert drawn >= {*SHAPE_COLOURS, *BACKGROUND_COLOURS, *SHAPES, *TEXTURES, *SIZES}
    assert all(r["patient_id"].startswith("generic-") for r in records)


def test_each_image_shows_its_captions_shape_colour_and_background(tmp_path):
    records = read_records(write_generic_corpus(tmp_path / "g", 120, 64, progress=False))
    images = load_images(tmp_path / "g", records).astype(float)
    palette = np.array([COLOURS[c] for c in SHAPE_COLOURS], dtype=float)
    for image, record in zip(images, records):
        pixels = image.reshape(-1, 3)
        nearest = np.linalg.norm(pixels[:, None, :] - palette[None], axis=2).argmin(1)
        close = np.linalg.norm(pixels - COLOURS[record["drawn_colour"]], axis=1) < 45
        # the shape covers at least ~1 % of the image in its own colour ...
        assert close.mean() > 0.01, record["text"]
        # ... and its colour is the shape colour most pixels lie near, among those close to one
        counts = np.bincount(
            nearest[np.min(np.linalg.norm(pixels[:, None] - palette[None], axis=2), 1) < 45], minlength=8
        )
        assert SHAPE_COLOURS[counts.argmax()] == record["drawn_colour"], record["text"]
        # the border (where no shape reaches) has the background's colour on average
        border = np.concatenate([image[0], image[-1], image[:, 0], image[:, -1]])
        background = np.array(COLOURS[record["drawn_background"]], dtype=float)
        assert np.linalg.norm(np.median(border, 0) - np.maximum(background, 40) + (background < 40) * 25) < 60


def test_a_folder_it_did_not_write_is_refused_and_a_finished_corpus_is_kept(tmp_path):
    foreign = tmp_path / "busy"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="not empty"):
        write_generic_corpus(foreign, 10, 32, progress=False)
    assert (foreign / "notes.txt").read_text() == "mine"
    done = write_generic_corpus(tmp_path / "g", 10, 32, progress=False)
    stamp = (done / "medsyn_dataset.json").stat().st_mtime_ns
    assert write_generic_corpus(done, 10, 32, progress=False) == done
    assert (done / "medsyn_dataset.json").stat().st_mtime_ns == stamp
    with pytest.raises(FileExistsError, match="another dataset"):
        write_generic_corpus(done, 20, 32, progress=False)
    # a write cut short (settings written, some images, no marker) is finished by the next call
    cut = tmp_path / "cut"
    write_generic_corpus(cut, 10, 32, progress=False)
    (cut / "medsyn_dataset.json").unlink()
    (cut / "train" / "metadata.jsonl").unlink()
    finished = read_records(write_generic_corpus(cut, 10, 32, progress=False))
    assert [r["sha256"] for r in finished] == [r["sha256"] for r in read_records(done)]
    with pytest.raises(FileExistsError, match="not empty"):  # but not with other settings
        (cut / "medsyn_dataset.json").unlink()
        write_generic_corpus(cut, 12, 32, progress=False)
