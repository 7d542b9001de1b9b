"""The papers' architectures from their published configurations, with random weights (nothing is
downloaded): the SDXL base 1.0 and Stable Diffusion 1.5 U-Nets, text encoders and VAEs, the PixArt-α
XL and FLUX.1-dev transformers as their `config.json` files on the hub give them, and at CPU scale the
same classes with small widths.

The configurations are typed here because the hub cannot be reached; each is the diffusers /
transformers config of the named checkpoint, with defaults left out."""

import json
from pathlib import Path

import torch

# stabilityai/stable-diffusion-xl-base-1.0, unet/config.json (2.57 B parameters). diffusers calls the
# number of heads `attention_head_dim` here: 5, 10, 20 heads of 64 channels.
SDXL_UNET = {
    "sample_size": 128,
    "block_out_channels": [320, 640, 1280],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 2,
    "attention_head_dim": [5, 10, 20],
    "transformer_layers_per_block": [1, 2, 10],
    "cross_attention_dim": 2048,
    "use_linear_projection": True,
    "addition_embed_type": "text_time",
    "addition_time_embed_dim": 256,
    "projection_class_embeddings_input_dim": 2816,
}
# runwayml/stable-diffusion-v1-5, unet/config.json (860 M parameters)
SD15_UNET = {
    "sample_size": 64,
    "block_out_channels": [320, 640, 1280, 1280],
    "down_block_types": ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
    "up_block_types": ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
    "layers_per_block": 2,
    "attention_head_dim": 8,
    "cross_attention_dim": 768,
}
# OpenAI CLIP ViT-L/14's text tower (SD 1.5; SDXL's first) and OpenCLIP ViT-bigG/14's (SDXL's second)
CLIP_L = {
    "hidden_size": 768,
    "intermediate_size": 3072,
    "num_hidden_layers": 12,
    "num_attention_heads": 12,
    "hidden_act": "quick_gelu",
    "projection_dim": 768,
}
CLIP_BIGG = {
    "hidden_size": 1280,
    "intermediate_size": 5120,
    "num_hidden_layers": 32,
    "num_attention_heads": 20,
    "hidden_act": "gelu",
    "projection_dim": 1280,
}
# the SD / SDXL VAE (83 M parameters; SDXL's scaling factor 0.13025, SD's 0.18215)
VAE = {
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "layers_per_block": 2,
    "latent_channels": 4,
}
SCHEDULER = {
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "steps_offset": 1,
    "timestep_spacing": "leading",
}

# PixArt-alpha/PixArt-XL-2-512x512, transformer/config.json (611 M parameters; Med-Art's base): ε and a
# learned variance (8 output channels), AdaLN-single, T5-XXL captions (4,096 channels); the SD VAE
PIXART_XL_512 = {
    "sample_size": 64,
    "num_layers": 28,
    "num_attention_heads": 16,
    "attention_head_dim": 72,
    "in_channels": 4,
    "out_channels": 8,
    "patch_size": 2,
    "cross_attention_dim": 1152,
    "caption_channels": 4096,
    "norm_type": "ada_norm_single",
    "num_embeds_ada_norm": 1000,
    "activation_fn": "gelu-approximate",
    "attention_bias": True,
    "norm_elementwise_affine": False,
    "norm_eps": 1e-6,
}
PIXART_SCHEDULER = {"beta_start": 0.0001, "beta_end": 0.02, "beta_schedule": "linear"}
# T5-v1.1-XXL's encoder at its width (4,096: the transformer's caption channels) with 2 of its 24
# layers: the training step reads cached prompt embeddings, so the tower's depth is not timed
T5_XXL_SHALLOW = {
    "d_model": 4096,
    "d_ff": 10240,
    "d_kv": 64,
    "num_heads": 64,
    "num_layers": 2,
    "feed_forward_proj": "gated-gelu",
}

# black-forest-labs/FLUX.1-dev, transformer/config.json (11.9 B parameters; MSDM's large baseline,
# LoRA only), its 16-channel VAE and its flow schedule with the shift growing with the image's tokens
FLUX_1_DEV = {
    "patch_size": 1,
    "in_channels": 64,
    "num_layers": 19,
    "num_single_layers": 38,
    "attention_head_dim": 128,
    "num_attention_heads": 24,
    "joint_attention_dim": 4096,
    "pooled_projection_dim": 768,
    "guidance_embeds": True,
    "axes_dims_rope": [16, 56, 56],
}
FLUX_VAE = {
    **VAE,
    "latent_channels": 16,
    "scaling_factor": 0.3611,
    "shift_factor": 0.1159,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
}
FLUX_SCHEDULER = {
    "shift": 3.0,
    "use_dynamic_shifting": True,
    "base_shift": 0.5,
    "max_shift": 1.15,
    "base_image_seq_len": 256,
    "max_image_seq_len": 4096,
}

