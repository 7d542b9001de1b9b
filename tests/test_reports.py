"""Anatomy-pathology reports (arXiv 2403.06835): every embedded source names a vocabulary, so every
curated image carries a report built from its labels, and each class's report is its own (Kvasir's
three normal landmarks included). A language model from a local directory rewrites the reports; a
rewrite that leaves a finding out, names another class or holds an identifier is refused and the
template kept, with the reason; the cache spares the model a second call; no DICOM identifier reaches
the model or a report."""

import json
from collections import defaultdict

import pytest
from conftest import EMBEDDED_MANIFESTS
from test_vlm_captions import _dicom_identifiers
from tiny_models import save_tiny_llm

from medsyn.data.captions import llm_reports, load_vocabulary, names_every_finding, report_prompt, source_vocabulary
from medsyn.data.corpus import write_corpus
from medsyn.data.curate import curate
from medsyn.data.dataset import class_key, read_records
from medsyn.data.manifest import ManifestError
from medsyn.models.report_writer import ReportWriter
from medsyn.paths import VOCABULARIES_DIR


def test_every_embedded_class_has_a_report_of_its_own_from_its_vocabulary(curated):
    reports = defaultdict(set)
    for record in curated["records"]:
        assert record["report_source"] == "vocabulary", record["source"]
        assert record["report"] == report_prompt(record["labels"], source_vocabulary(record["source"]))
        reports[class_key(record)].add(record["report"])
    assert all(len(texts) == 1 for texts in reports.values())  # a class's report depends on its labels
    by_text = defaultdict(list)
    for key, texts in reports.items():
        by_text[next(iter(texts))].append(key)
    assert [keys for keys in by_text.values() if len(keys) > 1] == []  # and no two classes share one
    cecum = next(iter(reports["kvasir_v2: normal cecum"]))
    assert cecum.startswith("Colonoscopy. Anatomy: cecum. Pathology: none.")
    assert len(reports) == 22


