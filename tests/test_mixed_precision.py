"""The papers' bf16 mixed precision (on a CUDA GPU when there is one, else bf16 autocast on the CPU)
trains ldm-finetune and dit-hldf with finite losses, the saved weights and the VAE stay float32 (no
black images), and samples come out."""

import numpy as np
import torch
from tiny_models import clip_tokenizer_files, clip_tower, save_tiny_sd, tiny_vae, write_tiny_dataset

from medsyn.sampling import generate, load_pipeline

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _not_black(samples):
    return all(s["image"].std() > 1 and s["image"].mean() > 5 for s in samples)


def test_bf16_finetune_on_gpu(tmp_path):
    from medsyn.training.ldm_finetune import finetune_unet

    data = write_tiny_dataset(tmp_path / "data", size=32)
    result = finetune_unet(
        data,
        save_tiny_sd(tmp_path / "sd"),
        tmp_path / "ft",
        steps=30,
        batch_size=8,
        lr=1e-3,
        mixed_precision="bf16",
        checkpoint_every=15,
        validation_every=30,
        sampling_steps=4,
        progress=False,
    )
    assert np.isfinite(result["loss_history"]).all()
    assert (tmp_path / "ft" / "validation" / "step_0000030.png").is_file()
    pipeline = load_pipeline(result["pipeline_dir"]).to(DEVICE)
    assert pipeline.vae.dtype == torch.float32 and pipeline.unet.dtype == torch.float32
    assert _not_black(generate(pipeline, ["A red disc."], per_prompt=2, seed=0, steps=4))


def test_bf16_dit_hldf_on_gpu(tmp_path):
    from medsyn.training.dit_hldf import train_dit

    data = write_tiny_dataset(tmp_path / "data")
    vocab = clip_tokenizer_files(tmp_path / "clip" / "tokenizer")
    clip_tower(tmp_path / "clip" / "text_encoder", vocab, 32)
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.0)
    vae.save_pretrained(tmp_path / "vae")
    result = train_dit(
        data,
        tmp_path / "dit",
        vae_dir=tmp_path / "vae",
        text_encoder="clip",
        text_encoder_path=tmp_path / "clip",
        config={"num_layers": 2, "num_attention_heads": 2, "attention_head_dim": 16},
        steps=30,
        batch_size=8,
        lr=1e-3,
        mixed_precision="bf16",
        hldf_batch=4,
        checkpoint_every=15,
        validation_every=30,
        sampling_steps=4,
        progress=False,
    )
    assert np.isfinite(result["loss_history"]).all() and np.isfinite(result["pixel_history"]).all()
    assert all(p > 0 for p in result["pixel_history"])
    pipeline = load_pipeline(result["pipeline_dir"]).to(DEVICE)
    assert _not_black(generate(pipeline, ["A cyan bar."], per_prompt=2, seed=0, steps=4))
