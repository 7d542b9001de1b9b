"""The curation stage: raw files + manifests -> one image-text dataset (`medsyn.data.dataset`).

Follows MediSyn's curation (Cho et al., Methods 4.1): heterogeneous sources are read as a viewer
shows them, resized and centre-cropped, de-duplicated within and across sources, captioned from
their labels and split 80/10/10 by patient. Every file under the raw directory ends up either in
`metadata.jsonl` (as `source_file`) or in `rejected.csv` with a reason: counts in = counts out +
counts rejected, and a bad file never aborts the run.
"""

import csv
import hashlib
import io
import json
import os
import re
import shutil
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
from PIL import Image
from tqdm.auto import tqdm

from medsyn.data.captions import (
    caption_from_labels,
    llm_reports,
    load_vocabulary,
    report_prompt,
    vlm_captions,
    vocabulary_terms,
)
from medsyn.data.dataset import MARKER, SPLITS, class_key, image_file_name, read_records, write_records
from medsyn.data.dedup import DuplicateIndex
from medsyn.data.manifest import ManifestError, load_manifest, validate_manifest
from medsyn.data.preprocess import percentile_rescale, resize_center_crop, tile_image, tissue_fraction
from medsyn.data.readers import (
    UnreadableImageError,
    axial_slice_for_display,
    dicom_to_display,
    load_dicom,
    read_nifti,
    read_raster,
    slice_indices,
    sniff_format,
)
from medsyn.data.split import patient_split
from medsyn.paths import VOCABULARIES_DIR

REJECTED_COLUMNS = ["source_file", "source", "source_item", "reason", "detail"]


@dataclass
class Rejection:
    """One row of `rejected.csv`. `detail` never carries a value read from inside a file."""

    source_file: str
    source: str
    reason: str
    detail: str
    source_item: str = ""


@dataclass
class _Candidate:
    """An image already written (named by its hash), waiting for its pseudonym and split."""

    source: str
    source_file: str
    source_item: str
    file_name: str
    sha256: str
    labels: list[str]
    patient_key: str  # the original identifier: kept in memory only, replaced by a pseudonym
    identifiers: tuple[str, ...] = ()  # identifying header values of a DICOM file, in memory only


@dataclass
class CurationResult:
    """What `curate` wrote, with the accounting that proves no file was lost."""

    out_dir: Path
    records: list[dict]
    rejections: list[Rejection]
    files_in: int
    summary: dict = field(default_factory=dict)


# ---------------------------------------------------------------- claiming files


def _list_files(root: Path) -> tuple[list[str], list[Rejection]]:
    """Every regular file under root (hidden ones too, and links to files), as sorted POSIX paths
    relative to root, and a rejection for each entry that is not one: a dangling link or a link loop,
    a link to a folder (not followed: it could lead outside the raw folder or back into it), a folder
    that cannot be read, and anything else that is not a regular file (a socket, a device)."""
    files, problems = [], []

    def unreadable(error: OSError) -> None:
        rel = Path(error.filename).relative_to(root).as_posix() + "/"
        problems.append(
            Rejection(_escaped(rel), "", "unreadable_folder", f"folder cannot be listed ({error.strerror})")
        )

    for folder, folders, names in os.walk(root, onerror=unreadable):
        for name in sorted(folders):
            path = Path(folder, name)
            if path.is_symlink():
                rel = _escaped(path.relative_to(root).as_posix())
                problems.append(Rejection(rel, "", "linked_folder", "a link to a folder is not followed"))
        for name in names:
            path = Path(folder, name)
            rel = path.relative_to(root).as_posix()
            try:
                regular = path.is_file()  # follows links
            except OSError:  # a link loop
                regular = False
            if regular:
                files.append(rel)
            elif path.is_symlink():
                problems.append(Rejection(_escaped(rel), "", "broken_link", "link to nothing (dangling, or a loop)"))
            else:
                problems.append(Rejection(_escaped(rel), "", "not_a_file", "not a regular file"))
    return sorted(files), problems


# rejections of entries under the raw folder that are not regular files (`_list_files`)
NOT_FILES = ("unreadable_folder", "linked_folder", "broken_link", "not_a_file")


def _escaped(path: str) -> str:
    """A path as text any file can hold: bytes of a file name that are not UTF-8 (which Python keeps as
    surrogates) are written as \\xNN."""
    return path.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


