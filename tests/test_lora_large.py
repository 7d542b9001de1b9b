"""LoRA fine-tunes of FLUX and Kandinsky 2.2 on tiny pipelines saved here: the loss drops, resume is
exact, only adapters train, the saved adapters load with diffusers onto the base model and give the
merged pipeline's images, and the saved pipeline samples at the trained size."""

import time
from unittest import mock

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_flux, save_tiny_kandinsky, split_kandinsky, write_tiny_dataset

from medsyn.sampling import generate, image_size, load_pipeline, optimise_for_sampling, set_scheduler
from medsyn.training.lora_large import combine_kandinsky, finetune_flux, finetune_kandinsky, load_local


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("large")
    return {
        "data": write_tiny_dataset(root / "data"),
        "flux": save_tiny_flux(root / "flux"),
        "kandinsky": save_tiny_kandinsky(root / "kandinsky"),
    }


def _flux(tiny, out, steps, **kw):
    kw = {
        "lr": 2e-2,
        "batch_size": 8,
        "lora_rank": 8,
        "max_sequence_length": 16,
        "checkpoint_every": 4,
        "validation_every": 0,
        "progress": False,
        **kw,
    }
    return finetune_flux(tiny["data"], tiny["flux"], out, steps=steps, **kw)


def _kandinsky(tiny, out, steps, **kw):
    kw = {
        "lr": 3e-3,
        "batch_size": 8,
        "lora_rank": 8,
        "checkpoint_every": 4,
        "validation_every": 0,
        "progress": False,
        **kw,
    }
    return finetune_kandinsky(tiny["data"], tiny["kandinsky"], out, steps=steps, **kw)


def _same_images(a, b) -> bool:
    return all(np.abs(x["image"].astype(int) - y["image"]).max() <= 1 for x, y in zip(a, b))


def test_flux_lora_learns_resumes_and_loads_with_diffusers(tiny, tmp_path):
    from diffusers import FluxPipeline

    learned = _flux(tiny, tmp_path / "long", steps=40, checkpoint_every=0, validation_every=40)
    history = learned["loss_history"]
    assert np.mean(history[-8:]) < 0.8 * np.mean(history[:8])
    total = sum(
        v.numel() for v in load_file(tiny["flux"] / "transformer" / "diffusion_pytorch_model.safetensors").values()
    )
    assert 0 < learned["trained_parameters"] < 0.3 * total
    assert (tmp_path / "long" / "validation" / "step_0000040.png").is_file()

    straight = _flux(tiny, tmp_path / "straight", steps=8, ema_decay=0.9)
    _flux(tiny, tmp_path / "resumed", steps=4, ema_decay=0.9)
    resumed = _flux(tiny, tmp_path / "resumed", steps=8, ema_decay=0.9)
    assert resumed["loss_history"] == straight["loss_history"][4:]
    a, b = (
        load_file(run / "lora" / "pytorch_lora_weights.safetensors")
        for run in (tmp_path / "straight", tmp_path / "resumed")
    )
    assert all(torch.equal(a[k], b[k]) for k in a)

    merged = load_pipeline(learned["pipeline_dir"])
    assert image_size(merged) == 16 and merged.tokenizer_2.model_max_length == 16
    base = FluxPipeline.from_pretrained(tiny["flux"], local_files_only=True)
    base.set_progress_bar_config(disable=True)
    base.tokenizer_2.model_max_length = 16
    base.transformer.register_to_config(sample_size=8)
    before = generate(base, ["A red disc."], per_prompt=2, seed=1, steps=4)
    base.load_lora_weights(learned["lora_dir"])
    after = generate(base, ["A red disc."], per_prompt=2, seed=1, steps=4)
    images = generate(merged, ["A red disc."], per_prompt=2, seed=1, steps=4)
    assert images[0]["image"].shape == (16, 16, 3)
    assert _same_images(images, after) and not _same_images(images, before)


