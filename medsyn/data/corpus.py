"""The embedded raw corpus: procedural images written in the real formats and folder layouts of the
public sources, so that the curation code that handles real data is the code that runs by default.

Seven sources, seven image types, five specialties, each laid out as its public release is:

| source | format and layout | classes |
|---|---|---|
| rsna_pe | CT DICOM in HU, train/<study>/<series>/<sop>.dcm + train.csv | pulmonary embolism / none |
| chexpert | frontal (and lateral) chest X-ray JPEG, train/patientNNNNN/studyN/ + train.csv | multi-label: cardiomegaly, pleural effusion, no finding |
| brats | brain MRI FLAIR NIfTI + segmentation, BraTS2021_NNNNN/ | glioma / no tumour, per slice |
| kermany_oct | OCT B-scan JPEG, OCT2017/{train,test}/<CLASS>/<CLASS>-<patient>-<n>.jpeg | CNV, DME, drusen, normal |
| ham10000 | dermoscopy JPEG, HAM10000_images_part_1/ + HAM10000_metadata.csv | melanoma, nevus, keratosis, BCC |
| kvasir_v2 | colonoscopy JPEG, kvasir-dataset-v2/<class>/ | polyp, dyed lifted polyp, oesophagitis, cecum |
| camelyon16 | large histology TIFF, training/{normal,tumor}/ (tiled by curation) | metastasis / normal |

The images are drawings, not anatomy: each class is made visibly distinct at 64 x 64 so that later
stages can show text-conditioned generation on a CPU. Deliberate defects (a truncated file, a
non-image, a DICOM without pixel data, exact and near duplicates, a file with no label row, a lateral
view, a stray file no manifest claims) are listed in `<raw>.corpus.json` (beside the raw folder) with the reason curation must give.
Patient names, ids, birth dates and accession numbers written into DICOM headers are listed there
too, so tests can prove none reaches the curated output.
"""

import csv
import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
from PIL import Image
from scipy import ndimage
from tqdm.auto import tqdm

SOURCES = ("rsna_pe", "chexpert", "brats", "kermany_oct", "ham10000", "kvasir_v2", "camelyon16")


def _rng(seed: int, *keys) -> np.random.Generator:
    """An independent generator per (seed, source, item): files do not depend on generation order."""
    digest = hashlib.sha256(":".join(map(str, (seed,) + keys)).encode()).digest()
    return np.random.default_rng(int.from_bytes(digest[:8], "little"))


