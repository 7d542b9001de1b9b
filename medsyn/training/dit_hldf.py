"""dit-hldf: a PixArt-α diffusion transformer (Chen et al. 2023) trained with Hybrid-Level Diffusion
Fine-tuning as Med-Art proposes it: the usual latent diffusion loss plus a pixel-space term.

Pixel term, as implemented here. At every step the model's own estimate of the clean latent,
x̂₀ = √ᾱ_t·x_t − √(1−ᾱ_t)·v̂ (v-prediction) or (x_t − √(1−ᾱ_t)·ε̂)/√ᾱ_t (ε-prediction), is decoded
through the frozen VAE decoder *with gradients*, and compared with the real image:

    L = L_latent + λ(step) · Σ_i ᾱ_{t_i} · [ w_pix · |D(x̂₀) − x|₁ + w_col · W₁ per channel(D(x̂₀), x) ] / Σ_i ᾱ_{t_i}

- the per-pixel term is the mean absolute error in [−1, 1];
- the colour term is, per RGB channel, the 1-D Wasserstein distance between the two images' pixel
  value distributions (the mean absolute difference of the sorted values): it matches each channel's
  mean, spread and histogram shape;
- each sample is weighted by ᾱ_t, the share of signal in x_t, because x̂₀ at high noise is a blurred
  mean that no pixel loss should sharpen;
- λ(step) is 0 before `hldf_start`, then rises linearly to `hldf_weight` over `hldf_ramp` steps; the
  term is computed on the first `hldf_batch` images of each micro-batch to bound its cost.

How this differs from Med-Art's released code: that code computes its pixel-level signal by running
a 20-step sampling pass every 500 training steps and matches only the per-channel mean and standard
deviation of the sampled images to the real ones. Here the term is part of every step's loss (from
`hldf_start`), it is differentiable end to end through the decoder into the transformer, it compares
each generated image with its own real image pixel by pixel, and it matches the whole per-channel
value distribution rather than its first two moments. No sampling pass enters the loss; sampling
happens only for the validation grids.

Two ways in, one loop (`train_dit`): a compact PixArtTransformer2DModel trained from scratch in the
latent space of a medsyn VAE with a medsyn text encoder (the `default` profile), or a pretrained
PixArt-α pipeline from a local directory, fully or with LoRA (the `paper` profile). The result is a
diffusers `PixArtAlphaPipeline` directory.
"""

import json
import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from medsyn.data.dataset import split_records
from medsyn.models.text_encoders import load_text_encoder, require_dir
from medsyn.sampling import load_pipeline
from medsyn.training.common import (
    LORA_TARGETS,
    adamw,
    add_lora,
    cache_images,
    cache_latent_moments,
    cache_prompt_embeddings,
    class_chances,
    diffusion_target,
    draw_batch,
    ema_weights,
    make_accelerator,
    make_lr_schedule,
    merge_adapters,
    micro_batch_size,
    min_snr_weights,
    optimizer_step,
    park,
    progress_bar,
    prompt_rows,
    resume_step,
    save_checkpoint,
    save_validation_grid,
    to_model_range,
    training_recipe,
)
from medsyn.training.ldm_compact import SCHEDULE

# ~1.9 M parameters: 6 blocks of width 128 over a 16 x 16 latent in 2 x 2 patches (64 tokens), small
# enough for 2 CPU cores; PixArt-α itself is 28 blocks of width 1152
TRANSFORMER_CONFIG = {
    "num_layers": 6,
    "num_attention_heads": 4,
    "attention_head_dim": 32,
    "patch_size": 2,
    "norm_type": "ada_norm_single",
    "use_additional_conditions": False,
}


def build_pipeline(
    vae_dir: str | Path,
    text_encoder: str,
    text_encoder_path: str | None,
    latent_size: int,
    config: dict | None,
    prediction_type: str,
):
    """A new PixArtAlphaPipeline: a compact transformer around a trained VAE and a frozen text encoder.

    PixArt's pipeline encodes prompts with its tokenizer and passes the attention mask to the encoder
    and the transformer, which is how BERT-like encoders such as MiniLM are meant to be used."""
    from diffusers import AutoencoderKL, DPMSolverMultistepScheduler, PixArtAlphaPipeline, PixArtTransformer2DModel

    vae = AutoencoderKL.from_pretrained(require_dir(vae_dir), local_files_only=True)
    encoder = load_text_encoder(text_encoder, text_encoder_path)
    tokenizer, text_model = encoder.towers[0]
    tokenizer.model_max_length = encoder.max_length
    cfg = {**TRANSFORMER_CONFIG, **(config or {})}
    width = cfg["num_attention_heads"] * cfg["attention_head_dim"]
    transformer = PixArtTransformer2DModel(
        sample_size=latent_size,
        in_channels=vae.config.latent_channels,
        out_channels=vae.config.latent_channels,
        cross_attention_dim=width,
        caption_channels=encoder.hidden_size,
        **cfg,
    )
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type=prediction_type, algorithm_type="dpmsolver++")
    return PixArtAlphaPipeline(
        tokenizer=tokenizer, text_encoder=text_model, vae=vae, transformer=transformer, scheduler=scheduler
    )


