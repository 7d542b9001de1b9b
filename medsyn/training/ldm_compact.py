"""ldm-compact: a small latent diffusion model trained from scratch, as MSDM / Prompt to Polyp
(Chaichuk, Gautam, Hicks, Tutubalina 2025) does for colonoscopy: an AutoencoderKL trained on the
curated images, then a cross-attention UNet2DConditionModel trained in its latent space on a frozen
text encoder, saved as a diffusers `StableDiffusionPipeline` directory that
`StableDiffusionPipeline.from_pretrained` loads as it is.

Two readable loops, top to bottom: `train_vae` and `train_unet`. Shared pieces (batch order,
per-step randomness, Min-SNR, caches, checkpoints) are in `medsyn.training.common`.
"""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsyn.data.dataset import split_records
from medsyn.models.text_encoders import load_text_encoder, require_dir
from medsyn.training.common import (
    adamw,
    adversarial_term,
    cache_images,
    cache_latent_moments,
    cache_prompt_embeddings,
    class_chances,
    diffusion_target,
    discriminator_step,
    draw_batch,
    drawn_indices,
    ema_weights,
    make_accelerator,
    make_lr_schedule,
    micro_batch_size,
    min_snr_weights,
    optimizer_step,
    progress_bar,
    prompt_rows,
    resume_step,
    save_checkpoint,
    save_validation_grid,
    spectral_distance,
    step_generator,
    structural_dissimilarity,
    to_model_range,
    training_recipe,
)

# A ~0.65 M-parameter VAE (x4 down-sampling, 4 latent channels) and a ~2 M-parameter U-Net: sizes that
# learn the embedded classes on 2 CPU cores. The `paper` profile passes larger ones. Few channels per
# norm group: with one channel per group (instance norm) the VAE lost each image's colour (measured:
# colour L1 0.24 with 16 groups, 0.12 with 4).
VAE_CONFIG = {
    "block_out_channels": [16, 32, 64],
    "layers_per_block": 1,
    "latent_channels": 4,
    "norm_num_groups": 4,
    "mid_block_add_attention": False,
}
UNET_CONFIG = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
}
# Stable Diffusion's noise schedule; v-prediction keeps few-step samplers bounded on small latents
SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "steps_offset": 1,
}


# ---------------------------------------------------------------- the autoencoder


class PatchDiscriminator(nn.Module):
    """PatchGAN (Isola et al. 2017) as in the LDM autoencoder loss: a logit per overlapping patch.
    GroupNorm instead of BatchNorm, so several processes need no synchronised statistics."""

    def __init__(self, channels: int = 3, width: int = 32, layers: int = 2):
        super().__init__()
        blocks, c = [nn.Conv2d(channels, width, 4, 2, 1), nn.LeakyReLU(0.2)], width
        for _ in range(1, layers):
            blocks += [nn.Conv2d(c, 2 * c, 4, 2, 1), nn.GroupNorm(8, 2 * c), nn.LeakyReLU(0.2)]
            c *= 2
        blocks.append(nn.Conv2d(c, 1, 3, 1, 1))
        self.net = nn.Sequential(*blocks)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Autoencode(nn.Module):
    """Encode, sample z = mean + std * ε with the caller's ε, decode: one forward, so that a
    distributed wrapper sees (and synchronises) every gradient of the step."""

    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, x: torch.Tensor, eps: torch.Tensor):
        posterior = self.vae.encode(x).latent_dist
        return self.vae.decode(posterior.mean + posterior.std * eps).sample, posterior.kl().mean()


def make_vae(image_size: int, config: dict | None = None):
    from diffusers import AutoencoderKL

    cfg = {**VAE_CONFIG, **(config or {})}
    levels = len(cfg["block_out_channels"])
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        sample_size=image_size,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        **cfg,
    )


