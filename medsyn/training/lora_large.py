"""LoRA fine-tunes of the two large pretrained pipelines MSDM / Prompt to Polyp (Chaichuk et al.
2025) compares its compact model against, each held in a local directory:

- FLUX.1 (`finetune_flux`): a rectified-flow transformer. The latents are packed into 2 x 2 patches
  as the pipeline packs them, x_t = (1 − σ) x_0 + σ ε with σ drawn uniformly from the scheduler's
  training sigmas (diffusers' weighting scheme "none"), the target is the velocity ε − x_0, and a
  guidance-distilled model (FLUX.1-dev) is given its guidance embedding at a fixed value.
- Kandinsky 2.2 (`finetune_kandinsky`): a prior maps the prompt's CLIP text embedding to a CLIP image
  embedding, and a U-Net decoder denoises MoVQ latents conditioned on that image embedding only.
  Both get adapters, trained together on one loss: the decoder on the CLIP image embedding of the
  real image (ε or v MSE), the prior on predicting that embedding from the caption (x_0 MSE on
  CLIP-normalised embeddings, the prior's own parameterisation). Dropped captions train what
  guidance uses: the decoder's zero-image embedding and the prior's empty prompt.

Only LoRA adapters are trained (what MSDM does for these baselines): on FLUX where diffusers' FLUX
scripts put them, on Kandinsky's attention projections;
latents, image and prompt embeddings are cached once to memory-mapped files. The adapters are saved
on their own — FLUX in diffusers' `FluxPipeline.load_lora_weights` format, Kandinsky's two with
`save_lora_adapter` (its pipelines have no LoRA loader; `model.load_lora_adapter(dir, prefix=None)`
reads them) — and merged into the saved pipeline, which `medsyn.sampling` samples at the trained size.
"""

import time
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from medsyn.data.dataset import load_images, split_records
from medsyn.sampling import load_pipeline
from medsyn.training.common import (
    adamw,
    add_lora,
    cache_latent_moments,
    cache_prompt_embeddings,
    diffusion_target,
    draw_batch,
    ema_weights,
    make_accelerator,
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
    step_generator,
    storage_dtype,
    training_recipe,
)

# diffusers' FLUX LoRA scripts' default: the joint blocks' attention (image and text streams) and
# feed-forwards, the single blocks' MLP and output projections
FLUX_LORA_TARGETS = [
    "attn.to_k",
    "attn.to_q",
    "attn.to_v",
    "attn.to_out.0",
    "attn.add_k_proj",
    "attn.add_q_proj",
    "attn.add_v_proj",
    "attn.to_add_out",
    "ff.net.0.proj",
    "ff.net.2",
    "ff_context.net.0.proj",
    "ff_context.net.2",
    "proj_mlp",
    "proj_out",
]


def load_local(pretrained_dir: str | Path, expected: str):
    """A pipeline of class `expected` from a local directory; nothing reaches the network."""
    pipeline = load_pipeline(pretrained_dir)
    if type(pipeline).__name__ != expected:
        raise ValueError(f"{pretrained_dir} holds a {type(pipeline).__name__}, not a {expected}")
    return pipeline


def combine_kandinsky(prior_dir: str | Path, decoder_dir: str | Path, out_dir: str | Path) -> Path:
    """Write one `KandinskyV22CombinedPipeline` directory from local copies of the two published ones
    (kandinsky-2-2-prior and kandinsky-2-2-decoder), the input `finetune_kandinsky` takes."""
    from diffusers import KandinskyV22CombinedPipeline

    prior = load_local(prior_dir, "KandinskyV22PriorPipeline")
    decoder = load_local(decoder_dir, "KandinskyV22Pipeline")
    combined = KandinskyV22CombinedPipeline(
        unet=decoder.unet,
        scheduler=decoder.scheduler,
        movq=decoder.movq,
        prior_prior=prior.prior,
        prior_image_encoder=prior.image_encoder,
        prior_text_encoder=prior.text_encoder,
        prior_tokenizer=prior.tokenizer,
        prior_scheduler=prior.scheduler,
        prior_image_processor=prior.image_processor,
    )
    combined.save_pretrained(out_dir)
    return Path(out_dir)


def _frozen(*models) -> None:
    for model in models:
        model.eval().requires_grad_(False)


def _optimisation(trainable, lr: float, lr_warmup_steps: int, ema_decay: float | None):
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel

    optimizer = adamw(trainable, lr=lr, weight_decay=1e-2)
    lr_scheduler = get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=lr_warmup_steps)
    return optimizer, lr_scheduler, (EMAModel(trainable, decay=ema_decay) if ema_decay else None)


