import subprocess
import sys

import pytest
import yaml

from medsyn.data.manifest import ManifestError, load_manifest, validate_manifest
from medsyn.paths import MANIFESTS_DIR

REQUIRED_SOURCES = [
    "kvasir_vqa",
    "kvasir_v2",
    "roco_v2",
    "mimic_cxr_jpg",
    "chexpert",
    "rsna_pe",
    "brats",
    "ham10000",
    "isic_2019",
    "kermany_oct",
    "fundus_odir",
    "pcam",
    "camelyon16",
    "cholec80",
    "sar_rarp50",
    "folder_by_class",
]


@pytest.mark.parametrize("name", REQUIRED_SOURCES)
def test_manifest_validates_and_describes_the_source(name):
    manifest = load_manifest(MANIFESTS_DIR / f"{name}.yaml")
    assert manifest["name"] == name
    assert manifest["access"] in {"open", "registration", "credentialed"}
    for field in ("home_page", "licence", "reader", "labels", "patient_id", "caption", "preprocessing", "split"):
        assert manifest[field], field


def _ham10000() -> dict:
    return yaml.safe_load((MANIFESTS_DIR / "ham10000.yaml").read_text())


def test_misspelled_top_level_field_is_named_with_a_suggestion():
    manifest = _ham10000()
    manifest["captoin"] = manifest.pop("caption")
    with pytest.raises(ManifestError) as err:
        validate_manifest(manifest, "ham.yaml")
    assert "'captoin'" in str(err.value) and "did you mean 'caption'" in str(err.value)
    assert "'caption' is a required property" in str(err.value)


def test_misspelled_nested_field_is_named_with_its_path():
    manifest = _ham10000()
    manifest["labels"]["colunm"] = manifest["labels"].pop("column")
    with pytest.raises(ManifestError, match=r"labels\.colunm.*did you mean 'column'"):
        validate_manifest(manifest, "ham.yaml")


def test_wrong_value_is_named():
    manifest = _ham10000()
    manifest["access"] = "public"
    with pytest.raises(ManifestError, match=r"field 'access': 'public' is not one of"):
        validate_manifest(manifest, "ham.yaml")


def test_inconsistent_options_are_named():
    manifest = _ham10000()
    del manifest["table"]
    with pytest.raises(ManifestError, match="field 'table' is required"):
        validate_manifest(manifest, "ham.yaml")
    manifest = _ham10000()
    manifest["split"]["fractions"] = [0.8, 0.1, 0.2]
    with pytest.raises(ManifestError, match="must sum to 1"):
        validate_manifest(manifest, "ham.yaml")


def test_cli_exits_non_zero_naming_the_misspelled_field(tmp_path):
    manifest = _ham10000()
    manifest["reader"]["inclde"] = manifest["reader"].pop("include")
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump(manifest))
    (tmp_path / "raw").mkdir()
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "medsyn",
            "curate",
            "--manifest",
            str(bad),
            "--raw",
            str(tmp_path / "raw"),
            "--out",
            str(tmp_path / "out"),
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0
    assert "reader.inclde" in run.stderr and "did you mean 'include'" in run.stderr
    assert not (tmp_path / "out").exists()
