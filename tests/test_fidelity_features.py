"""FID's InceptionV3 loads from a local file only (and fails at once, naming where it looked),
gives the FID torch-fidelity's own pipeline gives; precision/recall against a plain k-NN computation;
MS-SSIM diversity against hand-made cases."""

import time

import numpy as np
import pytest
import torch
from PIL import Image

from medsyn.metrics import frechet_distance
from medsyn.metrics.fidelity import (
    INCEPTION_ENV,
    INCEPTION_FILE,
    feature_statistics,
    inception_features,
    inception_weights,
    ms_ssim_diversity,
    precision_recall,
)


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """torch-fidelity's InceptionV3 with random weights, saved where a real weights file would be."""
    import torch_fidelity.feature_extractor_inceptionv3 as module

    original = module.FeatureExtractorInceptionV3.load_state_dict
    module.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    try:
        path = tmp_path_factory.mktemp("inception") / INCEPTION_FILE
        torch.manual_seed(0)
        path.parent.mkdir(exist_ok=True)
        # the constructor needs a file to read: give it an empty state dict, which the patch ignores
        torch.save({}, path)
        model = module.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
    finally:
        module.FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(model.state_dict(), path)
    return path


def test_missing_weights_fail_at_once_naming_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setenv(INCEPTION_ENV, str(tmp_path / "env" / "inception.pth"))
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError) as error:
        inception_features(np.zeros((2, 32, 32, 3), np.uint8), weights_path=tmp_path / "given.pth")
    assert time.perf_counter() - start < 1
    message = str(error.value)
    for place in (
        tmp_path / "given.pth",
        tmp_path / "env" / "inception.pth",
        tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE,
    ):
        assert str(place) in message


def test_weights_from_path_environment_or_hub_cache(random_inception, tmp_path, monkeypatch):
    monkeypatch.delenv(INCEPTION_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    assert inception_weights(random_inception) == random_inception
    monkeypatch.setenv(INCEPTION_ENV, str(random_inception))
    assert inception_weights() == random_inception
    monkeypatch.delenv(INCEPTION_ENV)
    cached = tmp_path / "torch_home" / "hub" / "checkpoints" / INCEPTION_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(random_inception.read_bytes())
    assert inception_weights() == cached


def test_fid_equals_torch_fidelitys_own_pipeline(random_inception, tmp_path):
    """Our features + frechet_distance give the FID `torch_fidelity.calculate_metrics` computes from
    PNG folders with the same weights."""
    import torch_fidelity

    rng = np.random.default_rng(0)
    real = rng.integers(0, 256, (24, 48, 48, 3), dtype=np.uint8)
    fake = np.clip(real.astype(int) // 2 + rng.integers(0, 60, real.shape), 0, 255).astype(np.uint8)
    for name, images in (("real", real), ("fake", fake)):
        (tmp_path / name).mkdir()
        for i, image in enumerate(images):
            Image.fromarray(image).save(tmp_path / name / f"{i:03d}.png")
    ours = frechet_distance(
        *feature_statistics(inception_features(real, random_inception, batch_size=10)),
        *feature_statistics(inception_features(list(fake), random_inception, batch_size=7)),
    )
    theirs = torch_fidelity.calculate_metrics(
        input1=str(tmp_path / "fake"),
        input2=str(tmp_path / "real"),
        fid=True,
        feature_extractor_weights_path=str(random_inception),
        cuda=False,
        cache=False,
        verbose=False,
        save_cpu_ram=True,
    )
    assert ours == pytest.approx(theirs["frechet_inception_distance"], rel=1e-4)
    assert ours > 0
    with pytest.raises(ValueError, match="uint8"):
        inception_features(real.astype(np.float32), random_inception)


def _precision_recall_plain(real, fake, k):
    """Kynkäänniemi et al.: a sample is inside a set's manifold if it is within some member's distance
    to that member's k-th nearest neighbour (itself excluded)."""

    def radii(points):
        d = np.linalg.norm(points[:, None] - points[None], axis=-1)
        return np.sort(d, axis=1)[:, k]  # column 0 is the point itself

    def inside(queries, points):
        d = np.linalg.norm(queries[:, None] - points[None], axis=-1)
        return np.mean(np.any(d <= radii(points)[None], axis=1))

    return inside(fake, real), inside(real, fake)


def test_precision_recall_against_a_plain_computation():
    rng = np.random.default_rng(2)
    real = rng.normal(size=(60, 5))
    fake = np.concatenate([rng.normal(size=(30, 5)), rng.normal(4, 0.3, size=(30, 5))])  # half off the manifold
    result = precision_recall(real, fake, neighbourhood=3)
    precision, recall = _precision_recall_plain(real, fake, 3)
    assert result["precision"] == pytest.approx(precision, abs=1e-6)
    assert result["recall"] == pytest.approx(recall, abs=1e-6)
    assert result["precision"] < 0.6  # the far half is not real-looking
    same = precision_recall(real, real.copy())
    assert same["precision"] == 1 and same["recall"] == 1
    with pytest.raises(ValueError, match="more than 3"):
        precision_recall(real[:3], fake)


def test_ms_ssim_diversity():
    rng = np.random.default_rng(3)
    one = (rng.random((64, 64)) * 255).astype(np.uint8)
    copies = [one] * 5
    value, window = ms_ssim_diversity(copies, pairs=10)
    assert value == pytest.approx(1.0, abs=1e-5) and window == 3  # 64 px: (3 − 1)·16 < 64 ≤ (5 − 1)·16
    varied = [(rng.random((64, 64, 3)) * 255).astype(np.uint8) for _ in range(5)]
    assert ms_ssim_diversity(varied, pairs=10)[0] < 0.2  # independent noise images share no structure
    assert ms_ssim_diversity([np.zeros((200, 200), np.uint8), np.zeros((200, 200), np.uint8)], pairs=3)[1] == 11
    with pytest.raises(ValueError, match="too small"):
        ms_ssim_diversity([np.zeros((32, 32), np.uint8)] * 2)