# ---------------------------------------------------------------- FLUX


def encode_flux(pipeline, prompts: list[str], max_sequence_length: int) -> dict[str, torch.Tensor]:
    """T5 token states and CLIP's pooled embedding, exactly as `FluxPipeline` computes them."""
    with torch.no_grad():
        hidden, pooled, _ = pipeline.encode_prompt(
            prompt=list(prompts),
            prompt_2=None,
            device=pipeline.device,
            num_images_per_prompt=1,
            max_sequence_length=max_sequence_length,
        )
    return {"hidden_states": hidden, "pooled": pooled}


def finetune_flux(
    dataset_dir: str | Path,
    pretrained_dir: str | Path,
    out_dir: str | Path,
    steps: int = 1000,
    batch_size: int = 4,
    gradient_accumulation_steps: int = 1,
    lr: float = 1e-4,
    lr_warmup_steps: int = 0,
    lora_rank: int = 16,
    lora_alpha: float | None = None,
    guidance: float = 1.0,
    max_sequence_length: int = 512,
    caption_dropout: float = 0.0,
    ema_decay: float | None = None,
    max_grad_norm: float = 1.0,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    checkpoint_every: int = 500,
    validation_every: int = 500,
    validation_prompts: list[str] | None = None,
    guidance_scale: float = 3.5,
    sampling_steps: int = 28,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train LoRA adapters on a local FLUX.1 transformer with the rectified-flow loss; save `<out_dir>/pipeline`.

    Args:
        dataset_dir: curated dataset; the training split is used.
        pretrained_dir: a local `FluxPipeline` directory.
        out_dir: checkpoints, caches, validation grids, `lora/` and `pipeline/`.
        steps, batch_size, gradient_accumulation_steps: as in `ldm_finetune.finetune_unet`.
        lr, lr_warmup_steps: AdamW learning rate (diffusers' FLUX LoRA default 1e-4), constant after warm-up.
        lora_rank, lora_alpha: adapter rank and scale (default: the rank).
        guidance: the guidance embedding's value in training, for a guidance-distilled transformer
            (diffusers' FLUX.1-dev scripts use 1); ignored when the transformer has none.
        max_sequence_length: T5 tokens per prompt, in training and in the saved pipeline's sampling.
        caption_dropout: probability of training on the empty prompt (FLUX.1-dev has no CFG: 0).
        ema_decay: EMA of the adapters, saved instead of the raw ones (None: no EMA).
        mixed_precision: as in the other loops; 'bf16' or 'fp16' also stores the frozen weights (the
            transformer's base, both text encoders) in that dtype (`add_lora`'s `frozen_dtype`); the
            adapters train in float32 and the saved pipeline is float32.
        max_grad_norm, gradient_checkpointing, checkpoint_every, validation_every, validation_prompts,
        seed, resume, progress: as in the other loops.
        guidance_scale, sampling_steps: the validation grid's sampler.

    Returns:
        {'pipeline_dir', 'lora_dir', 'steps', 'trained_parameters', 'loss_history', 'step_seconds'}
        (each step's wall-clock seconds; its loss is read, so its work is done when it is timed).
    """
    recipe = training_recipe(locals())  # before anything else is bound: the arguments
    from accelerate.utils import set_seed
    from diffusers import FlowMatchEulerDiscreteScheduler

    out_dir = Path(out_dir)
    accelerator = make_accelerator(mixed_precision=mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batch = micro_batch_size(batch_size, gradient_accumulation_steps, world)
    set_seed(seed)

    pipeline = load_local(pretrained_dir, "FluxPipeline").to(accelerator.device)
    frozen_dtype = storage_dtype(mixed_precision)  # the text encoders' and the transformer's base weights
    for text_encoder in (pipeline.text_encoder, pipeline.text_encoder_2):
        text_encoder.to(frozen_dtype or text_encoder.dtype)
    _frozen(pipeline.vae, pipeline.text_encoder, pipeline.text_encoder_2)
    pipeline.tokenizer_2.model_max_length = max_sequence_length  # what the saved pipeline samples with
    records = split_records(dataset_dir, "train")
    prompts, prompt_of = prompt_rows(records)
    cache = out_dir / "cache"
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            cache_latent_moments(pipeline.vae, dataset_dir, records, cache)
            cache_prompt_embeddings(
                lambda batch: encode_flux(pipeline, batch, max_sequence_length), [""] + prompts, cache
            )
    parked = park(pipeline.text_encoder, pipeline.text_encoder_2)  # T5-XXL: 8.9 GiB in bf16
    latent_mean, latent_std = (
        np.load(cache / "latent_mean.npy", mmap_mode="r"),
        np.load(cache / "latent_std.npy", mmap_mode="r"),
    )
    hidden, pooled = (np.load(cache / f"prompt_{name}.npy", mmap_mode="r") for name in ("hidden_states", "pooled"))
    channels, height, width = latent_mean.shape[1:]
    if height % 2 or width % 2:
        raise ValueError(f"FLUX packs 2 x 2 latent patches: {height} x {width} latents need even sides")
    scaling, shift = pipeline.vae.config.scaling_factor, pipeline.vae.config.shift_factor or 0.0

    transformer = pipeline.transformer.train()
    trainable = add_lora(transformer, lora_rank, lora_alpha, FLUX_LORA_TARGETS, frozen_dtype)
    if gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    sigmas = FlowMatchEulerDiscreteScheduler.from_config(pipeline.scheduler.config).sigmas.float()
    optimizer, lr_scheduler, ema = _optimisation(trainable, lr, lr_warmup_steps, ema_decay)
    transformer, optimizer, lr_scheduler = accelerator.prepare(transformer, optimizer, lr_scheduler)
    if ema:
        accelerator.register_for_checkpointing(ema)
    start = resume_step(accelerator, out_dir / "checkpoints", resume, recipe)
    validation_prompts = validation_prompts or prompts[:8]
    device = accelerator.device
    # positions of the packed image tokens (row, column) and of the text tokens (all zero), as the pipeline sets them
    image_ids = pipeline._prepare_latent_image_ids(1, height // 2, width // 2, device, torch.float32)
    text_ids = torch.zeros(hidden.shape[1], 3, device=device)
    guided = accelerator.unwrap_model(transformer).config.guidance_embeds

    history, step_seconds = [], []
    bar = progress_bar(steps, start, "finetune-flux", progress and accelerator.is_local_main_process)
    for step in range(start, steps):
        began = time.perf_counter()
        for micro in range(gradient_accumulation_steps):
            draw = step * gradient_accumulation_steps + micro
            d = draw_batch(
                seed,
                draw,
                len(records),
                micro_batch,
                latent_mean.shape[1:],
                len(sigmas),
                caption_dropout,
                0.0,
                rank,
                world,
            )
            latents = (torch.from_numpy(latent_mean[d.index] + latent_std[d.index] * d.eps) - shift) * scaling
            sigma = sigmas[d.timesteps].view(-1, 1, 1, 1)
            noisy = (1 - sigma) * latents + sigma * d.noise
            target = d.noise - latents  # the velocity dx_t/dσ
            rows = np.where(d.dropped, 0, prompt_of[d.index])
            n = len(rows)
            sync = micro == gradient_accumulation_steps - 1
            with accelerator.autocast(), nullcontext() if sync else accelerator.no_sync(transformer):
                packed = pipeline._pack_latents(noisy.to(device), n, channels, height, width)
                prediction = transformer(
                    hidden_states=packed,
                    timestep=sigma.flatten().to(device),
                    guidance=torch.full((n,), guidance, device=device) if guided else None,
                    pooled_projections=torch.from_numpy(pooled[rows]).to(device),
                    encoder_hidden_states=torch.from_numpy(hidden[rows]).to(device),
                    txt_ids=text_ids,
                    img_ids=image_ids,
                ).sample
                prediction = pipeline._unpack_latents(
                    prediction,
                    height * pipeline.vae_scale_factor,
                    width * pipeline.vae_scale_factor,
                    pipeline.vae_scale_factor,
                )
                loss = ((prediction.float() - target.to(device)) ** 2).mean() / gradient_accumulation_steps
                accelerator.backward(loss)
        # Copied from medsyn.training.ldm_compact.train_unet, block "step bookkeeping"
        optimizer_step(accelerator, trainable, optimizer, lr_scheduler, ema, max_grad_norm)
        # the mean over all processes' shares of the batch
        history.append(accelerator.reduce(loss.detach(), "mean").item() * gradient_accumulation_steps)
        bar.update(1)
        bar.set_postfix(loss=f"{history[-1]:.4f}")
        done = step + 1
        if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(accelerator, out_dir / "checkpoints", done, {"loss": history[-1], "recipe": recipe})
        # End block
        step_seconds.append(time.perf_counter() - began)  # with a checkpoint written at its end, if any
        if validation_every and accelerator.is_main_process and (done % validation_every == 0 or done == steps):
            with ema_weights(ema, trainable):
                pipeline.transformer = accelerator.unwrap_model(transformer).eval()
                pipeline.transformer.register_to_config(sample_size=height)
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
    pipeline_dir, lora_dir = out_dir / "pipeline", out_dir / "lora"
    with ema_weights(ema, trainable):
        if accelerator.is_main_process:
            from peft.utils import get_peft_model_state_dict

            type(pipeline).save_lora_weights(lora_dir, transformer_lora_layers=get_peft_model_state_dict(final))
            # float32 throughout, as diffusers and transformers load it back, the adapters merged in float32
            _frozen(final.float(), pipeline.text_encoder.float(), pipeline.text_encoder_2.float())
            merge_adapters(final)
            final.register_to_config(sample_size=height)  # the saved pipeline samples at the trained size
            pipeline.transformer = final
            pipeline.save_pretrained(pipeline_dir)
    accelerator.wait_for_everyone()
    return {
        "pipeline_dir": pipeline_dir,
        "lora_dir": lora_dir,
        "steps": steps,
        "trained_parameters": sum(p.numel() for p in trainable),
        "loss_history": history,
        "step_seconds": step_seconds,
    }


# ---------------------------------------------------------------- Kandinsky 2.2


def encode_kandinsky_prompts(pipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
    """The prior's text conditioning (projected CLIP text embedding, token states, attention mask),
    exactly as `KandinskyV22PriorPipeline` computes it."""
    with torch.no_grad():
        text_embeds, hidden, mask = pipeline.prior_pipe._encode_prompt(list(prompts), pipeline.device, 1, False)
    return {"text_embeds": text_embeds, "hidden_states": hidden, "mask": mask.float()}


def cache_image_embeddings(pipeline, dataset_dir: str | Path, records: list[dict], cache_dir: Path) -> np.ndarray:
    """CLIP image embeddings of the training images (the prior's image encoder and processor), N x D,
    memory-mapped, plus the zero-image embedding Kandinsky's guidance uses as `zero_embed.npy`."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / "image_embeds.npy"
    encoder, processor = pipeline.prior_image_encoder, pipeline.prior_image_processor
    for start in range(0, len(records), 64):
        images = [Image.fromarray(image) for image in load_images(dataset_dir, records[start : start + 64])]
        with torch.no_grad():
            pixels = processor(images, return_tensors="pt").pixel_values.to(pipeline.device, encoder.dtype)
            embeds = encoder(pixels).image_embeds.float().cpu().numpy()
        if start == 0:
            array = np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=(len(records), embeds.shape[1]))
        array[start : start + 64] = embeds
    array.flush()
    with torch.no_grad():
        np.save(
            cache_dir / "zero_embed.npy", pipeline.prior_pipe.get_zero_embed(1, pipeline.device).float().cpu().numpy()
        )
    return np.load(path, mmap_mode="r")


def finetune_kandinsky(
    dataset_dir: str | Path,
    pretrained_dir: str | Path,
    out_dir: str | Path,
    steps: int = 1000,
    batch_size: int = 8,
    gradient_accumulation_steps: int = 1,
    lr: float = 1e-4,
    lr_warmup_steps: int = 0,
    lora_rank: int = 4,
    lora_alpha: float | None = None,
    train_prior: bool = True,
    caption_dropout: float = 0.1,
    snr_gamma: float | None = None,
    ema_decay: float | None = None,
    max_grad_norm: float = 1.0,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    checkpoint_every: int = 500,
    validation_every: int = 500,
    validation_prompts: list[str] | None = None,
    guidance_scale: float = 4.0,
    sampling_steps: int = 25,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train LoRA adapters on a local Kandinsky 2.2 decoder (and prior); save `<out_dir>/pipeline`.

    Args:
        dataset_dir: curated dataset; the training split is used.
        pretrained_dir: a local `KandinskyV22CombinedPipeline` directory (see `combine_kandinsky`).
        out_dir: checkpoints, caches, validation grids, `lora/decoder`, `lora/prior` and `pipeline/`.
        steps, batch_size, gradient_accumulation_steps: as in `ldm_finetune.finetune_unet`.
        lr, lr_warmup_steps: AdamW learning rate (diffusers' Kandinsky LoRA default 1e-4), constant after warm-up.
        lora_rank, lora_alpha: adapter rank and scale (default: the rank), for both models.
        train_prior: also adapt the prior (text -> image embedding); False trains the decoder only.
        caption_dropout: probability of training a sample on the unconditional inputs.
        snr_gamma: Min-SNR γ of the decoder loss; None for plain MSE.
        mixed_precision: as in `finetune_flux` (frozen: both denoisers' base weights, the CLIP towers).
        gradient_checkpointing: recompute the decoder U-Net's blocks in the backward pass (the
            prior has no checkpointing in diffusers; its activations are small).
        ema_decay, max_grad_norm, checkpoint_every, validation_every, validation_prompts, seed, resume,
        progress: as in the other loops.
        guidance_scale, sampling_steps: the validation grid's sampler (decoder).

    Returns:
        {'pipeline_dir', 'lora_dir', 'steps', 'trained_parameters', 'loss_history'}.
    """
    recipe = training_recipe(locals())  # before anything else is bound: the arguments
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    out_dir = Path(out_dir)
    accelerator = make_accelerator(mixed_precision=mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batch = micro_batch_size(batch_size, gradient_accumulation_steps, world)
    set_seed(seed)

    pipeline = load_local(pretrained_dir, "KandinskyV22CombinedPipeline").to(accelerator.device)
    frozen_dtype = storage_dtype(mixed_precision)  # the CLIP towers' and the denoisers' base weights
    for tower in (pipeline.prior_image_encoder, pipeline.prior_text_encoder):
        tower.to(frozen_dtype or tower.dtype)
    _frozen(pipeline.movq, pipeline.prior_image_encoder, pipeline.prior_text_encoder)
    records = split_records(dataset_dir, "train")
    prompts, prompt_of = prompt_rows(records)
    cache = out_dir / "cache"
    with accelerator.main_process_first():
        if accelerator.is_main_process:
            cache_latent_moments(pipeline.movq, dataset_dir, records, cache)
            cache_image_embeddings(pipeline, dataset_dir, records, cache)
            cache_prompt_embeddings(lambda batch: encode_kandinsky_prompts(pipeline, batch), [""] + prompts, cache)
    parked = park(pipeline.prior_text_encoder, pipeline.prior_image_encoder)
    latents_all = np.load(cache / "latent_mean.npy", mmap_mode="r")  # MoVQ encodes deterministically
    image_embeds, zero_embed = np.load(cache / "image_embeds.npy", mmap_mode="r"), np.load(cache / "zero_embed.npy")
    text_embeds, text_hidden, text_mask = (
        np.load(cache / f"prompt_{name}.npy", mmap_mode="r") for name in ("text_embeds", "hidden_states", "mask")
    )
    channels = latents_all.shape[1]

    unet, prior = pipeline.unet.train(), pipeline.prior_prior
    # the prior is trained in CLIP-normalised embedding space with its own (cosine, x_0-predicting) schedule
    clip_mean, clip_std = prior.clip_mean.detach().cpu().float(), prior.clip_std.detach().cpu().float()
    trainable = add_lora(unet, lora_rank, lora_alpha, frozen_dtype=frozen_dtype)
    prior.requires_grad_(False).to(frozen_dtype or prior.dtype)
    if train_prior:
        prior.train()
        trainable += add_lora(prior, lora_rank, lora_alpha, frozen_dtype=frozen_dtype)
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    decoder_schedule = DDPMScheduler.from_config(pipeline.scheduler.config)
    prior_schedule = pipeline.prior_scheduler
    optimizer, lr_scheduler, ema = _optimisation(trainable, lr, lr_warmup_steps, ema_decay)
    unet, prior, optimizer, lr_scheduler = accelerator.prepare(unet, prior, optimizer, lr_scheduler)
    if ema:
        accelerator.register_for_checkpointing(ema)
    start = resume_step(accelerator, out_dir / "checkpoints", resume, recipe)
    validation_prompts = validation_prompts or prompts[:8]
    device = accelerator.device

    history = []
    bar = progress_bar(steps, start, "finetune-kandinsky", progress and accelerator.is_local_main_process)
    for step in range(start, steps):
        for micro in range(gradient_accumulation_steps):
            draw = step * gradient_accumulation_steps + micro
            d = draw_batch(
                seed,
                draw,
                len(records),
                micro_batch,
                latents_all.shape[1:],
                decoder_schedule.config.num_train_timesteps,
                caption_dropout,
                0.0,
                rank,
                world,
            )
            latents = torch.from_numpy(latents_all[d.index])
            embeds = torch.from_numpy(np.where(d.dropped[:, None], zero_embed, image_embeds[d.index]))
            noisy = decoder_schedule.add_noise(latents, d.noise, d.timesteps)
            target = diffusion_target(decoder_schedule, latents, d.noise, d.timesteps)
            sync = micro == gradient_accumulation_steps - 1
            models = (unet, prior) if train_prior else (unet,)
            with (
                accelerator.autocast(),
                nullcontext() if sync else accelerator.no_sync(unet),
                nullcontext() if sync or not train_prior else accelerator.no_sync(prior),
            ):
                prediction = unet(
                    noisy.to(device),
                    d.timesteps.to(device),
                    encoder_hidden_states=None,
                    added_cond_kwargs={"image_embeds": embeds.to(device)},
                ).sample[:, :channels]
                per_sample = ((prediction.float() - target.to(device)) ** 2).mean(dim=(1, 2, 3))
                weights = min_snr_weights(
                    compute_snr(decoder_schedule, d.timesteps), snr_gamma, decoder_schedule.config.prediction_type
                )
                loss = (weights.to(device) * per_sample).mean()
                if train_prior:
                    loss = loss + _prior_loss(
                        prior,
                        prior_schedule,
                        seed,
                        draw,
                        micro_batch,
                        rank,
                        world,
                        d,
                        image_embeds,
                        clip_mean,
                        clip_std,
                        text_embeds,
                        text_hidden,
                        text_mask,
                        prompt_of,
                        device,
                    )
                loss = loss / gradient_accumulation_steps
                accelerator.backward(loss)
        # Copied from medsyn.training.ldm_compact.train_unet, block "step bookkeeping"
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
                for model in models:
                    accelerator.unwrap_model(model).eval()
                pipeline.unet.register_to_config(sample_size=latents_all.shape[-1])
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
                for model in models:
                    model.train()
    bar.close()

    pipeline_dir, lora_dir = out_dir / "pipeline", out_dir / "lora"
    with ema_weights(ema, trainable):
        if accelerator.is_main_process:
            finals = {"decoder": accelerator.unwrap_model(unet)}
            if train_prior:
                finals["prior"] = accelerator.unwrap_model(prior)
            # float32 throughout, as diffusers and transformers load it back, the adapters merged in float32
            for model in (
                *finals.values(),
                pipeline.prior_prior,
                pipeline.prior_image_encoder,
                pipeline.prior_text_encoder,
            ):
                model.float()
            for name, model in finals.items():
                model.save_lora_adapter(lora_dir / name)
                merge_adapters(model)
                model.eval()
            finals["decoder"].register_to_config(sample_size=latents_all.shape[-1])  # sample at the trained size
            pipeline.save_pretrained(pipeline_dir)
    accelerator.wait_for_everyone()
    return {
        "pipeline_dir": pipeline_dir,
        "lora_dir": lora_dir,
        "steps": steps,
        "trained_parameters": sum(p.numel() for p in trainable),
        "loss_history": history,
    }


def _prior_loss(
    prior,
    schedule,
    seed,
    draw,
    batch_size,
    rank,
    world,
    d,
    image_embeds,
    clip_mean,
    clip_std,
    text_embeds,
    text_hidden,
    text_mask,
    prompt_of,
    device,
) -> torch.Tensor:
    """MSE of the prior's x_0 prediction of the (CLIP-normalised) image embedding of each sample's image
    from its caption (the empty prompt where the caption was dropped), as diffusers' prior script trains it."""
    mine = slice(rank, None, world)
    generator = step_generator(seed, draw, stream=1)  # the prior's draws: a stream of their own
    dim = image_embeds.shape[1]
    noise = torch.randn(batch_size, dim, generator=generator)[mine]
    timesteps = torch.randint(0, schedule.config.num_train_timesteps, (batch_size,), generator=generator)[mine]
    target = (torch.from_numpy(image_embeds[d.index]) - clip_mean) / clip_std
    noisy = schedule.add_noise(target, noise, timesteps)
    rows = np.where(d.dropped, 0, prompt_of[d.index])
    prediction = prior(
        noisy.to(device),
        timestep=timesteps.to(device),
        proj_embedding=torch.from_numpy(text_embeds[rows]).to(device),
        encoder_hidden_states=torch.from_numpy(text_hidden[rows]).to(device),
        attention_mask=torch.from_numpy(text_mask[rows]).bool().to(device),
    ).predicted_image_embedding
    return ((prediction.float() - target.to(device)) ** 2).mean()
