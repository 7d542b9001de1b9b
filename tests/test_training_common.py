import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler
from diffusers.training_utils import compute_snr

from medsyn.training.common import (
    batch_indices,
    class_chances,
    diffusion_target,
    draw_batch,
    drawn_indices,
    make_lr_schedule,
    min_snr_weights,
    sample_noise,
    spectral_distance,
    step_generator,
    structural_dissimilarity,
    training_recipe,
)


def test_min_snr_weights_equal_min_snr_on_the_x0_error_for_epsilon_and_v():
    """Closed form: w·‖target − pred‖² = min(SNR, γ)·‖x0 − x̂0‖² whatever the prediction."""
    gamma = 5.0
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(64, 4, 8, 8, generator=g), torch.randn(64, 4, 8, 8, generator=g)
    t = torch.randint(0, 1000, (64,), generator=g)
    for kind in ("epsilon", "v_prediction"):
        scheduler = DDPMScheduler(
            num_train_timesteps=1000,
            beta_schedule="scaled_linear",
            beta_start=0.00085,
            beta_end=0.012,
            prediction_type=kind,
        )
        alpha = scheduler.alphas_cumprod[t].sqrt().view(-1, 1, 1, 1).double()
        sigma = (1 - scheduler.alphas_cumprod[t]).sqrt().view(-1, 1, 1, 1).double()
        x_t = scheduler.add_noise(x0, noise, t).double()
        target = diffusion_target(scheduler, x0, noise, t).double()
        prediction = target + 0.3 * torch.randn(target.shape, generator=g, dtype=torch.float64)
        x0_hat = (x_t - sigma * prediction) / alpha if kind == "epsilon" else alpha * x_t - sigma * prediction
        snr = compute_snr(scheduler, t).double()
        weighted = min_snr_weights(snr, gamma, kind) * ((target - prediction) ** 2).mean(dim=(1, 2, 3))
        expected = torch.clamp(snr, max=gamma) * ((x0.double() - x0_hat) ** 2).mean(dim=(1, 2, 3))
        torch.testing.assert_close(weighted, expected, rtol=1e-4, atol=1e-6)
    assert torch.equal(min_snr_weights(snr, None, "v_prediction"), torch.ones_like(snr))


def test_batches_cover_each_epoch_once_and_are_a_function_of_the_step():
    n, batch = 10, 4
    drawn = np.concatenate([batch_indices(n, batch, seed=3, step=k) for k in range(5)])  # 20 = two epochs
    assert sorted(drawn[:10]) == list(range(10)) and sorted(drawn[10:]) == list(range(10))
    assert np.array_equal(batch_indices(n, batch, 3, 4), batch_indices(n, batch, 3, 4))
    assert not np.array_equal(batch_indices(n, batch, 3, 0), batch_indices(n, batch, 4, 0))


def test_step_randomness_depends_only_on_seed_step_and_stream():
    a = torch.randn(5, generator=step_generator(1, 7))
    assert torch.equal(a, torch.randn(5, generator=step_generator(1, 7)))
    assert not torch.equal(a, torch.randn(5, generator=step_generator(1, 8)))
    assert not torch.equal(a, torch.randn(5, generator=step_generator(1, 7, stream=1)))


def test_noise_offset_adds_a_per_channel_constant():
    plain = sample_noise((2000, 3, 8, 8), step_generator(0, 0))
    offset = sample_noise((2000, 3, 8, 8), step_generator(0, 0), offset=0.5)
    channel_means = offset.mean(dim=(2, 3))
    assert abs(plain.mean(dim=(2, 3)).std().item() - 1 / 8) < 0.02  # 64 iid values: std of mean = 1/8
    assert abs(channel_means.std().item() - (0.25 + 1 / 64) ** 0.5) < 0.03


def test_ema_weights_swaps_in_the_average_and_back_even_for_a_generator():
    from diffusers.training_utils import EMAModel

    from medsyn.training.common import ema_weights

    model = torch.nn.Linear(3, 2)
    ema = EMAModel(model.parameters(), decay=0.5)
    average = [p.detach().clone() for p in ema.shadow_params]
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)
    trained = [p.detach().clone() for p in model.parameters()]
    with ema_weights(ema, model.parameters()):  # a generator, as callers pass it
        assert all(torch.equal(p, a) for p, a in zip(model.parameters(), average))
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))
    with ema_weights(None, model.parameters()):
        assert all(torch.equal(p, t) for p, t in zip(model.parameters(), trained))