def test_a_vocabulary_with_a_normal_term_in_an_unknown_anatomy_is_refused(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text(
        "name: bad\nimage_type: colonoscopy\nanatomy: {colon: {}}\n"
        "normal: {normal cecum: {anatomy: cecum}}\npathology: {polyp: {anatomy: colon}}\n"
    )
    with pytest.raises(ManifestError, match="normal term 'normal cecum' names unknown anatomy 'cecum'"):
        load_vocabulary(path)


def test_a_rewrite_must_name_every_finding_by_its_term_or_a_synonym():
    vocabulary = load_vocabulary(VOCABULARIES_DIR / "chest_xray.yaml")
    assert names_every_finding("The heart is an enlarged heart.", ["cardiomegaly"], vocabulary)
    assert names_every_finding("Cardiomegaly and a small effusion.", ["cardiomegaly", "pleural effusion"], vocabulary)
    assert not names_every_finding("The heart is large.", ["cardiomegaly"], vocabulary)
    assert not names_every_finding("Cardiomegaly.", ["cardiomegaly", "pleural effusion"], vocabulary)
    assert names_every_finding("Clear lungs.", ["no finding"], vocabulary)  # a normal term needs no mention


class _Writer:
    """Answers each template with a planned text and counts what it was asked."""

    def __init__(self, answer, variants: int = 1):
        self.answer, self.variants, self.batch_size, self.asked = answer, variants, 4, []
        self.model_id = "planned@0"

    def write(self, reports, image_types, variant=0):
        self.asked += [(report, variant) for report in reports]
        return [self.answer(report, variant) for report in reports]


def _records(labels_by_source: dict[str, list[list[str]]]) -> list[dict]:
    records = []
    for source, label_sets in labels_by_source.items():
        vocabulary = source_vocabulary(source)
        for i, labels in enumerate(label_sets):
            records.append(
                {
                    "source": source,
                    "labels": labels,
                    "image_type": vocabulary["image_type"],
                    "sha256": f"{len(records):08x}{i:056x}",
                    "report": report_prompt(labels, vocabulary),
                    "report_source": "vocabulary",
                    "report_note": "",
                }
            )
    return records


def test_rewrites_are_asked_once_per_template_refused_with_reasons_and_cached(tmp_path):
    records = _records(
        {
            "chexpert": [["cardiomegaly"]] * 3 + [["pleural effusion"]] * 2 + [["no finding"]],
            "rsna_pe": [["pulmonary embolism"]] * 2,
        }
    )
    answers = {
        "cardiomegaly": "The heart is an enlarged heart.",  # accepted (a synonym)
        "pleural effusion": "Blunted angle, no fluid named.",  # leaves its finding out
        "no finding": "Normal chest; no pleural effusion.",  # names another class
        "pulmonary embolism": "Pulmonary embolism seen on 12/03/2019.",  # a date
    }

    def answer(report, variant):
        if "Pathology: none" in report:
            return answers["no finding"]
        return next(text for label, text in answers.items() if f"Pathology: {label}" in report)

    vocabularies = {"chexpert": source_vocabulary("chexpert"), "rsna_pe": source_vocabulary("rsna_pe")}
    writer = _Writer(answer)
    counts = llm_reports(records, writer, tmp_path / "reports.jsonl", vocabularies, set(), progress=False)
    assert len(writer.asked) == 4  # four distinct templates, each asked once
    assert counts["written"] == 4 and counts["cached"] == 0 and counts["llm"] == 3
    assert counts["template"] == {"drops_finding": 2, "identifier": 2, "names_another_class": 1}
    for record in records:
        if record["labels"] == ["cardiomegaly"]:
            assert record["report"] == answers["cardiomegaly"] and record["report_source"] == "llm"
        else:
            assert record["report_source"] == "vocabulary" and record["report"].startswith(
                record["image_type"][0].upper()
            )
            assert record["report_note"].startswith("llm report refused: ")
    assert "2019" not in (tmp_path / "reports.jsonl").read_text()  # refused before it was cached

    again = _records({"chexpert": [["cardiomegaly"]] * 2, "rsna_pe": [["pulmonary embolism"]]})
    writer = _Writer(answer)
    counts = llm_reports(again, writer, tmp_path / "reports.jsonl", vocabularies, set(), progress=False)
    assert writer.asked == [] and counts["cached"] == 2 and counts["llm"] == 2


def test_variants_are_picked_by_the_image_hash_and_asked_once_each(tmp_path):
    records = _records({"chexpert": [["cardiomegaly"]] * 40})
    template = records[0]["report"]
    writer = _Writer(lambda report, variant: f"Cardiomegaly, variant number {'abc'[variant]}.", variants=3)
    llm_reports(records, writer, tmp_path / "reports.jsonl", {"chexpert": source_vocabulary("chexpert")}, set(), False)
    assert sorted(writer.asked) == [(template, variant) for variant in range(3)]
    assert {record["report"] for record in records} == {f"Cardiomegaly, variant number {c}." for c in "abc"}


def test_a_tiny_llama_rewrites_the_reports_of_a_curation_and_its_cache_spares_a_second_call(tmp_path):
    raw = tmp_path / "raw"
    write_corpus(raw, patients=4, seed=2, size=64, sources=("camelyon16", "rsna_pe"), progress=False)
    words = ["Sheets", "of", "metastatic", "carcinoma", "fill", "the", "node", "."]
    model = save_tiny_llm(tmp_path / "llm", words, prompt_words=["Rewrite", "this", "report"])
    writer = ReportWriter(model, batch_size=2)
    asked = []
    write = writer.write
    writer.write = lambda reports, kinds, variant=0: asked.extend(reports) or write(reports, kinds, variant)
    manifests = [m for m in EMBEDDED_MANIFESTS if m.stem in ("camelyon16", "rsna_pe")]
    cache = tmp_path / "reports.jsonl"
    result = curate(manifests, raw, tmp_path / "out", size=32, progress=False, report_writer=writer, report_cache=cache)
    records = read_records(tmp_path / "out")
    by_class = defaultdict(set)
    for record in records:
        by_class[(class_key(record), record["report_source"], record["report_note"])].add(record["report"])
    assert by_class[("camelyon16: metastatic carcinoma", "llm", "")] == {
        "Sheets of metastatic carcinoma fill the node."
    }
    refused = "llm report refused: names another class than the image's labels"
    assert len(by_class[("camelyon16: normal lymph node", "vocabulary", refused)]) == 1
    assert len(by_class[("rsna_pe: no pulmonary embolism", "vocabulary", refused)]) == 1
    assert len(by_class[("rsna_pe: pulmonary embolism", "vocabulary", refused)]) == 1
    assert result.summary["reports"]["llm"] == sum(r["report_source"] == "llm" for r in records) > 0
    assert len(asked) == 4 and writer.calls == 2  # four templates in batches of two
    written = [path.read_text() for path in sorted((tmp_path / "out").glob("*/metadata.jsonl"))]
    text = "\n".join([*asked, *written, cache.read_text()])
    assert _dicom_identifiers(raw)  # RSNA PE's DICOM headers carry some
    assert not [value for value in _dicom_identifiers(raw) if value in text]

    curate(manifests, raw, tmp_path / "out", size=32, progress=False, report_writer=writer, report_cache=cache)
    assert writer.calls == 2  # every rewrite came from the cache
    assert json.loads((tmp_path / "out" / "curation_summary.json").read_text())["reports"]["cached"] == 4


def test_a_missing_report_model_is_named_before_anything_loads(tmp_path):
    with pytest.raises(FileNotFoundError, match="language model for reports not found: .*config.json"):
        ReportWriter(tmp_path / "nowhere")
