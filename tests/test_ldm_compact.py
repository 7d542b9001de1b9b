"""ldm-compact on a tiny data set: loss drops, resume is exact, the pipeline reloads with diffusers."""

import json
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from tiny_models import write_tiny_dataset

from medsyn.models.class_probe import TrainedProbe
from medsyn.training.ldm_compact import train_unet, train_vae

TINY_VAE = {"block_out_channels": [8, 16], "norm_num_groups": 4}
TINY_UNET = {
    "block_out_channels": [16, 32],
    "norm_num_groups": 8,
    "attention_head_dim": 4,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "UpBlock2D"],
}


@pytest.fixture(scope="module")
def tiny_dataset(tmp_path_factory) -> Path:
    return write_tiny_dataset(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def tiny_vae(tiny_dataset, tmp_path_factory) -> dict:
    return train_vae(
        tiny_dataset,
        tmp_path_factory.mktemp("vae"),
        steps=60,
        batch_size=8,
        lr=2e-3,
        adversarial_start=40,
        config=TINY_VAE,
        checkpoint_every=30,
        progress=False,
    )


def test_vae_loss_drops_and_the_latent_scale_is_set(tiny_vae):
    history = tiny_vae["l1_history"]
    assert np.mean(history[-10:]) < 0.6 * np.mean(history[:5])
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(tiny_vae["vae_dir"], local_files_only=True)
    assert vae.config.scaling_factor == pytest.approx(tiny_vae["scaling_factor"])


def _unet(tiny_dataset, tiny_vae, out, steps, **kw):
    kw = {
        "config": TINY_UNET,
        "batch_size": 8,
        "lr": 2e-3,
        "lr_warmup_steps": 2,
        "checkpoint_every": 4,
        "validation_every": 0,
        "progress": False,
        **kw,
    }
    return train_unet(tiny_dataset, tiny_vae["vae_dir"], out, steps=steps, **kw)


def test_unet_resume_is_bitwise_identical_to_an_uninterrupted_run(tiny_dataset, tiny_vae, tmp_path):
    straight = _unet(tiny_dataset, tiny_vae, tmp_path / "straight", steps=8)
    _unet(tiny_dataset, tiny_vae, tmp_path / "resumed", steps=4)
    resumed = _unet(tiny_dataset, tiny_vae, tmp_path / "resumed", steps=8)
    assert len(resumed["loss_history"]) == 4  # it continued from step 4
    assert resumed["loss_history"] == straight["loss_history"][4:]
    a = load_file(tmp_path / "straight" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "resumed" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)  # EMA weights, bitwise


def test_gradient_accumulation_averages_the_micro_batch_gradients(tiny_dataset, tiny_vae, tmp_path, monkeypatch):
    """The gradient of one step over two accumulated micro-batches of 4 is the mean of the gradients of
    those two batches taken one step each (the same draws: micro-batch k is global draw k either way).
    With LR 0 the weights stay put, so the single-batch steps see the same model. Dropping the
    division by the accumulation steps doubles the gradient and fails this."""
    import medsyn.training.ldm_compact as ldm_compact

    recorded = []
    real_step = ldm_compact.optimizer_step

    def recording_step(accelerator, parameters, *args):
        recorded.append([p.grad.detach().clone() for p in parameters])  # before clipping and stepping
        real_step(accelerator, parameters, *args)

    monkeypatch.setattr(ldm_compact, "optimizer_step", recording_step)
    common = {
        "lr": 0.0,
        "lr_warmup_steps": 0,
        "checkpoint_every": 0,
        "validation_every": 0,
        "progress": False,
        "config": TINY_UNET,
    }
    train_unet(tiny_dataset, tiny_vae["vae_dir"], tmp_path / "single", steps=2, batch_size=4, **common)
    train_unet(
        tiny_dataset,
        tiny_vae["vae_dir"],
        tmp_path / "accumulated",
        steps=1,
        batch_size=8,
        gradient_accumulation_steps=2,
        **common,
    )
    first, second, accumulated = recorded
    assert any(g.abs().sum() > 0 for g in accumulated)
    for a, b, together in zip(first, second, accumulated):
        torch.testing.assert_close(together, (a + b) / 2, rtol=1e-4, atol=1e-7)


def test_unet_learns_and_the_pipeline_reloads_with_diffusers(tiny_dataset, tiny_vae, tmp_path):
    from diffusers import StableDiffusionPipeline

    from medsyn.sampling import generate, load_pipeline

    result = _unet(tiny_dataset, tiny_vae, tmp_path / "run", steps=120, checkpoint_every=60)
    history = result["loss_history"]
    assert np.mean(history[-20:]) < 0.8 * np.mean(history[:10])
    reloaded = StableDiffusionPipeline.from_pretrained(result["pipeline_dir"], local_files_only=True)
    reloaded.set_progress_bar_config(disable=True)
    ours = load_pipeline(result["pipeline_dir"])
    a = generate(reloaded, ["A red disc.", "A cyan bar."], per_prompt=2, seed=5, steps=10)
    b = generate(ours, ["A red disc.", "A cyan bar."], per_prompt=2, seed=5, steps=10)
    assert all(np.array_equal(x["image"], y["image"]) for x, y in zip(a, b))
    # one image alone, from its recorded seed, is the same image
    alone = reloaded(
        "A cyan bar.",
        height=16,
        width=16,
        num_inference_steps=10,
        guidance_scale=4.0,
        output_type="np",
        generator=torch.Generator().manual_seed(a[3]["seed"]),
    ).images[0]
    assert np.abs(np.rint(alone * 255) - a[3]["image"].astype(float)).max() <= 1
    # samples stay bounded (v-prediction): the final latents are of the training latents' scale
    latents = reloaded(
        ["A red disc."] * 4,
        height=16,
        width=16,
        num_inference_steps=10,
        output_type="latent",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert torch.isfinite(latents).all() and latents.abs().max() < 10
    # the text encoder in the pipeline encodes prompts exactly as training did
    from medsyn.models.text_encoders import load_text_encoder

    cached = np.load(tmp_path / "run" / "cache" / "prompt_hidden_states.npy")
    rows = json.loads((tmp_path / "run" / "cache" / "prompts.json").read_text())
    embeds, _ = reloaded.encode_prompt(rows[1:], "cpu", 1, False)
    torch.testing.assert_close(embeds, torch.from_numpy(cached[1:]), rtol=1e-5, atol=1e-5)
    assert load_text_encoder("minilm").max_length == reloaded.tokenizer.model_max_length


def test_missing_pretrained_directories_fail_at_once_naming_the_path(tiny_dataset, tmp_path):
    from medsyn.models.text_encoders import load_text_encoder
    from medsyn.sampling import load_pipeline

    start = time.perf_counter()
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nowhere")):
        load_pipeline(tmp_path / "nowhere")
    with pytest.raises(FileNotFoundError, match="tokenizer has no merges.txt"):
        (tmp_path / "sdxl" / "tokenizer").mkdir(parents=True)
        (tmp_path / "sdxl" / "tokenizer" / "vocab.json").write_text("{}")
        load_text_encoder("sdxl", tmp_path / "sdxl")
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "sdxl" / "text_encoder")):
        (tmp_path / "sdxl" / "tokenizer" / "merges.txt").write_text("#version: 0.2\n")
        load_text_encoder("sdxl", tmp_path / "sdxl")
    with pytest.raises(OSError, match="no_vae"):
        train_unet(tiny_dataset, tmp_path / "no_vae", tmp_path / "out", steps=1, progress=False)
    assert time.perf_counter() - start < 5