def load_pretrained(pretrained_dir: str | Path):
    """A PixArt-α pipeline (transformer, VAE, T5, tokenizer, scheduler) from a local directory."""
    pipeline = load_pipeline(pretrained_dir)
    if not hasattr(pipeline, "transformer"):
        raise ValueError(f"{pretrained_dir} holds a {type(pipeline).__name__}, not a PixArt-α pipeline")
    return pipeline


def encode_with_pipeline(pipeline, prompts: list[str], max_sequence_length: int = 120) -> dict[str, torch.Tensor]:
    """Prompt embeddings and attention masks exactly as `PixArtAlphaPipeline.__call__` computes them
    (the empty prompt is its unconditional prompt).

    The pipeline samples with 120 tokens; a shorter `max_sequence_length` gives the same result for
    every prompt that fits: the encoder attends only to real tokens, and the transformer's
    cross-attention masks padding out."""
    with torch.no_grad():
        hidden, mask, _, _ = pipeline.encode_prompt(
            list(prompts),
            do_classifier_free_guidance=False,
            device=pipeline.device,
            clean_caption=False,
            max_sequence_length=max_sequence_length,
        )
    return {"hidden_states": hidden, "attention_mask": mask}


def x0_estimate(scheduler, noisy: torch.Tensor, prediction: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """The clean latent implied by the network's prediction (DDPM: x_t = √ᾱ·x₀ + √(1−ᾱ)·ε)."""
    alpha_bar = scheduler.alphas_cumprod.to(noisy.device)[timesteps].view(-1, 1, 1, 1)
    a, s = alpha_bar.sqrt(), (1 - alpha_bar).sqrt()
    kind = scheduler.config.prediction_type
    if kind == "v_prediction":
        return a * noisy - s * prediction
    if kind == "epsilon":
        return (noisy - s * prediction) / a
    if kind == "sample":
        return prediction
    raise ValueError(f"unknown prediction_type {kind!r}")


def colour_distribution_distance(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per image, the mean over channels of the 1-D Wasserstein-1 distance between the two images'
    pixel values in that channel (sorted values, compared in order). Inputs N x C x H x W; returns N."""
    return (a.flatten(2).sort(dim=-1).values - b.flatten(2).sort(dim=-1).values).abs().mean(dim=(1, 2))


def hldf_schedule(step: int, weight: float, start: int, ramp: int) -> float:
    """λ(step): 0 before `start`, then linear up to `weight` over `ramp` steps."""
    if weight <= 0 or step < start:
        return 0.0
    return weight * min(1.0, (step - start + 1) / max(ramp, 1))


def save_lora(model, lora_dir: Path, rank: int, alpha: float | None) -> None:
    """Save the LoRA weights (peft's state-dict layout, `pytorch_lora_weights.safetensors`, which
    `peft.set_peft_model_state_dict` loads back after `inject_adapter_in_model` with the same rank,
    alpha and targets) and that configuration."""
    from peft.utils import get_peft_model_state_dict
    from safetensors.torch import save_file

    lora_dir.mkdir(parents=True, exist_ok=True)
    save_file(
        {k: v.contiguous() for k, v in get_peft_model_state_dict(model).items()},
        lora_dir / "pytorch_lora_weights.safetensors",
    )
    (lora_dir / "lora_config.json").write_text(
        json.dumps({"r": rank, "lora_alpha": alpha or rank, "target_modules": LORA_TARGETS})
    )


def train_dit(
    dataset_dir: str | Path,
    out_dir: str | Path,
    vae_dir: str | Path | None = None,
    pretrained_dir: str | Path | None = None,
    text_encoder: str = "minilm",
    text_encoder_path: str | None = None,
    max_sequence_length: int | None = None,
    caption_field: str = "text",
    config: dict | None = None,
    steps: int = 2000,
    batch_size: int = 32,
    gradient_accumulation_steps: int = 1,
    lr: float = 2e-5,
    lr_warmup_steps: int = 0,
    lr_schedule: str = "constant",
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    ema_decay: float | None = 0.999,
    prediction_type: str = "v_prediction",
    snr_gamma: float | None = 5.0,
    noise_offset: float = 0.0,
    caption_dropout: float = 0.1,
    balance: str = "none",
    hldf_weight: float = 1.0,
    hldf_start: int = 0,
    hldf_ramp: int = 1,
    hldf_pixel_weight: float = 1.0,
    hldf_colour_weight: float = 1.0,
    hldf_batch: int = 8,
    max_grad_norm: float = 1.0,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    checkpoint_every: int = 500,
    validation_every: int = 500,
    validation_prompts: list[str] | None = None,
    guidance_scale: float = 4.5,
    sampling_steps: int = 20,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train a PixArt-α transformer with the HLDF pixel term and save `<out_dir>/pipeline`.

    Args:
        dataset_dir: curated dataset; the training split is used.
        out_dir: checkpoints, caches, validation grids and `pipeline/` (and `lora/`).
        vae_dir: a trained AutoencoderKL for a new compact transformer (with `text_encoder`).
        pretrained_dir: a local PixArt-α pipeline to fine-tune instead (its VAE, T5 and scheduler are used).
        text_encoder, text_encoder_path: see `medsyn.models.text_encoders.load_text_encoder` (compact only).
        max_sequence_length: prompt tokens in training (default: PixArt-α's 120 for a pretrained pipeline,
            the text encoder's length for a compact one; shorter prompts cost less cross-attention).
        caption_field: the records' caption to train on: `text` (with a vision-language model's
            description when curation added one) or `class_text` (the label template alone): Med-Art's
            comparison of the two trains one model on each.
        config: PixArtTransformer2DModel overrides of `TRANSFORMER_CONFIG` (compact only).
        steps, batch_size, gradient_accumulation_steps: optimizer steps; images per optimizer step over
            all processes and micro-batches; micro-batches per step.
        lr, lr_warmup_steps: AdamW peak learning rate (PixArt-α's fine-tuning 2e-5) and its warm-up steps.
        lr_schedule: after the warm-up, 'constant' or 'cosine' (to 0 at `steps`; `common.make_lr_schedule`).
        lora_rank, lora_alpha: train LoRA adapters of this rank and scale (default: the rank) on the attention
            projections only (None: all weights).
        ema_decay: EMA of the trained weights, saved instead of the raw weights (None: no EMA).
        prediction_type: of a new transformer; a pretrained one keeps its scheduler's.
        snr_gamma: Min-SNR γ of the latent loss; None for plain MSE.
        noise_offset, caption_dropout, max_grad_norm: as in the other families.
        balance: 'none' (every image once per epoch) or 'class' (every class equally often,
            `medsyn.training.common.class_chances`).
        hldf_weight, hldf_start, hldf_ramp: λ of the pixel term and its schedule (`hldf_schedule`); 0 turns it off.
        hldf_pixel_weight, hldf_colour_weight: weights of the per-pixel L1 and the colour-distribution term.
        hldf_batch: images per micro-batch (per process) that go through the decoder.
        mixed_precision: accelerate's 'no', 'fp16' or 'bf16'; the VAE decoder always runs in float32.
        gradient_checkpointing: trade compute for memory in the transformer.
        checkpoint_every, validation_every: steps between checkpoints / validation grids (0: never).
        validation_prompts, guidance_scale, sampling_steps: the validation grid's prompts and sampler.
        seed: seed of initialisation, batch order and every random draw.
        resume: continue from the newest checkpoint in `<out_dir>/checkpoints`.
        progress: show a progress bar.

    Returns:
        {'pipeline_dir', 'lora_dir' (or None), 'steps', 'trained_parameters', 'loss_history',
        'pixel_history', 'step_seconds'}: latent loss, pixel term and wall-clock seconds of each step
        run here (the losses are read every step, so each step's work is done when it is timed).
    """
    recipe = training_recipe(locals())  # before anything else is bound: the arguments
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    if (vae_dir is None) == (pretrained_dir is None):
        raise ValueError("give either vae_dir (a new compact transformer) or pretrained_dir (a PixArt-α pipeline)")
    out_dir = Path(out_dir)
    accelerator = make_accelerator(mixed_precision=mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batch = micro_batch_size(batch_size, gradient_accumulation_steps, world)
    set_seed(seed)

    records = split_records(dataset_dir, "train")
    cache = out_dir / "cache"
    with accelerator.main_process_first():  # the main process writes the cache, the others then read it
        images = cache_images(dataset_dir, records, cache / "train_images.npy")  # the pixel term's targets
    if pretrained_dir is not None:
        pipeline = load_pretrained(pretrained_dir)
        max_sequence_length = max_sequence_length or 120
        native = pipeline.transformer.config.sample_size * pipeline.vae_scale_factor
        if native != images.shape[-1]:  # its position embeddings are laid out for its own size
            raise ValueError(
                f"{pretrained_dir} samples {native} px images and the curated ones are {images.shape[-1]} px: "
                f"curate at {native} px (01_curate's size) or fine-tune a PixArt-α of the curated size"
            )
    else:
        from diffusers import AutoencoderKL

        levels = len(AutoencoderKL.load_config(require_dir(vae_dir))["block_out_channels"])
        pipeline = build_pipeline(
            vae_dir, text_encoder, text_encoder_path, images.shape[-1] // 2 ** (levels - 1), config, prediction_type
        )
        max_sequence_length = max_sequence_length or pipeline.tokenizer.model_max_length
    pipeline = pipeline.to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    vae = pipeline.vae.eval().requires_grad_(False)
    pipeline.text_encoder.eval().requires_grad_(False)

    # latent posteriors and prompt embeddings with their attention masks, cached once
    prompts, prompt_of = prompt_rows(records, caption_field)
    chances = class_chances(records, balance)
    with accelerator.main_process_first():  # only the main process writes; the others wait, then read
        if accelerator.is_main_process:
            cache_latent_moments(vae, dataset_dir, records, cache)
            cache_prompt_embeddings(
                lambda batch: encode_with_pipeline(pipeline, batch, max_sequence_length), [""] + prompts, cache
            )
    parked = park(pipeline.text_encoder)
    latent_mean, latent_std = (
        np.load(cache / "latent_mean.npy", mmap_mode="r"),
        np.load(cache / "latent_std.npy", mmap_mode="r"),
    )
    hidden = np.load(cache / "prompt_hidden_states.npy", mmap_mode="r")
    mask = np.load(cache / "prompt_attention_mask.npy", mmap_mode="r")
    scaling = vae.config.scaling_factor
    shift = getattr(vae.config, "shift_factor", None) or 0.0

    transformer = pipeline.transformer.train()
    trainable = add_lora(transformer, lora_rank, lora_alpha) if lora_rank else list(transformer.parameters())
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    prediction_type = noise_scheduler.config.prediction_type
    learned_sigma = transformer.config.out_channels == 2 * transformer.config.in_channels
    # PixArt-α at 1024 px conditions on resolution and aspect ratio; the compact one does not
    side = latent_mean.shape[-1] * pipeline.vae_scale_factor
    conditions = transformer.use_additional_conditions
    ema = EMAModel(trainable, decay=ema_decay) if ema_decay else None
    optimizer = adamw(trainable, lr=lr, weight_decay=1e-2)
    lr_scheduler = make_lr_schedule(optimizer, lr_schedule, lr_warmup_steps, steps)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if ema:
        accelerator.register_for_checkpointing(ema)
    start = resume_step(accelerator, out_dir / "checkpoints", resume, recipe)
    validation_prompts = validation_prompts or prompts[:8]

    history, pixel_history, step_seconds = [], [], []
    bar = progress_bar(steps, start, "dit-hldf", progress and accelerator.is_local_main_process)
    for step in range(start, steps):
        began = time.perf_counter()
        hldf = hldf_schedule(step, hldf_weight, hldf_start, hldf_ramp)
        latent_total = pixel_total = 0.0
        for micro in range(gradient_accumulation_steps):
            draw = step * gradient_accumulation_steps + micro  # the global micro-batch number
            d = draw_batch(
                seed,
                draw,
                len(records),
                micro_batch,
                latent_mean.shape[1:],
                noise_scheduler.config.num_train_timesteps,
                caption_dropout,
                noise_offset,
                rank,
                world,
                chances,
            )
            device = accelerator.device
            latents = (torch.from_numpy(latent_mean[d.index] + latent_std[d.index] * d.eps) - shift) * scaling
            rows = np.where(d.dropped, 0, prompt_of[d.index])
            n = len(rows)
            added = {"resolution": None, "aspect_ratio": None}
            if conditions:
                added = {
                    "resolution": torch.tensor([[side, side]] * n, dtype=torch.float32, device=device),
                    "aspect_ratio": torch.ones(n, 1, device=device),
                }
            noisy = noise_scheduler.add_noise(latents, d.noise, d.timesteps).to(device)
            target = diffusion_target(noise_scheduler, latents, d.noise, d.timesteps).to(device)
            sync = micro == gradient_accumulation_steps - 1
            with nullcontext() if sync else accelerator.no_sync(transformer):
                with accelerator.autocast():
                    prediction = transformer(
                        noisy,
                        encoder_hidden_states=torch.from_numpy(hidden[rows]).to(device),
                        encoder_attention_mask=torch.from_numpy(mask[rows]).to(device),
                        timestep=d.timesteps.to(device),
                        added_cond_kwargs=added,
                    ).sample.float()
                if learned_sigma:  # PixArt-α also predicts a variance; the MSE trains the mean half
                    prediction = prediction.chunk(2, dim=1)[0]
                per_sample = ((prediction - target) ** 2).mean(dim=(1, 2, 3))
                weights = min_snr_weights(compute_snr(noise_scheduler, d.timesteps), snr_gamma, prediction_type)
                loss = (weights.to(device) * per_sample).mean()
                pixel = torch.zeros((), device=device)
                if hldf > 0:
                    # the pixel term in float32, outside autocast (an fp16 VAE decodes to black images)
                    k = min(hldf_batch, n)
                    x0 = x0_estimate(noise_scheduler, noisy[:k], prediction[:k], d.timesteps[:k].to(device))
                    decoded = vae.decode(x0 / scaling + shift).sample
                    real = to_model_range(images[d.index[:k]]).to(device)
                    per_image = hldf_pixel_weight * (decoded - real).abs().mean(
                        dim=(1, 2, 3)
                    ) + hldf_colour_weight * colour_distribution_distance(decoded, real)
                    signal = noise_scheduler.alphas_cumprod.to(device)[d.timesteps[:k].to(device)]
                    pixel = (signal * per_image).sum() / signal.sum()
                accelerator.backward((loss + hldf * pixel) / gradient_accumulation_steps)
            latent_total += loss.item() / gradient_accumulation_steps
            pixel_total += pixel.item() / gradient_accumulation_steps
        optimizer_step(accelerator, trainable, optimizer, lr_scheduler, ema, max_grad_norm)
        history.append(latent_total)
        pixel_history.append(pixel_total)
        bar.update(1)
        bar.set_postfix(loss=f"{latent_total:.4f}", pixel=f"{pixel_total:.4f}")
        done = step + 1
        if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(
                accelerator,
                out_dir / "checkpoints",
                done,
                {"loss": latent_total, "pixel": pixel_total, "recipe": recipe},
            )
        step_seconds.append(time.perf_counter() - began)  # with a checkpoint written at its end, if any
        if validation_every and accelerator.is_main_process and (done % validation_every == 0 or done == steps):
            with ema_weights(ema, trainable):
                pipeline.transformer = accelerator.unwrap_model(transformer).eval()
                save_validation_grid(
                    pipeline,
                    validation_prompts,
                    guidance_scale,
                    sampling_steps,
                    seed,
                    out_dir / "validation" / f"step_{done:07d}.png",
                    parked,
                    accelerator.device,
                )
                transformer.train()
    bar.close()

    final = accelerator.unwrap_model(transformer)
    pipeline_dir, lora_dir = out_dir / "pipeline", (out_dir / "lora" if lora_rank else None)
    with ema_weights(ema, trainable):
        if accelerator.is_main_process:
            pipeline.transformer = final
            if lora_rank:
                save_lora(final, lora_dir, lora_rank, lora_alpha)
                pipeline.transformer = merge_adapters(final)
            pipeline.save_pretrained(pipeline_dir)
    accelerator.wait_for_everyone()
    return {
        "pipeline_dir": pipeline_dir,
        "lora_dir": lora_dir,
        "steps": steps,
        "trained_parameters": sum(p.numel() for p in trainable),
        "loss_history": history,
        "pixel_history": pixel_history,
        "step_seconds": step_seconds,
    }
