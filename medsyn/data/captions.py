"""Captions from labels (MediSyn style: "Dermoscopy image showing melanoma."), captions that add a
vision-language model's description of the image (Med-Art), and the anatomy/pathology vocabularies
used for report-style prompts (arXiv 2403.06835)."""

import json
import os
import re
from pathlib import Path

import jsonschema
import yaml

from medsyn.data.manifest import ManifestError


def join_labels(labels: list[str]) -> str:
    """'a', 'a and b', 'a, b and c'."""
    if not labels:
        return ""
    if len(labels) == 1:
        return labels[0]
    return ", ".join(labels[:-1]) + " and " + labels[-1]


def caption_from_labels(labels: list[str], caption: dict, image_type: str) -> str:
    """Fill the manifest's caption template.

    Args:
        labels: vocabulary terms of the image, in order.
        caption: the manifest's `caption` block (`template`, optional `normal_template`, `normal_labels`).
        image_type: the manifest's image type, available to templates as {image_type}.

    Raises:
        ValueError: no labels, or a template naming an unknown field.
    """
    if not labels:
        raise ValueError("cannot caption an image without labels")
    normal = set(caption.get("normal_labels", []))
    use_normal = "normal_template" in caption and set(labels) <= normal
    template = caption["normal_template"] if use_normal else caption["template"]
    try:
        text = template.format(labels=join_labels(labels), image_type=image_type)
    except (KeyError, IndexError) as err:
        raise ValueError(f"caption template {template!r} uses an unknown field {err}") from err
    return text[0].upper() + text[1:]


# terms that each sit in an anatomy, with optional synonyms and a report sentence: pathologies, and
# normal terms that name what they show
TERMS_IN_ANATOMY = {
    "type": "object",
    "additionalProperties": {
        "type": "object",
        "additionalProperties": False,
        "required": ["anatomy"],
        "properties": {
            "anatomy": {"type": "string"},
            "synonyms": {"type": "array", "items": {"type": "string"}},
            "finding": {"type": "string"},
        },
    },
}

VOCABULARY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "image_type", "anatomy", "pathology"],
    "properties": {
        "name": {"type": "string"},
        "image_type": {"type": "string"},
        "normal": {
            "oneOf": [
                {"type": "array", "items": {"type": "string"}},
                TERMS_IN_ANATOMY,  # normal terms that name what they show (Kvasir's landmarks)
            ]
        },
        "anatomy": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"synonyms": {"type": "array", "items": {"type": "string"}}},
            },
        },
        "pathology": TERMS_IN_ANATOMY,
    },
}


def load_vocabulary(path: str | Path) -> dict:
    """Read an anatomy/pathology vocabulary (`data_manifests/vocabularies/<name>.yaml`).

    Format: `anatomy` maps each anatomical term to optional synonyms; `pathology` maps each finding
    to the anatomy it sits in, optional synonyms and a report sentence (`finding`); `normal` lists the
    terms that mean "nothing abnormal", or maps each to the anatomy it shows and a report sentence
    (where a source's normal classes are distinct landmarks, as Kvasir's are).

    Raises:
        ManifestError: a field outside the format, or a pathology or normal term pointing at an unknown
            anatomy.
    """
    path = Path(path)
    with open(path) as f:
        vocabulary = yaml.safe_load(f)
    errors = list(jsonschema.Draft202012Validator(VOCABULARY_SCHEMA).iter_errors(vocabulary))
    if errors:
        raise ManifestError(
            f"{path.name}: "
            + "; ".join(f"field '{'.'.join(map(str, e.absolute_path)) or '(top level)'}': {e.message}" for e in errors)
        )
    normal = vocabulary.get("normal", [])
    for kind, entries in (
        ("pathology", vocabulary["pathology"]),
        ("normal", normal if isinstance(normal, dict) else {}),
    ):
        for term, entry in entries.items():
            if entry["anatomy"] not in vocabulary["anatomy"]:
                raise ManifestError(f"{path.name}: {kind} term '{term}' names unknown anatomy '{entry['anatomy']}'")
    return vocabulary


def source_vocabulary(source: str) -> dict | None:
    """The vocabulary that medsyn's manifest of `source` names (`caption.vocabulary`), or None: no
    such manifest among `data_manifests/`, or one without a vocabulary."""
    from medsyn.paths import MANIFESTS_DIR, VOCABULARIES_DIR

    path = MANIFESTS_DIR / f"{source}.yaml"
    if not path.is_file():
        return None
    with open(path) as f:
        name = (yaml.safe_load(f).get("caption") or {}).get("vocabulary")
    return load_vocabulary(VOCABULARIES_DIR / f"{name}.yaml") if name else None