def test_class_balanced_draws_see_every_class_equally_often_and_repeat_from_the_step():
    # 1,000 images of one class, 40 of another, 10 of a third (as CAMELYON16 against Kvasir)
    records = [{"source": "s", "labels": [c]} for c, n in (("a", 1000), ("b", 40), ("c", 10)) for _ in range(n)]
    chances = class_chances(records, "class")
    assert chances.sum() == pytest.approx(1.0)
    classes = np.array([r["labels"][0] for r in records])
    drawn = np.concatenate([drawn_indices(len(records), 32, 0, step, chances) for step in range(600)])
    shares = {c: float(np.mean(classes[drawn] == c)) for c in "abc"}
    assert all(abs(share - 1 / 3) < 0.02 for share in shares.values()), shares  # 19,200 draws: SE 0.0034
    # within the rare class every image is drawn, about equally often
    rare = np.bincount(drawn[classes[drawn] == "c"] - 1040, minlength=10)
    assert rare.min() > 0.75 * rare.mean()
    # unbalanced, the rare class is about 1 % of the draws, as in the data
    plain = np.concatenate(
        [drawn_indices(len(records), 32, 0, step, class_chances(records, "none")) for step in range(60)]
    )
    assert np.mean(classes[plain] == "c") < 0.02
    # a function of (seed, step): a resumed run draws the same batches; processes take slices of one draw
    assert np.array_equal(drawn_indices(1050, 32, 0, 7, chances), drawn_indices(1050, 32, 0, 7, chances))
    whole = draw_batch(0, 7, 1050, 8, (1, 2, 2), 1000, 0.1, chances=chances)
    halves = [draw_batch(0, 7, 1050, 8, (1, 2, 2), 1000, 0.1, rank=k, world=2, chances=chances) for k in (0, 1)]
    assert sorted(whole.index.tolist()) == sorted(halves[0].index.tolist() + halves[1].index.tolist())
    with pytest.raises(ValueError, match="balance"):
        class_chances(records, "classes")


def _ssim_by_hand(a: np.ndarray, b: np.ndarray) -> float:
    """Wang et al. (2004) SSIM with a 7-tap Gaussian window (σ 1.5), valid positions only, C1 = (0.01)²,
    C2 = (0.03)² for data in [0, 1], averaged over positions and channels: numpy, from the formula."""
    g = np.exp(-((np.arange(7) - 3) ** 2) / (2 * 1.5**2))
    g /= g.sum()

    def blur(x):  # separable, valid positions only, over the two image axes
        x = np.apply_along_axis(np.convolve, -1, x, g, mode="valid")
        return np.apply_along_axis(np.convolve, -2, x, g, mode="valid")

    mu_a, mu_b = blur(a), blur(b)
    var_a, var_b = blur(a * a) - mu_a**2, blur(b * b) - mu_b**2
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = 0.01**2, 0.03**2
    ssim = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return float(ssim.mean())


def test_structural_dissimilarity_is_one_minus_ssim_of_images_in_minus_one_to_one():
    rng = np.random.default_rng(0)
    x = rng.uniform(-1, 1, (2, 3, 16, 16))
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1)
    term = structural_dissimilarity(torch.tensor(y, dtype=torch.float32), torch.tensor(x, dtype=torch.float32))
    assert float(term) == pytest.approx(1 - _ssim_by_hand((y + 1) / 2, (x + 1) / 2), abs=1e-5)
    assert float(structural_dissimilarity(torch.tensor(x), torch.tensor(x))) == pytest.approx(0.0, abs=1e-6)


def test_spectral_distance_compares_amplitude_spectra_and_charges_blur_not_displacement():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(1)
    x = rng.uniform(-1, 1, (2, 3, 16, 16))
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1)
    by_hand = np.abs(np.abs(np.fft.rfft2(y, norm="ortho")) - np.abs(np.fft.rfft2(x, norm="ortho"))).mean()
    term = spectral_distance(torch.tensor(y, dtype=torch.float32), torch.tensor(x, dtype=torch.float32))
    assert float(term) == pytest.approx(by_hand, rel=1e-5)
    # fine texture moved by two pixels keeps its spectrum; the same texture blurred loses it
    texture = torch.tensor(x, dtype=torch.float32)
    moved = torch.roll(texture, shifts=(2, 2), dims=(2, 3))
    blurred = torch.tensor(gaussian_filter(x, (0, 0, 1, 1), mode="wrap"), dtype=torch.float32)
    assert float(spectral_distance(moved, texture)) == pytest.approx(0.0, abs=1e-5)
    assert float(spectral_distance(blurred, texture)) > 0.2
    assert float((moved - texture).abs().mean()) > float((blurred - texture).abs().mean())  # L1 says the opposite


def test_the_lr_schedules_warm_up_then_hold_or_follow_half_a_cosine_to_zero():
    def rates(name, warmup, steps):
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=2.0)
        schedule = make_lr_schedule(optimizer, name, warmup, steps)
        out = []
        for _ in range(steps):
            out.append(optimizer.param_groups[0]["lr"])
            optimizer.step()
            schedule.step()
        return np.array(out)

    constant = rates("constant", 4, 20)
    assert np.allclose(constant[:4], [0.0, 0.5, 1.0, 1.5]) and np.allclose(constant[4:], 2.0)
    cosine = rates("cosine", 4, 20)
    assert np.allclose(cosine[:4], constant[:4])
    step = np.arange(4, 20)
    assert np.allclose(cosine[4:], 2.0 * 0.5 * (1 + np.cos(np.pi * (step - 4) / 16)))  # written out by hand
    assert cosine[-1] < 0.05 and np.all(np.diff(cosine[4:]) < 0)
    with pytest.raises(ValueError, match="lr_schedule"):
        make_lr_schedule(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0), "linear", 0, 10)


def test_a_decaying_schedule_keeps_the_step_count_in_the_recipe():
    # under a constant rate more steps continue a run; under a decay the step count is its length
    assert "steps" not in training_recipe({"steps": 10, "lr": 1e-3, "lr_schedule": "constant"})
    assert "steps" not in training_recipe({"steps": 10, "lr": 1e-3})
    assert training_recipe({"steps": 10, "lr": 1e-3, "lr_schedule": "cosine"})["steps"] == 10
