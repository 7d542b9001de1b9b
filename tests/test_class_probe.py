"""The embedded classes are visually distinct: a small CNN trained only on real training images
recognises held-out patients' images (the check that later stages' alignment scores rest on)."""

from conftest import EMBEDDED_MANIFESTS

from medsyn.data.corpus import write_corpus
from medsyn.data.curate import curate
from medsyn.training.class_probe import train_class_probe


def test_classes_are_distinct_for_a_classifier_trained_on_real_images(tmp_path):
    write_corpus(tmp_path / "raw", patients=40, seed=7, size=64, progress=False)
    result = curate(EMBEDDED_MANIFESTS, tmp_path / "raw", tmp_path / "out", size=32, progress=False)
    train = [r for r in result.records if r["split"] == "train"]
    held_out = [r for r in result.records if r["split"] != "train"]
    probe = train_class_probe(tmp_path / "out", train, epochs=20, seed=0, progress=False)
    assert len(probe.classes) == 22
    scores = probe.accuracy(tmp_path / "out", held_out)
    assert scores["accuracy"] >= 0.85, scores
    assert scores["macro_accuracy"] >= 0.8, scores
    # and it is not chance: labels shuffled within the held-out set score far lower
    shuffled = [
        dict(
            r,
            labels=held_out[(i * 7 + 3) % len(held_out)]["labels"],
            source=held_out[(i * 7 + 3) % len(held_out)]["source"],
        )
        for i, r in enumerate(held_out)
    ]
    assert probe.accuracy(tmp_path / "out", shuffled)["accuracy"] < 0.3