def vocabulary_phrases(vocabulary: dict) -> list[str]:
    """Every term a report of this vocabulary can name: anatomy, pathology and normal terms."""
    return sorted(set(vocabulary["anatomy"]) | vocabulary_terms(vocabulary))


def vocabulary_terms(vocabulary: dict) -> set[str]:
    """Every label a vocabulary allows: its pathologies and its normal terms."""
    return set(vocabulary["pathology"]) | set(vocabulary.get("normal", []))


def report_prompt(labels: list[str], vocabulary: dict) -> str:
    """Anatomy-pathology prompt in the style of arXiv 2403.06835: the anatomy involved, then each
    pathology with its location, then the report sentences.

    Example: "Chest X-ray. Anatomy: heart. Pathology: cardiomegaly (heart). Findings: The cardiac
    silhouette is enlarged." A normal term that names its anatomy gives "Colonoscopy. Anatomy: cecum.
    Pathology: none. Findings: Orange mucosa with ..."; other normal terms "... Anatomy: normal.
    Pathology: none. Findings: No abnormality."

    Args:
        labels: vocabulary terms.
        vocabulary: from `load_vocabulary`.

    Raises:
        ValueError: a label the vocabulary does not know.
    """
    unknown = [label for label in labels if label not in vocabulary_terms(vocabulary)]
    if unknown:
        raise ValueError(f"labels not in vocabulary '{vocabulary['name']}': {unknown}")
    findings = [label for label in labels if label in vocabulary["pathology"]]
    head = vocabulary["image_type"][0].upper() + vocabulary["image_type"][1:] + "."
    if not findings:
        normal = vocabulary.get("normal", [])
        shown = [normal[label] for label in labels if isinstance(normal, dict) and label in normal]
        if not shown:
            return f"{head} Anatomy: normal. Pathology: none. Findings: No abnormality."
        anatomy = list(dict.fromkeys(e["anatomy"] for e in shown))
        sentences = " ".join(e.get("finding", f"The {e['anatomy']} is normal.") for e in shown)
        return f"{head} Anatomy: {', '.join(anatomy)}. Pathology: none. Findings: {sentences}"
    entries = [vocabulary["pathology"][f] for f in findings]
    anatomy = list(dict.fromkeys(e["anatomy"] for e in entries))
    pathology = "; ".join(f"{f} ({e['anatomy']})" for f, e in zip(findings, entries))
    sentences = " ".join(e.get("finding", f"{f[0].upper() + f[1:]} is present.") for f, e in zip(findings, entries))
    return f"{head} Anatomy: {', '.join(anatomy)}. Pathology: {pathology}. Findings: {sentences}"


# ---------------------------------------------------------------- captions written by a vision-language model

# a description is refused (and the template kept) for one of these reasons
CAPTION_REFUSALS = {
    "empty": "says nothing (fewer than three words)",
    "repeats": "repeats itself",
    "names_another_class": "names another class than the image's labels",
    "identifier": "holds something that looks like an identifier (a patient key, a file's number, a date)",
}
DATE_OR_NUMBER = re.compile(r"\d{4,}|\d{1,2}[./-]\d{1,2}[./-]\d{2,4}")


def _words(text: str) -> list[str]:
    return re.findall(r"[a-z0-9']+", text.lower())


def _contains_phrase(text_words: list[str], phrase: str) -> bool:
    words = _words(phrase)
    return bool(words) and any(text_words[i : i + len(words)] == words for i in range(len(text_words) - len(words) + 1))


def refuse_identifiers(description: str, identifiers: set[str]) -> str | None:
    """'identifier' when the description holds one of `identifiers` (case-insensitive, as a word or
    inside one) or a run of four digits or a date; else None. Checked before a description is cached."""
    lower = description.lower()
    if DATE_OR_NUMBER.search(description) or any(i.lower() in lower for i in identifiers if len(i) >= 3):
        return "identifier"
    return None


def refuse_description(description: str, labels: list[str], other_labels: set[str]) -> str | None:
    """Why a description cannot join its image's caption (a key of `CAPTION_REFUSALS`), or None.

    Args:
        description: what the vision-language model said.
        labels: the image's labels (the ground truth).
        other_labels: every other class's label terms in the dataset; one of them in the description,
            as whole words and not part of the image's own labels, refuses it.
    """
    words = _words(description)
    if len([w for w in words if any(ch.isalpha() for ch in w)]) < 3:
        return "empty"
    trigrams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    if len(trigrams) != len(set(trigrams)) or (len(words) >= 8 and len(set(words)) < len(words) / 2):
        return "repeats"
    own = " ".join(labels).lower()
    if any(_contains_phrase(words, other) for other in other_labels if other.lower() not in own):
        return "names_another_class"
    return None


def combine_caption(template: str, description: str) -> str:
    """The label template first (the class stays in the caption), then the description as a sentence."""
    description = description.strip()
    description = description[0].upper() + description[1:]
    if description[-1] not in ".!?":
        description += "."
    return f"{template} {description}"


