"""Fréchet distance against closed forms, KID against a naive double loop, the tiled distance and
the chunked nearest-neighbour search against independent plain implementations."""

import itertools

import numpy as np
import pytest
import torch

from medsyn.metrics import frechet_distance
from medsyn.metrics.fidelity import (
    FrechetDistanceOfDraws,
    KernelDistanceOfDraws,
    PrecisionRecallOfDraws,
    feature_statistics,
    kernel_distance,
    precision_recall,
    trace_sqrt_product,
)
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


def test_kid_of_bootstrap_draws_from_precomputed_kernels_equals_torch_fidelitys_on_the_drawn_rows():
    rng = np.random.default_rng(2)
    real, generated = rng.normal(size=(90, 16)), rng.normal(0.2, 1.1, size=(70, 16))
    kid = KernelDistanceOfDraws(real, generated)
    for size in (1000, 40):  # whole draws, and subsets smaller than the draws
        for seed in range(5):
            r, g = rng.integers(0, 90, 90), rng.integers(0, 70, 70)  # rows drawn with replacement
            expected = kernel_distance(real[r], generated[g], subsets=10, subset_size=size, seed=seed)
            assert kid(r, g, subsets=10, subset_size=size, seed=seed) == pytest.approx(expected, rel=1e-9, abs=1e-12)
    # the draws matter: another draw of the generated rows gives another value
    r, g = np.arange(90), np.arange(70)
    assert kid(r, g, subsets=10)[0] != pytest.approx(kid(r, rng.integers(0, 70, 70), subsets=10)[0], rel=1e-3)


def test_trace_sqrt_product_is_the_trace_of_scipys_matrix_square_root():
    from scipy.linalg import sqrtm

    rng = np.random.default_rng(3)
    for rows, dimensions in ((200, 8), (40, 12), (5, 12)):  # the last: Σ₁ singular (fewer rows than dimensions)
        a, b = rng.normal(size=(rows, dimensions)), rng.normal(0.3, 1.4, size=(rows + 7, dimensions))
        sigma1, sigma2 = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
        expected = np.trace(sqrtm(sigma1 @ sigma2)).real
        assert trace_sqrt_product(sigma1, sigma2) == pytest.approx(expected, rel=1e-7)


def test_frechet_distance_of_draws_equals_torch_fidelitys_on_the_drawn_rows():
    rng = np.random.default_rng(4)
    generated, real = rng.normal(0.2, 1.1, size=(70, 16)), rng.normal(size=(90, 16))
    fd = FrechetDistanceOfDraws(generated, real)
    for _ in range(10):
        g, r = rng.integers(0, 70, 70), rng.integers(0, 90, 90)  # rows drawn with replacement
        expected = frechet_distance(*feature_statistics(generated[g]), *feature_statistics(real[r]))
        assert fd(g, r) == pytest.approx(expected, rel=1e-9)
    assert abs(FrechetDistanceOfDraws(real, real)(np.arange(90), np.arange(90))) < 1e-9
    # fewer drawn rows than dimensions: the trace from the rows' cross products, singular covariances
    wide_generated, wide_real = rng.normal(0.1, 1.2, size=(12, 40)), rng.normal(size=(15, 40))
    wide = FrechetDistanceOfDraws(wide_generated, wide_real)
    for _ in range(10):
        g, r = rng.integers(0, 12, 12), rng.integers(0, 15, 15)
        a, b = wide_generated[g] - wide_generated[g].mean(axis=0), wide_real[r] - wide_real[r].mean(axis=0)
        mean_gap = wide_generated[g].mean(axis=0) - wide_real[r].mean(axis=0)
        # the eigenvalues of Σ₁Σ₂ from those of (A Bᵀ)(A Bᵀ)ᵀ / ((n₁ - 1)(n₂ - 1)), by eigvalsh (centred
        # rows leave one eigenvalue at 0, whose rounding its square root lifts to about 1e-7)
        product = (a @ b.T) @ (a @ b.T).T / ((len(a) - 1) * (len(b) - 1))
        cross = np.sqrt(np.clip(np.linalg.eigvalsh(product), 0, None)).sum()
        traces = np.trace(np.cov(a, rowvar=False)) + np.trace(np.cov(b, rowvar=False))
        assert wide(g, r) == pytest.approx(mean_gap @ mean_gap + traces - 2 * cross, rel=1e-8)
        torch_fidelitys = frechet_distance(*feature_statistics(wide_generated[g]), *feature_statistics(wide_real[r]))
        assert wide(g, r) == pytest.approx(torch_fidelitys, rel=1e-7)  # rounding of its near-zero eigenvalues
    with pytest.raises(ValueError, match="feature shapes"):
        FrechetDistanceOfDraws(generated[:, :3], real)


def test_precision_recall_of_draws_equals_torch_fidelitys_on_the_drawn_rows():
    """Bit for bit, with rows drawn several times (a repeated row is its own nearest neighbour) and
    clustered features whose balls overlap only in part."""
    rng = np.random.default_rng(5)
    centres = rng.normal(size=(6, 8))
    real = centres[rng.integers(0, 6, 60)] + 0.5 * rng.normal(size=(60, 8))
    generated = centres[rng.integers(0, 6, 45)] + 0.7 * rng.normal(size=(45, 8)) + 0.3
    manifolds = PrecisionRecallOfDraws(real, generated)
    seen = set()
    for _ in range(40):
        r, g = rng.integers(0, 60, 60), rng.integers(0, 45, 45)
        expected = precision_recall(real[r], generated[g])
        assert manifolds(r, g) == expected
        seen.add((expected["precision"], expected["recall"]))
    assert len(seen) > 10  # the draws matter
    assert manifolds(np.arange(60), np.arange(45)) == precision_recall(real, generated)
    with pytest.raises(ValueError, match="more than 3"):
        PrecisionRecallOfDraws(real[:3], generated)