def _glob(base: Path, patterns: list[str]) -> list[Path]:
    found = set()
    for pattern in patterns:
        found.update(p for p in base.glob(pattern) if p.is_file())
    return sorted(found)


def table_paths(manifest: dict) -> list[str]:
    """The label tables a manifest names, relative to its root (one path or a list)."""
    table = manifest.get("table")
    if not table:
        return []
    return [table["path"]] if isinstance(table["path"], str) else list(table["path"])


# ---------------------------------------------------------------- labels and patients


def _norm(value) -> str:
    """Compare table cells and manifest values as numbers where they are numbers ('1', 1, '1.0')."""
    text = str(value).strip()
    try:
        return repr(float(text))
    except ValueError:
        return text


class _SourceReader:
    """Reads one manifest's files: finds the table row, labels and patient key, decodes pixels."""

    def __init__(self, manifest: dict, raw_dir: Path):
        self.m = manifest
        self.name = manifest["name"]
        self.root = (raw_dir / manifest["root"]).resolve()
        self.raw_dir = raw_dir
        self.identifiers: tuple[str, ...] = ()  # the last decoded DICOM file's identifying header values
        self.table = self._load_table()
        self.vocabulary, self.terms = None, None
        if "vocabulary" in manifest["caption"]:
            self.vocabulary = load_vocabulary(VOCABULARIES_DIR / f"{manifest['caption']['vocabulary']}.yaml")
            self.terms = vocabulary_terms(self.vocabulary)

    def _load_table(self) -> pd.DataFrame | None:
        paths = table_paths(self.m)
        if not paths:
            return None
        frames = []
        for rel in paths:
            path = self.root / rel
            if not path.is_file():
                raise FileNotFoundError(f"{self.name}: label table not found: {path}")
            try:
                frames.append(pd.read_csv(path, dtype=str, keep_default_na=False))
            except (pd.errors.ParserError, UnicodeDecodeError) as err:
                raise ManifestError(f"{self.name}: label table {path} cannot be parsed: {err}") from err
        table = pd.concat(frames, ignore_index=True)
        key = self.m["table"]["key_column"]
        if key not in table.columns:
            raise ManifestError(f"{self.name}: table.key_column '{key}' is not a column of {paths}")
        wanted = {self.m["labels"].get("column")} | set(self.m["labels"].get("columns", []))
        wanted |= {self.m["patient_id"].get("column")} | set(self.m["table"].get("where", {}))
        missing = sorted(c for c in wanted - {None} if c not in table.columns)
        if missing and (self.m["labels"]["from"] == "table" or self.m["patient_id"]["from"] == "table"):
            raise ManifestError(f"{self.name}: columns {missing} are not in the label table {paths}")
        return table.drop_duplicates(subset=key, keep="first").set_index(key)

    def _row(self, rel: str) -> pd.Series | None:
        spec = self.m["table"]
        path = Path(rel)
        if spec["key"] == "stem":
            key = path.name.split(".")[0] if path.name.endswith(".nii.gz") else path.stem
        elif spec["key"] == "name":
            key = path.name
        elif spec["key"] == "relative_path":
            key = rel
        else:
            match = re.search(spec["key_pattern"], rel)
            key = match.group(1) if match else None
        if key is None or key not in self.table.index:
            return None
        return self.table.loc[key]

    def _labels_from_row(self, row: pd.Series) -> tuple[list[str] | None, str]:
        spec = self.m["labels"]
        names = spec.get("names", {})
        if "column" in spec:
            value = row[spec["column"]]
            mapped = {_norm(k): v for k, v in names.items()}
            if names and _norm(value) not in mapped:
                return None, f"value in column '{spec['column']}' is not in labels.names"
            return [mapped.get(_norm(value), str(value))], ""
        positive = {_norm(v) for v in spec.get("positive_values", [1])}
        uncertain = {_norm(v) for v in spec.get("uncertain_values", [])}
        labels = []
        for column in spec["columns"]:
            cell = _norm(row[column])
            if cell in uncertain:
                policy = spec.get("uncertain", "negative")
                if policy == "exclude":
                    return None, f"uncertain value in column '{column}'"
                if policy == "negative":
                    continue
            elif cell not in positive:
                continue
            labels.append(names.get(column, column))
        if not labels and "empty" in spec:
            labels = [spec["empty"]]
        return (labels or None), ("" if labels else "no positive label column")

    def describe(self, rel: str) -> tuple[list[str] | None, str | None, Rejection | None]:
        """Labels (None for per-slice mask labels) and patient key of one file, or a rejection."""
        source_file = self._source_file(rel)
        reject = lambda reason, detail: (None, None, Rejection(source_file, self.name, reason, detail))  # noqa: E731
        row = None
        if self.table is not None:
            row = self._row(rel)
            if row is None and (self.m["labels"]["from"] == "table" or self.m["patient_id"]["from"] == "table"):
                return reject("no_label", "no row for this file in the label table")
            for column, value in self.m["table"].get("where", {}).items():
                if row is not None and _norm(row[column]) != _norm(value):
                    return reject("excluded_by_filter", f"table column '{column}' is not '{value}'")

        spec = self.m["labels"]
        if spec["from"] == "table":
            labels, why = self._labels_from_row(row)
            if labels is None:
                return reject("no_label", why)
        elif spec["from"] == "folder":
            parts = Path(rel).parts
            level = spec.get("folder_level", -1)
            if len(parts) < 1 - level:
                return reject("no_label", "file is not inside a class folder")
            folder = parts[level - 1]
            names = spec.get("names")
            if names is not None and folder not in names:
                return reject("unknown_label", f"folder '{folder}' is not in labels.names")
            labels = [names[folder] if names else folder.replace("_", " ").replace("-", " ").lower()]
        elif spec["from"] == "constant":
            labels = [spec["value"]]
        else:  # mask: decided per slice
            labels = None

        patients = self.m["patient_id"]
        if patients["from"] == "table":
            patient = str(row[patients["column"]]).strip() if row is not None else ""
        elif patients["from"] == "path":
            match = re.search(patients["pattern"], rel)
            patient = match.group(1) if match else ""
        elif patients["from"] == "dicom":
            patient = "<dicom>"  # read with the pixels
        else:
            patient = f"file:{rel}"  # no patient ids: each file is its own group (tiles stay together)
        if not patient:
            return reject("no_patient_id", f"no patient id found ({patients['from']})")
        return labels, patient, None

    def _source_file(self, rel: str) -> str:
        return (self.root / rel).relative_to(self.raw_dir).as_posix()

    def decode(
        self, rel: str, labels: list[str] | None
    ) -> tuple[list[tuple[str, np.ndarray, list[str]]], list[Rejection], str | None]:
        """Decode a file into (source_item, uint8 image, labels) pieces, per-piece rejections and the
        DICOM patient key (when patient ids come from DICOM); a DICOM file's identifying header values
        are left in `self.identifiers` until the next file, for the caption guard."""
        path = self.root / rel
        fmt = self.m["reader"]["format"]
        if fmt == "auto":
            fmt = sniff_format(path)
            if fmt == "unknown":
                fmt = "image"  # PIL identifies by content; a non-image is rejected there
        positions = self.m["reader"].get("slices", {}).get("positions", [0.5])
        prep = self.m["preprocessing"]
        window = (prep["ct_window"]["width"], prep["ct_window"]["level"])
        pieces, rejected, patient_key = [], [], None
        self.identifiers = ()

        if fmt == "dicom":
            image = load_dicom(path)
            patient_key, self.identifiers = image.patient_key, image.identifiers
            frames = image.pixels.shape[0]
            indices = [0] if frames == 1 else slice_indices(frames, positions)
            for i in indices:
                item = "" if frames == 1 else f"frame {i}"
                pieces.append((item, dicom_to_display(image, i, window, tuple(prep["percentile_clip"])), labels))
        elif fmt == "nifti":
            volume = read_nifti(path)
            mask = self._mask_volume(rel, volume.shape) if self.m["labels"]["from"] == "mask" else None
            for i in slice_indices(volume.shape[2], positions):
                display = percentile_rescale(
                    axial_slice_for_display(volume, i), *prep["percentile_clip"], reference=volume
                )
                slice_labels = labels
                if mask is not None:
                    spec = self.m["labels"]["mask"]
                    slice_labels = [spec["positive"] if (mask[:, :, i] > 0).any() else spec["negative"]]
                pieces.append((f"slice {i}", display, slice_labels))
        else:
            image = read_raster(path)
            tiles = self.m["reader"].get("tiles")
            if tiles is None:
                pieces.append(("", image, labels))
            else:
                cut = tile_image(image, tiles["size"], tiles.get("max_overlap", 0.1))
                if not cut:
                    raise UnreadableImageError(
                        "too_small", f"image {image.shape[:2]} is smaller than one {tiles['size']}px tile"
                    )
                for y, x, tile in cut:
                    item = f"tile y={y} x={x}"
                    fraction = tissue_fraction(tile)
                    if fraction < tiles.get("min_tissue", 0.0):
                        rejected.append(
                            Rejection(
                                self._source_file(rel),
                                self.name,
                                "background_tile",
                                f"tissue fraction {fraction:.2f} < {tiles['min_tissue']}",
                                item,
                            )
                        )
                    else:
                        pieces.append((item, tile, labels))
        return pieces, rejected, patient_key

    def _mask_volume(self, rel: str, shape) -> np.ndarray:
        spec = self.m["labels"]["mask"]
        mask_rel = re.sub(spec["pattern"], spec["replacement"], rel)
        mask_path = self.root / mask_rel
        if mask_rel == rel or not mask_path.is_file():
            raise UnreadableImageError("no_label", f"label mask not found: {self._source_file(mask_rel)}")
        mask = read_nifti(mask_path)
        if mask.shape != shape:
            raise UnreadableImageError("no_label", f"label mask shape {mask.shape} differs from image {shape}")
        return mask

    def to_channels(self, image: np.ndarray) -> np.ndarray:
        channels = self.m["preprocessing"]["channels"]
        if channels == "grey" and image.ndim == 3:
            return np.asarray(Image.fromarray(image).convert("L"))
        if channels == "rgb" and image.ndim == 2:
            return np.repeat(image[..., None], 3, axis=2)
        return image


