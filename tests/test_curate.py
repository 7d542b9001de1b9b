"""Curation of the embedded corpus and of real DICOM files, checked against the corpus's ground truth."""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from conftest import EMBEDDED_MANIFESTS, pydicom_file
from PIL import Image

from medsyn.data.curate import check_accounting, curate, curate_held_out, patients_in_several_splits
from medsyn.data.dataset import MARKER, DatasetError, image_path, read_records
from medsyn.data.preprocess import hounsfield_window
from medsyn.data.readers import read_dicom
from medsyn.paths import MANIFESTS_DIR

REQUIRED_FIELDS = {
    "file_name",
    "text",
    "split",
    "specialty",
    "image_type",
    "labels",
    "patient_id",
    "source",
    "sha256",
    "source_file",
}


def _rejected(out: Path) -> list[dict]:
    with open(out / "rejected.csv") as f:
        return list(csv.DictReader(f))


def test_every_raw_file_is_accounted_for(curated):
    raw_files = {p.relative_to(curated["raw"]).as_posix() for p in curated["raw"].rglob("*") if p.is_file()}
    listed = {r["source_file"] for r in curated["records"]} | {r["source_file"] for r in _rejected(curated["out"])}
    assert listed == raw_files
    assert check_accounting(curated["raw"], curated["out"])["missing"] == []


def test_deliberate_defects_get_their_reasons(curated):
    rejected = {(r["source_file"], r["reason"]): r for r in _rejected(curated["out"])}
    kept = {r["source_file"] for r in curated["records"]}
    for defect in curated["truth"]["defects"]:
        assert (defect["source_file"], defect["reason"]) in rejected, defect
        assert defect["source_file"] not in kept
        if "duplicate_of" in defect:
            assert (
                rejected[(defect["source_file"], defect["reason"])]["detail"]
                == f"duplicate of {defect['duplicate_of']}"
            )
            assert defect["duplicate_of"] in kept


def test_records_follow_the_data_contract(curated):
    out = curated["out"]
    for record in curated["records"]:
        assert REQUIRED_FIELDS <= set(record)
        assert record["split"] in {"train", "validation", "test"}
        assert record["text"].endswith(".") and record["labels"]
        path = image_path(out, record)
        assert hashlib.sha256(path.read_bytes()).hexdigest() == record["sha256"]
        assert Image.open(path).size == (32, 32)
    sources = {r["source"] for r in curated["records"]}
    assert sources == set(curated["truth"]["sources"])
    assert len({r["image_type"] for r in curated["records"]}) >= 6
    assert len({r["specialty"] for r in curated["records"]}) >= 4


def test_the_dataset_loads_as_a_hugging_face_imagefolder_with_its_splits(curated):
    import datasets

    summary = json.loads((curated["out"] / "curation_summary.json").read_text())
    loaded = datasets.load_dataset("imagefolder", data_dir=str(curated["out"]))
    assert {s: len(loaded[s]) for s in loaded} == summary["images_by_split"]
    assert set(summary["images_by_split"]) == {"train", "validation", "test"}
    for split in loaded:
        assert set(loaded[split]["split"]) == {split}
        assert sorted(loaded[split]["sha256"]) == sorted(r["sha256"] for r in curated["records"] if r["split"] == split)
    assert {"image", "text", "split", "labels", "patient_id"} <= set(loaded["train"].column_names)


def test_diffusers_scripts_pointed_at_the_training_folder_see_the_training_split_only(curated):
    import datasets

    # what diffusers' examples/text_to_image/train_text_to_image.py does with --train_data_dir
    train_data_dir = str(curated["out"] / "train")
    loaded = datasets.load_dataset("imagefolder", data_files={"train": os.path.join(train_data_dir, "**")})
    train = [r for r in curated["records"] if r["split"] == "train"]
    assert list(loaded) == ["train"] and len(loaded["train"]) == len(train)
    assert sorted(loaded["train"]["sha256"]) == sorted(r["sha256"] for r in train)
    assert set(loaded["train"]["split"]) == {"train"}


