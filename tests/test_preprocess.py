import numpy as np
import pytest

from medsyn.data.preprocess import (
    percentile_rescale,
    resize_center_crop,
    tile_image,
    tile_origins,
    tissue_fraction,
    voi_window,
)


def test_percentile_rescale_against_numpy():
    rng = np.random.default_rng(0)
    x = rng.normal(100, 30, size=(50, 40))
    lo, hi = np.percentile(x, [0.5, 99.5])
    expected = np.rint(np.clip((x - lo) / (hi - lo), 0, 1) * 255)
    np.testing.assert_array_equal(percentile_rescale(x), expected)
    assert percentile_rescale(np.full((3, 3), 7.0)).max() == 0
    with pytest.raises(ValueError):
        percentile_rescale(x, 60, 40)


def test_percentile_rescale_with_a_volume_reference():
    volume = np.stack([np.zeros((4, 4)), np.full((4, 4), 100.0)])
    assert percentile_rescale(volume[0], 0, 100, reference=volume).max() == 0
    assert percentile_rescale(volume[1], 0, 100, reference=volume).min() == 255


def test_voi_window_hand_worked():
    # DICOM PS3.3 C.11.2.1.2.1 with centre 50.5, width 101: x <= 0 -> min, x > 100 -> max, x = 50 -> 127.5
    np.testing.assert_array_equal(voi_window(np.array([0.0, 50.0, 101.0]), 50.5, 101), [0, 128, 255])


def test_resize_center_crop_shapes_and_identity():
    rng = np.random.default_rng(0)
    square = rng.integers(0, 255, (64, 64), dtype=np.uint8)
    assert resize_center_crop(square, 64) is square
    tall = rng.integers(0, 255, (300, 200, 3), dtype=np.uint8)
    out = resize_center_crop(tall, 100)
    assert out.shape == (100, 100, 3) and out.dtype == np.uint8
    small = rng.integers(0, 255, (20, 30), dtype=np.uint8)
    assert resize_center_crop(small, 64).shape == (64, 64)


def test_resize_keeps_the_centre():
    image = np.zeros((100, 300), dtype=np.uint8)
    image[:, 100:200] = 255  # the middle third is white; the crop keeps exactly that
    out = resize_center_crop(image, 50)
    assert out.shape == (50, 50) and out[:, 5:45].min() > 200


@pytest.mark.parametrize("length, tile", [(384, 128), (400, 128), (135, 128), (1000, 96), (128, 128), (250, 128)])
def test_tiles_overlap_at_most_ten_percent_and_stay_inside(length, tile):
    origins = tile_origins(length, tile, max_overlap=0.1)
    assert origins and origins[0] >= 0 and origins[-1] + tile <= length
    for a, b in zip(origins, origins[1:]):
        assert tile - (b - a) <= 0.1 * tile + 1  # +1 for rounding of fractional strides
    covered = np.zeros(length, bool)
    for o in origins:
        covered[o : o + tile] = True
    assert covered.mean() > 0.9


def test_tile_image_and_tissue_fraction():
    image = np.full((256, 384, 3), 240, np.uint8)
    image[:, :128] = 100
    tiles = tile_image(image, 128)
    assert [(y, x) for y, x, _ in tiles] == [(0, 0), (0, 128), (0, 256), (128, 0), (128, 128), (128, 256)]
    assert [round(tissue_fraction(t), 2) for _, _, t in tiles[:3]] == [1.0, 0.0, 0.0]
    assert tile_image(np.zeros((10, 10)), 128) == []