def _grid(h: int, w: int, rng: np.random.Generator | None = None, jitter: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """Normalised coordinates in [-1, 1] (y down, x right). With `rng`, the grid is rotated, scaled and
    shifted at random, as patient positioning and field of view vary between real acquisitions."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    if rng is None:
        return yy, xx
    angle = rng.uniform(-0.2, 0.2) * jitter
    scale = np.exp(rng.uniform(-0.12, 0.12) * jitter)
    dy, dx = rng.uniform(-0.12, 0.12, size=2) * jitter
    c, s = np.cos(angle), np.sin(angle)
    return (c * yy - s * xx) * scale + dy, (s * yy + c * xx) * scale + dx


def _shading(rng: np.random.Generator, h: int, w: int, strength: float = 0.25) -> np.ndarray:
    """A smooth multiplicative illumination gradient (exposure, bias field, light fall-off)."""
    yy, xx = np.meshgrid(np.linspace(-1, 1, h), np.linspace(-1, 1, w), indexing="ij")
    a, b = rng.uniform(-1, 1, size=2) * strength
    return 1 + a * yy + b * xx


def _ellipse(yy, xx, cy, cx, ry, rx, angle=0.0) -> np.ndarray:
    c, s = np.cos(angle), np.sin(angle)
    y, x = yy - cy, xx - cx
    return ((x * c + y * s) / rx) ** 2 + ((-x * s + y * c) / ry) ** 2 <= 1.0


def _noise(rng, shape, sigma) -> np.ndarray:
    """Smooth noise with unit standard deviation."""
    field = ndimage.gaussian_filter(rng.standard_normal(shape), sigma)
    return field / (field.std() + 1e-8)


def _to_uint8(x: np.ndarray) -> np.ndarray:
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def _save_jpeg(image: np.ndarray, path: Path, quality: int = 92) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(image).save(path, format="JPEG", quality=quality)


def _write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


# ---------------------------------------------------------------- CT pulmonary angiography (DICOM)


def ct_slice_hu(rng, size: int, embolism: bool) -> np.ndarray:
    """Axial chest CT slice in Hounsfield units with contrast-filled pulmonary arteries; with
    `embolism`, a saddle filling defect (~30 HU) across the pulmonary trunk and both branches."""
    yy, xx = _grid(size, size, rng)
    j = lambda s: s * (1 + 0.06 * rng.standard_normal())  # noqa: E731  (patient-to-patient size jitter)
    hu = np.full((size, size), -1000.0)
    body = _ellipse(yy, xx, 0.05, 0, j(0.78), j(0.93))
    hu[body] = -90  # subcutaneous fat
    hu[_ellipse(yy, xx, 0.05, 0, j(0.70), j(0.85))] = 40  # muscle and mediastinum
    for side in (-1, 1):
        hu[_ellipse(yy, xx, -0.02, side * 0.45, j(0.55), j(0.32), side * 0.1)] = -860
    hu[_ellipse(yy, xx, 0.6, 0, 0.13, 0.13)] = 650  # vertebral body
    hu[_ellipse(yy, xx, 0.35, -0.22, 0.11, 0.11)] = 280  # descending aorta
    vessels = _ellipse(yy, xx, -0.05, 0, 0.15, 0.15)  # pulmonary trunk
    for side in (-1, 1):
        vessels |= _ellipse(yy, xx, -0.08, side * 0.27, 0.09, 0.22, side * 0.25)
    hu[vessels] = 330
    if embolism:
        # a large saddle embolus: most of the lumen dark, a thin rim of contrast around it
        clot = _ellipse(yy, xx, -0.06, 0, 0.11, 0.48) & vessels
        clot |= _ellipse(yy, xx, -0.05, 0, 0.11, 0.11)
        hu[clot] = 30
    hu += 12 * rng.standard_normal(hu.shape) + 25 * _noise(rng, hu.shape, 2) * body
    return hu


def _write_ct_dicom(
    path: Path, hu: np.ndarray, uids: dict, patient: dict, position: float, with_pixels: bool = True
) -> None:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uids["sop"]
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = CTImageStorage, uids["sop"]
    ds.StudyInstanceUID, ds.SeriesInstanceUID = uids["study"], uids["series"]
    ds.Modality = "CT"
    ds.PatientName = patient["name"]
    ds.PatientID = patient["id"]
    ds.PatientBirthDate = patient["birth_date"]
    ds.AccessionNumber = patient["accession"]
    ds.StudyDescription = "CT PULMONARY ANGIOGRAM"
    ds.ImagePositionPatient = [0.0, 0.0, position]
    ds.PixelSpacing = [0.7, 0.7]
    ds.SliceThickness = 2.5
    ds.WindowCenter, ds.WindowWidth = 40, 400  # the scanner's soft-tissue preset; curation uses its own window
    if with_pixels:
        stored = np.clip(np.rint(hu) + 1024, 0, 4095).astype(np.uint16)
        ds.Rows, ds.Columns = stored.shape
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
        ds.PixelData = stored.tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)


def write_rsna_pe(root: Path, patients: range, seed: int, size: int, truth: dict) -> None:
    """RSNA-STR Pulmonary Embolism Detection layout: train/<StudyUID>/<SeriesUID>/<SOPUID>.dcm + train.csv."""
    from pydicom.uid import generate_uid

    rows = []
    for p in patients:
        rng = _rng(seed, "rsna_pe", p)
        embolism = p % 2 == 1
        patient = {
            "name": f"Synthetic^Patient{p:03d}^CT",
            "id": f"MRN{7100000 + int(rng.integers(0, 99999)):07d}",
            "birth_date": f"19{40 + p % 50:02d}0{1 + p % 9}1{p % 9}",
            "accession": f"ACC{880000 + p:06d}",
        }
        truth["phi"].extend(patient.values())
        study = generate_uid(entropy_srcs=[str(seed), "rsna", str(p), "study"])
        series = generate_uid(entropy_srcs=[str(seed), "rsna", str(p), "series"])
        for k in range(3):
            sop = generate_uid(entropy_srcs=[str(seed), "rsna", str(p), str(k)])
            path = root / "train" / study / series / f"{sop}.dcm"
            defect = None
            if p == 0 and k == 2:
                defect = "no_pixel_data"
            elif p == 1 and k == 2:
                defect = "unreadable"
            _write_ct_dicom(
                path,
                ct_slice_hu(rng, size, embolism),
                {"study": study, "series": series, "sop": sop},
                patient,
                position=-100.0 - 2.5 * k,
                with_pixels=defect != "no_pixel_data",
            )
            if defect == "unreadable":  # cut the file inside its pixel data
                data = path.read_bytes()
                path.write_bytes(data[: len(data) * 3 // 5])
            if defect:
                truth["defects"].append({"source_file": path, "reason": defect})
            rows.append([study, series, sop, int(embolism), int(not embolism), 0, 0])
    _write_csv(
        root / "train.csv",
        [
            "StudyInstanceUID",
            "SeriesInstanceUID",
            "SOPInstanceUID",
            "pe_present_on_image",
            "negative_exam_for_pe",
            "qa_motion",
            "qa_contrast",
        ],
        rows,
    )


# ---------------------------------------------------------------- chest X-ray (JPEG)


def chest_xray(rng, height: int, width: int, cardiomegaly: bool, effusion: bool, lateral: bool = False) -> np.ndarray:
    """Frontal chest radiograph as displayed (bone bright, lungs dark): an enlarged cardiac silhouette
    for cardiomegaly, white basal opacity with a meniscus for pleural effusion."""
    yy, xx = _grid(height, width, rng)
    j = lambda s: s * (1 + 0.05 * rng.standard_normal())  # noqa: E731
    img = np.full((height, width), 25.0)
    body = _ellipse(yy, xx, 0.15, 0, j(1.05), j(0.92))
    img[body] = 150
    if lateral:
        img[_ellipse(yy, xx, 0.0, 0.05, j(0.6), j(0.55))] = 70
        img[_ellipse(yy, xx, 0.2, -0.2, j(0.3), j(0.3))] = 165
    else:
        lungs = np.zeros_like(body)
        for side in (-1, 1):
            lungs |= _ellipse(yy, xx, -0.05, side * 0.42, j(0.62), j(0.33), side * -0.08)
        img[lungs] = 60
        ribs = (np.sin((yy * 9 + 0.6 * np.abs(xx) ** 2 * 4) * np.pi) > 0.75) & lungs
        img[ribs] += 28
        img[_ellipse(yy, xx, 0.0, 0, 1.0, 0.09)] = 185  # spine and mediastinum
        if effusion:  # dense basal opacity whose upper edge (meniscus) climbs towards the chest wall
            sides = [-1, 1] if rng.random() < 0.5 else [int(rng.choice([-1, 1]))]
            for s in sides:
                lung = _ellipse(yy, xx, -0.05, s * 0.42, 0.7, 0.38, s * -0.08)
                level = rng.uniform(0.05, 0.2) - 0.35 * np.clip(s * xx - 0.2, 0, None)
                img[lung & (yy > level)] = 140
        heart_rx = j(0.45 if cardiomegaly else 0.24)
        img[_ellipse(yy, xx, 0.38, 0.08, j(0.26), heart_rx)] = (
            210  # drawn over any effusion and brighter: the silhouette stays visible
        )
    img = ndimage.gaussian_filter(img, 1.5) * _shading(rng, height, width)
    img += 6 * _noise(rng, img.shape, 1) + 3 * rng.standard_normal(img.shape)
    return _to_uint8(img)


CHEXPERT_COLUMNS = [
    "No Finding",
    "Enlarged Cardiomediastinum",
    "Cardiomegaly",
    "Lung Opacity",
    "Lung Lesion",
    "Edema",
    "Consolidation",
    "Pneumonia",
    "Atelectasis",
    "Pneumothorax",
    "Pleural Effusion",
    "Pleural Other",
    "Fracture",
    "Support Devices",
]


def write_chexpert(root: Path, patients: range, seed: int, size: int, truth: dict) -> None:
    """CheXpert-v1.0-small layout: train/patientNNNNN/studyN/view1_frontal.jpg + train.csv (1.0 / 0.0 / -1.0 / blank)."""
    base = root / "CheXpert-v1.0-small"
    rows = []
    height, width = round(size * 1.2), size
    for p in patients:
        rng = _rng(seed, "chexpert", p)
        for study in range(1, 2 + int(rng.integers(0, 3))):  # 1-3 studies per patient
            finding = (p + study) % 4  # 0 none, 1 cardiomegaly, 2 effusion, 3 both
            cardio, effusion = finding in (1, 3), finding in (2, 3)
            rel = f"CheXpert-v1.0-small/train/patient{p + 1:05d}/study{study}/view1_frontal.jpg"
            _save_jpeg(chest_xray(rng, height, width, cardio, effusion), root / rel)
            cells = {c: "" for c in CHEXPERT_COLUMNS}
            cells["No Finding"] = "1.0" if finding == 0 else ""
            cells["Cardiomegaly"] = "1.0" if cardio else ("0.0" if rng.random() < 0.3 else "")
            cells["Pleural Effusion"] = "1.0" if effusion else ""
            if rng.random() < 0.2:
                cells["Atelectasis"] = "-1.0"  # uncertain mention of an observation the images do not draw
            rows.append([rel, "Female" if p % 2 else "Male", 40 + p % 45, "Frontal", "PA"] + list(cells.values()))
            if p % 7 == 3 and study == 1:  # a lateral view: excluded by the manifest's Frontal filter
                rel_lat = rel.replace("view1_frontal", "view2_lateral")
                _save_jpeg(chest_xray(rng, height, width, cardio, effusion, lateral=True), root / rel_lat)
                rows.append([rel_lat, "Female" if p % 2 else "Male", 40 + p % 45, "Lateral", ""] + list(cells.values()))
                truth["defects"].append({"source_file": root / rel_lat, "reason": "excluded_by_filter"})
    _write_csv(base / "train.csv", ["Path", "Sex", "Age", "Frontal/Lateral", "AP/PA"] + CHEXPERT_COLUMNS, rows)


# ---------------------------------------------------------------- brain MRI (NIfTI)


def brain_flair_volume(rng, size: int, depth: int, tumour_slice: int) -> tuple[np.ndarray, np.ndarray]:
    """FLAIR-like head volume (x, y, z) and its tumour mask: CSF dark, a hyperintense glioma with
    oedema centred on axial slice `tumour_slice`."""
    z = np.linspace(-1, 1, depth)
    yy, xx = _grid(size, size, rng, jitter=1.2)
    head_x, head_y = rng.uniform(0.8, 1.0), rng.uniform(0.65, 0.85)  # head shape varies between patients
    volume = np.zeros((size, size, depth))
    mask = np.zeros((size, size, depth), dtype=np.uint8)
    side = rng.choice([-1, 1])
    ty, tx = rng.uniform(-0.3, 0.2), side * rng.uniform(0.3, 0.45)
    t_radius = rng.uniform(0.22, 0.3)
    texture = _noise(rng, (size, size), 2)
    for k in range(depth):
        # the head is wider above the middle than below it, and the ventricles sit above the middle,
        # so slices at different levels differ in shape
        scale = np.sqrt(max(0.0, 1 - ((z[k] - 0.25) / 1.25) ** 2))
        if scale < 0.2:
            continue
        elongation = 1.0 + 0.25 * max(0.0, -z[k])
        head = _ellipse(xx, yy, 0, 0, head_x * scale * elongation, head_y * scale)  # x is the first (left-right) axis
        brain = _ellipse(xx, yy, 0, 0, (head_x - 0.1) * scale * elongation, (head_y - 0.1) * scale)
        sl = np.where(head, 260.0, 0.0)
        sl[brain] = 420 + 40 * texture[brain]
        ventricle_size = max(0.0, 1 - ((z[k] - 0.02) / 0.25) ** 2)
        if z[k] > 0.25:  # high convexity: sulci instead of ventricles
            sl[brain & (np.sin(12 * np.hypot(xx, yy) + 3 * texture) > 0.6)] = 150
        if ventricle_size > 0.1:
            ventricles = _ellipse(xx, yy, -0.1, 0.14, 0.32 * ventricle_size, 0.1 * ventricle_size, 0.3) | _ellipse(
                xx, yy, -0.1, -0.14, 0.32 * ventricle_size, 0.1 * ventricle_size, -0.3
            )
            sl[ventricles & brain] = 60
        dz = (k - tumour_slice) / depth * 2
        r = t_radius**2 - (dz * 1.4) ** 2
        if r > 0:
            core = _ellipse(xx, yy, ty, tx, np.sqrt(r), np.sqrt(r))
            edema = _ellipse(xx, yy, ty, tx, np.sqrt(r) * 1.5, np.sqrt(r) * 1.5) & brain
            sl[edema] = 720
            sl[core] = 950
            mask[:, :, k] = np.where(core, 1, np.where(edema, 2, 0))
        volume[:, :, k] = sl
    volume *= _shading(rng, size, size, 0.2)[..., None]  # coil bias field
    volume += 15 * rng.standard_normal(volume.shape)
    return np.clip(volume, 0, None), mask


def write_brats(root: Path, patients: range, seed: int, size: int, truth: dict) -> None:
    """BraTS 2021 layout: BraTS2021_NNNNN/BraTS2021_NNNNN_flair.nii.gz and _seg.nii.gz."""
    import nibabel as nib

    depth = 40
    affine = np.diag([240 / size, 240 / size, 155 / depth, 1.0])
    levels = [round(0.3 * (depth - 1)), round(0.5 * (depth - 1)), round(0.7 * (depth - 1))]
    for p in patients:
        rng = _rng(seed, "brats", p)
        case = f"BraTS2021_{p:05d}"
        volume, mask = brain_flair_volume(rng, size, depth, tumour_slice=levels[p % 3])
        folder = root / case
        folder.mkdir(parents=True, exist_ok=True)
        nib.save(nib.Nifti1Image(volume.astype(np.float32), affine), folder / f"{case}_flair.nii.gz")
        nib.save(nib.Nifti1Image(mask, affine), folder / f"{case}_seg.nii.gz")


# ---------------------------------------------------------------- retinal OCT (JPEG)


def oct_bscan(rng, height: int, width: int, kind: str) -> np.ndarray:
    """OCT B-scan: layered retina over a bright RPE line. Drusen lift the RPE in small domes, CNV in
    one large dome over a bright lesion, DME thickens the retina and hollows it with dark cysts."""
    x = np.linspace(-1, 1, width)
    y = np.arange(height)[:, None] / height
    tilt = rng.uniform(-0.12, 0.12)
    rpe = rng.uniform(0.6, 0.75) + tilt * x + rng.uniform(-0.06, 0.1) * x**2
    thickness = np.full_like(x, 0.22) - 0.08 * np.exp(-((x / 0.18) ** 2))  # foveal pit
    if kind == "DME":
        thickness = thickness + 0.14 * np.exp(-((x / 0.5) ** 2)) + 0.08 * np.exp(-((x / 0.18) ** 2))
    lift = np.zeros_like(x)
    if kind == "DRUSEN":
        for cx in rng.uniform(-0.7, 0.7, size=int(rng.integers(4, 7))):
            lift += 0.05 * np.exp(-(((x - cx) / 0.06) ** 2))
    if kind == "CNV":
        cx = rng.uniform(-0.25, 0.25)
        lift += 0.16 * np.exp(-(((x - cx) / 0.22) ** 2))
    rpe_line = rpe - lift
    top = rpe_line - thickness
    inside = (y > top) & (y < rpe_line)
    depth_in = (y - top) / thickness
    img = np.full((height, width), 12.0)
    img += np.where(inside, 90 + 70 * np.exp(-depth_in / 0.12) + 25 * np.sin(depth_in * 9), 0)
    img += np.where(np.abs(y - rpe_line) < 0.018, 140, 0)
    img += np.where((y > rpe + 0.02) & (y < rpe + 0.14), 70, 0)  # choroid
    if kind == "CNV":
        lesion = (y > rpe_line + 0.01) & (y < rpe) & (np.abs(x - cx) < 0.25)
        img[lesion] = 190
    if kind == "DME":
        for _ in range(int(rng.integers(3, 6))):
            cx, cy = rng.uniform(-0.45, 0.45), rng.uniform(0.3, 0.65)
            r = rng.uniform(0.06, 0.1)
            col = int((cx + 1) / 2 * (width - 1))
            cy = top[col] + cy * thickness[col]
            cyst = ((x[None, :] - cx) / r) ** 2 + ((y - cy) / (r * 0.8 * width / height / 2)) ** 2 < 1
            img[cyst & inside] = 20
    img = ndimage.gaussian_filter(img, 0.8)
    img *= rng.gamma(4.0, 0.25, size=img.shape) * _shading(rng, height, width, 0.3)  # speckle, signal fall-off
    return _to_uint8(img)


def write_kermany_oct(root: Path, patients: range, seed: int, size: int, truth: dict) -> None:
    """Kermany OCT2017 layout: OCT2017/{train,test}/<CLASS>/<CLASS>-<patient>-<n>.jpeg."""
    classes = ["CNV", "DME", "DRUSEN", "NORMAL"]
    height, width = size, round(size * 4 / 3)
    for p in patients:
        rng = _rng(seed, "kermany_oct", p)
        kind = classes[p % 4]
        patient = 1000000 + p * 7919 % 900000
        split = "test" if p % 10 == 9 else "train"  # the release's own split, which curation ignores
        for n in range(1 + int(rng.integers(1, 3))):
            _save_jpeg(
                oct_bscan(rng, height, width, kind), root / "OCT2017" / split / kind / f"{kind}-{patient}-{n + 1}.jpeg"
            )


# ---------------------------------------------------------------- dermoscopy (JPEG)


def dermoscopy(rng, height: int, width: int, dx: str) -> np.ndarray:
    """Dermoscopic image of one lesion on skin: nevus uniform brown and round; melanoma large,
    irregular, dark with blue-grey areas; keratosis light tan and waxy; BCC pink with white sheen and
    branching red vessels."""
    yy, xx = _grid(height, width, rng)
    skin = np.array([226, 178, 150]) * rng.uniform(0.9, 1.05)
    img = np.ones((height, width, 3)) * skin
    img += 6 * _noise(rng, (height, width), 3)[..., None]
    angle = rng.uniform(0, np.pi)
    r = np.hypot(yy, xx * width / height)
    theta = np.arctan2(yy, xx)
    if dx == "mel":
        radius = 0.62 + 0.14 * np.sin(3 * theta + angle) + 0.08 * _noise(rng, yy.shape, 4)
        lesion = r < radius
        colour = np.array([70, 40, 28]) + np.array([30, 20, 12]) * _noise(rng, yy.shape, 3)[..., None]
        img[lesion] = colour[lesion]
        blue = lesion & (_noise(rng, yy.shape, 5) > 0.6)
        img[blue] = [95, 105, 130]
        img[lesion & (_noise(rng, yy.shape, 2) > 1.2)] = [25, 15, 12]
    elif dx == "nv":
        lesion = _ellipse(yy, xx, 0, 0, 0.42, 0.36, angle)
        img[lesion] = np.array([140, 92, 60]) + 8 * _noise(rng, yy.shape, 2)[lesion][:, None]
    elif dx == "bkl":
        lesion = _ellipse(yy, xx, 0, 0, 0.5, 0.38, angle)
        waxy = 25 * np.sin(16 * (yy * np.cos(angle) + xx * np.sin(angle)) + 3 * _noise(rng, yy.shape, 3))
        img[lesion] = np.array([196, 156, 104]) + waxy[lesion][:, None]
    else:  # bcc
        lesion = _ellipse(yy, xx, 0, 0, 0.46, 0.46, angle)
        img[lesion] = [222, 132, 138]
        img[lesion & (_noise(rng, yy.shape, 3) > 0.8)] = [245, 228, 232]
        for _ in range(4):
            t0 = rng.uniform(0, 2 * np.pi)
            vessel = np.abs(np.sin(theta * 2 + t0 + 4 * r) * r) < 0.02
            img[vessel & lesion] = [170, 25, 40]
    img = ndimage.gaussian_filter(img, (0.8, 0.8, 0))
    vignette = np.clip(1.25 - 0.45 * np.hypot(yy, xx), 0, 1)[..., None]
    return _to_uint8(img * vignette * _shading(rng, height, width, 0.15)[..., None])


def write_ham10000(root: Path, patients: range, seed: int, size: int, truth: dict) -> None:
    """HAM10000 layout: HAM10000_images_part_1/ISIC_NNNNNNN.jpg + HAM10000_metadata.csv (lesion_id, image_id, dx, ...)."""
    classes = ["mel", "nv", "bkl", "bcc"]
    height, width = size, round(size * 4 / 3)
    rows = []
    image_number = 24306
    for p in patients:
        rng = _rng(seed, "ham10000", p)
        dx = classes[p % 4]
        lesion_id = f"HAM_{p * 104729 % 9999999:07d}"
        for _ in range(1 + int(rng.random() < 0.35)):
            image_id = f"ISIC_{image_number:07d}"
            image_number += 1
            _save_jpeg(dermoscopy(rng, height, width, dx), root / "HAM10000_images_part_1" / f"{image_id}.jpg")
            rows.append([lesion_id, image_id, dx, "histo", 35 + p % 50, "male" if p % 3 else "female", "back"])
    # defects: a truncated JPEG, and an image with no row in the metadata table
    truncated = root / "HAM10000_images_part_1" / f"ISIC_{image_number:07d}.jpg"
    _save_jpeg(dermoscopy(_rng(seed, "ham10000", "truncated"), height, width, "nv"), truncated)
    truncated.write_bytes(truncated.read_bytes()[:300])
    rows.append(["HAM_9999998", truncated.stem, "nv", "histo", 50, "male", "back"])
    truth["defects"].append({"source_file": truncated, "reason": "unreadable"})
    orphan = root / "HAM10000_images_part_1" / f"ISIC_{image_number + 1:07d}.jpg"
    _save_jpeg(dermoscopy(_rng(seed, "ham10000", "orphan"), height, width, "bkl"), orphan)
    truth["defects"].append({"source_file": orphan, "reason": "no_label"})
    _write_csv(
        root / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"], rows
    )


# ---------------------------------------------------------------- colonoscopy (JPEG)


def colonoscopy(rng, height: int, width: int, kind: str) -> np.ndarray:
    """Endoscopic frame inside the circular field of view, with Kvasir's green position box."""
    yy0, xx0 = _grid(height, width)
    yy, xx = _grid(height, width, rng)
    r = np.hypot(yy, xx * width / height)
    theta = np.arctan2(yy, xx)
    phase = rng.uniform(0, 2 * np.pi)
    if kind == "esophagitis":
        base = np.array([232, 196, 184])
    elif kind == "normal-cecum":
        base = np.array([222, 142, 98])
    else:
        base = np.array([206, 112, 100])
    img = np.ones((height, width, 3)) * base * rng.uniform(0.92, 1.05)
    img *= (1 - 0.55 * np.exp(-((r / 0.35) ** 2)))[..., None]  # dark lumen in the centre
    if kind == "normal-cecum":
        img *= (1 - 0.18 * (np.sin(r * 18 + phase) > 0.4))[..., None]  # circular folds
        img[_ellipse(yy, xx, 0.25, 0.3, 0.06, 0.18, 0.4)] = [120, 55, 40]  # appendiceal orifice
    elif kind == "esophagitis":
        streaks = (np.sin(theta * 7 + phase) > 0.75) & (r > 0.3)
        img[streaks] = [200, 40, 45]
    else:
        img *= (1 - 0.12 * (np.sin(yy * 10 + xx * 4 + phase) > 0.5))[..., None]
        cy, cx = rng.uniform(-0.25, 0.25), rng.uniform(-0.3, 0.3)
        polyp = _ellipse(yy, xx, cy, cx, 0.33, 0.33 * height / width)
        if kind == "polyps":
            img[polyp] = [192, 72, 70]
        else:  # dyed-lifted-polyps: indigo carmine under the lifted mucosa
            img[polyp] = [70, 110, 192]
            img[_ellipse(yy, xx, cy, cx, 0.5, 0.5 * height / width) & ~polyp] = [120, 140, 200]
        highlight = _ellipse(yy, xx, cy - 0.12, cx - 0.06, 0.05, 0.05)
        img[highlight] = 250
    img = ndimage.gaussian_filter(img, (1, 1, 0)) * _shading(rng, height, width, 0.35)[..., None]
    img += 5 * _noise(rng, (height, width), 2)[..., None]
    img[np.hypot(yy0, xx0 * width / height) > 1.0] = 0  # outside the endoscope's (fixed) field of view
    img[int(0.72 * height) : int(0.95 * height), int(0.02 * width) : int(0.22 * width)] = [30, 120, 50]
    return _to_uint8(img)


def write_kvasir_v2(root: Path, patients: range, seed: int, size: int, truth: dict) -> None:
    """Kvasir v2 layout: kvasir-dataset-v2/<class>/<uuid>.jpg, one folder per class (no patient ids)."""
    import uuid

    classes = ["polyps", "dyed-lifted-polyps", "esophagitis", "normal-cecum"]
    height, width = size, round(size * 1.2)
    first = None
    for i in patients:
        rng = _rng(seed, "kvasir_v2", i)
        kind = classes[i % 4]
        name = uuid.UUID(bytes=rng.bytes(16), version=4)
        path = root / "kvasir-dataset-v2" / kind / f"{name}.jpg"
        image = colonoscopy(rng, height, width, kind)
        _save_jpeg(image, path)
        first = first or (path, image)
    # defects: an exact copy, a re-encoded brighter copy, and a text file that claims to be a JPEG
    path, image = first
    copy = path.with_name("fe1b2c3d-0000-4000-8000-000000000001.jpg")
    shutil.copyfile(path, copy)
    truth["defects"].append({"source_file": copy, "reason": "exact_duplicate", "duplicate_of": path})
    near = path.with_name("fe1b2c3d-0000-4000-8000-000000000002.jpg")
    _save_jpeg(_to_uint8(image.astype(float) * 1.03 + 2), near, quality=70)
    truth["defects"].append({"source_file": near, "reason": "near_duplicate", "duplicate_of": path})
    fake = root / "kvasir-dataset-v2" / "polyps" / "fe1b2c3d-0000-4000-8000-000000000003.jpg"
    fake.write_text("This is not an image: a note saved with the wrong extension.\n")
    truth["defects"].append({"source_file": fake, "reason": "not_an_image"})


# ---------------------------------------------------------------- histopathology (large TIFF)


def lymph_node_histology(rng, size: int, tumour: bool, glass_fraction: float) -> np.ndarray:
    """H&E lymph-node field: dense small dark lymphocytes; metastasis as sheets of large pale nuclei
    in pink cytoplasm. A band of empty glass on the right gives background tiles."""
    stroma = np.array([236, 190, 215]) if tumour else np.array([222, 170, 205])
    img = np.ones((size, size, 3)) * stroma
    img += 8 * _noise(rng, (size, size), 4)[..., None]
    spacing, radius, colour = (9, 3.6, np.array([150, 95, 175])) if tumour else (4, 1.5, np.array([70, 35, 120]))
    centres = np.zeros((size, size))
    ys, xs = np.meshgrid(np.arange(0, size, spacing), np.arange(0, size, spacing), indexing="ij")
    jitter = rng.uniform(-spacing / 3, spacing / 3, size=(2,) + ys.shape)
    cy, cx = np.clip(ys + jitter[0], 0, size - 1).astype(int), np.clip(xs + jitter[1], 0, size - 1).astype(int)
    keep = rng.random(ys.shape) < (0.7 if tumour else 0.9)
    centres[cy[keep], cx[keep]] = 1
    disk = np.hypot(*np.mgrid[-6:7, -6:7]) <= radius
    nuclei = np.clip(ndimage.convolve(centres, disk.astype(float), mode="constant"), 0, 1)
    nuclei = ndimage.gaussian_filter(nuclei, 0.7)
    img = img * (1 - nuclei[..., None]) + colour * nuclei[..., None]
    glass = np.arange(size)[None, :] >= size * (1 - glass_fraction)
    img[np.broadcast_to(glass, (size, size))] = [243, 241, 244]
    return _to_uint8(img + 4 * rng.standard_normal(img.shape))


def write_camelyon16(root: Path, patients: range, seed: int, size: int, truth: dict) -> None:
    """CAMELYON16 layout: training/{normal,tumor}/{normal,tumor}_NNN.tif. The real slides are pyramidal
    whole-slide images; these are single-level regions at a fixed magnification, tiled by curation."""
    import tifffile

    for p in patients:
        rng = _rng(seed, "camelyon16", p)
        tumour = p % 2 == 1
        kind = "tumor" if tumour else "normal"
        image = lymph_node_histology(rng, size * 3, tumour, glass_fraction=0.34 if p % 3 == 0 else 0.0)
        path = root / "training" / kind / f"{kind}_{p // 2 + 1:03d}.tif"
        path.parent.mkdir(parents=True, exist_ok=True)
        tifffile.imwrite(path, image, photometric="rgb")


WRITERS = {
    "rsna_pe": write_rsna_pe,
    "chexpert": write_chexpert,
    "brats": write_brats,
    "kermany_oct": write_kermany_oct,
    "ham10000": write_ham10000,
    "kvasir_v2": write_kvasir_v2,
    "camelyon16": write_camelyon16,
}


def write_corpus(
    out_dir: str | Path,
    patients: int = 40,
    seed: int = 0,
    size: int = 128,
    sources: tuple[str, ...] = SOURCES,
    progress: bool = True,
    first_patient: int = 0,
) -> dict:
    """Write the embedded raw corpus, one folder per source named as its manifest's `root`.

    Args:
        out_dir: the raw directory to create (must be empty or absent).
        patients: patients (lesions, slides, or images where a source has no patients) per source.
        seed: seed; the same seed writes byte-identical files.
        size: base side of the written images in pixels (CT and MRI matrices, the short side of
            photographs; histology regions are three tiles wide).
        sources: which sources to write.
        progress: show a progress bar.
        first_patient: the number of the first patient written. A second corpus with the same seed
            and `first_patient` past the first's patients holds other patients of the same sources
            (the downstream experiment's held-out test patients).

    Returns:
        The ground truth written to `corpus.json`: defects with the reason curation must give, and
        the patient identifiers written into DICOM headers.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"corpus directory is not empty: {out_dir}")
    unknown = set(sources) - set(WRITERS)
    if unknown:
        raise ValueError(f"unknown corpus sources {sorted(unknown)}; known: {list(WRITERS)}")
    if patients < 4:
        raise ValueError(f"need at least 4 patients per source (one per class), got {patients}")
    out_dir.mkdir(parents=True, exist_ok=True)
    if first_patient < 0:
        raise ValueError(f"first_patient must be at least 0, got {first_patient}")
    truth = {
        "seed": seed,
        "patients": patients,
        "first_patient": first_patient,
        "size": size,
        "sources": list(sources),
        "defects": [],
        "phi": [],
    }
    numbers = range(first_patient, first_patient + patients)
    for name in tqdm(sources, desc="corpus", unit="source", disable=not progress):
        WRITERS[name](out_dir / name, numbers, seed, size, truth)
    stray = out_dir / ".DS_Store"  # what a copied folder often carries; no manifest claims it
    stray.write_bytes(b"\x00\x00\x00\x01Bud1" + bytes(32))
    truth["defects"].append({"source_file": stray, "reason": "unclaimed"})
    for defect in truth["defects"]:
        for key in ("source_file", "duplicate_of"):
            if key in defect:
                defect[key] = Path(defect[key]).relative_to(out_dir).as_posix()
    # the truth file sits beside the corpus, not in it, so that the raw directory holds only raw data
    truth_path = out_dir.parent / f"{out_dir.name}.corpus.json"
    truth_path.write_text(json.dumps(truth, indent=2))
    return truth