# ---------------------------------------------------------------- the stage


def curate(
    manifests: list,
    raw_dir: str | Path,
    out_dir: str | Path,
    size: int = 512,
    seed: int = 0,
    near_duplicate_correlation: float | None = 0.995,
    progress: bool = True,
    captioner=None,
    caption_cache: str | Path | None = None,
    report_writer=None,
    report_cache: str | Path | None = None,
    patient_prefix: str = "",
) -> CurationResult:
    """Curate raw sources into an imagefolder dataset with `metadata.jsonl` and `rejected.csv`.

    Args:
        manifests: manifest paths or already-validated manifest dicts, in priority order (a file
            claimed by two manifests belongs to the first).
        raw_dir: the raw directory; every file under it is accounted for.
        out_dir: where the dataset is written; an earlier curation there is replaced, a folder holding
            anything else is refused.
        size: output side in pixels (shorter side resized, then centre crop); 512 for `paper`.
        seed: seed of the patient-level split.
        near_duplicate_correlation: thumbnail correlation at which a perceptual-hash candidate is a
            near duplicate (`medsyn.data.dedup`); None turns near-duplicate removal off.
        progress: show a progress bar.
        captioner: None for captions from the label templates only; or a vision-language captioner
            (`medsyn.models.captioner.VLMCaptioner`) whose description of each image joins its
            template (`medsyn.data.captions.vlm_captions`; refused descriptions keep the template).
        caption_cache: the captioner's cache file (default `<out_dir>.vlm_captions.jsonl`, beside the
            dataset so that it outlives a rebuild).
        report_writer: None for reports from the vocabularies' templates only (`report_prompt`: each
            record's `report`, where its source's manifest names a vocabulary; else its caption); or a
            language model (`medsyn.models.report_writer.ReportWriter`) that rewrites each template
            report as prose (`medsyn.data.captions.llm_reports`; refused rewrites keep the template).
        report_cache: the report writer's cache file (default `<out_dir>.llm_reports.jsonl`).
        patient_prefix: put before every pseudonym (`<prefix><source>-00001`), so that the patients
            of a second dataset of other patients (the downstream experiment's held-out set) are
            never named like the first's.
    """
    raw_dir, out_dir = Path(raw_dir).resolve(), Path(out_dir).resolve()
    if not raw_dir.is_dir():
        raise FileNotFoundError(f"raw directory not found: {raw_dir}")
    if size < 8:
        raise ValueError(f"size must be at least 8 pixels, got {size}")
    loaded = [
        validate_manifest(m, m.get("name", "<manifest>")) if isinstance(m, dict) else load_manifest(m)
        for m in manifests
    ]
    names = [m["name"] for m in loaded]
    if len(set(names)) != len(names):
        raise ManifestError(f"two manifests share a name: {names}")

    _check_output(out_dir, raw_dir)
    all_files, rejections = _list_files(raw_dir)
    readers = [_SourceReader(m, raw_dir) for m in loaded]
    owner: dict[str, tuple[_SourceReader, str]] = {}  # source_file -> (reader, kind)
    for reader in readers:
        if not reader.root.is_dir():
            raise FileNotFoundError(f"{reader.name}: source folder not found: {reader.root}")
        support = _glob(reader.root, table_paths(reader.m) + reader.m["reader"].get("support", []))
        for path in support:
            owner.setdefault(path.relative_to(raw_dir).as_posix(), (reader, "support"))
        for path in _glob(reader.root, reader.m["reader"]["include"]):
            owner.setdefault(path.relative_to(raw_dir).as_posix(), (reader, "image"))

    image_files = []
    for source_file in all_files:
        if source_file not in owner:
            rejections.append(Rejection(source_file, "", "unclaimed", "no manifest includes this file"))
            continue
        reader, kind = owner[source_file]
        if kind == "support":
            rejections.append(
                Rejection(
                    source_file,
                    reader.name,
                    "support_file",
                    "belongs to the source but is not an image (label table, mask, documentation)",
                )
            )
        else:
            image_files.append((reader, source_file))

    # the new dataset is built beside the old one and swapped in only when complete (`_swap_in`)
    building = out_dir.parent / f".{out_dir.name}.partial"
    shutil.rmtree(building, ignore_errors=True)
    (building / STAGING).mkdir(parents=True)
    duplicates = DuplicateIndex(min_correlation=near_duplicate_correlation)
    candidates: list[_Candidate] = []
    for reader, source_file in tqdm(image_files, desc="curate", unit="file", disable=not progress):
        rel = (raw_dir / source_file).relative_to(reader.root).as_posix()
        labels, patient, rejection = reader.describe(rel)
        if rejection:
            rejections.append(rejection)
            continue
        try:
            pieces, piece_rejections, dicom_patient = reader.decode(rel, labels)
        except UnreadableImageError as err:
            rejections.append(Rejection(source_file, reader.name, err.reason, err.detail))
            continue
        except OSError as err:  # permissions, a file that vanished, an I/O error
            detail = f"file cannot be read ({err.strerror or type(err).__name__})"
            rejections.append(Rejection(source_file, reader.name, "unreadable", detail))
            continue
        except Exception as err:  # noqa: BLE001 - a decoder's own failure on a damaged file never ends the run
            # the type only: a decoder's message may quote header values
            rejections.append(
                Rejection(source_file, reader.name, "unreadable", f"decoder failed ({type(err).__name__})")
            )
            continue
        rejections.extend(piece_rejections)
        if patient == "<dicom>":
            if not dicom_patient:
                rejections.append(Rejection(source_file, reader.name, "no_patient_id", "DICOM file has no PatientID"))
                continue
            patient = f"dicom:{dicom_patient}"
        for item, image, item_labels in pieces:
            if reader.terms is not None:
                unknown = [label for label in item_labels if label not in reader.terms]
                if unknown:
                    rejections.append(
                        Rejection(
                            source_file,
                            reader.name,
                            "unknown_label",
                            f"labels {unknown} are not in vocabulary '{reader.vocabulary['name']}'",
                            item,
                        )
                    )
                    continue
            image = reader.to_channels(resize_center_crop(image, size))
            duplicate = duplicates.check(f"{source_file}|{item}", image)
            if duplicate:
                reason, first = duplicate
                first_file, first_item = first.split("|", 1)
                detail = f"duplicate of {_escaped(first_file)}" + (f" ({first_item})" if first_item else "")
                rejections.append(Rejection(source_file, reader.name, reason, detail, item))
                continue
            file_name, sha = _write_png(image, building)
            candidates.append(
                _Candidate(reader.name, source_file, item, file_name, sha, item_labels, patient, reader.identifiers)
            )

    vocabularies = {reader.name: reader.vocabulary for reader in readers}
    records = _assign_splits(candidates, loaded, building, seed, patient_prefix, vocabularies)
    captions = {"source": "template"}
    if captioner is not None:
        cache = Path(caption_cache) if caption_cache else out_dir.with_name(out_dir.name + ".vlm_captions.jsonl")
        captions = {"source": "vlm", **vlm_captions(records, building, captioner, cache, _identifiers(candidates))}
    reports = {"source": "template"}
    if report_writer is not None:
        cache = Path(report_cache) if report_cache else out_dir.with_name(out_dir.name + ".llm_reports.jsonl")
        reports = {
            "source": "llm",
            **llm_reports(records, report_writer, cache, vocabularies, _identifiers(candidates), progress=progress),
        }
    _write_rejections(rejections, building)
    result = CurationResult(out_dir=out_dir, records=records, rejections=rejections, files_in=len(all_files))
    result.summary = {**_summary(result, all_files, size, seed, names), "captions": captions, "reports": reports}
    (building / SUMMARY).write_text(json.dumps(result.summary, indent=2))
    write_records(building, records, kind="curated")
    _swap_in(building, out_dir)
    return result