def test_two_processes_train_the_same_model_as_one(tiny_dataset, tiny_vae, tmp_path):
    """`accelerate launch --num_processes 2` on the CPU (gloo) with the same global batch gives the
    weights of one process, up to the order of floating-point sums in the gradient all-reduce."""
    import subprocess
    import sys

    _unet(tiny_dataset, tiny_vae, tmp_path / "one", steps=3, checkpoint_every=0)
    script = tmp_path / "train.py"
    script.write_text(
        "import json, sys\nfrom medsyn.training.ldm_compact import train_unet\n"
        f"train_unet({str(tiny_dataset)!r}, {str(tiny_vae['vae_dir'])!r}, {str(tmp_path / 'two')!r}, "
        f"config=json.loads({json.dumps(json.dumps(TINY_UNET))}), steps=3, batch_size=8, lr=2e-3, lr_warmup_steps=2, "
        "checkpoint_every=0, validation_every=0, progress=False)\n"
        "from accelerate import PartialState\nstate = PartialState()\n"
        f"open({str(tmp_path)!r} + f'/rank{{state.process_index}}.txt', 'w').write(f'{{state.num_processes}} {{state.backend}}')\n"
    )
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "accelerate.commands.launch",
            "--multi_gpu",
            "--num_processes",
            "2",
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            str(script),
        ],
        capture_output=True,
        text=True,
        timeout=600,
        env={**__import__("os").environ, "HF_HUB_OFFLINE": "1"},
    )
    assert run.returncode == 0, run.stderr[-3000:]
    # two CPU processes in one gloo group (each writes its own file: their stdout may interleave)
    assert [(tmp_path / f"rank{i}.txt").read_text() for i in (0, 1)] == ["2 gloo"] * 2, run.stdout
    a = load_file(tmp_path / "one" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    b = load_file(tmp_path / "two" / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors")
    worst = max((a[k] - b[k]).abs().max().item() for k in a)
    assert worst < 1e-4, worst


def test_a_broken_newest_checkpoint_is_named_and_the_older_one_resumed(tiny_dataset, tiny_vae, tmp_path):
    _unet(tiny_dataset, tiny_vae, tmp_path / "run", steps=8)  # checkpoints at steps 4 and 8
    newest = tmp_path / "run" / "checkpoints" / "step_0000008"
    weights = next(newest.glob("model*.safetensors"))
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a disk that filled up
    with pytest.warns(UserWarning, match="step_0000008"):
        resumed = _unet(tiny_dataset, tiny_vae, tmp_path / "run", steps=10)
    assert len(resumed["loss_history"]) == 6  # continued from step 4
    straight = _unet(tiny_dataset, tiny_vae, tmp_path / "straight", steps=10)
    assert resumed["loss_history"] == straight["loss_history"][4:]


def test_resuming_with_another_recipe_is_an_error_unless_overridden(tiny_dataset, tiny_vae, tmp_path):
    from medsyn.training.common import RecipeMismatchError

    _unet(tiny_dataset, tiny_vae, tmp_path / "run", steps=4)
    for change in ({"lr": 1e-3}, {"seed": 1}, {"prediction_type": "epsilon"}):
        with pytest.raises(RecipeMismatchError, match=next(iter(change))):
            _unet(tiny_dataset, tiny_vae, tmp_path / "run", steps=8, **change)
    assert len(_unet(tiny_dataset, tiny_vae, tmp_path / "run", steps=6)["loss_history"]) == 2  # more steps: fine
    with pytest.warns(UserWarning, match="different recipe"):
        _unet(tiny_dataset, tiny_vae, tmp_path / "run", steps=8, lr=1e-3, resume="override")
    state = json.loads((tmp_path / "run" / "checkpoints" / "step_0000008" / "trainer_state.json").read_text())
    assert state["recipe"]["lr"] == 1e-3 and state["recipe"]["recipe_overridden"]["lr"] == {
        "checkpoint": 2e-3,
        "now": 1e-3,
    }


def test_autoencoder_ceiling_judges_reconstructions_per_class(tiny_dataset, tiny_vae, tmp_path):
    from diffusers import AutoencoderKL

    from medsyn.data.dataset import class_key, load_images, split_records
    from medsyn.models.class_probe import to_probe_input
    from medsyn.training.class_probe import train_class_probe
    from medsyn.training.report import autoencoder_ceiling

    probe_path = train_class_probe(tiny_dataset, split_records(tiny_dataset, "train"), epochs=3, progress=False).save(
        tmp_path / "probe.pt"
    )
    records = split_records(tiny_dataset, "train")[:12]
    table = autoencoder_ceiling(tiny_vae["vae_dir"], tiny_dataset, records, probe_path)
    # by hand: torch's MSE for the PSNR, the probe's own predictions for the accuracy
    vae = AutoencoderKL.from_pretrained(tiny_vae["vae_dir"]).eval()
    originals = load_images(tiny_dataset, records)
    with torch.no_grad():
        x = torch.from_numpy(originals).permute(0, 3, 1, 2).float() / 127.5 - 1
        y = ((vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1) + 1) * 127.5).round()
    y = y.permute(0, 2, 3, 1)
    target = torch.from_numpy(originals).float()
    mse = torch.stack([torch.nn.functional.mse_loss(a, b) for a, b in zip(y, target)])
    psnr = 10 * torch.log10(255**2 / mse)
    predicted = TrainedProbe.load(probe_path).predict(to_probe_input(y.numpy().astype(np.uint8)))
    classes = [class_key(r) for r in records]
    probe = TrainedProbe.load(probe_path)
    for name in set(classes):
        mine = [i for i, c in enumerate(classes) if c == name]
        assert table.loc[name, "images"] == len(mine)
        assert table.loc[name, "psnr_db"] == pytest.approx(float(psnr[mine].mean()), abs=1e-3)
        hits = np.mean([predicted[i] == probe.classes.index(name) for i in mine])
        assert table.loc[name, "classifier_on_reconstructions"] == pytest.approx(hits)
        colour = (y[mine].mean(dim=(1, 2)) - target[mine].mean(dim=(1, 2))).abs().mean()
        assert table.loc[name, "colour_error"] == pytest.approx(float(colour), abs=1e-3)
    assert table.loc["macro mean", "images"] == 12
    assert table.loc["macro mean", "psnr_db"] == pytest.approx(table["psnr_db"].iloc[:-1].mean())


def test_class_balanced_vae_batches_resume_exactly_and_refuse_unknown_modes(tiny_dataset, tmp_path):
    kw = {"batch_size": 8, "lr": 2e-3, "config": TINY_VAE, "checkpoint_every": 2, "progress": False}
    kw |= {"balance": "class", "adversarial_start": 3, "ssim_weight": 0.2}
    straight = train_vae(tiny_dataset, tmp_path / "straight", steps=4, **kw)
    train_vae(tiny_dataset, tmp_path / "resumed", steps=2, **kw)
    resumed = train_vae(tiny_dataset, tmp_path / "resumed", steps=4, **kw)
    assert resumed["l1_history"] == straight["l1_history"][2:]
    plain = train_vae(tiny_dataset, tmp_path / "plain", steps=4, **{**kw, "balance": "none"})
    assert plain["l1_history"] != straight["l1_history"]  # other batches
    # the structural term reaches the weights: the same batches, another second step
    l1_only = train_vae(tiny_dataset, tmp_path / "l1", steps=2, **{**kw, "ssim_weight": 0.0})
    assert l1_only["l1_history"][0] == straight["l1_history"][0]
    assert l1_only["l1_history"][1] != straight["l1_history"][1]
    spectral = train_vae(tiny_dataset, tmp_path / "spectral", steps=2, **{**kw, "spectral_weight": 0.5})
    assert spectral["l1_history"][0] == straight["l1_history"][0]
    assert spectral["l1_history"][1] != straight["l1_history"][1]  # so does the spectral one
    with pytest.raises(ValueError, match="balance"):
        train_vae(tiny_dataset, tmp_path / "bad", steps=1, **{**kw, "balance": "classes"})
