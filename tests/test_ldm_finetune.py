"""ldm-finetune on tiny SD 1.x / SDXL pipelines saved here: the loss drops, resume is exact, LoRA
trains only adapters and its saved files load with diffusers, a missing directory fails at once."""

import time

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import save_tiny_sd, write_tiny_dataset

from medsyn.sampling import generate, load_pipeline
from medsyn.training.ldm_finetune import finetune_unet


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("finetune")
    return {
        "data": write_tiny_dataset(root / "data", size=32),
        "sd": save_tiny_sd(root / "sd"),
        "xl": save_tiny_sd(root / "xl", xl=True),
    }


def _finetune(tiny, out, steps, pretrained="sd", **kw):
    kw = {"lr": 2e-3, "batch_size": 8, "checkpoint_every": 4, "validation_every": 0, "progress": False, **kw}
    return finetune_unet(tiny["data"], tiny[pretrained], out, steps=steps, **kw)


def _unet_weights(run):
    return load_file(run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")


def test_full_finetune_learns_and_resumes_exactly(tiny, tmp_path):
    learned = _finetune(tiny, tmp_path / "long", steps=60, checkpoint_every=0)
    history = learned["loss_history"]
    assert np.mean(history[-10:]) < 0.8 * np.mean(history[:10])
    assert learned["trained_parameters"] == sum(v.numel() for v in _unet_weights(tmp_path / "long").values())

    straight = _finetune(tiny, tmp_path / "straight", steps=8, ema_decay=0.99)
    _finetune(tiny, tmp_path / "resumed", steps=4, ema_decay=0.99)
    resumed = _finetune(tiny, tmp_path / "resumed", steps=8, ema_decay=0.99)
    assert resumed["loss_history"] == straight["loss_history"][4:]
    a, b = _unet_weights(tmp_path / "straight"), _unet_weights(tmp_path / "resumed")
    assert all(torch.equal(a[k], b[k]) for k in a)  # EMA weights, bitwise
    # the VAE and text encoder are frozen: saved unchanged
    for part in ("vae", "text_encoder"):
        before = load_file(next((tiny["sd"] / part).glob("*.safetensors")))
        after = load_file(next((tmp_path / "straight" / "pipeline" / part).glob("*.safetensors")))
        assert all(torch.equal(before[k], after[k]) for k in before)


def test_class_balanced_finetune_resumes_exactly_and_draws_other_batches(tiny, tmp_path):
    straight = _finetune(tiny, tmp_path / "straight", steps=6, balance="class")
    _finetune(tiny, tmp_path / "resumed", steps=4, balance="class")
    resumed = _finetune(tiny, tmp_path / "resumed", steps=6, balance="class")
    assert resumed["loss_history"] == straight["loss_history"][4:]
    plain = _finetune(tiny, tmp_path / "plain", steps=1, balance="none")
    assert plain["loss_history"][0] != straight["loss_history"][0]
    with pytest.raises(ValueError, match="balance"):
        _finetune(tiny, tmp_path / "bad", steps=1, balance="classes")


def test_lora_trains_only_adapters_and_saves_what_diffusers_loads(tiny, tmp_path):
    from diffusers import StableDiffusionPipeline

    result = _finetune(tiny, tmp_path / "lora", steps=6, lora_rank=4, checkpoint_every=3)
    total = sum(v.numel() for v in _unet_weights(tmp_path / "lora").values())
    assert 0 < result["trained_parameters"] < 0.2 * total
    merged = load_pipeline(result["pipeline_dir"])
    base = StableDiffusionPipeline.from_pretrained(tiny["sd"], local_files_only=True)
    base.set_progress_bar_config(disable=True)
    base.load_lora_weights(result["lora_dir"])
    a = generate(merged, ["A red disc."], per_prompt=2, seed=1, steps=4)
    b = generate(base, ["A red disc."], per_prompt=2, seed=1, steps=4)
    assert all(np.abs(x["image"].astype(int) - y["image"]).max() <= 1 for x, y in zip(a, b))
    untouched = StableDiffusionPipeline.from_pretrained(tiny["sd"], local_files_only=True)
    untouched.set_progress_bar_config(disable=True)
    c = generate(untouched, ["A red disc."], per_prompt=2, seed=1, steps=4)
    assert any(not np.array_equal(x["image"], z["image"]) for x, z in zip(a, c))  # the adapters changed something


def test_sdxl_pipeline_with_pooled_embeddings_and_zero_unconditional(tiny, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    result = _finetune(tiny, tmp_path / "xl", steps=3, pretrained="xl", checkpoint_every=0)
    cache = tmp_path / "xl" / "cache"
    hidden, pooled = np.load(cache / "prompt_hidden_states.npy"), np.load(cache / "prompt_pooled.npy")
    assert hidden.shape[-1] == 64 and pooled.shape[-1] == 32
    assert not hidden[0].any() and not pooled[0].any()  # force_zeros_for_empty_prompt, as at sampling
    assert hidden[1:].any()
    reloaded = StableDiffusionXLPipeline.from_pretrained(result["pipeline_dir"], local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    images = generate(reloaded, ["A cyan bar."], per_prompt=1, seed=0, steps=3)
    assert images[0]["image"].shape == (32, 32, 3)


def test_missing_pretrained_directory_fails_at_once(tiny, tmp_path):
    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "no_sdxl")):
        finetune_unet(tiny["data"], tmp_path / "no_sdxl", tmp_path / "out", steps=1, progress=False)
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="has no model_index.json"):
        finetune_unet(tiny["data"], tmp_path / "empty", tmp_path / "out", steps=1, progress=False)
    assert time.perf_counter() - start < 5