# the held-out set has no training images: a quarter of its patients choose the downstream
# classifier's epoch, three quarters test it
HELD_OUT_FRACTIONS = (0.0, 0.25, 0.75)
HELD_OUT_PREFIX = "held-out-"


def curate_held_out(
    manifests: list,
    raw_dir: str | Path,
    out_dir: str | Path,
    sources: list[str],
    patients: int,
    first_patient: int,
    corpus_size: int,
    size: int,
    seed: int = 0,
    progress: bool = True,
) -> CurationResult:
    """Other patients of some sources of the embedded corpus, curated into a second dataset with
    validation and test splits only (`HELD_OUT_FRACTIONS`): the downstream experiment's large test
    sets, which the generators never see and which leave the main dataset's splits, and every
    evaluation of them, unchanged.

    Args:
        manifests: the main curation's manifests (paths or validated dicts); those of `sources` are used.
        raw_dir: where the held-out raw corpus is written (or was written by an earlier run with the
            same `patients` and `first_patient`).
        out_dir: the held-out dataset.
        sources: the sources (downstream tasks) to write other patients of.
        patients: patients per source.
        first_patient: the first patient's number: the main corpus's patient count, so that none is
            written twice.
        corpus_size, size, seed: as for the main corpus (`write_corpus`) and curation (`curate`).
        progress: show progress bars.

    Raises:
        ValueError: a source without a manifest, or a raw directory written with other patients.
    """
    from medsyn.data.corpus import write_corpus

    loaded = [
        validate_manifest(m, m.get("name", "<manifest>")) if isinstance(m, dict) else load_manifest(m)
        for m in manifests
    ]
    chosen = [m for m in loaded if m["name"] in sources]
    unknown = sorted(set(sources) - {m["name"] for m in chosen})
    if unknown:
        raise ValueError(f"held-out sources without a manifest: {unknown}")
    raw_dir = Path(raw_dir)
    truth_path = raw_dir.parent / f"{raw_dir.name}.corpus.json"
    if raw_dir.exists() and any(raw_dir.iterdir()):
        truth = json.loads(truth_path.read_text()) if truth_path.is_file() else {}
        keys = ("patients", "first_patient", "sources", "seed", "size")
        written = {k: sorted(truth[k]) if k == "sources" else truth[k] for k in keys if k in truth}
        asked = dict(zip(keys, (patients, first_patient, sorted(sources), seed, corpus_size)))
        if written != asked:
            raise ValueError(
                f"{raw_dir} holds another held-out corpus ({written}); asked for {asked}: "
                "remove it or choose another directory"
            )
    else:
        write_corpus(raw_dir, patients, seed, corpus_size, tuple(sources), progress, first_patient)
    held_out = [{**m, "split": {**m["split"], "fractions": list(HELD_OUT_FRACTIONS)}} for m in chosen]
    return curate(held_out, raw_dir, out_dir, size=size, seed=seed, progress=progress, patient_prefix=HELD_OUT_PREFIX)