class CaptionCache:
    """Descriptions by (image sha256, model id), one JSON line each, appended as they come: a rerun,
    or a run that stopped half-way, asks the model only about images it has not described. A
    description holding an identifier is stored as refused, without its text."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.entries: dict[tuple[str, str], dict] = {}
        if self.path.exists():
            for line in self.path.read_text().splitlines():
                try:
                    entry = json.loads(line)
                    self.entries[(entry["sha256"], entry["model"])] = entry
                except (ValueError, KeyError, TypeError):
                    continue  # a torn last line: that image is described again

    def get(self, sha256: str, model: str) -> dict | None:
        return self.entries.get((sha256, model))

    def add(self, entries: list[dict]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path, "a") as f:
            for entry in entries:
                f.write(json.dumps(entry) + "\n")
                self.entries[(entry["sha256"], entry["model"])] = entry
            f.flush()
            os.fsync(f.fileno())


def vlm_captions(
    records: list[dict],
    dataset_dir: str | Path,
    captioner,
    cache_path: str | Path,
    identifiers: set[str],
    progress: bool = True,
) -> dict:
    """Give each record a caption that joins its label template and a vision-language model's
    description of its image (Med-Art); a refused description leaves the template, with the reason.

    Sets per record `text` (the caption), `caption_source` ('vlm' or 'template') and `caption_note`
    (why the template was kept, or ''). `class_text` (the label template) stays the class's prompt.

    Args:
        records: curated records whose images lie under `dataset_dir` (their `text` is the template).
        dataset_dir: the dataset (or the folder being built).
        captioner: an object with `model_id` and `describe(images, image_types) -> list[str]`
            (`medsyn.models.captioner.VLMCaptioner`); it sees the image and its image type, nothing else.
        cache_path: the `CaptionCache` file, outside the dataset (it outlives a rebuild).
        identifiers: strings that must never reach a caption (the curation's patient keys, the numbered
            parts of source paths); a description holding one is refused before it is cached.
        progress: show a progress bar.

    Returns:
        counts: `described` (new model outputs), `cached`, `vlm`, and `template` per refusal reason.
    """
    from tqdm.auto import tqdm

    from medsyn.data.dataset import image_path, load_rgb

    cache = CaptionCache(cache_path)
    model = captioner.model_id
    todo = {}
    for record in records:
        if cache.get(record["sha256"], model) is None:
            todo.setdefault(record["sha256"], record)
    pending = list(todo.values())
    batch = max(1, getattr(captioner, "batch_size", 8))
    with tqdm(total=len(pending), desc="captions (vlm)", unit="image", disable=not progress) as bar:
        for start in range(0, len(pending), batch):
            chunk = pending[start : start + batch]
            images = [load_rgb(image_path(dataset_dir, r)) for r in chunk]
            descriptions = captioner.describe(images, [r["image_type"] for r in chunk])
            entries = []
            for record, description in zip(chunk, descriptions, strict=True):
                refused = refuse_identifiers(description, identifiers)
                entries.append(
                    {
                        "sha256": record["sha256"],
                        "model": model,
                        "description": None if refused else description,
                        "refused": refused,
                    }
                )
            cache.add(entries)
            bar.update(len(chunk))
    all_labels = {label for record in records for label in record["labels"]}
    counts = {"described": len(pending), "cached": len({r["sha256"] for r in records}) - len(pending), "vlm": 0}
    refused_counts: dict[str, int] = {}
    for record in records:
        entry = cache.get(record["sha256"], model)
        reason = entry["refused"] or refuse_description(
            entry["description"], record["labels"], all_labels - set(record["labels"])
        )
        if reason is None:
            record["text"] = combine_caption(record["class_text"], entry["description"])
            record["caption_source"], record["caption_note"] = "vlm", ""
            counts["vlm"] += 1
        else:
            record["text"] = record["class_text"]
            record["caption_source"] = "template"
            record["caption_note"] = f"vlm description refused: {CAPTION_REFUSALS[reason]}"
            refused_counts[reason] = refused_counts.get(reason, 0) + 1
    counts["template"] = dict(sorted(refused_counts.items()))
    counts["model"] = model
    return counts


# ---------------------------------------------------------------- reports written by a language model

# a rewrite is refused (and the template report kept) for one of the caption reasons or this one
REPORT_REFUSALS = {**CAPTION_REFUSALS, "drops_finding": "leaves out one of the image's findings"}


def names_every_finding(text: str, labels: list[str], vocabulary: dict) -> bool:
    """Whether `text` names each pathology among `labels`, by its term or one of its synonyms (whole
    words); normal terms need no mention."""
    words = _words(text)
    for label in labels:
        entry = vocabulary["pathology"].get(label)
        if entry is not None and not any(_contains_phrase(words, n) for n in [label, *entry.get("synonyms", [])]):
            return False
    return True


def _report_key(template: str, variant: int) -> str:
    """The cache key of one rewrite: reports depend on the template report only, not on the image."""
    import hashlib

    return hashlib.sha256(f"{variant}|{template}".encode()).hexdigest()


def llm_reports(
    records: list[dict],
    writer,
    cache_path: str | Path,
    vocabularies: dict[str, dict | None],
    identifiers: set[str],
    progress: bool = True,
) -> dict:
    """Give each record whose source has a vocabulary a report that a language model rewrote from its
    template report (`report_prompt`); a refused rewrite leaves the template, with the reason.

    The model sees the template report and the image type only. Rewrites depend on the template alone,
    so the model is asked once per distinct template and variant (`writer.variants`; an image's hash
    picks its variant), and every answer is cached by (template, variant, model): a rerun asks nothing.

    Sets per record `report`, `report_source` ('llm', 'vocabulary' where the template is kept, or
    'caption' for a source without a vocabulary, left as it is) and `report_note` (why the template
    was kept, or ''). `class_report` (the template report) stays the class's report prompt.

    Args:
        records: curated records, with `report` from `report_prompt` and `report_source` 'vocabulary'.
        writer: an object with `model_id`, `variants` and `write(reports, image_types, variant) ->
            list[str]` (`medsyn.models.report_writer.ReportWriter`).
        cache_path: the cache file (a `CaptionCache`), outside the dataset (it outlives a rebuild).
        vocabularies: source name -> its vocabulary (`load_vocabulary`) or None.
        identifiers: strings that must never reach a report; a rewrite holding one, a run of four
            digits or a date is refused before it is cached.
        progress: show a progress bar.

    Returns:
        counts: `written` (new model outputs), `cached`, `llm`, and `template` per refusal reason.
    """
    from tqdm.auto import tqdm

    cache = CaptionCache(cache_path)
    model, variants = writer.model_id, max(1, int(getattr(writer, "variants", 1)))
    mine = [r for r in records if r["report_source"] == "vocabulary"]
    variant_of = [int(r["sha256"][:8], 16) % variants for r in mine]
    key_of = [_report_key(r["report"], variant) for r, variant in zip(mine, variant_of, strict=True)]
    # key -> (template, image type, variant), each distinct rewrite once
    asked = {key: (r["report"], r["image_type"], v) for r, key, v in zip(mine, key_of, variant_of, strict=True)}
    pending = {key: value for key, value in asked.items() if cache.get(key, model) is None}
    batch = max(1, getattr(writer, "batch_size", 8))
    with tqdm(total=len(pending), desc="reports (llm)", unit="report", disable=not progress) as bar:
        for variant in range(variants):
            keys = [key for key, value in pending.items() if value[2] == variant]
            for start in range(0, len(keys), batch):
                chunk = keys[start : start + batch]
                texts = writer.write([pending[k][0] for k in chunk], [pending[k][1] for k in chunk], variant)
                cache.add(
                    [
                        {"sha256": key, "model": model, "description": None if refused else text, "refused": refused}
                        for key, text in zip(chunk, texts, strict=True)
                        for refused in [refuse_identifiers(text, identifiers)]
                    ]
                )
                bar.update(len(chunk))
    # another class: any label in the dataset, any term of a vocabulary in use, and the synonyms of the
    # record's own vocabulary's other pathologies (another vocabulary's synonyms are too generic: "mass")
    known = {label for record in records for label in record["labels"]}
    known |= {term for vocabulary in vocabularies.values() if vocabulary for term in vocabulary_terms(vocabulary)}
    counts = {"written": len(pending), "cached": len(asked) - len(pending), "llm": 0}
    refused_counts: dict[str, int] = {}
    for record, key in zip(mine, key_of, strict=True):
        entry, vocabulary = cache.get(key, model), vocabularies[record["source"]]
        others = known | {
            synonym
            for term, value in vocabulary["pathology"].items()
            if term not in record["labels"]
            for synonym in value.get("synonyms", [])
        }
        reason = entry["refused"] or refuse_description(
            entry["description"], record["labels"], others - set(record["labels"])
        )
        if reason is None and not names_every_finding(entry["description"], record["labels"], vocabulary):
            reason = "drops_finding"
        if reason is None:
            record["report"], record["report_source"], record["report_note"] = entry["description"], "llm", ""
            counts["llm"] += 1
        else:
            record["report_note"] = f"llm report refused: {REPORT_REFUSALS[reason]}"
            refused_counts[reason] = refused_counts.get(reason, 0) + 1
    counts["template"] = dict(sorted(refused_counts.items()))
    counts["model"] = model
    return counts
