"""Load and validate data manifests (`data_manifests/<name>.yaml`) against `manifest.schema.yaml`."""

import difflib
from pathlib import Path

import jsonschema
import yaml

SCHEMA_PATH = Path(__file__).with_name("manifest.schema.yaml")

DEFAULTS = {
    "root": ".",
    "preprocessing": {"ct_window": {"width": 700, "level": 100}, "percentile_clip": [0.5, 99.5], "channels": "auto"},
    "split": {"fractions": [0.8, 0.1, 0.1]},
}


class ManifestError(ValueError):
    """A manifest that does not follow the schema; the message names the file, the field and the reason."""


def _schema() -> dict:
    with open(SCHEMA_PATH) as f:
        return yaml.safe_load(f)


def _describe(error: jsonschema.ValidationError) -> str:
    """Turn a jsonschema error into 'field: reason', suggesting the closest known field for a misspelling."""
    where = ".".join(str(p) for p in error.absolute_path) or "(top level)"
    if error.validator == "additionalProperties":
        known = list(error.schema.get("properties", {}))
        unknown = sorted(set(error.instance) - set(known))
        parts = []
        for field in unknown:
            close = difflib.get_close_matches(field, known, n=1)
            hint = f" (did you mean '{close[0]}'?)" if close else ""
            full = field if where == "(top level)" else f"{where}.{field}"
            parts.append(f"unknown field '{full}'{hint}")
        return "; ".join(parts)
    if error.validator == "required":
        return f"{where}: {error.message}"
    return f"field '{where}': {error.message}"


def validate_manifest(manifest: dict, origin: str = "<manifest>") -> dict:
    """Validate a manifest dict and return it with defaults filled in.

    Args:
        manifest: the parsed YAML.
        origin: file name used in error messages.

    Raises:
        ManifestError: naming the field and the reason.
    """
    if not isinstance(manifest, dict):
        raise ManifestError(f"{origin}: a manifest must be a mapping, got {type(manifest).__name__}")
    errors = sorted(
        jsonschema.Draft202012Validator(_schema()).iter_errors(manifest), key=lambda e: list(e.absolute_path)
    )
    if errors:
        raise ManifestError(f"{origin}: " + "; ".join(_describe(e) for e in errors))
    _check_consistency(manifest, origin)
    return _with_defaults(manifest)


def _check_consistency(m: dict, origin: str) -> None:
    """Rules that JSON Schema cannot express: which options each `from` needs."""
    labels, patients = m["labels"], m["patient_id"]
    needs_table = labels["from"] == "table" or patients["from"] == "table"
    if needs_table and "table" not in m:
        raise ManifestError(f"{origin}: field 'table' is required when labels or patient_id come from a table")
    if labels["from"] == "table" and ("column" in labels) == ("columns" in labels):
        raise ManifestError(f"{origin}: field 'labels': give exactly one of 'column' or 'columns'")
    if labels["from"] == "mask" and "mask" not in labels:
        raise ManifestError(f"{origin}: field 'labels.mask' is required when labels come from a mask")
    if labels["from"] == "constant" and "value" not in labels:
        raise ManifestError(f"{origin}: field 'labels.value' is required when labels are constant")
    if patients["from"] == "table" and "column" not in patients:
        raise ManifestError(f"{origin}: field 'patient_id.column' is required when patient ids come from a table")
    if patients["from"] == "path" and "pattern" not in patients:
        raise ManifestError(f"{origin}: field 'patient_id.pattern' is required when patient ids come from the path")
    if m.get("table", {}).get("key") == "pattern" and "key_pattern" not in m["table"]:
        raise ManifestError(f"{origin}: field 'table.key_pattern' is required when table.key is 'pattern'")
    if m["split"]["rule"] == "patient" and patients["from"] == "none":
        raise ManifestError(f"{origin}: field 'split.rule' is 'patient' but patient_id.from is 'none'")
    fractions = m["split"].get("fractions")
    if fractions and abs(sum(fractions) - 1) > 1e-6:
        raise ManifestError(f"{origin}: field 'split.fractions' must sum to 1, got {sum(fractions)}")


def _with_defaults(m: dict) -> dict:
    out = dict(m)
    out.setdefault("root", DEFAULTS["root"])
    out["preprocessing"] = {**DEFAULTS["preprocessing"], **m.get("preprocessing", {})}
    out["preprocessing"]["ct_window"] = {
        **DEFAULTS["preprocessing"]["ct_window"],
        **m.get("preprocessing", {}).get("ct_window", {}),
    }
    out["split"] = {**DEFAULTS["split"], **m["split"]}
    return out


def load_manifest(path: str | Path) -> dict:
    """Read and validate `data_manifests/<name>.yaml`.

    Args:
        path: the manifest file.

    Raises:
        ManifestError: unreadable YAML, or a field that breaks the schema (named in the message).
        FileNotFoundError: no such file.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"manifest not found: {path}")
    try:
        with open(path) as f:
            manifest = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ManifestError(f"{path.name}: not valid YAML: {err}") from err
    return validate_manifest(manifest, origin=path.name)


def resolve_manifest(name_or_path: str | Path) -> Path:
    """A manifest path as given, or the file `data_manifests/<name>.yaml` for a bare name."""
    from medsyn.paths import MANIFESTS_DIR

    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        return path
    return MANIFESTS_DIR / f"{name_or_path}.yaml"


def manifest_table(manifests: list[dict]):
    """One row per manifest: what it is, where it comes from, how it may be used (a pandas DataFrame)."""
    import pandas as pd

    columns = ["name", "title", "specialty", "image_type", "access", "licence", "home_page"]
    return pd.DataFrame([{c: m.get(c, "") for c in columns} for m in manifests]).set_index("name")