SUMMARY = "curation_summary.json"
STAGING = ".staging"  # accepted images wait here, named by their hash, until their split is known
OUTPUTS = (*SPLITS, MARKER, SUMMARY, "rejected.csv")


def _check_output(out_dir: Path, raw_dir: Path) -> None:
    """Refuse an output that could hold data curation did not write: one that is, or lies inside, the
    raw directory, one that contains it, and an existing folder that is neither empty nor an earlier
    curation (identified by its summary and marker, and holding nothing else)."""
    resolved = out_dir.resolve()
    if resolved == raw_dir or raw_dir in resolved.parents:
        raise FileExistsError(f"output directory {out_dir} lies inside the raw directory {raw_dir}: choose another")
    if resolved in raw_dir.parents:
        raise FileExistsError(f"the raw directory {raw_dir} lies inside the output directory {out_dir}: choose another")
    if not out_dir.exists():
        return
    if not out_dir.is_dir():
        raise FileExistsError(f"output {out_dir} exists and is not a directory")
    present = sorted(p.name for p in out_dir.iterdir())
    if not present:
        return
    earlier = (out_dir / SUMMARY).is_file() and (out_dir / MARKER).is_file()
    foreign = [name for name in present if name not in OUTPUTS]
    if not earlier or foreign:
        raise FileExistsError(
            f"output directory {out_dir} is not empty and is not an earlier curation "
            f"({'it holds ' + str((foreign or present)[:5])}); curation writes only into an empty "
            "folder or replaces its own earlier output"
        )


