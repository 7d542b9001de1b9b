import numpy as np
import pytest
from PIL import Image

from medsyn.data.captions import caption_from_labels, join_labels, load_vocabulary, report_prompt
from medsyn.data.dedup import DuplicateIndex, pixel_sha256
from medsyn.data.manifest import ManifestError
from medsyn.data.split import patient_split
from medsyn.paths import VOCABULARIES_DIR


def test_split_puts_every_group_in_exactly_one_split_with_the_target_fractions():
    sizes = {f"p{i}": 1 for i in range(1000)}
    split = patient_split(sizes, seed=0)
    assert set(split) == set(sizes)
    counts = {s: sum(1 for v in split.values() if v == s) for s in ("train", "validation", "test")}
    assert counts == {"train": 800, "validation": 100, "test": 100}


def test_split_is_deterministic_for_a_seed_and_changes_with_it():
    rng = np.random.default_rng(0)
    sizes = {f"p{i}": int(rng.integers(1, 6)) for i in range(200)}
    assert patient_split(sizes, seed=1) == patient_split(dict(reversed(list(sizes.items()))), seed=1)
    assert patient_split(sizes, seed=1) != patient_split(sizes, seed=2)
    assert patient_split(sizes, seed=1, salt="a") != patient_split(sizes, seed=1, salt="b")
    images = {s: sum(n for p, n in sizes.items() if patient_split(sizes, seed=1)[p] == s) for s in ("train", "test")}
    assert abs(images["train"] / sum(sizes.values()) - 0.8) < 0.03


def test_split_rejects_bad_fractions():
    with pytest.raises(ValueError):
        patient_split({"a": 1}, fractions=(0.5, 0.5, 0.5))


def _photo(seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:64, 0:64] / 64
    image = np.stack(
        [
            np.sin(xx * rng.uniform(3, 9) + rng.uniform(0, 6)),
            np.cos(yy * rng.uniform(3, 9)),
            np.sin((xx + yy) * rng.uniform(2, 7)),
        ],
        -1,
    )
    return ((image + 1) * 120 + rng.normal(0, 4, image.shape)).clip(0, 255).astype(np.uint8)


def test_exact_and_near_duplicates_are_found_and_distinct_images_are_not(tmp_path):
    index = DuplicateIndex()
    originals = [_photo(s) for s in range(20)]
    for i, image in enumerate(originals):
        assert index.check(f"img{i}", image) is None
    assert index.check("copy", originals[3].copy()) == ("exact_duplicate", "img3")
    # re-encoded as JPEG and brightened: a near duplicate of image 5
    Image.fromarray(np.clip(originals[5].astype(float) * 1.04 + 3, 0, 255).astype(np.uint8)).save(
        tmp_path / "a.jpg", quality=70
    )
    assert index.check("reencoded", np.asarray(Image.open(tmp_path / "a.jpg"))) == ("near_duplicate", "img5")
    assert DuplicateIndex(min_correlation=None).check("x", originals[0]) is None


def test_pixel_hash_ignores_the_container_but_not_the_pixels():
    image = _photo(0)
    assert pixel_sha256(image) == pixel_sha256(image.copy())
    changed = image.copy()
    changed[0, 0, 0] ^= 1
    assert pixel_sha256(image) != pixel_sha256(changed)


def test_captions_follow_medisyn_style():
    caption = {"template": "Dermoscopy image showing {labels}."}
    assert caption_from_labels(["melanoma"], caption, "dermoscopy") == "Dermoscopy image showing melanoma."
    chest = {
        "template": "Frontal chest X-ray showing {labels}.",
        "normal_template": "Frontal chest X-ray with no finding.",
        "normal_labels": ["no finding"],
    }
    assert (
        caption_from_labels(["cardiomegaly", "pleural effusion"], chest, "chest X-ray")
        == "Frontal chest X-ray showing cardiomegaly and pleural effusion."
    )
    assert caption_from_labels(["no finding"], chest, "chest X-ray") == "Frontal chest X-ray with no finding."
    assert (
        caption_from_labels(["x"], {"template": "{image_type} with {labels}"}, "medical image")
        == "Medical image with x"
    )
    assert join_labels(["a", "b", "c"]) == "a, b and c"
    with pytest.raises(ValueError, match="without labels"):
        caption_from_labels([], caption, "dermoscopy")
    with pytest.raises(ValueError, match="unknown field"):
        caption_from_labels(["a"], {"template": "{patient}"}, "x")


def test_vocabulary_and_report_prompt():
    vocabulary = load_vocabulary(VOCABULARIES_DIR / "chest_xray.yaml")
    prompt = report_prompt(["cardiomegaly", "pleural effusion"], vocabulary)
    assert prompt == (
        "Chest X-ray. Anatomy: heart, pleura. Pathology: cardiomegaly (heart); pleural effusion (pleura). "
        "Findings: The cardiac silhouette is enlarged. There is a pleural effusion with blunting of the "
        "costophrenic angle."
    )
    assert "Pathology: none" in report_prompt(["no finding"], vocabulary)
    with pytest.raises(ValueError, match="not in vocabulary"):
        report_prompt(["melanoma"], vocabulary)


def test_vocabulary_with_unknown_anatomy_or_field_fails(tmp_path):
    bad = tmp_path / "v.yaml"
    bad.write_text("name: v\nimage_type: x\nanatomy: {heart: {}}\npathology: {effusion: {anatomy: pleura}}\n")
    with pytest.raises(ManifestError, match="unknown anatomy 'pleura'"):
        load_vocabulary(bad)
    bad.write_text("name: v\nimage_type: x\nanatomy: {}\npathology: {}\nsynonym: []\n")
    with pytest.raises(ManifestError, match="synonym"):
        load_vocabulary(bad)


def test_stratified_split_keeps_rare_classes_in_train_and_balances_the_rest():
    sizes = {f"p{i}": 1 for i in range(102)}
    strata = {f"p{i}": ("rare" if i < 2 else "common") for i in range(102)}
    split = patient_split(sizes, seed=0, strata=strata)
    assert split["p0"] == split["p1"] == "train"
    common = [split[f"p{i}"] for i in range(2, 102)]
    assert (common.count("train"), common.count("validation"), common.count("test")) == (80, 10, 10)


def test_a_class_of_three_or_more_patients_gets_every_split():
    """Five patients of one class, most with several images: filling by deficit alone put them all in
    train and validation; every split must get one."""
    sizes = {"p1": 6, "p2": 5, "p3": 5, "p4": 4, "p5": 1}
    for seed in range(20):
        split = patient_split(sizes, seed=seed, strata=dict.fromkeys(sizes, "oct: drusen"))
        assert set(split.values()) == {"train", "validation", "test"}, (seed, split)
    two = patient_split({"a": 3, "b": 2}, seed=0)  # too few patients for three splits: no split is forced
    assert set(two.values()) <= {"train", "validation", "test"} and "train" in two.values()
    # a class that already had every split keeps the assignment filling by deficit gives
    many = {f"p{i}": 1 for i in range(40)}
    assert sorted(patient_split(many, seed=3).values()).count("test") == 4
