"""Readers against real DICOM files (pydicom / pydicom-data) and independent computations."""

import numpy as np
import pydicom
import pytest
from conftest import pydicom_file
from pydicom.pixels import apply_voi_lut

from medsyn.data.preprocess import hounsfield_window
from medsyn.data.readers import (
    UnreadableImageError,
    dicom_to_display,
    load_dicom,
    read_dicom,
    read_nifti,
    read_raster,
    sniff_format,
)


def test_ct_is_returned_in_hounsfield_units():
    path = pydicom_file("CT_small.dcm")
    ds = pydicom.dcmread(path)
    expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
    hu = read_dicom(path)
    assert hu.shape == (128, 128)
    np.testing.assert_array_equal(hu, expected)


def test_hounsfield_window_matches_the_formula_on_real_ct():
    hu = read_dicom(pydicom_file("CT_small.dcm"))
    width, level = 700, 100
    expected = np.clip((hu - (level - width / 2)) / width, 0, 1) * 255
    windowed = hounsfield_window(hu)
    assert windowed.dtype == np.uint8
    assert np.abs(windowed - expected).max() <= 0.5 + 1e-9


def test_hounsfield_window_hand_worked_values():
    hu = np.array([-1000.0, -250.0, 100.0, 450.0, 3000.0])  # below, lower edge, level, upper edge, above
    np.testing.assert_array_equal(hounsfield_window(hu, width=700, level=100), [0, 0, 128, 255, 255])
    with pytest.raises(ValueError, match="width"):
        hounsfield_window(hu, width=0)


def test_enhanced_ct_uses_the_per_frame_rescale():
    path = pydicom_file("eCT_Supplemental.dcm")
    ds = pydicom.dcmread(path)
    groups = ds.SharedFunctionalGroupsSequence[0].PixelValueTransformationSequence[0]
    expected = ds.pixel_array.astype(np.float64) * float(groups.RescaleSlope) + float(groups.RescaleIntercept)
    hu = read_dicom(path)
    assert hu.shape == (2, 512, 512)
    np.testing.assert_array_equal(hu, expected)
    assert hu.min() == -1024  # air, only reached through the functional-group rescale


def test_monochrome1_radiograph_is_inverted_after_its_voi_window():
    path = pydicom_file("RG1_UNCI.dcm")
    ds = pydicom.dcmread(path)
    assert ds.PhotometricInterpretation == "MONOCHROME1"
    reference = apply_voi_lut(ds.pixel_array, ds) / (2**ds.BitsStored - 1) * 255  # pydicom's own VOI window
    display = dicom_to_display(load_dicom(path))
    assert np.abs((255 - display.astype(np.float64)) - reference).max() <= 1.0
    # bone bright: the display is the inverse of the stored values' ordering
    assert np.corrcoef(display.ravel()[::97], ds.pixel_array.ravel()[::97])[0, 1] < -0.9


@pytest.mark.parametrize(
    "compressed, uncompressed",
    [
        ("MR_small_jpeg_ls_lossless.dcm", "MR_small.dcm"),
        ("MR_small_RLE.dcm", "MR_small.dcm"),
        ("MR2_J2KR.dcm", "MR2_UNCR.dcm"),
        ("JPEG-LL.dcm", None),
    ],
)
def test_compressed_transfer_syntaxes_decode_through_the_plugins(compressed, uncompressed):
    pixels = read_dicom(pydicom_file(compressed))
    assert pixels.size and np.isfinite(pixels).all()
    if uncompressed:
        np.testing.assert_array_equal(pixels, read_dicom(pydicom_file(uncompressed)))


def test_colour_dicom_comes_back_as_rgb():
    pixels = read_dicom(pydicom_file("SC_rgb.dcm"))
    assert pixels.shape[-1] == 3 and pixels.dtype == np.uint8


def test_dicom_without_pixel_data_is_a_named_rejection():
    with pytest.raises(UnreadableImageError) as err:
        load_dicom(pydicom_file("rtplan.dcm"))
    assert err.value.reason == "no_pixel_data"


def test_truncated_dicom_is_unreadable():
    with pytest.raises(UnreadableImageError) as err:
        load_dicom(pydicom_file("MR_truncated.dcm"))
    assert err.value.reason == "unreadable"


def test_dicom_without_preamble_or_suffix_is_sniffed(tmp_path):
    target = tmp_path / "IMG0001"
    target.write_bytes(pydicom_file("CT_small.dcm").read_bytes())
    assert sniff_format(target) == "dicom"
    text = tmp_path / "notes"
    text.write_text("hello")
    assert sniff_format(text) == "unknown"


def test_nifti_is_reoriented_to_ras(tmp_path):
    import nibabel as nib

    data = np.arange(4 * 5 * 6, dtype=np.float32).reshape(4, 5, 6)
    lps = np.diag([-1.0, -1.0, 1.0, 1.0])  # stored left-to-right reversed, as LPS-ordered files are
    nib.save(nib.Nifti1Image(data, lps), tmp_path / "v.nii.gz")
    volume = read_nifti(tmp_path / "v.nii.gz")
    np.testing.assert_array_equal(volume, data[::-1, ::-1, :])


def test_truncated_nifti_and_jpeg_are_unreadable(tmp_path):
    import nibabel as nib
    from PIL import Image

    nib.save(nib.Nifti1Image(np.ones((8, 8, 8), np.float32), np.eye(4)), tmp_path / "v.nii.gz")
    data = (tmp_path / "v.nii.gz").read_bytes()
    (tmp_path / "v.nii.gz").write_bytes(data[: len(data) // 2])
    with pytest.raises(UnreadableImageError):
        read_nifti(tmp_path / "v.nii.gz")
    Image.fromarray(np.full((64, 64, 3), 120, np.uint8)).save(tmp_path / "a.jpg")
    (tmp_path / "a.jpg").write_bytes((tmp_path / "a.jpg").read_bytes()[:200])
    with pytest.raises(UnreadableImageError):
        read_raster(tmp_path / "a.jpg")
    (tmp_path / "b.png").write_text("not an image")
    with pytest.raises(UnreadableImageError) as err:
        read_raster(tmp_path / "b.png")
    assert err.value.reason == "not_an_image"


def test_16_bit_png_is_scaled_by_its_bit_range(tmp_path):
    from PIL import Image

    values = np.array([[0, 32768, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "a.png")
    np.testing.assert_array_equal(read_raster(tmp_path / "a.png"), [[0, 128, 255]])