def _swap_in(building: Path, out_dir: Path) -> None:
    """Replace `out_dir` (an earlier curation or nothing) by the complete new dataset. Between the two
    renames the output does not exist, so a reader sees the old dataset, the new one, or none: never
    a mixture."""
    shutil.rmtree(building / STAGING, ignore_errors=True)
    old = out_dir.parent / f".{out_dir.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out_dir.exists():
        os.replace(out_dir, old)
    os.replace(building, out_dir)
    shutil.rmtree(old, ignore_errors=True)


def _write_png(image: np.ndarray, building: Path) -> tuple[str, str]:
    """Write one accepted image at once (so memory holds no pixels) into the staging folder and return
    (file_name, sha256); `_assign_splits` moves it into its split's folder."""
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    data = buffer.getvalue()
    sha = hashlib.sha256(data).hexdigest()
    file_name = image_file_name(sha)
    path = building / STAGING / file_name
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    return file_name, sha


def _assign_splits(
    candidates: list[_Candidate],
    manifests: list[dict],
    building: Path,
    seed: int,
    patient_prefix: str,
    vocabularies: dict[str, dict | None],
) -> list[dict]:
    """Pseudonymise patients, split per source (stratified by class) and move each image into its
    split's folder; return the records in file order, each with its caption and its report (from the
    source's vocabulary, else the caption)."""
    by_name = {m["name"]: m for m in manifests}

    pseudonyms: dict[tuple[str, str], str] = {}
    patients_per_source: Counter = Counter()
    group_sizes: dict[str, Counter] = defaultdict(Counter)
    classes: dict[str, Counter] = defaultdict(Counter)  # pseudonym -> class counts, for a stratified split
    for c in candidates:  # candidates come in sorted file order, so numbering is deterministic
        key = (c.source, c.patient_key)
        if key not in pseudonyms:
            patients_per_source[c.source] += 1
            pseudonyms[key] = f"{patient_prefix}{c.source}-{patients_per_source[c.source]:05d}"
        group_sizes[c.source][pseudonyms[key]] += 1
        classes[pseudonyms[key]][" + ".join(sorted(c.labels))] += 1
    split_of = {}
    for source, sizes in group_sizes.items():
        strata = {p: max(sorted(classes[p]), key=classes[p].get) for p in sizes}
        assignment = patient_split(
            dict(sizes), by_name[source]["split"]["fractions"], seed=seed, salt=source, strata=strata
        )
        split_of.update({(source, p): s for p, s in assignment.items()})

    records = []
    for c in candidates:
        m = by_name[c.source]
        patient_id = pseudonyms[(c.source, c.patient_key)]
        template = caption_from_labels(c.labels, m["caption"], m["image_type"])
        vocabulary = vocabularies.get(c.source)
        report = report_prompt(c.labels, vocabulary) if vocabulary else template
        records.append(
            {
                "file_name": c.file_name,
                "text": template,
                "class_text": template,
                "caption_source": "template",
                "caption_note": "",
                "report": report,
                "class_report": report,
                "report_source": "vocabulary" if vocabulary else "caption",
                "report_note": "",
                "split": split_of[(c.source, patient_id)],
                "specialty": m["specialty"],
                "image_type": m["image_type"],
                "labels": c.labels,
                "patient_id": patient_id,
                "source": c.source,
                "source_file": _escaped(c.source_file),
                "source_item": c.source_item,
                "sha256": c.sha256,
            }
        )
        target = building / records[-1]["split"] / c.file_name
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(building / STAGING / c.file_name, target)
    return records


