"""Readers for the formats the public sources ship: DICOM, NIfTI and raster images.

Each reader returns pixels in physical units (Hounsfield units for CT) together with what a viewer
needs to display them; `to_display` turns those into the uint8 image a radiology viewer would show.
No reader returns or logs a patient identifier except `DicomImage.patient_key`, which callers use
only to group files by patient and then replace with a pseudonym.
"""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from medsyn.data.preprocess import hounsfield_window, percentile_rescale, voi_window


class UnreadableImageError(ValueError):
    """A file that cannot be decoded as an image; `reason` is a short code for `rejected.csv`."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


RASTER_SUFFIXES = {".png", ".jpg", ".jpeg", ".tif", ".tiff", ".bmp"}
NIFTI_SUFFIXES = (".nii", ".nii.gz")
DICOM_SUFFIXES = {".dcm", ".dicom"}


def sniff_format(path: str | Path) -> str:
    """Guess 'dicom', 'nifti' or 'image' from the suffix, then from the DICOM preamble; 'unknown' otherwise.

    Args:
        path: file to inspect.
    """
    path = Path(path)
    name = path.name.lower()
    if name.endswith(NIFTI_SUFFIXES):
        return "nifti"
    if path.suffix.lower() in DICOM_SUFFIXES:
        return "dicom"
    if path.suffix.lower() in RASTER_SUFFIXES:
        return "image"
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    return "unknown"


# ---------------------------------------------------------------- DICOM


@dataclass
class DicomImage:
    """Decoded DICOM pixel data in physical units plus the display attributes a viewer uses.

    pixels: float64 (frames, H, W) for grey or uint8 (frames, H, W, 3) for colour.
    """

    pixels: np.ndarray
    modality: str
    photometric: str
    voi: tuple[float, float] | None
    patient_key: str | None
    identifiers: tuple[str, ...] = ()  # identifying header values: kept in memory to keep them out of captions


# header elements that identify a patient, a study or a person (DICOM PS3.15 Annex E's basic profile, in part)
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "OtherPatientIDs",
    "PatientBirthDate",
    "AccessionNumber",
    "StudyID",
    "StudyDate",
    "InstitutionName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
)


def _identifying_values(ds) -> tuple[str, ...]:
    """The identifying header values of a DICOM dataset, person names also split into their parts."""
    values = set()
    for keyword in IDENTIFYING_KEYWORDS:
        value = str(ds.get(keyword, "") or "").strip()
        values.add(value)
        values.update(part.strip() for part in value.replace("^", "=").split("="))
    return tuple(sorted(v for v in values if len(v) >= 3))


def _first_value(value) -> float:
    """Window Center/Width may be multi-valued; a viewer opens the first."""
    if isinstance(value, (list, tuple)) or getattr(value, "VM", 1) > 1:
        return float(value[0])
    return float(value)


def _frame_rescale(ds, frame: int) -> tuple[float, float] | None:
    """Slope and intercept for one frame: per-frame group, shared group, then the top-level attributes.

    Enhanced CT/MR (e.g. `eCT_Supplemental.dcm`) keep them in functional groups, which pydicom's
    `apply_modality_lut` does not read.
    """
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame), ("SharedFunctionalGroupsSequence", 0)):
        sequence = ds.get(groups)
        if sequence and index < len(sequence):
            transform = sequence[index].get("PixelValueTransformationSequence")
            if transform:
                item = transform[0]
                return float(item.get("RescaleSlope", 1.0)), float(item.get("RescaleIntercept", 0.0))
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        return float(ds.get("RescaleSlope", 1.0)), float(ds.get("RescaleIntercept", 0.0))
    return None


def load_dicom(path: str | Path) -> DicomImage:
    """Decode a DICOM file (any transfer syntax the installed pydicom plugins handle).

    The modality LUT (Rescale Slope/Intercept, per frame for Enhanced objects, or a Modality LUT
    Sequence) is applied, so CT comes back in Hounsfield units. Colour data comes back as RGB.

    Args:
        path: the DICOM file.

    Raises:
        UnreadableImageError: not DICOM, truncated, no pixel data, or a codec that is not installed.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError
    from pydicom.pixels import apply_modality_lut

    try:
        ds = pydicom.dcmread(path, force=True)
    except (InvalidDicomError, EOFError, OSError, ValueError, KeyError) as err:
        raise UnreadableImageError("unreadable", f"not a readable DICOM file ({type(err).__name__})") from err
    if not any(tag in ds for tag in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
        raise UnreadableImageError("no_pixel_data", "DICOM file has no pixel data element")
    try:
        array = ds.pixel_array
    except Exception as err:  # pydicom raises many types for truncated data and missing codecs
        raise UnreadableImageError("unreadable", f"DICOM pixel data cannot be decoded: {err}") from err

    photometric = str(ds.get("PhotometricInterpretation", "MONOCHROME2"))
    frames = int(ds.get("NumberOfFrames", 1) or 1)
    samples = int(ds.get("SamplesPerPixel", 1))
    if frames == 1:
        array = array[np.newaxis]
    if samples == 1:
        if ds.get("PerFrameFunctionalGroupsSequence") or ds.get("SharedFunctionalGroupsSequence"):
            stack = []
            for i in range(frames):
                rescale = _frame_rescale(ds, i)
                slope, intercept = rescale if rescale else (1.0, 0.0)
                stack.append(array[i].astype(np.float64) * slope + intercept)
            pixels = np.stack(stack)
        else:
            pixels = np.asarray(apply_modality_lut(array, ds), dtype=np.float64)
    else:
        pixels = array if array.dtype == np.uint8 else _to_uint8_colour(array)
        photometric = "RGB"  # pydicom converts YBR to RGB when decoding

    voi = None
    if "WindowCenter" in ds and "WindowWidth" in ds:
        voi = (_first_value(ds.WindowCenter), _first_value(ds.WindowWidth))
    patient_key = str(ds.get("PatientID", "")) or None
    return DicomImage(
        pixels=pixels,
        modality=str(ds.get("Modality", "")),
        photometric=photometric,
        voi=voi,
        patient_key=patient_key,
        identifiers=_identifying_values(ds),
    )


def _to_uint8_colour(array: np.ndarray) -> np.ndarray:
    """16/32-bit colour to uint8 by its full bit range (what viewers do for RGB secondary captures)."""
    info = np.iinfo(array.dtype)
    return np.rint(array.astype(np.float64) / info.max * 255).astype(np.uint8)


def read_dicom(path: str | Path) -> np.ndarray:
    """Pixel data of a DICOM file in physical units (Hounsfield units for CT).

    Returns float64 H x W for a single grey frame, (frames, H, W) for multi-frame, and uint8 H x W x 3
    (or frames x H x W x 3) for colour.

    Args:
        path: the DICOM file.
    """
    pixels = load_dicom(path).pixels
    return pixels[0] if pixels.shape[0] == 1 else pixels


def dicom_to_display(
    image: DicomImage,
    frame: int = 0,
    ct_window: tuple[float, float] = (700, 100),
    percentiles: tuple[float, float] = (0.5, 99.5),
) -> np.ndarray:
    """One frame as a viewer shows it, in uint8.

    CT: the Hounsfield window `ct_window` = (width, level). Other grey modalities: the file's VOI
    window, or percentile clipping when it has none. MONOCHROME1 (e.g. many CR radiographs) is
    inverted so that bone is bright. Colour is returned as RGB.

    Args:
        image: a decoded DICOM from `load_dicom`.
        frame: frame index.
        ct_window: (width, level) in HU for CT.
        percentiles: (low, high) clipping percentiles when no VOI window is present.
    """
    pixels = image.pixels[frame]
    if pixels.ndim == 3:
        return pixels.astype(np.uint8)
    if image.modality.upper() == "CT":
        display = hounsfield_window(pixels, width=ct_window[0], level=ct_window[1])
    elif image.voi is not None:
        if not image.voi[1] >= 1:  # also NaN
            raise UnreadableImageError("impossible_window", "DICOM Window Width is below 1: no viewer can show it")
        display = voi_window(pixels, *image.voi)
    else:
        display = percentile_rescale(pixels, *percentiles)
    if image.photometric.upper() == "MONOCHROME1":
        display = 255 - display
    return display


# ---------------------------------------------------------------- NIfTI


def read_nifti(path: str | Path) -> np.ndarray:
    """Voxel data of a NIfTI volume, reoriented to RAS+ (nibabel's closest canonical), float64.

    Args:
        path: `.nii` or `.nii.gz` file.

    Raises:
        UnreadableImageError: the file is not a readable NIfTI volume.
    """
    import nibabel as nib

    try:
        volume = nib.as_closest_canonical(nib.load(str(path)))
        data = np.asarray(volume.get_fdata(dtype=np.float64))
    except Exception as err:  # nibabel raises ImageFileError, EOFError, zlib errors...
        raise UnreadableImageError("unreadable", f"not a readable NIfTI volume ({type(err).__name__})") from err
    if data.ndim == 4:  # multi-volume series (e.g. fMRI, DWI): take the first volume
        data = data[..., 0]
    if data.ndim != 3:
        raise UnreadableImageError("unreadable", f"expected a 3-D volume, got shape {data.shape}")
    return data


def slice_indices(depth: int, positions: list[float]) -> list[int]:
    """Slice indices at fractional positions along an axis (0.5 is the middle slice).

    Args:
        depth: number of slices.
        positions: fractions in [0, 1].
    """
    return sorted({min(depth - 1, max(0, round(p * (depth - 1)))) for p in positions})


def axial_slice_for_display(volume: np.ndarray, index: int) -> np.ndarray:
    """Axial slice `index` of a RAS+ volume, rotated so anterior is up and the patient's left on the right
    of the screen, as radiology viewers show it."""
    return np.rot90(volume[:, :, index])


# ---------------------------------------------------------------- raster images


def high_bit_depth_to_uint8(array: np.ndarray) -> np.ndarray:
    """Grey values in a 16- or 32-bit container to uint8, scaled by the bits the data use: the
    smallest depth of at least 8 bits that holds the largest value. A 12-bit detector's image in a
    16-bit PNG (values up to 4095) is scaled by 4095, not 65535, which would leave it nearly black;
    images of one bit depth keep their relative brightness."""
    values = np.asarray(array, dtype=np.float64)
    if values.size and values.min() < 0:
        values = values - values.min()  # signed data: shift to start at 0
    top = float(values.max()) if values.size else 0.0
    bits = max(8, int(np.ceil(np.log2(top + 1))))
    return np.rint(np.clip(values / (2**bits - 1), 0, 1) * 255).astype(np.uint8)


def read_raster(path: str | Path) -> np.ndarray:
    """Decode a PNG/JPEG/TIFF/BMP file to uint8 H x W (grey) or H x W x 3 (colour).

    16- and 32-bit grey images are scaled by the bit depth their data use (`high_bit_depth_to_uint8`);
    palette and alpha images become RGB.

    Args:
        path: the image file.

    Raises:
        UnreadableImageError: not an image, or a truncated one.
    """
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16B", "I;16L", "I"):
                return high_bit_depth_to_uint8(np.asarray(img))
            if img.mode not in ("L", "RGB"):
                img = img.convert("RGB")
            return np.asarray(img)
    except Image.DecompressionBombError as err:
        raise UnreadableImageError(
            "decompression_bomb", "image header claims more pixels than the decoder allows"
        ) from err
    except UnidentifiedImageError as err:
        raise UnreadableImageError("not_an_image", "file is not a recognised image") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise UnreadableImageError("unreadable", f"image cannot be decoded: {err}") from err
