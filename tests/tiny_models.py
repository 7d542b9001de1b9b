"""Tiny models and data built and `save_pretrained` here, standing in for weights that cannot be downloaded."""

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image


def write_tiny_dataset(root: Path, size: int = 16, n: int = 24) -> Path:
    """A curated-format data set of two classes, a red disc and a cyan bar, with captions."""
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[0:size, 0:size]
    c, records = size // 2, []
    for i in range(n):
        disc = i % 2 == 0
        image = np.full((size, size, 3), 40, np.uint8)
        if disc:
            image[(yy - c) ** 2 + (xx - c) ** 2 < (size / 3.5) ** 2] = (230, 80, 80)
        else:
            image[:, c - size // 8:c + size // 8] = (60, 200, 220)
        image = np.clip(image + rng.normal(0, 6, image.shape), 0, 255).astype(np.uint8)
        name = f"images/{i:02x}.png"
        Image.fromarray(image).save(root / name)
        records.append({"file_name": name, "text": "A red disc." if disc else "A cyan bar.",
                        "split": "validation" if i >= n - n // 6 else "train", "labels": ["disc" if disc else "bar"],
                        "source": "tiny", "specialty": "tiny", "image_type": "phantom", "patient_id": f"tiny-{i}"})
    (root / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records) + "\n")
    return root


def clip_tokenizer_files(directory: Path) -> int:
    """A byte-level BPE vocabulary with no merges: every byte is a token (enough to tokenize anything)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    directory.mkdir(parents=True)
    symbols = list(bytes_to_unicode().values())
    vocab = {s: i for i, s in enumerate(symbols + [s + "</w>" for s in symbols] + ["<|startoftext|>", "<|endoftext|>"])}
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return len(vocab)


def clip_tower(directory: Path, vocab_size: int, hidden: int, projection: bool = False) -> None:
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=2,
                            num_attention_heads=2, max_position_embeddings=77, projection_dim=hidden,
                            bos_token_id=vocab_size - 2, eos_token_id=vocab_size - 1)
    torch.manual_seed(0)
    (CLIPTextModelWithProjection if projection else CLIPTextModel)(config).save_pretrained(directory)


def tiny_vae(sample_size: int = 16):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=[8, 16], down_block_types=["DownEncoderBlock2D"] * 2,
                         up_block_types=["UpDecoderBlock2D"] * 2, norm_num_groups=4, latent_channels=4,
                         sample_size=sample_size)


def save_tiny_sd(directory: Path, xl: bool = False, prediction_type: str = "epsilon") -> Path:
    """A randomly initialised Stable Diffusion 1.x (or SDXL) pipeline directory with CLIP text towers."""
    from diffusers import (EulerDiscreteScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline,
                           UNet2DConditionModel)
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    parts = directory / "parts"
    vocab = clip_tokenizer_files(parts / "tokenizer")
    clip_tower(parts / "text_encoder", vocab, 32)
    unet_kw = {"cross_attention_dim": 32}
    if xl:
        clip_tokenizer_files(parts / "tokenizer_2")
        clip_tower(parts / "text_encoder_2", vocab, 32, projection=True)
        # SDXL conditions on the pooled text embedding plus 6 size / crop numbers, each embedded in 8
        unet_kw = {"cross_attention_dim": 64, "addition_embed_type": "text_time", "addition_time_embed_dim": 8,
                   "projection_class_embeddings_input_dim": 32 + 6 * 8}
    torch.manual_seed(0)
    unet = UNet2DConditionModel(sample_size=16, in_channels=4, out_channels=4, block_out_channels=[16, 32],
                                layers_per_block=1, norm_num_groups=8, attention_head_dim=4,
                                down_block_types=["DownBlock2D", "CrossAttnDownBlock2D"],
                                up_block_types=["CrossAttnUpBlock2D", "UpBlock2D"], **unet_kw)
    scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012,
                                       steps_offset=1, prediction_type=prediction_type)
    vae = tiny_vae()
    vae.register_to_config(scaling_factor=1.0)
    local = {"local_files_only": True}
    text = {"tokenizer": CLIPTokenizer.from_pretrained(parts / "tokenizer", model_max_length=77, **local),
            "text_encoder": CLIPTextModel.from_pretrained(parts / "text_encoder", **local)}
    if xl:
        text |= {"tokenizer_2": CLIPTokenizer.from_pretrained(parts / "tokenizer_2", model_max_length=77, **local),
                 "text_encoder_2": CLIPTextModelWithProjection.from_pretrained(parts / "text_encoder_2", **local)}
        pipeline = StableDiffusionXLPipeline(vae=vae, unet=unet, scheduler=scheduler, **text)
    else:
        pipeline = StableDiffusionPipeline(vae=vae, unet=unet, scheduler=scheduler, safety_checker=None,
                                           feature_extractor=None, requires_safety_checker=False, **text)
    pipeline.save_pretrained(directory / "pipeline")
    return directory / "pipeline"