def _identifiers(candidates: list[_Candidate]) -> set[str]:
    """What must never reach a caption: every patient key the sources gave, every identifying DICOM
    header value, and every part of a source path that carries a number (patient00001, a study's
    accession, a scan's file name)."""
    found = set()
    for c in candidates:
        found.add(c.patient_key.removeprefix("dicom:"))
        found.update(c.identifiers)
        for part in Path(c.source_file).parts:
            stem = Path(part).stem
            if any(ch.isdigit() for ch in stem):
                found.add(stem)
    return {value for value in found if len(value) >= 3}


def _write_rejections(rejections: list[Rejection], out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    with open(out_dir / "rejected.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(REJECTED_COLUMNS)
        for r in sorted(rejections, key=lambda r: (r.source_file, r.source_item)):
            writer.writerow([_escaped(r.source_file), r.source, r.source_item, r.reason, r.detail])


def _summary(result: CurationResult, all_files: list[str], size: int, seed: int, names: list[str]) -> dict:
    kept_files = {r["source_file"] for r in result.records}
    rejected_files = {_escaped(r.source_file) for r in result.rejections}
    accounted = kept_files | rejected_files
    lost = sorted({_escaped(f) for f in all_files} - accounted)
    if lost:  # a bug, not bad input: fail loudly rather than write an incomplete account
        raise RuntimeError(f"curation lost track of {len(lost)} files, e.g. {lost[:3]}")
    return {
        "sources": names,
        "size": size,
        "seed": seed,
        "files_in": len(all_files),
        "entries_not_files": sum(r.reason in NOT_FILES for r in result.rejections),
        "files_with_images": len(kept_files),
        "files_only_rejected": len(rejected_files - kept_files),
        "images_out": len(result.records),
        "rejections": len(result.rejections),
        "rejections_by_reason": dict(sorted(Counter(r.reason for r in result.rejections).items())),
        "images_by_split": dict(sorted(Counter(r["split"] for r in result.records).items())),
        "classes_missing_a_split": _classes_missing_a_split(result.records),
    }


def _classes_missing_a_split(records: list[dict]) -> dict[str, str]:
    """Each class that has no image in some split, with which and why (a class of fewer than three
    patients cannot be in all three; `patient_split` gives every other class all three)."""
    splits, patients = defaultdict(set), defaultdict(set)
    for record in records:
        splits[class_key(record)].add(record["split"])
        patients[class_key(record)].add(record["patient_id"])
    return {
        key: f"no {' or '.join(s for s in SPLITS if s not in present)} images: {len(patients[key])} patient(s)"
        for key, present in sorted(splits.items())
        if len(present) < len(SPLITS)
    }


def check_accounting(raw_dir: str | Path, dataset_dir: str | Path) -> dict:
    """Compare the files under `raw_dir` with the `source_file`s of `metadata.jsonl` and `rejected.csv`.

    Returns counts plus `missing` (raw files in neither) and `unknown` (listed files that are not under
    raw_dir); both are empty for a complete account.
    """
    listed, problems = _list_files(Path(raw_dir))
    files = {_escaped(f) for f in listed} | {r.source_file for r in problems}
    in_metadata = {r["source_file"] for r in read_records(dataset_dir)}
    rejected = pd.read_csv(Path(dataset_dir) / "rejected.csv", dtype=str, keep_default_na=False)
    in_rejected = set(rejected["source_file"])
    return {
        "files_in": len(files),
        "files_in_metadata": len(in_metadata),
        "files_only_in_rejected": len(in_rejected - in_metadata),
        "missing": sorted(files - in_metadata - in_rejected),
        "unknown": sorted((in_metadata | in_rejected) - files),
    }


def patients_in_several_splits(records: list[dict]) -> list[str]:
    """Pseudonymous patient ids that occur in more than one split (empty for a patient-level split)."""
    splits: dict[str, set] = defaultdict(set)
    for record in records:
        splits[record["patient_id"]].add(record["split"])
    return sorted(p for p, s in splits.items() if len(s) > 1)
