"""Fréchet distance against closed forms, KID against a naive double loop, the tiled distance and
the chunked nearest-neighbour search against independent plain implementations."""

import itertools

import numpy as np
import pytest
import torch

from medsyn.metrics import frechet_distance
from medsyn.metrics.fidelity import feature_statistics, kernel_distance
from medsyn.metrics.privacy import nearest_neighbours, tiled_l2


def test_frechet_distance_closed_forms():
    rng = np.random.default_rng(0)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    a, b = rng.uniform(0.5, 2, 5), rng.uniform(0.5, 2, 5)
    # diagonal covariances: ‖μ₁ − μ₂‖² + Σ (a + b − 2√(ab))
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-9)
    # scaled covariance Σ₂ = c² Σ₁: tr(Σ₁)(1 − c)²
    q = rng.normal(size=(5, 5))
    sigma = q @ q.T + np.eye(5)
    assert frechet_distance(mu1, sigma, mu1, 9 * sigma) == pytest.approx(np.trace(sigma) * (1 - 3) ** 2, rel=1e-7)
    # identical distributions
    assert abs(frechet_distance(mu1, sigma, mu1, sigma)) < 1e-8
    features = rng.normal(size=(400, 6))
    assert abs(frechet_distance(*feature_statistics(features), *feature_statistics(features))) < 1e-8
    with pytest.raises(ValueError, match="shapes"):
        frechet_distance(mu1, sigma, mu1[:3], sigma)


def test_kid_is_the_unbiased_mmd_of_a_naive_double_loop():
    rng = np.random.default_rng(1)
    x, y = rng.normal(size=(12, 4)), rng.normal(0.3, 1.2, size=(12, 4))

    def k(u, v):
        return (u @ v / 4 + 1) ** 3

    m = len(x)
    xx = sum(k(x[i], x[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i, j in itertools.permutations(range(m), 2)) / (m * (m - 1))
    xy = sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / (m * m)
    mean, std = kernel_distance(x, y, subsets=3, subset_size=m)  # whole sets: every subset is a permutation
    assert mean == pytest.approx(xx + yy - 2 * xy, rel=1e-10) and std == pytest.approx(0, abs=1e-12)
    # unbiased: two halves of one sample score near 0, far below a shifted sample
    same = rng.normal(size=(600, 4))
    near = kernel_distance(same[:300], same[300:], subsets=50, subset_size=200)[0]
    far = kernel_distance(same[:300], same[300:] + 1.0, subsets=50, subset_size=200)[0]
    assert abs(near) < 0.05 * far


def _tiled_l2_plain(a, b, grid):
    a, b = a.astype(float), b.astype(float)
    h, w = a.shape[0] // grid, a.shape[1] // grid
    worst = 0.0
    for i in range(grid):
        for j in range(grid):
            p, q = a[i * h:(i + 1) * h, j * w:(j + 1) * w], b[i * h:(i + 1) * h, j * w:(j + 1) * w]
            worst = max(worst, np.sqrt(np.sum((p - q) ** 2)) / np.sqrt(255 ** 2 * p.size))
    return worst


@pytest.mark.parametrize("shape", [(32, 48), (32, 32, 3), (64, 16, 1)])
def test_tiled_l2_matches_a_plain_loop(shape):
    rng = np.random.default_rng(2)
    a, b = rng.integers(0, 256, shape, dtype=np.uint8), rng.integers(0, 256, shape, dtype=np.uint8)
    assert tiled_l2(a, b) == pytest.approx(_tiled_l2_plain(a, b, 4), abs=1e-6)
    assert tiled_l2(a, a) == 0
    assert tiled_l2(np.zeros(shape, np.uint8), np.full(shape, 255, np.uint8)) == pytest.approx(1.0)
    # one changed tile is enough to be far: the maximum, not the mean, over tiles
    c = a.copy()
    c[:shape[0] // 4, :shape[1] // 4] = 255 - c[:shape[0] // 4, :shape[1] // 4]
    assert tiled_l2(a, c) == pytest.approx(_tiled_l2_plain(a, c, 4), abs=1e-6) and tiled_l2(a, c) > 0.3


def test_tiled_l2_rejects_bad_input():
    with pytest.raises(ValueError, match="shape"):
        tiled_l2(np.zeros((8, 8), np.uint8), np.zeros((8, 12), np.uint8))
    with pytest.raises(ValueError, match="uint8"):
        tiled_l2(np.zeros((8, 8)), np.zeros((8, 8)))
    with pytest.raises(ValueError, match="grid"):
        tiled_l2(np.zeros((10, 10), np.uint8), np.zeros((10, 10), np.uint8))


def test_chunked_nearest_neighbours_equal_brute_force():
    g = torch.Generator().manual_seed(0)
    queries, references = torch.randn(37, 16, generator=g), torch.randn(1000, 16, generator=g) * 3
    index, similarity = nearest_neighbours(queries, references, chunk=64)
    full = torch.nn.functional.normalize(queries, dim=1) @ torch.nn.functional.normalize(references, dim=1).T
    assert np.array_equal(index, full.argmax(1).numpy())
    np.testing.assert_allclose(similarity, full.max(1).values.numpy(), rtol=1e-6)
    copy_index, copy_similarity = nearest_neighbours(references[[5, 700]], references, chunk=100)
    assert copy_index.tolist() == [5, 700] and np.allclose(copy_similarity, 1, atol=1e-6)