def test_channels_last_trains_the_same_weights_and_a_loaded_pipeline_can_be_trained_in_place(tiny, tmp_path):
    """The memory format changes the layout, not the arithmetic's result beyond float rounding; a
    pipeline object is trained in place and, with save_pipeline=False, nothing is written."""
    straight = _finetune(tiny, tmp_path / "nchw", steps=4, checkpoint_every=0)
    pipeline = load_pipeline(tiny["sd"])
    nhwc = finetune_unet(
        tiny["data"],
        pipeline,
        tmp_path / "nhwc",
        steps=4,
        lr=2e-3,
        batch_size=8,
        checkpoint_every=0,
        validation_every=0,
        progress=False,
        memory_format="channels_last",
        save_pipeline=False,
    )
    np.testing.assert_allclose(nhwc["loss_history"], straight["loss_history"], rtol=1e-4)
    assert len(nhwc["step_seconds"]) == 4 and all(s > 0 for s in nhwc["step_seconds"])
    assert not (tmp_path / "nhwc" / "pipeline").exists()
    trained, saved = pipeline.unet.state_dict(), _unet_weights(tmp_path / "nchw")
    initial = load_file(tiny["sd"] / "unet" / "diffusion_pytorch_model.safetensors")
    # the same training to float rounding: the two runs differ by under 0.1 % of what training changed
    apart = sum((trained[k] - saved[k]).abs().sum() for k in saved)
    assert apart < 1e-3 * sum((saved[k] - initial[k]).abs().sum() for k in saved)
    assert pipeline.unet.conv_in.weight.is_contiguous()  # handed back in the usual layout
    with pytest.raises(ValueError, match="memory_format"):
        _finetune(tiny, tmp_path / "bad", steps=1, memory_format="nhwc")


def test_text_towers_wait_in_host_memory_between_validation_grids(tiny, tmp_path, monkeypatch):
    """Once the prompt embeddings are cached, SDXL's two text towers are parked in host memory
    (`park`) and come to the accelerator only for each validation grid, then go back: the memory a
    GPU run gains is counted in benchmarks/training_memory.py. Here the CPU is both, so the test
    follows the moves the loop asks for, in order with its optimizer steps; a loop that parks nothing
    or samples its grid with the towers left in host memory fails it."""
    from transformers import PreTrainedModel

    import medsyn.training.ldm_finetune as ldm_finetune

    events, real_to, real_step = [], PreTrainedModel.to, ldm_finetune.optimizer_step

    def logged_to(self, *args, **kwargs):
        events.append((type(self).__name__, str(args[0] if args else kwargs.get("device"))))
        return real_to(self, *args, **kwargs)

    def logged_step(*args, **kwargs):
        events.append("step")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(PreTrainedModel, "to", logged_to)
    monkeypatch.setattr(ldm_finetune, "optimizer_step", logged_step)
    _finetune(tiny, tmp_path / "xl", steps=4, pretrained="xl", checkpoint_every=0, validation_every=2)
    towers = ["CLIPTextModel", "CLIPTextModelWithProjection"]
    parked, out = [(t, "cpu") for t in towers], [(t, "cpu") for t in towers]
    steps = [i for i, e in enumerate(events) if e == "step"]
    assert len(steps) == 4
    assert events[steps[0] - 2 : steps[0]] == parked  # parked before the first step
    grid = [(t, "cpu") for t in towers] + out  # to the accelerator (the CPU here), then back
    assert events[steps[1] + 1 : steps[2]] == grid  # the grid after step 2
    assert events[steps[3] + 1 :][:4] == grid  # and after the last
    assert all(e == "step" for e in events[steps[0] : steps[1] + 1])  # nothing moves while training
