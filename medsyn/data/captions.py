"""Captions from labels (MediSyn style: "Dermoscopy image showing melanoma.") and the
anatomy/pathology vocabularies used for report-style prompts (arXiv 2403.06835)."""

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


VOCABULARY_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "image_type", "anatomy", "pathology"],
    "properties": {
        "name": {"type": "string"},
        "image_type": {"type": "string"},
        "normal": {"type": "array", "items": {"type": "string"}},
        "anatomy": {
            "type": "object",
            "additionalProperties": {
                "type": "object",
                "additionalProperties": False,
                "properties": {"synonyms": {"type": "array", "items": {"type": "string"}}},
            },
        },
        "pathology": {
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
        },
    },
}


def load_vocabulary(path: str | Path) -> dict:
    """Read an anatomy/pathology vocabulary (`data_manifests/vocabularies/<name>.yaml`).

    Format: `anatomy` maps each anatomical term to optional synonyms; `pathology` maps each finding
    to the anatomy it sits in, optional synonyms and a report sentence (`finding`); `normal` lists the
    terms that mean "nothing abnormal".

    Raises:
        ManifestError: a field outside the format, or a pathology pointing at an unknown anatomy.
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
    for term, entry in vocabulary["pathology"].items():
        if entry["anatomy"] not in vocabulary["anatomy"]:
            raise ManifestError(f"{path.name}: pathology '{term}' names unknown anatomy '{entry['anatomy']}'")
    return vocabulary


def vocabulary_terms(vocabulary: dict) -> set[str]:
    """Every label a vocabulary allows: its pathologies and its normal terms."""
    return set(vocabulary["pathology"]) | set(vocabulary.get("normal", []))


def report_prompt(labels: list[str], vocabulary: dict) -> str:
    """Anatomy-pathology prompt in the style of arXiv 2403.06835: the anatomy involved, then each
    pathology with its location, then the report sentences.

    Example: "Chest X-ray. Anatomy: heart. Pathology: cardiomegaly (heart). Findings: The cardiac
    silhouette is enlarged."

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
        return f"{head} Anatomy: normal. Pathology: none. Findings: No abnormality."
    entries = [vocabulary["pathology"][f] for f in findings]
    anatomy = list(dict.fromkeys(e["anatomy"] for e in entries))
    pathology = "; ".join(f"{f} ({e['anatomy']})" for f, e in zip(findings, entries))
    sentences = " ".join(e.get("finding", f"{f[0].upper() + f[1:]} is present.") for f, e in zip(findings, entries))
    return f"{head} Anatomy: {', '.join(anatomy)}. Pathology: {pathology}. Findings: {sentences}"