def test_kandinsky_lora_on_prior_and_decoder(tiny, tmp_path):
    learned = _kandinsky(tiny, tmp_path / "long", steps=40, checkpoint_every=0, validation_every=40)
    history = learned["loss_history"]
    assert np.mean(history[-8:]) < 0.8 * np.mean(history[:8])
    assert (tmp_path / "long" / "validation" / "step_0000040.png").is_file()
    cache = tmp_path / "long" / "cache"
    assert not np.load(cache / "latent_std.npy").any()  # MoVQ encodes deterministically
    # dropped captions train what guidance uses: the prior's empty prompt, the decoder's zero-image embedding
    zero = load_local(tiny["kandinsky"], "KandinskyV22CombinedPipeline").prior_pipe.get_zero_embed(1, "cpu")
    np.testing.assert_allclose(np.load(cache / "zero_embed.npy"), zero.detach().numpy(), atol=1e-6)

    straight = _kandinsky(tiny, tmp_path / "straight", steps=8)
    _kandinsky(tiny, tmp_path / "resumed", steps=4)
    resumed = _kandinsky(tiny, tmp_path / "resumed", steps=8)
    assert resumed["loss_history"] == straight["loss_history"][4:]
    for part in ("decoder", "prior"):
        a, b = (
            load_file(run / "lora" / part / "pytorch_lora_weights.safetensors")
            for run in (tmp_path / "straight", tmp_path / "resumed")
        )
        assert all(torch.equal(a[k], b[k]) for k in a)

    merged = load_pipeline(learned["pipeline_dir"])
    assert type(merged).__name__ == "KandinskyV22CombinedPipeline" and image_size(merged) == 16
    base = load_local(tiny["kandinsky"], "KandinskyV22CombinedPipeline")
    base.unet.register_to_config(sample_size=8)
    before = generate(base, ["A cyan bar."], per_prompt=2, seed=3, steps=4)
    base.unet.load_lora_adapter(
        learned["lora_dir"] / "decoder", prefix=None, weight_name="pytorch_lora_weights.safetensors"
    )
    base.prior_prior.load_lora_adapter(
        learned["lora_dir"] / "prior", prefix=None, weight_name="pytorch_lora_weights.safetensors"
    )
    after = generate(base, ["A cyan bar."], per_prompt=2, seed=3, steps=4)
    images = generate(merged, ["A cyan bar."], per_prompt=2, seed=3, steps=4)
    assert images[0]["image"].shape == (16, 16, 3)
    assert _same_images(images, after) and not _same_images(images, before)

    decoder_only = _kandinsky(tiny, tmp_path / "decoder", steps=2, train_prior=False, checkpoint_every=0)
    assert decoder_only["trained_parameters"] < learned["trained_parameters"]
    assert not (tmp_path / "decoder" / "lora" / "prior").exists()


def test_kandinsky_from_the_two_published_directories(tiny, tmp_path):
    """kandinsky-2-2-prior and kandinsky-2-2-decoder are separate repositories: one call combines them."""
    combined = load_local(tiny["kandinsky"], "KandinskyV22CombinedPipeline")
    prior, decoder = split_kandinsky(combined, tmp_path / "prior", tmp_path / "decoder")
    out = combine_kandinsky(prior, decoder, tmp_path / "combined")
    a = generate(load_pipeline(out), ["A red disc."], per_prompt=1, seed=0, steps=3)
    b = generate(combined, ["A red disc."], per_prompt=1, seed=0, steps=3)
    assert _same_images(a, b)


def test_missing_or_wrong_pretrained_directory(tiny, tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no_flux")):
        finetune_flux(tiny["data"], tmp_path / "no_flux", tmp_path / "out", steps=1, progress=False)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no_prior")):
        combine_kandinsky(tmp_path / "no_prior", tiny["kandinsky"], tmp_path / "out")
    with pytest.raises(ValueError, match="holds a KandinskyV22CombinedPipeline, not a FluxPipeline"):
        finetune_flux(tiny["data"], tiny["kandinsky"], tmp_path / "out", steps=1, progress=False)
    assert time.perf_counter() - start < 10


def test_samplers_of_a_flow_and_of_kandinskys_decoder(tiny):
    """FLUX samples 'euler' with its own flow-matching Euler and 'dpmsolver++' on the same shifted flow
    schedule; Kandinsky's sampler is its decoder's (replaced there, not on the combined pipeline
    alone), and Euler, whose inputs that decoder does not scale, is refused."""
    from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="static shift"):  # the tiny pipeline's schedule
        set_scheduler(load_pipeline(tiny["flux"]), "dpmsolver++")
    flux = load_pipeline(tiny["flux"])
    flux.scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's: the shift grows with the image's tokens
        shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256
    )
    set_scheduler(flux, "euler")
    assert type(flux.scheduler) is FlowMatchEulerDiscreteScheduler and flux.scheduler.config.max_shift == 1.15
    steps, mu = 10, 0.8
    flux.scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), mu=mu)  # as FluxPipeline asks
    euler = flux.scheduler.sigmas.numpy()
    set_scheduler(flux, "dpmsolver++")
    assert type(flux.scheduler) is DPMSolverMultistepScheduler
    flux.scheduler.set_timesteps(steps, mu=mu)
    np.testing.assert_allclose(np.asarray(flux.scheduler.sigmas), euler, atol=1e-3)  # its discrete steps apart
    flux.tokenizer_2.model_max_length = 16
    images = generate(flux, ["A red disc."], per_prompt=1, seed=0, steps=3)
    assert images[0]["image"].shape == (image_size(flux), image_size(flux), 3)
    with pytest.raises(ValueError, match="samples a flow"):
        set_scheduler(flux, "ddim")
    set_scheduler(flux, "euler")  # from the pipeline's own sampler again, not from DPM-Solver's settings
    assert type(flux.scheduler) is FlowMatchEulerDiscreteScheduler and flux.scheduler.config.shift == 3.0
    set_scheduler(flux, "pipeline")
    assert flux.scheduler.config.max_shift == 1.15

    kandinsky = load_pipeline(tiny["kandinsky"])
    own = generate(kandinsky, ["A red disc."], per_prompt=1, seed=0, steps=3)
    set_scheduler(kandinsky, "ddim")
    assert type(kandinsky.decoder_pipe.scheduler) is DDIMScheduler
    assert not _same_images(generate(kandinsky, ["A red disc."], per_prompt=1, seed=0, steps=3), own)
    with pytest.raises(ValueError, match="family_schedulers"):
        set_scheduler(kandinsky, "euler")
    optimise_for_sampling(kandinsky, "cpu", memory_format="channels_last")  # a MoVQ, not a VAE
    assert kandinsky.movq.encoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("family", ["flux", "kandinsky"])
