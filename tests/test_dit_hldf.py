"""dit-hldf on a tiny data set: the HLDF pieces against independent computations, the loss drops,
the pixel term reaches the transformer, resume is exact, LoRA on a pretrained (learned-sigma) PixArt
directory, and the pipeline reloads with diffusers."""

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from scipy.stats import wasserstein_distance
from tiny_models import tiny_vae, write_tiny_dataset

from medsyn.data.dataset import load_images, read_records
from medsyn.training.dit_hldf import colour_distribution_distance, hldf_schedule, train_dit, x0_estimate

TINY = {"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dit")
    data = write_tiny_dataset(root / "data")
    vae = tiny_vae()
    with torch.no_grad():  # an untrained VAE, its latents scaled to unit variance as `train_vae` does
        images = load_images(data, read_records(data))
        latents = vae.encode(torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1).latent_dist.mean
    vae.register_to_config(scaling_factor=float(1 / latents.std()))
    vae.save_pretrained(root / "vae")
    return {"data": data, "vae": root / "vae"}


def _train(tiny, out, steps, **kw):
    kw = {
        "config": TINY,
        "batch_size": 8,
        "lr": 2e-3,
        "checkpoint_every": 4,
        "validation_every": 0,
        "hldf_batch": 4,
        "progress": False,
        **kw,
    }
    return train_dit(tiny["data"], out, vae_dir=tiny["vae"], steps=steps, **kw)


def _weights(run):
    return load_file(run / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")


@pytest.mark.parametrize("kind", ["epsilon", "v_prediction"])
def test_x0_estimate_inverts_the_forward_process(kind):
    from diffusers import DDPMScheduler

    from medsyn.training.common import diffusion_target

    scheduler = DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, prediction_type=kind)
    x0, noise = torch.randn(6, 4, 8, 8), torch.randn(6, 4, 8, 8)
    t = torch.tensor([0, 10, 200, 500, 800, 999])
    noisy = scheduler.add_noise(x0, noise, t)
    perfect = diffusion_target(scheduler, x0, noise, t)
    torch.testing.assert_close(x0_estimate(scheduler, noisy, perfect, t)[:5], x0[:5], atol=1e-3, rtol=1e-3)


def test_colour_term_is_the_per_channel_wasserstein_distance():
    rng = np.random.default_rng(0)
    a, b = rng.normal(0, 1, (2, 3, 9, 7)), rng.normal(0.5, 2, (2, 3, 9, 7))
    ours = colour_distribution_distance(torch.from_numpy(a), torch.from_numpy(b)).numpy()
    scipy = [np.mean([wasserstein_distance(a[n, c].ravel(), b[n, c].ravel()) for c in range(3)]) for n in range(2)]
    np.testing.assert_allclose(ours, scipy, rtol=1e-10)
    assert colour_distribution_distance(torch.from_numpy(a), torch.from_numpy(a[:, :, ::-1].copy())).abs().max() == 0


def test_hldf_schedule():
    assert [hldf_schedule(s, 2.0, start=10, ramp=4) for s in (0, 9, 10, 11, 13, 100)] == [0, 0, 0.5, 1.0, 2.0, 2.0]
    assert hldf_schedule(50, 0.0, start=0, ramp=1) == 0


def test_dit_learns_with_the_pixel_term_and_resumes_exactly(tiny, tmp_path):
    learned = _train(tiny, tmp_path / "long", steps=80, checkpoint_every=0, ema_decay=None, hldf_start=40, hldf_ramp=10)
    loss, pixel = learned["loss_history"], learned["pixel_history"]
    assert np.mean(loss[-10:]) < 0.8 * np.mean(loss[:10])
    assert all(p == 0 for p in pixel[:40]) and all(p > 0 for p in pixel[40:])

    # the pixel term changes what the transformer learns (its gradient goes through the decoder)
    with_pixel = _train(tiny, tmp_path / "pix", steps=2, hldf_weight=10.0, checkpoint_every=0, ema_decay=None)
    without = _train(tiny, tmp_path / "nopix", steps=2, hldf_weight=0.0, checkpoint_every=0, ema_decay=None)
    assert with_pixel["loss_history"][0] == without["loss_history"][0]  # same first forward pass
    a, b = _weights(tmp_path / "pix"), _weights(tmp_path / "nopix")
    assert any(not torch.equal(a[k], b[k]) for k in a)

    straight = _train(tiny, tmp_path / "straight", steps=8)
    _train(tiny, tmp_path / "resumed", steps=4)
    resumed = _train(tiny, tmp_path / "resumed", steps=8)
    assert resumed["loss_history"] == straight["loss_history"][4:]
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # EMA weights, bitwise