def test_a_dataset_without_its_completion_marker_or_with_a_torn_split_is_refused(curated, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(curated["out"], copy)
    lines = (copy / "train" / "metadata.jsonl").read_text().splitlines(keepends=True)
    (copy / "train" / "metadata.jsonl").write_text("".join(lines[:-3]))  # as if killed while writing
    with pytest.raises(DatasetError, match="metadata.jsonl holds"):
        read_records(copy)
    (copy / MARKER).unlink()
    with pytest.raises(DatasetError, match=MARKER):
        read_records(copy, "test")


def test_no_patient_in_two_splits_and_the_seed_decides_the_split(curated, tmp_path):
    assert patients_in_several_splits(curated["records"]) == []
    first = [(r["sha256"], r["split"]) for r in curated["result"].records]
    again = curate(EMBEDDED_MANIFESTS, curated["raw"], tmp_path / "same", size=32, seed=0, progress=False)
    assert [(r["sha256"], r["split"]) for r in again.records] == first
    other = curate(EMBEDDED_MANIFESTS, curated["raw"], tmp_path / "other", size=32, seed=1, progress=False)
    assert [r["split"] for r in other.records] != [split for _, split in first]
    assert patients_in_several_splits(other.records) == []


def test_held_out_patients_are_other_patients_in_validation_and_test_only(curated, tmp_path):
    """The downstream experiment's held-out set: the corpus's next patients of two sources, curated
    with validation and test splits only, prefixed pseudonyms, no image equal to a curated one."""
    from medsyn.data.split import patient_split

    kwargs = dict(patients=12, first_patient=8, corpus_size=64, size=32, seed=3, progress=False)
    result = curate_held_out(
        EMBEDDED_MANIFESTS, tmp_path / "raw_held_out", tmp_path / "held_out", ["chexpert", "kermany_oct"], **kwargs
    )
    records = read_records(tmp_path / "held_out")
    assert {r["source"] for r in records} == {"chexpert", "kermany_oct"}
    assert {r["split"] for r in records} == {"validation", "test"}
    assert all(r["patient_id"].startswith("held-out-") for r in records)
    assert not {r["sha256"] for r in records} & {r["sha256"] for r in curated["records"]}
    assert patients_in_several_splits(records) == []
    test = sum(r["split"] == "test" for r in records)
    assert 0.6 < test / len(records) < 0.9  # three quarters by patient
    accounting = check_accounting(tmp_path / "raw_held_out", tmp_path / "held_out")
    assert not accounting["missing"] and not accounting["unknown"]
    assert result.summary["images_out"] == len(records)
    # a rerun reuses the raw corpus it wrote; one asking for other patients is refused
    curate_held_out(
        EMBEDDED_MANIFESTS, tmp_path / "raw_held_out", tmp_path / "held_out2", ["chexpert", "kermany_oct"], **kwargs
    )
    assert [r["sha256"] for r in read_records(tmp_path / "held_out2")] == [r["sha256"] for r in records]
    with pytest.raises(ValueError, match="another held-out corpus"):
        curate_held_out(EMBEDDED_MANIFESTS, tmp_path / "raw_held_out", tmp_path / "held_out3", ["chexpert"], **kwargs)
    with pytest.raises(ValueError, match="without a manifest"):
        curate_held_out(EMBEDDED_MANIFESTS, tmp_path / "other", tmp_path / "held_out4", ["mimic"], **kwargs)
    # a split whose fraction is 0 gets no patient, even when the others overshoot their targets
    sizes = {f"p{i}": 1 + i % 3 for i in range(50)}
    assert "train" not in set(patient_split(sizes, (0.0, 0.25, 0.75), seed=1).values())


def test_no_dicom_identifier_reaches_the_output(curated):
    phi = [value for value in curated["truth"]["phi"] if len(value) >= 4]
    assert len(phi) >= 4 * 8
    for path in curated["out"].rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            for value in phi:
                assert value.encode() not in data, f"{value} found in {path.name}"
    patient_ids = {r["patient_id"] for r in curated["records"] if r["source"] == "rsna_pe"}
    assert all(p.startswith("rsna_pe-") for p in patient_ids)


def _folder_by_class_raw(tmp_path: Path) -> Path:
    """A user's folder-per-class directory mixing real DICOM (CT, MR, MONOCHROME1 CR), PNG and junk."""
    raw = tmp_path / "raw"
    (raw / "ct").mkdir(parents=True)
    (raw / "mr").mkdir()
    (raw / "radiograph").mkdir()
    shutil.copy(pydicom_file("CT_small.dcm"), raw / "ct" / "CT_small.dcm")
    shutil.copy(pydicom_file("eCT_Supplemental.dcm"), raw / "ct" / "IMG0002")  # no suffix: sniffed
    shutil.copy(pydicom_file("MR_small.dcm"), raw / "mr" / "MR_small.dcm")
    shutil.copy(pydicom_file("MR_truncated.dcm"), raw / "mr" / "MR_truncated.dcm")
    shutil.copy(pydicom_file("rtplan.dcm"), raw / "mr" / "rtplan.dcm")
    shutil.copy(pydicom_file("RG1_UNCI.dcm"), raw / "radiograph" / "RG1_UNCI.dcm")
    Image.fromarray(np.tile(np.arange(128, dtype=np.uint8), (96, 1))).save(raw / "radiograph" / "gradient.png")
    (raw / "radiograph" / "readme.txt").write_text("acquired 2021")
    (raw / "stray.jpg").write_bytes(b"\xff\xd8\xff")
    return raw


def test_folder_by_class_on_real_dicom(tmp_path):
    raw = _folder_by_class_raw(tmp_path)
    result = curate([MANIFESTS_DIR / "folder_by_class.yaml"], raw, tmp_path / "out", size=128, progress=False)
    by_file = {r["source_file"]: r for r in result.records}
    reasons = {(r.source_file, r.reason) for r in result.rejections}
    assert {
        ("mr/MR_truncated.dcm", "unreadable"),
        ("mr/rtplan.dcm", "no_pixel_data"),
        ("radiograph/readme.txt", "not_an_image"),
        ("stray.jpg", "unclaimed"),
    } <= reasons
    assert set(by_file) == {
        "ct/CT_small.dcm",
        "ct/IMG0002",
        "mr/MR_small.dcm",
        "radiograph/RG1_UNCI.dcm",
        "radiograph/gradient.png",
    }
    assert by_file["ct/CT_small.dcm"]["labels"] == ["ct"]
    assert by_file["ct/CT_small.dcm"]["text"] == "Medical image showing ct."

    # CT_small is 128 x 128, so at size 128 the written pixels are exactly the 700/100 HU window
    hu = read_dicom(pydicom_file("CT_small.dcm"))
    expected = np.clip((hu - (100 - 350)) / 700, 0, 1) * 255
    written = np.asarray(Image.open(image_path(tmp_path / "out", by_file["ct/CT_small.dcm"])))
    assert np.abs(written.astype(float) - expected).max() <= 0.5 + 1e-9
    np.testing.assert_array_equal(written, hounsfield_window(hu))

    # no identifier from any DICOM header reaches the output tree
    phi = set()
    for path in raw.rglob("*"):
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:
            continue
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            value = str(ds.get(keyword, "")).strip()
            if len(value) >= 3:
                phi.add(value)
    assert {"1CT1", "9RG1", "4MR1"} <= phi
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert not [v for v in phi if v.encode() in data], path.name


def test_curate_command_line(tmp_path):
    raw = _folder_by_class_raw(tmp_path)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "medsyn",
            "curate",
            "--manifest",
            "folder_by_class",
            "--raw",
            str(raw),
            "--out",
            str(tmp_path / "out"),
            "--size",
            "64",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    summary = json.loads(run.stdout)
    assert summary["files_in"] == 9 and summary["images_out"] == 5  # the 2-frame eCT gives its middle frame only
    assert (tmp_path / "out" / "rejected.csv").is_file()
    import datasets  # a user's folder loads with its splits too

    loaded = datasets.load_dataset("imagefolder", data_dir=str(tmp_path / "out"))
    assert {split: len(loaded[split]) for split in loaded} == summary["images_by_split"]


def _tree(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_rerun_replaces_an_earlier_curation_and_refuses_foreign_folders(curated, tmp_path):
    out = tmp_path / "out"
    curate(EMBEDDED_MANIFESTS[:1], curated["raw"], out, size=16, progress=False)
    first = set(out.rglob("*.png"))
    curate(EMBEDDED_MANIFESTS[:1], curated["raw"], out, size=24, progress=False)
    assert first and not first & set(out.rglob("*.png"))  # no stale image of the earlier run
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # nothing left beside it
    (out / "notes.txt").write_text("mine")
    before = _tree(out)
    with pytest.raises(FileExistsError, match="notes.txt"):
        curate(EMBEDDED_MANIFESTS[:1], curated["raw"], out, size=24, progress=False)
    assert _tree(out) == before


def test_curation_never_deletes_what_it_did_not_write(tmp_path):
    # the fault audit's case: raw images inside the output folder
    base = tmp_path / "X"
    raw = _folder_by_class_raw(base / "images")
    untouched = _tree(base)
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "medsyn",
            "curate",
            "--manifest",
            "folder_by_class",
            "--raw",
            str(raw),
            "--out",
            str(base),
            "--size",
            "32",
            "--no-progress",
        ],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 2 and "lies inside the output directory" in run.stderr
    assert _tree(base) == untouched
    # an output inside the raw folder, and a Hugging Face imagefolder that medsyn did not write
    with pytest.raises(FileExistsError, match="inside the raw directory"):
        curate([MANIFESTS_DIR / "folder_by_class.yaml"], raw, raw / "curated", size=32, progress=False)
    foreign = tmp_path / "someone_elses_dataset"
    (foreign / "train").mkdir(parents=True)
    (foreign / "train" / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a"}\n')
    (foreign / "train" / "a.png").write_bytes(b"not ours")
    before = _tree(foreign)
    with pytest.raises(FileExistsError, match="not an earlier curation"):
        curate([MANIFESTS_DIR / "folder_by_class.yaml"], raw, foreign, size=32, progress=False)
    assert _tree(foreign) == before
    assert _tree(base) == untouched  # the raw folder too, and no curated/ was made inside it


def test_corpus_is_deterministic(tmp_path):
    from medsyn.data.corpus import write_corpus

    write_corpus(tmp_path / "a", patients=4, seed=5, size=32, sources=("ham10000", "brats"), progress=False)
    write_corpus(tmp_path / "b", patients=4, seed=5, size=32, sources=("ham10000", "brats"), progress=False)
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*") if p.is_file())
    assert files and all(
        (tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes()
        for f in files
        if not f.name.endswith(".nii.gz")
    )  # gzip headers carry a time stamp
    import nibabel as nib

    for f in files:
        if f.name.endswith(".nii.gz"):
            np.testing.assert_array_equal(
                nib.load(tmp_path / "a" / f).get_fdata(), nib.load(tmp_path / "b" / f).get_fdata()
            )


def _bad_files_raw(tmp_path: Path) -> Path:
    """Good images plus each kind of bad input of the fault audit, in one folder-per-class tree."""
    raw = _folder_by_class_raw(tmp_path)
    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (48, 48), dtype=np.uint8)).save(raw / "radiograph" / "noise.png")
    # a PNG whose header claims 100000 x 100000 pixels
    png = (raw / "radiograph" / "noise.png").read_bytes()
    header = (100000).to_bytes(4, "big") * 2 + png[24:29]  # width, height, then depth, colour type, ...
    crc = zlib.crc32(b"IHDR" + header).to_bytes(4, "big")
    (raw / "radiograph" / "bomb.png").write_bytes(png[:16] + header + crc + png[33:])
    # a DICOM whose window width is 0
    ds = pydicom.dcmread(pydicom_file("MR_small.dcm"))
    ds.WindowCenter, ds.WindowWidth = 600, 0
    ds.save_as(raw / "mr" / "zero_window.dcm")
    # a file name that is not UTF-8
    os.rename(os.fsencode(raw / "radiograph" / "gradient.png"), os.fsencode(raw / "radiograph") + b"/gradient-\xff.png")
    # 12-bit data in a 16-bit PNG
    twelve = np.tile(np.linspace(0, 4095, 64)[:, None], (1, 64)).astype(np.uint16)  # vertical: not the gradient above
    Image.fromarray(twelve).save(raw / "radiograph" / "twelve_bit.png")
    # links: dangling, a loop, a link to a folder; and a folder nobody may read
    os.symlink(raw / "nowhere.png", raw / "radiograph" / "dangling.png")
    os.symlink(raw / "radiograph" / "loop_b.png", raw / "radiograph" / "loop_a.png")
    os.symlink(raw / "radiograph" / "loop_a.png", raw / "radiograph" / "loop_b.png")
    os.symlink(raw / "mr", raw / "radiograph" / "mr_again")
    return raw


def test_every_bad_file_becomes_a_recorded_rejection_and_the_run_completes(tmp_path):
    raw = _bad_files_raw(tmp_path)
    result = curate([MANIFESTS_DIR / "folder_by_class.yaml"], raw, tmp_path / "out", size=64, progress=False)
    reasons = {(r.source_file, r.reason) for r in result.rejections}
    assert {
        ("radiograph/bomb.png", "decompression_bomb"),
        ("mr/zero_window.dcm", "impossible_window"),
        ("radiograph/dangling.png", "broken_link"),
        ("radiograph/loop_a.png", "broken_link"),
        ("radiograph/loop_b.png", "broken_link"),
        ("radiograph/mr_again", "linked_folder"),
    } <= reasons
    kept = {r["source_file"]: r for r in result.records}
    assert "radiograph/gradient-\\xff.png" in kept  # the name kept, escaped
    # counts in = counts out + counts rejected, and the written files agree
    summary = result.summary
    assert (
        summary["files_in"] + summary["entries_not_files"]
        == summary["files_with_images"] + summary["files_only_rejected"]
    )
    rejected = _rejected(tmp_path / "out")
    assert {r["source_file"] for r in rejected} | set(kept) >= {"radiograph/gradient-\\xff.png", "radiograph/bomb.png"}
    accounting = check_accounting(raw, tmp_path / "out")
    assert accounting["missing"] == [] and accounting["unknown"] == []
    # the 12-bit image is scaled by its 12 bits, not left nearly black
    twelve = np.asarray(Image.open(image_path(tmp_path / "out", kept["radiograph/twelve_bit.png"])))
    assert twelve.max() == 255 and twelve.min() == 0


def test_high_bit_depth_images_are_scaled_by_the_bits_their_data_use():
    from medsyn.data.readers import high_bit_depth_to_uint8

    twelve = np.array([[0, 2048, 4095]], dtype=np.uint16)
    assert high_bit_depth_to_uint8(twelve).tolist() == [[0, 128, 255]]
    sixteen = np.array([[0, 65535]], dtype=np.uint16)
    assert high_bit_depth_to_uint8(sixteen).tolist() == [[0, 255]]
    assert high_bit_depth_to_uint8(np.array([[0, 200]], dtype=np.uint16)).tolist() == [[0, 200]]  # 8-bit data


def test_unreadable_files_and_folders_are_rejections(tmp_path, monkeypatch):
    """What a user without read permission meets (simulated, since the tests may run as root, who
    reads everything): a file without a suffix that cannot be opened, and a folder that cannot be listed."""
    import medsyn.data.curate as curation

    raw = _folder_by_class_raw(tmp_path)
    (raw / "locked").mkdir()
    (raw / "locked" / "a.png").write_bytes(b"x")
    sniff, scandir = curation.sniff_format, os.scandir

    def sniff_unless_locked(path):
        if Path(path).name == "IMG0002":
            raise PermissionError(13, "Permission denied", str(path))
        return sniff(path)

    def scandir_unless_locked(path="."):
        if isinstance(path, str | os.PathLike) and Path(path).name == "locked":  # (rmtree passes descriptors)
            raise PermissionError(13, "Permission denied", str(path))
        return scandir(path)

    monkeypatch.setattr(curation, "sniff_format", sniff_unless_locked)
    monkeypatch.setattr(os, "scandir", scandir_unless_locked)
    result = curate([MANIFESTS_DIR / "folder_by_class.yaml"], raw, tmp_path / "out", size=64, progress=False)
    reasons = {(r.source_file, r.reason) for r in result.rejections}
    assert {("ct/IMG0002", "unreadable"), ("locked/", "unreadable_folder")} <= reasons


def test_an_interrupted_curation_leaves_the_previous_dataset(curated, tmp_path, monkeypatch):
    """A failure at each stage of a re-curation (writing images, splitting, writing the records, the
    rejections, the swap) leaves the earlier dataset as it was."""
    import medsyn.data.curate as curation

    out = tmp_path / "out"
    curate(EMBEDDED_MANIFESTS[:2], curated["raw"], out, size=16, progress=False)
    before = _tree(out)

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed")

    for stage in ("_write_png", "_assign_splits", "write_records", "_write_rejections", "_swap_in"):
        with monkeypatch.context() as patch:
            patch.setattr(curation, stage, killed)
            with pytest.raises(KeyboardInterrupt):
                curate(EMBEDDED_MANIFESTS[:2], curated["raw"], out, size=24, progress=False)
        assert _tree(out) == before, stage
    curate(EMBEDDED_MANIFESTS[:2], curated["raw"], out, size=24, progress=False)  # and the next run completes
    assert Image.open(image_path(out, read_records(out)[0])).size == (24, 24)


def test_a_curation_killed_with_sigkill_leaves_a_complete_dataset_or_one_that_is_refused(curated, tmp_path):
    import signal
    import time

    out = tmp_path / "out"
    curate(EMBEDDED_MANIFESTS[:3], curated["raw"], out, size=16, progress=False)
    before = read_records(out)
    script = (
        "from medsyn.data.curate import curate; from conftest import EMBEDDED_MANIFESTS; "
        f"curate(EMBEDDED_MANIFESTS[:3], {str(curated['raw'])!r}, {str(out)!r}, size=24, progress=False)"
    )
    for delay in (1.0, 3.0):
        process = subprocess.Popen([sys.executable, "-c", script], cwd=Path(__file__).parent)
        time.sleep(delay)
        process.send_signal(signal.SIGKILL)
        process.wait()
        try:
            records = read_records(out)
        except DatasetError as error:
            assert MARKER in str(error)
            continue
        assert records == before or Image.open(image_path(out, records[0])).size == (24, 24)
        assert all(image_path(out, r).is_file() for r in records)