def _tiled_l2_plain(a, b, grid):
    a, b = a.astype(float), b.astype(float)
    h, w = a.shape[0] // grid, a.shape[1] // grid
    worst = 0.0
    for i in range(grid):
        for j in range(grid):
            p, q = a[i * h : (i + 1) * h, j * w : (j + 1) * w], b[i * h : (i + 1) * h, j * w : (j + 1) * w]
            worst = max(worst, np.sqrt(np.sum((p - q) ** 2)) / np.sqrt(255**2 * p.size))
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
    c[: shape[0] // 4, : shape[1] // 4] = 255 - c[: shape[0] // 4, : shape[1] // 4]
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


def test_nearest_in_group_searches_only_the_querys_group():
    from medsyn.metrics.privacy import nearest_in_group

    torch.manual_seed(4)
    references, queries = torch.randn(50, 8), torch.randn(12, 8)
    reference_groups = [("derm", "dermoscopy") if i % 2 else ("rad", "ct") for i in range(50)]
    query_groups = [("derm", "dermoscopy"), ("rad", "ct"), ("path", "slide")] * 4
    index, similarity = nearest_in_group(queries, query_groups, references, reference_groups, chunk=7)
    for q, group in enumerate(query_groups):
        candidates = [r for r in range(50) if reference_groups[r] == group]
        if not candidates:  # no training image of its kind: reported, not matched elsewhere
            assert index[q] == -1 and np.isnan(similarity[q])
            continue
        cos = [float(torch.nn.functional.cosine_similarity(queries[q], references[r], dim=0)) for r in candidates]
        assert index[q] == candidates[int(np.argmax(cos))] and similarity[q] == pytest.approx(max(cos), abs=1e-6)


def test_memorisation_table_and_wilcoxon_by_hand():
    from medsyn.metrics.privacy import memorisation_table

    d = np.array([0.30, 0.25, 0.40, 0.22, 0.35, 0.10, 0.50])
    table = memorisation_table(d, ["a"] * 5 + ["b"] * 2).set_index("specialty")
    assert table.loc["a", "pairs"] == 5 and table.loc["a", "pairs_at_most_0.15"] == 0
    assert table.loc["a", "mean"] == pytest.approx(0.304) and table.loc["a", "sd"] == pytest.approx(
        np.std(d[:5], ddof=1)
    )
    # exact signed-rank test: all five differences positive and distinct is the most extreme of 2⁵ sign patterns
    assert table.loc["a", "wilcoxon_p_greater"] == pytest.approx(1 / 32)
    assert table.loc["b", "pairs_at_most_0.15"] == 1 and table.loc["all", "pairs"] == 7
    assert table.loc["all", "pairs_at_most_0.15"] == 1


def test_a_planted_copy_is_flagged(tmp_path):
    """A training image copied among generated ones is found as its own nearest neighbour and falls
    under the threshold; independently drawn images do not."""
    from tiny_models import write_tiny_dataset

    from medsyn.data.dataset import load_split
    from medsyn.metrics.privacy import COPY_THRESHOLD, memorisation_table, nearest_in_group

    root = write_tiny_dataset(tmp_path / "data", size=32)
    training, _ = load_split(root, "train")
    rng = np.random.default_rng(5)
    generated = rng.integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
    generated[2] = training[7]  # the planted copy
    embed = lambda images: torch.from_numpy(images.reshape(len(images), -1).astype(np.float32) - 128)  # noqa: E731
    index, _ = nearest_in_group(embed(generated), ["phantom"] * 6, embed(training), ["phantom"] * len(training))
    distances = np.array([tiled_l2(g, training[i]) for g, i in zip(generated, index)])
    assert index[2] == 7 and distances[2] == 0
    assert np.flatnonzero(distances <= COPY_THRESHOLD).tolist() == [2]
    assert memorisation_table(distances, ["tiny"] * 6).set_index("specialty").loc["tiny", "pairs_at_most_0.15"] == 1


def float64_nearest(queries, references):
    """The plain search: float64 cosines, numpy's argmax (the first, i.e. lower, index among equals)."""
    q = queries.double().numpy()
    r = references.double().numpy()
    similarity = (q / np.linalg.norm(q, axis=1, keepdims=True)) @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T
    return similarity.argmax(1), similarity.max(1)


def test_nearest_neighbours_equal_a_float64_search_through_near_ties_and_copies():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(20, 64, generator=g)
    # clusters of near-copies: float32 alone cannot always order them
    references = centres.repeat_interleave(50, 0) + 1e-4 * torch.randn(1000, 64, generator=g)
    references[600:610] = references[3]  # ten exact copies of one reference after it: the lower index wins
    queries = torch.cat([centres + 1e-5 * torch.randn(20, 64, generator=g), references[[3, 999]]])
    truth_index, truth_similarity = float64_nearest(queries, references)
    for candidates in (1, 4):
        index, similarity = nearest_neighbours(queries, references, chunk=77, candidates=candidates)
        assert np.array_equal(index, truth_index)
        np.testing.assert_allclose(similarity, truth_similarity, rtol=0, atol=1e-12)
    assert index[20] == 3  # the copy of reference 3 finds 3, not one of its ten later copies
    # float32 alone gets some of these wrong: the float64 step is what makes the search exact
    q32 = torch.nn.functional.normalize(queries, dim=1)
    r32 = torch.nn.functional.normalize(references, dim=1)
    assert not np.array_equal((q32 @ r32.T).argmax(1).numpy(), truth_index)
    with pytest.raises(ValueError, match="candidates"):
        nearest_neighbours(queries, references, candidates=0)
