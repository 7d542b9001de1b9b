"""Captions written by a vision-language model (Med-Art): a tiny LLaVA of the real architecture,
saved with `save_pretrained`, captions every curated image through transformers' auto classes;
descriptions that say nothing, repeat themselves, name another class or hold an identifier are
refused and the template kept; the cache spares the model a second look; no DICOM identifier
reaches the model or the output."""

import json
import time

import pydicom
import pytest
from test_curate import _folder_by_class_raw
from tiny_models import save_tiny_vlm

from medsyn.data.captions import combine_caption, refuse_description, refuse_identifiers
from medsyn.data.curate import curate
from medsyn.data.dataset import class_prompts, read_records
from medsyn.models.captioner import VLMCaptioner
from medsyn.paths import MANIFESTS_DIR

FOLDERS = [MANIFESTS_DIR / "folder_by_class.yaml"]


def test_a_description_is_refused_when_it_says_nothing_repeats_names_another_class_or_an_identifier():
    others = {"mr", "pleural effusion", "no finding"}
    assert refuse_description("A bright oval region with smooth edges.", ["ct"], others) is None
    assert refuse_description("", ["ct"], others) == "empty"
    assert refuse_description("grey .", ["ct"], others) == "empty"
    assert refuse_description("a bright area a bright area a bright area", ["ct"], others) == "repeats"
    assert refuse_description("dark dark dark dark dark dark light light", ["ct"], others) == "repeats"
    assert refuse_description("A small pleural effusion on the left.", ["ct"], others) == "names_another_class"
    assert refuse_description("Looks like an MR slice.", ["ct"], others) == "names_another_class"
    assert refuse_description("Smooth regions and an mri-like texture.", ["ct"], others) is None  # whole words only
    # a label that is part of the image's own labels is not "another class"
    assert refuse_description("Fluid in the pleural space: effusion.", ["pleural effusion"], {"effusion"}) is None
    assert refuse_identifiers("Grey disc, patient 1CT1 at the top.", {"1CT1"}) == "identifier"
    assert refuse_identifiers("Label 20190514 in a corner.", set()) == "identifier"
    assert refuse_identifiers("Text 05/14/19 in a corner.", set()) == "identifier"
    assert refuse_identifiers("Two bright round shapes.", {"1CT1", "ab"}) is None
    assert combine_caption("Medical image showing ct.", "a bright oval region") == (
        "Medical image showing ct. A bright oval region."
    )


def _dicom_identifiers(raw) -> set[str]:
    values = set()
    for path in raw.rglob("*"):
        try:
            ds = pydicom.dcmread(path, force=True, stop_before_pixels=True)
        except Exception:  # noqa: BLE001 - not every file is DICOM
            continue
        for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
            value = str(ds.get(keyword, "")).strip()
            if len(value) >= 3:
                values.add(value)
    return values


class _Recording:
    """Forwards to a processor and keeps every text it was given."""

    def __init__(self, processor):
        self.processor, self.texts = processor, []

    def __call__(self, *args, **kwargs):
        self.texts += list(kwargs.get("text", []))
        return self.processor(*args, **kwargs)

    def __getattr__(self, name):
        return getattr(self.processor, name)


def test_a_tiny_llava_captions_every_image_and_the_cache_spares_a_second_look(tmp_path):
    raw = _folder_by_class_raw(tmp_path)
    model = save_tiny_vlm(tmp_path / "vlm", ["a", "bright", "ct", "shape", "."])
    captioner = VLMCaptioner(model, batch_size=2)
    captioner.processor = _Recording(captioner.processor)
    cache = tmp_path / "captions.jsonl"
    result = curate(FOLDERS, raw, tmp_path / "out", size=32, progress=False, captioner=captioner, caption_cache=cache)
    records = read_records(tmp_path / "out")
    assert len(records) == len(result.records) == 5 and captioner.calls == 3  # 5 images, 2 per call
    for record in records:
        assert all(label in record["text"] for label in record["labels"])  # the class stays in the caption
        assert record["text"].startswith(record["class_text"])
        if record["labels"] == ["ct"]:
            assert (
                record["caption_source"] == "vlm" and record["text"] == "Medical image showing ct. A bright ct shape."
            )
        else:  # "ct" names another class for an MR or a radiograph: the template is kept, with the reason
            assert record["caption_source"] == "template" and record["text"] == record["class_text"]
            assert "names another class" in record["caption_note"]
    assert result.summary["captions"]["vlm"] == 2 and result.summary["captions"]["template"] == {
        "names_another_class": 3
    }
    assert class_prompts(records) == {  # the class prompts stay the templates
        "folder_by_class: ct": "Medical image showing ct.",
        "folder_by_class: mr": "Medical image showing mr.",
        "folder_by_class: radiograph": "Medical image showing radiograph.",
    }
    # the model saw pixels and an instruction built from the image type: no identifier, no file name
    identifiers = _dicom_identifiers(raw)
    assert {"1CT1", "4MR1"} <= identifiers
    assert captioner.processor.texts and not [
        t for t in captioner.processor.texts for v in identifiers | {"CT_small", "MR_small", "RG1_UNCI"} if v in t
    ]
    assert all("medical image" in t for t in captioner.processor.texts)

    # a rerun (a new captioner on the same model and cache) asks the model nothing
    again = VLMCaptioner(model, batch_size=2)
    rerun = curate(FOLDERS, raw, tmp_path / "out", size=32, progress=False, captioner=again, caption_cache=cache)
    assert again.calls == 0 and rerun.summary["captions"]["cached"] == 5
    assert [r["text"] for r in read_records(tmp_path / "out")] == [r["text"] for r in records]
    assert len(cache.read_text().splitlines()) == 5


def test_a_description_holding_a_patient_identifier_never_reaches_a_file(tmp_path):
    raw = _folder_by_class_raw(tmp_path)
    identifiers = _dicom_identifiers(raw)
    model = save_tiny_vlm(tmp_path / "vlm", ["a", "label", "reads", "1CT1", "."])  # CT_small's PatientID
    cache = tmp_path / "captions.jsonl"
    result = curate(
        FOLDERS, raw, tmp_path / "out", size=32, progress=False, captioner=VLMCaptioner(model), caption_cache=cache
    )
    assert result.summary["captions"]["template"] == {"identifier": 5}
    assert all(r["caption_source"] == "template" for r in read_records(tmp_path / "out"))
    assert all(json.loads(line)["description"] is None for line in cache.read_text().splitlines())
    for path in [*(tmp_path / "out").rglob("*"), cache]:
        if path.is_file():
            data = path.read_bytes()
            assert not [v for v in identifiers if v.encode() in data], path.name


def test_without_the_model_directory_the_error_names_it_at_once(tmp_path):
    began = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere" / "config.json")):
        VLMCaptioner(tmp_path / "nowhere")
    assert time.perf_counter() - began < 1.0
    # template captions touch nothing of a vision-language model
    result = curate(FOLDERS, _folder_by_class_raw(tmp_path), tmp_path / "out", size=32, progress=False)
    assert result.summary["captions"] == {"source": "template"}
    assert {r["caption_source"] for r in read_records(tmp_path / "out")} == {"template"}