def test_pipeline_reloads_with_diffusers_and_encodes_as_trained(tiny, tmp_path):
    from diffusers import PixArtAlphaPipeline

    from medsyn.sampling import generate, load_pipeline

    result = _train(tiny, tmp_path / "run", steps=3, checkpoint_every=0)
    reloaded = PixArtAlphaPipeline.from_pretrained(result["pipeline_dir"], local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    a = generate(reloaded, ["A red disc.", "A cyan bar."], per_prompt=1, seed=2, steps=5)
    b = generate(load_pipeline(result["pipeline_dir"]), ["A red disc.", "A cyan bar."], per_prompt=1, seed=2, steps=5)
    assert a[0]["image"].shape == (16, 16, 3)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    # training cached 32-token prompts (MiniLM's length); the pipeline samples with 120: the same
    # embeddings where tokens are real, and padding that is masked out
    cache = tmp_path / "run" / "cache"
    rows = json.loads((cache / "prompts.json").read_text())
    embeds, mask, _, _ = reloaded.encode_prompt(rows, do_classifier_free_guidance=False, clean_caption=False)
    cached, cached_mask = np.load(cache / "prompt_hidden_states.npy"), np.load(cache / "prompt_attention_mask.npy")
    assert cached.shape[1] == 32 and embeds.shape[1] == 120
    assert torch.equal(mask[:, :32].float(), torch.from_numpy(cached_mask)) and not mask[:, 32:].any()
    real = torch.from_numpy(cached_mask).bool()
    torch.testing.assert_close(embeds[:, :32][real], torch.from_numpy(cached)[real], atol=1e-5, rtol=1e-5)
    short, long = (
        reloaded(
            "A red disc.",
            num_inference_steps=5,
            height=16,
            width=16,
            output_type="np",
            generator=torch.Generator().manual_seed(0),
            clean_caption=False,
            use_resolution_binning=False,
            max_sequence_length=n,
        ).images
        for n in (32, 120)
    )
    assert np.abs(short - long).max() < 1e-4


def test_lora_on_a_pretrained_learned_sigma_pixart(tiny, tmp_path):
    from diffusers import PixArtTransformer2DModel

    from medsyn.training.dit_hldf import build_pipeline

    pretrained = build_pipeline(tiny["vae"], "minilm", None, 8, TINY, "epsilon")
    torch.manual_seed(0)  # PixArt-α's own layout: ε and a learned variance, 8 output channels
    pretrained.transformer = PixArtTransformer2DModel(
        sample_size=8, in_channels=4, out_channels=8, cross_attention_dim=32, caption_channels=384, **TINY
    )
    pretrained.save_pretrained(tmp_path / "pixart")
    result = train_dit(
        tiny["data"],
        tmp_path / "lora",
        pretrained_dir=tmp_path / "pixart",
        steps=3,
        batch_size=8,
        lr=1e-3,
        lora_rank=4,
        checkpoint_every=0,
        validation_every=0,
        hldf_batch=4,
        progress=False,
    )
    base = load_file(tmp_path / "pixart" / "transformer" / "diffusion_pytorch_model.safetensors")
    pretrained.transformer.register_to_config(sample_size=4)  # a PixArt of 8 px against 16-px images
    pretrained.save_pretrained(tmp_path / "pixart_8px")
    with pytest.raises(ValueError, match="samples 8 px images and the curated ones are 16 px"):
        train_dit(tiny["data"], tmp_path / "other", pretrained_dir=tmp_path / "pixart_8px", steps=1, progress=False)
    assert 0 < result["trained_parameters"] < 0.3 * sum(v.numel() for v in base.values())
    assert (result["lora_dir"] / "pytorch_lora_weights.safetensors").is_file()
    merged = _weights(tmp_path / "lora")
    assert merged.keys() == base.keys() and any(not torch.equal(merged[k], base[k]) for k in base)
    # the saved adapters, put back on the pretrained transformer, compute what the merged one does
    from peft import LoraConfig, inject_adapter_in_model, set_peft_model_state_dict

    config = json.loads((result["lora_dir"] / "lora_config.json").read_text())
    adapted = PixArtTransformer2DModel.from_pretrained(tmp_path / "pixart" / "transformer")
    inject_adapter_in_model(LoraConfig(**config), adapted)
    set_peft_model_state_dict(adapted, load_file(result["lora_dir"] / "pytorch_lora_weights.safetensors"))
    fused = PixArtTransformer2DModel.from_pretrained(result["pipeline_dir"] / "transformer")
    x, text = torch.randn(2, 4, 8, 8), torch.randn(2, 5, 384)
    inputs = {
        "encoder_hidden_states": text,
        "timestep": torch.tensor([3, 700]),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }
    with torch.no_grad():
        torch.testing.assert_close(adapted(x, **inputs).sample, fused(x, **inputs).sample, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="either vae_dir"):
        train_dit(tiny["data"], tmp_path / "x", steps=1)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no_pixart")):
        train_dit(tiny["data"], tmp_path / "x", pretrained_dir=tmp_path / "no_pixart", steps=1)