def train_vae(
    dataset_dir: str | Path,
    out_dir: str | Path,
    steps: int = 800,
    batch_size: int = 16,
    lr: float = 1e-3,
    kl_weight: float = 1e-6,
    adversarial_weight: float = 0.1,
    adversarial_start: int | None = None,
    ssim_weight: float = 0.0,
    spectral_weight: float = 0.0,
    balance: str = "none",
    config: dict | None = None,
    seed: int = 0,
    checkpoint_every: int = 200,
    resume: bool = True,
    mixed_precision: str = "no",
    progress: bool = True,
) -> dict:
    """Train an AutoencoderKL on the training split: L1 (+ 1 − SSIM) reconstruction + KL + a PatchGAN
    hinge term.

    The adversarial term (LDM, Rombach et al. 2022, Appendix G) needs no downloaded weights, unlike
    LPIPS. After training, the latent scale is set so that scaled latents have unit variance (SD's
    0.18215 was found the same way) and the VAE is saved to `<out_dir>/vae`.

    Args:
        dataset_dir: curated dataset (one image size).
        out_dir: where checkpoints, the cache and `vae/` go.
        steps: optimizer steps.
        batch_size: images per step (over all processes).
        lr: AdamW learning rate of autoencoder and discriminator.
        kl_weight: weight of the KL term.
        adversarial_weight: weight of the generator's hinge term, times the adaptive balance of its
            gradient against the reconstruction gradient; 0 turns the discriminator off.
        adversarial_start: step at which the adversarial term starts (default: three quarters of `steps`).
        ssim_weight: weight of 1 − SSIM beside L1 (`structural_dissimilarity`; 0: L1 alone). Measured on
            `default` (700 steps, two seeds): PSNR +0.6 / +1.3 dB and the real-image classifier on
            reconstructions 0.86 -> 0.90 and 0.89 -> 0.94 macro at 0.2; lymph-node texture survives.
        spectral_weight: weight of the amplitude-spectrum distance (`spectral_distance`; 0: none), a
            frequency-aware term that charges a blurred texture (four seeds on `default` at 0.5: the
            classifier on reconstructions +0.029 on average, not resolved; README).
        balance: 'none' (every image once per epoch) or 'class' (each batch drawn with replacement, an
            image's chance inversely proportional to its class's count): a class of 16 images among
            1,340 is otherwise seen too rarely to learn its colours (measured on `default`: the real-image
            classifier on reconstructions 0.81 -> 0.92 macro at the same steps).
        config: AutoencoderKL overrides of `VAE_CONFIG`.
        seed: seed of initialisation, batch order and sampling.
        checkpoint_every: steps between checkpoints.
        resume: continue from the newest checkpoint in `<out_dir>/checkpoints`.
        mixed_precision: accelerate's 'no', 'fp16' or 'bf16'.
        progress: show a progress bar.

    Returns:
        {'vae_dir', 'scaling_factor', 'validation_l1', 'l1_history'} (the L1 of each step run here).
    """
    recipe = training_recipe(locals())  # before anything else is bound: the arguments
    from accelerate.utils import set_seed

    out_dir = Path(out_dir)
    accelerator = make_accelerator(mixed_precision=mixed_precision)
    set_seed(seed)
    records = split_records(dataset_dir, "train")
    chances = class_chances(records, balance)
    if batch_size % accelerator.num_processes:
        raise ValueError(f"batch_size {batch_size} must split evenly over {accelerator.num_processes} processes")
    with accelerator.main_process_first():  # the main process writes the cache, the others then read it
        images = cache_images(dataset_dir, records, out_dir / "cache" / "train_images.npy")
    vae = make_vae(images.shape[-1], config)
    latent_shape = (
        vae.config.latent_channels,
        *(n // 2 ** (len(vae.config.block_out_channels) - 1) for n in images.shape[-2:]),
    )
    autoencode = _Autoencode(vae)
    discriminator = PatchDiscriminator()
    optimizer = adamw(autoencode.parameters(), lr=lr)
    d_optimizer = adamw(discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
    autoencode, discriminator, optimizer, d_optimizer = accelerator.prepare(
        autoencode, discriminator, optimizer, d_optimizer
    )
    start = resume_step(accelerator, out_dir / "checkpoints", resume, recipe)
    adversarial_start = 3 * steps // 4 if adversarial_start is None else adversarial_start
    rank, world = accelerator.process_index, accelerator.num_processes

    history = []
    bar = progress_bar(steps, start, "vae", progress and accelerator.is_local_main_process)
    for step in range(start, steps):
        # draws for the whole global batch, then this process's share: any number of processes sees
        # the images and noise that one process would
        mine = slice(rank, None, world)
        index = drawn_indices(len(images), batch_size, seed, step, chances)[mine]
        x = to_model_range(images[index]).to(accelerator.device)
        eps = torch.randn((batch_size, *latent_shape), generator=step_generator(seed, step))[mine].to(x.device)
        with accelerator.autocast():
            reconstruction, kl = autoencode(x, eps)
            l1 = (reconstruction - x).abs().mean()
            loss = l1 + kl_weight * kl
            if ssim_weight:
                loss = loss + ssim_weight * structural_dissimilarity(reconstruction, x)
            if spectral_weight:
                loss = loss + spectral_weight * spectral_distance(reconstruction, x)
            adversarial = adversarial_weight > 0 and step >= adversarial_start
            if adversarial:
                last = accelerator.unwrap_model(autoencode).vae.decoder.conv_out.weight
                loss = loss + adversarial_term(l1, discriminator(reconstruction), last, adversarial_weight)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if adversarial:
            discriminator_step(accelerator, discriminator, d_optimizer, x, reconstruction)
        history.append(l1.item())
        bar.update(1)
        bar.set_postfix(l1=f"{l1.item():.4f}", kl=f"{kl.item():.1f}")
        if (step + 1) % checkpoint_every == 0 or step + 1 == steps:
            save_checkpoint(accelerator, out_dir / "checkpoints", step + 1, {"l1": l1.item(), "recipe": recipe})
    bar.close()

    vae = accelerator.unwrap_model(autoencode).vae.eval()
    with torch.no_grad():
        means = [vae.encode(to_model_range(images[i : i + 64])).latent_dist.mean for i in range(0, len(images), 64)]
        scaling_factor = float(1 / torch.cat(means).std())
        held_out = split_records(dataset_dir, "validation")
        val = cache_images(dataset_dir, held_out, out_dir / "cache" / "validation_images.npy")
        x = to_model_range(val[:64])
        validation_l1 = float((vae.decode(vae.encode(x).latent_dist.mean).sample - x).abs().mean())
    vae.register_to_config(scaling_factor=scaling_factor)
    if accelerator.is_main_process:
        vae.save_pretrained(out_dir / "vae")
    return {
        "vae_dir": out_dir / "vae",
        "scaling_factor": scaling_factor,
        "validation_l1": validation_l1,
        "l1_history": history,
    }


# ---------------------------------------------------------------- the latent U-Net


def build_pipeline(vae, encoder, unet, prediction_type: str):
    """A diffusers StableDiffusionPipeline around medsyn's components (DPM-Solver++ by default).

    A BERT-like encoder gets `use_attention_mask`, so the pipeline encodes prompts exactly as training
    did, and its tokenizer's length is the training length."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    tokenizer, text_model = encoder.towers[0]
    tokenizer.model_max_length = encoder.max_length
    if encoder.kind in ("minilm", "bert"):
        text_model.config.use_attention_mask = True
    scheduler = DPMSolverMultistepScheduler(**SCHEDULE, prediction_type=prediction_type, algorithm_type="dpmsolver++")
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_model,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def train_unet(
    dataset_dir: str | Path,
    vae_dir: str | Path,
    out_dir: str | Path,
    text_encoder: str = "minilm",
    text_encoder_path: str | None = None,
    config: dict | None = None,
    steps: int = 3000,
    batch_size: int = 32,
    gradient_accumulation_steps: int = 1,
    lr: float = 1e-3,
    lr_warmup_steps: int = 100,
    lr_schedule: str = "constant",
    ema_decay: float = 0.999,
    prediction_type: str = "v_prediction",
    snr_gamma: float | None = 5.0,
    noise_offset: float = 0.0,
    caption_dropout: float = 0.1,
    balance: str = "none",
    max_grad_norm: float = 1.0,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    checkpoint_every: int = 500,
    validation_every: int = 500,
    validation_prompts: list[str] | None = None,
    guidance_scale: float = 4.0,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train a cross-attention U-Net in the VAE's latent space and save the pipeline to `<out_dir>/pipeline`.

    Loss: MSE on the scheduler's target (v by default) with Min-SNR-γ weights; captions are replaced
    by the empty prompt with probability `caption_dropout`, for classifier-free guidance. The EMA of
    the weights is what is saved.

    Args:
        dataset_dir: curated dataset; the training split is used.
        vae_dir: a trained AutoencoderKL (`train_vae`'s `vae/`), frozen here.
        out_dir: checkpoints, caches, validation grids and `pipeline/`.
        text_encoder, text_encoder_path: see `medsyn.models.text_encoders.load_text_encoder`.
        config: UNet2DConditionModel overrides of `UNET_CONFIG`.
        steps: optimizer steps; batch_size: images per optimizer step over all processes and
            accumulation steps; gradient_accumulation_steps: micro-batches per optimizer step.
        lr, lr_warmup_steps: AdamW peak learning rate and the steps of its linear warm-up.
        lr_schedule: after the warm-up, 'constant' or 'cosine' (to 0 at `steps`; `common.make_lr_schedule`).
        ema_decay: EMA decay of the saved weights.
        prediction_type: 'v_prediction' (default) or 'epsilon'.
        snr_gamma: Min-SNR γ; None for plain MSE.
        noise_offset: noise-offset strength (0: off).
        caption_dropout: probability of training on the empty prompt.
        balance: 'none' (every image once per epoch) or 'class' (every class equally often,
            `medsyn.training.common.class_chances`).
        max_grad_norm: gradient clipping.
        mixed_precision: accelerate's 'no', 'fp16' or 'bf16'.
        gradient_checkpointing: trade compute for memory in the U-Net.
        checkpoint_every, validation_every: steps between checkpoints / validation grids (0: never).
        validation_prompts: prompts of the validation grid (default: up to 8 distinct captions).
        guidance_scale: classifier-free guidance of the validation grid.
        seed: seed of initialisation, batch order and every random draw.
        resume: continue from the newest checkpoint in `<out_dir>/checkpoints`.
        progress: show a progress bar.

    Returns:
        {'pipeline_dir', 'steps', 'loss_history'} (the loss of each step run here).
    """
    recipe = training_recipe(locals())  # before anything else is bound: the arguments
    from accelerate.utils import set_seed
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from diffusers.training_utils import EMAModel, compute_snr

    out_dir = Path(out_dir)
    accelerator = make_accelerator(mixed_precision=mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batch = micro_batch_size(batch_size, gradient_accumulation_steps, world)
    set_seed(seed)

    # frozen components and the on-disk caches they fill once
    vae = AutoencoderKL.from_pretrained(require_dir(vae_dir), local_files_only=True).eval().requires_grad_(False)
    encoder = load_text_encoder(text_encoder, text_encoder_path)
    records = split_records(dataset_dir, "train")
    prompts, prompt_of = prompt_rows(records)
    chances = class_chances(records, balance)
    cache = out_dir / "cache"
    with accelerator.main_process_first():  # only the main process writes; the others wait, then read
        if accelerator.is_main_process:
            cache_latent_moments(vae, dataset_dir, records, cache)
            cache_prompt_embeddings(
                lambda batch: {"hidden_states": encoder.encode(batch).hidden_states}, [""] + prompts, cache
            )
    latent_mean, latent_std = (
        np.load(cache / "latent_mean.npy", mmap_mode="r"),
        np.load(cache / "latent_std.npy", mmap_mode="r"),
    )
    hidden = np.load(cache / "prompt_hidden_states.npy", mmap_mode="r")
    scaling = vae.config.scaling_factor

    unet = UNet2DConditionModel(
        sample_size=latent_mean.shape[-1],
        in_channels=latent_mean.shape[1],
        out_channels=latent_mean.shape[1],
        cross_attention_dim=encoder.hidden_size,
        **{**UNET_CONFIG, **(config or {})},
    )
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    noise_scheduler = DDPMScheduler(**SCHEDULE, prediction_type=prediction_type)
    trainable = list(unet.parameters())
    ema = EMAModel(trainable, decay=ema_decay, model_cls=UNet2DConditionModel, model_config=unet.config)
    optimizer = adamw(trainable, lr=lr, weight_decay=1e-2)
    lr_scheduler = make_lr_schedule(optimizer, lr_schedule, lr_warmup_steps, steps)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    accelerator.register_for_checkpointing(ema)
    start = resume_step(accelerator, out_dir / "checkpoints", resume, recipe)
    validation_prompts = validation_prompts or prompts[:8]

    history = []
    bar = progress_bar(steps, start, "unet", progress and accelerator.is_local_main_process)
    for step in range(start, steps):
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
            noise, timesteps = d.noise, d.timesteps
            latents = torch.from_numpy(latent_mean[d.index] + latent_std[d.index] * d.eps) * scaling
            encoder_hidden_states = torch.from_numpy(hidden[np.where(d.dropped, 0, prompt_of[d.index])])
            noisy = noise_scheduler.add_noise(latents, noise, timesteps)
            target = diffusion_target(noise_scheduler, latents, noise, timesteps)
            device = accelerator.device
            sync = micro == gradient_accumulation_steps - 1
            with accelerator.autocast(), nullcontext() if sync else accelerator.no_sync(unet):
                prediction = unet(noisy.to(device), timesteps.to(device), encoder_hidden_states.to(device)).sample
                per_sample = ((prediction.float() - target.to(device)) ** 2).mean(dim=(1, 2, 3))
                weights = min_snr_weights(compute_snr(noise_scheduler, timesteps), snr_gamma, prediction_type)
                loss = (weights.to(device) * per_sample).mean() / gradient_accumulation_steps
                accelerator.backward(loss)
        # Begin block "step bookkeeping" (each loop keeps a copy, marked; tests/test_house_rules.py compares them)
        optimizer_step(accelerator, trainable, optimizer, lr_scheduler, ema, max_grad_norm)
        # the mean over all processes' shares of the batch
        history.append(accelerator.reduce(loss.detach(), "mean").item() * gradient_accumulation_steps)
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        done = step + 1
        if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(accelerator, out_dir / "checkpoints", done, {"loss": history[-1], "recipe": recipe})
        # End block
        if validation_every and accelerator.is_main_process and (done % validation_every == 0 or done == steps):
            with ema_weights(ema, trainable):
                pipeline = build_pipeline(vae, encoder, accelerator.unwrap_model(unet).eval(), prediction_type)
                pipeline.set_progress_bar_config(disable=True)
                save_validation_grid(
                    pipeline,
                    validation_prompts,
                    guidance_scale,
                    25,
                    seed,
                    out_dir / "validation" / f"step_{done:07d}.png",
                )
                unet.train()
    bar.close()

    pipeline_dir = out_dir / "pipeline"
    final = accelerator.unwrap_model(unet)
    with ema_weights(ema, final.parameters()):
        if accelerator.is_main_process:
            build_pipeline(vae, encoder, final, prediction_type).save_pretrained(pipeline_dir)
    accelerator.wait_for_everyone()
    return {"pipeline_dir": pipeline_dir, "steps": steps, "loss_history": history}