# CPU scale: the same classes and block layouts, narrow and shallow
SMALL = {
    "sdxl_unet": {
        **SDXL_UNET,
        "block_out_channels": [32, 64, 128],
        "attention_head_dim": [1, 2, 4],
        "transformer_layers_per_block": [1, 1, 2],
        "layers_per_block": 1,
        "cross_attention_dim": 128,
        "addition_time_embed_dim": 16,
        "projection_class_embeddings_input_dim": 64 + 6 * 16,
        "norm_num_groups": 16,
    },
    "sd15_unet": {
        **SD15_UNET,
        "block_out_channels": [32, 64, 128, 128],
        "attention_head_dim": 4,
        "layers_per_block": 1,
        "cross_attention_dim": 64,
        "norm_num_groups": 16,
    },
    "clip_l": {
        **CLIP_L,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 64,
    },
    "clip_bigg": {
        **CLIP_BIGG,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "projection_dim": 64,
    },
    "vae": {**VAE, "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 16},
    "pixart": {
        **PIXART_XL_512,
        "sample_size": 16,
        "num_layers": 2,
        "num_attention_heads": 2,
        "attention_head_dim": 16,
        "cross_attention_dim": 32,
        "caption_channels": 64,
    },
    "t5": {**T5_XXL_SHALLOW, "d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4},
    "flux": {
        **FLUX_1_DEV,
        "num_layers": 1,
        "num_single_layers": 2,
        "attention_head_dim": 16,
        "num_attention_heads": 2,
        "joint_attention_dim": 64,
        "pooled_projection_dim": 64,
        "axes_dims_rope": [4, 6, 6],
    },
    "flux_vae": {**FLUX_VAE, "block_out_channels": [16, 32, 32, 32], "layers_per_block": 1, "norm_num_groups": 16},
}


def configurations(scale: str) -> dict:
    if scale == "gpu":
        return {
            "sdxl_unet": SDXL_UNET,
            "sd15_unet": SD15_UNET,
            "clip_l": CLIP_L,
            "clip_bigg": CLIP_BIGG,
            "vae": VAE,
            "pixart": PIXART_XL_512,
            "t5": T5_XXL_SHALLOW,
            "flux": FLUX_1_DEV,
            "flux_vae": FLUX_VAE,
        }
    return SMALL


def clip_tokenizer(directory: Path, pad_token: str | None = None):
    """CLIP's real BPE tokenizer (49,408 tokens) from the vocabulary open_clip ships, as a transformers
    `CLIPTokenizer`: the tokenizer of SD 1.5 and SDXL."""
    from open_clip.tokenizer import SimpleTokenizer
    from transformers import CLIPTokenizer

    simple = SimpleTokenizer()
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(simple.encoder))
    merges = sorted(simple.bpe_ranks, key=simple.bpe_ranks.get)
    (directory / "merges.txt").write_text("#version: 0.2\n" + "\n".join(" ".join(pair) for pair in merges) + "\n")
    special = {v: k for k, v in simple.encoder.items()}
    return CLIPTokenizer.from_pretrained(
        directory,
        bos_token=special[simple.sot_token_id],
        eos_token=special[simple.eot_token_id],
        unk_token=special[simple.eot_token_id],
        pad_token=pad_token or special[simple.eot_token_id],
        model_max_length=77,
        local_files_only=True,
    )


def clip_text(config: dict, projection: bool, tokenizer):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    full = CLIPTextConfig(
        vocab_size=len(tokenizer),
        max_position_embeddings=77,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        **config,
    )
    return (CLIPTextModelWithProjection if projection else CLIPTextModel)(full)


def build_pipeline(kind: str, scale: str, work: Path, device: torch.device, seed: int = 0):
    """A random-weight `StableDiffusionXLPipeline` ('sdxl') or `StableDiffusionPipeline` ('sd15') of the
    published configuration ('gpu' scale) or a small one ('cpu'), in float32 on `device`."""
    from diffusers import (
        AutoencoderKL,
        EulerDiscreteScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    configs = configurations(scale)
    torch.manual_seed(seed)
    with torch.device(device):  # initialise on the device: a 2.6 B-parameter U-Net initialises in seconds
        tokenizer = clip_tokenizer(work / kind / "tokenizer")
        text_encoder = clip_text(configs["clip_l"], False, tokenizer)
        vae = AutoencoderKL(**configs["vae"], scaling_factor=0.13025 if kind == "sdxl" else 0.18215)
        unet = UNet2DConditionModel(**configs[f"{kind}_unet"])
        scheduler = EulerDiscreteScheduler(**SCHEDULER)
        if kind == "sdxl":
            tokenizer_2 = clip_tokenizer(work / kind / "tokenizer_2", pad_token="!")
            text_encoder_2 = clip_text(configs["clip_bigg"], True, tokenizer_2)
            pipeline = StableDiffusionXLPipeline(
                vae=vae,
                text_encoder=text_encoder,
                text_encoder_2=text_encoder_2,
                tokenizer=tokenizer,
                tokenizer_2=tokenizer_2,
                unet=unet,
                scheduler=scheduler,
            )
        else:
            pipeline = StableDiffusionPipeline(
                vae=vae,
                text_encoder=text_encoder,
                tokenizer=tokenizer,
                unet=unet,
                scheduler=scheduler,
                safety_checker=None,
                feature_extractor=None,
                requires_safety_checker=False,
            )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def save_pixart(scale: str, directory: Path, seed: int = 0) -> Path:
    """A random-weight `PixArtAlphaPipeline` of PixArt-XL-2-512x512's transformer ('gpu' scale) or a
    small one ('cpu'), with the SD VAE and a T5 tower of T5-XXL's width, saved in `directory` (the
    form medsyn's loop takes, `train_dit(pretrained_dir=...)`); float32, built on the CPU."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from benchmarks.common import stand_ins

    if (directory / "model_index.json").is_file():
        return directory
    configs = configurations(scale)
    tokenizer = stand_ins().t5_tokenizer(directory / "tokenizer")  # T5's layout; its vocabulary is not timed
    torch.manual_seed(seed)
    pipeline = PixArtAlphaPipeline(
        tokenizer=tokenizer,
        text_encoder=T5EncoderModel(T5Config(vocab_size=len(tokenizer), **configs["t5"])),
        vae=AutoencoderKL(**configs["vae"], scaling_factor=0.18215),
        transformer=PixArtTransformer2DModel(**configs["pixart"]),
        scheduler=DPMSolverMultistepScheduler(**PIXART_SCHEDULER),
    )
    pipeline.save_pretrained(directory)
    return directory


def save_flux(scale: str, directory: Path, device: torch.device, seed: int = 0) -> Path:
    """A random-weight `FluxPipeline` of FLUX.1-dev's transformer ('gpu' scale: built on `device` in
    bfloat16, as it is published) or a small one ('cpu': float32), with CLIP ViT-L's text tower and a
    T5 tower of T5-XXL's width, saved in `directory` (the form `finetune_flux` takes)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    from benchmarks.common import stand_ins

    if (directory / "model_index.json").is_file():
        return directory
    configs = configurations(scale)
    t5_tokenizer = stand_ins().t5_tokenizer(directory / "tokenizer_2")  # T5's layout; not timed
    t5_tokenizer.model_max_length = 512
    dtype = torch.bfloat16 if scale == "gpu" else torch.float32
    torch.manual_seed(seed)
    with torch.device(device):
        tokenizer = clip_tokenizer(directory / "tokenizer")
        pipeline = FluxPipeline(
            scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_SCHEDULER),
            vae=AutoencoderKL(**configs["flux_vae"]),
            text_encoder=clip_text(configs["clip_l"], False, tokenizer),
            tokenizer=tokenizer,
            text_encoder_2=T5EncoderModel(T5Config(vocab_size=len(t5_tokenizer), **configs["t5"])),
            tokenizer_2=t5_tokenizer,
            transformer=_built_in(dtype, FluxTransformer2DModel, **configs["flux"]),
        )
    pipeline.save_pretrained(directory)
    return directory


def _built_in(dtype: torch.dtype, cls, **config):
    """`cls(**config)` with its parameters made in `dtype` (11.9 B float32 parameters would first take 48 GB)."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        return cls(**config)
    finally:
        torch.set_default_dtype(previous)


def parameters_of(module) -> int:
    return sum(p.numel() for p in module.parameters())