def test_under_bf16_the_frozen_weights_are_bf16_and_the_adapters_float32(tiny, tmp_path, family):
    """Under bf16 mixed precision the base weights and text towers are stored in bf16 (half of
    float32's memory: FLUX.1-dev's 11.9 B transformer parameters in 24 GB instead of 48), the
    adapters stay float32, and the loop learns, validates and saves as it does in float32."""
    from medsyn.training import lora_large

    train = _flux if family == "flux" else _kandinsky
    seen = {}
    add_lora = lora_large.add_lora

    def watched(model, *args, **kw):  # the adapters as they are trained, and the weights beside them
        trainable = add_lora(model, *args, **kw)
        seen.setdefault("frozen", set()).update(p.dtype for p in model.parameters() if not p.requires_grad)
        seen.setdefault("adapters", set()).update(p.dtype for p in trainable)
        return trainable

    with mock.patch.object(lora_large, "add_lora", watched):
        result = train(
            tiny, tmp_path / "bf16", steps=40, mixed_precision="bf16", checkpoint_every=0, validation_every=40
        )
    assert seen == {"frozen": {torch.bfloat16}, "adapters": {torch.float32}}
    history = result["loss_history"]
    assert np.isfinite(history).all() and np.mean(history[-6:]) < 0.8 * np.mean(history[:6])
    assert (tmp_path / "bf16" / "validation" / "step_0000040.png").is_file()
    saved = load_file(next((result["lora_dir"]).rglob("*.safetensors")))
    assert {v.dtype for v in saved.values()} == {torch.float32}
    saved_pipeline = load_pipeline(result["pipeline_dir"])  # float32 throughout, as loading gives it back
    modules = [m for m in saved_pipeline.components.values() if isinstance(m, torch.nn.Module)]
    assert {p.dtype for m in modules for p in m.parameters()} == {torch.float32}
    images = generate(saved_pipeline, ["A red disc."], per_prompt=1, seed=0, steps=3)
    assert images[0]["image"].shape == (16, 16, 3)


def test_kandinsky_gradient_checkpointing_recomputes_the_decoder_and_trains_the_same(tiny, tmp_path, monkeypatch):
    """02's `large_lora_gradient_checkpointing` reaches Kandinsky's decoder U-Net: its blocks run
    through torch's checkpoint, and the losses are those of the run that keeps its activations."""
    import torch.utils.checkpoint

    calls, real_checkpoint = [], torch.utils.checkpoint.checkpoint

    def counted_checkpoint(*args, **kwargs):
        calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counted_checkpoint)
    kept = _kandinsky(tiny, tmp_path / "kept", steps=2, checkpoint_every=0)
    assert not calls
    recomputed = _kandinsky(tiny, tmp_path / "recomputed", steps=2, checkpoint_every=0, gradient_checkpointing=True)
    assert calls
    np.testing.assert_allclose(recomputed["loss_history"], kept["loss_history"], rtol=1e-5)
