"""ldm-finetune: a pretrained latent diffusion pipeline (SD 1.x or SDXL) held in a local directory,
fine-tuned on the curated images as MediSyn (Cho et al.) fine-tunes SDXL: VAE and text encoders
frozen, the U-Net trained with MSE on ε (or v, whatever the pipeline's scheduler predicts), constant
learning rate 1e-5, captions dropped 10 % of the time for classifier-free guidance, bf16 on a GPU.
Optionally only LoRA adapters (peft) are trained, as MSDM does for its large baselines.

On the embedded `default` profile the "pretrained" pipeline is the ldm-compact one medsyn trained
itself, loaded through exactly this code. One loop, top to bottom: `finetune_unet`.
"""

import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch

from medsyn.data.dataset import split_records
from medsyn.sampling import MEMORY_FORMATS, compile_repeated_blocks, load_pipeline
from medsyn.training.common import (
    adamw,
    add_lora,
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
    training_recipe,
)


def load_pretrained(pretrained_dir):
    """A Stable Diffusion (1.x) or SDXL pipeline from a local directory (nothing reaches the network),
    or one already loaded, used as it is."""
    pipeline = load_pipeline(pretrained_dir) if isinstance(pretrained_dir, (str, Path)) else pretrained_dir
    if not hasattr(pipeline, "unet"):
        raise ValueError(
            f"{pretrained_dir} holds a {type(pipeline).__name__}; ldm-finetune trains U-Net pipelines "
            "(SD 1.x, SDXL). PixArt transformers are trained by medsyn.training.dit_hldf"
        )
    return pipeline


def encode_with_pipeline(pipeline, prompts: list[str]) -> dict[str, torch.Tensor]:
    """Prompt embeddings exactly as the pipeline computes them at sampling time.

    The empty prompt becomes the pipeline's own unconditional embedding, so that dropped captions
    train what classifier-free guidance later uses: for SDXL with `force_zeros_for_empty_prompt`
    that is all zeros, not the encoded empty string."""
    with torch.no_grad():
        if is_sdxl(pipeline):
            hidden, _, pooled, _ = pipeline.encode_prompt(
                prompt=list(prompts), device=pipeline.device, num_images_per_prompt=1, do_classifier_free_guidance=False
            )
            if pipeline.config.force_zeros_for_empty_prompt:
                empty = torch.tensor([not p for p in prompts], device=hidden.device)
                hidden, pooled = hidden.masked_fill(empty[:, None, None], 0), pooled.masked_fill(empty[:, None], 0)
            return {"hidden_states": hidden, "pooled": pooled}
        hidden, _ = pipeline.encode_prompt(list(prompts), pipeline.device, 1, False)
        return {"hidden_states": hidden}


def is_sdxl(pipeline) -> bool:
    return hasattr(pipeline, "text_encoder_2")


def finetune_unet(
    dataset_dir: str | Path,
    pretrained_dir: str | Path,
    out_dir: str | Path,
    steps: int = 1000,
    batch_size: int = 16,
    gradient_accumulation_steps: int = 1,
    lr: float = 1e-5,
    lr_warmup_steps: int = 0,
    lr_schedule: str = "constant",
    lora_rank: int | None = None,
    lora_alpha: float | None = None,
    ema_decay: float | None = None,
    snr_gamma: float | None = None,
    noise_offset: float = 0.0,
    caption_dropout: float = 0.1,
    balance: str = "none",
    max_grad_norm: float = 1.0,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    memory_format: str = "contiguous",
    compile_mode: str | None = None,
    checkpoint_every: int = 500,
    validation_every: int = 500,
    validation_prompts: list[str] | None = None,
    guidance_scale: float = 7.0,
    sampling_steps: int = 25,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
    save_pipeline: bool = True,
) -> dict:
    """Fine-tune the U-Net of a local SD 1.x / SDXL pipeline; save the result to `<out_dir>/pipeline`.

    The defaults are MediSyn's recipe (full U-Net, MSE, constant LR 1e-5, 10 % caption dropout). The
    loss is the MSE on the scheduler's own target (`prediction_type` of the pretrained scheduler), with
    optional Min-SNR-γ weights. With `lora_rank`, only LoRA adapters on the attention projections are
    trained; they are saved on their own (`<out_dir>/lora`, diffusers' `load_lora_weights` format) and
    merged into the saved pipeline.

    Args:
        dataset_dir: curated dataset; the training split is used.
        pretrained_dir: the pretrained pipeline directory (`model_index.json`, `unet/`, `vae/`, text encoders),
            or such a pipeline already loaded (its U-Net is trained in place).
        out_dir: checkpoints, caches, validation grids, `pipeline/` (and `lora/`).
        steps: optimizer steps; batch_size: images per optimizer step over all processes and
            accumulation steps; gradient_accumulation_steps: micro-batches per optimizer step.
        lr, lr_warmup_steps: AdamW peak learning rate and the steps of an optional linear warm-up.
        lr_schedule: after the warm-up, 'constant' or 'cosine' (to 0 at `steps`; `common.make_lr_schedule`).
        lora_rank, lora_alpha: LoRA rank (None: train the whole U-Net) and scale (default: the rank).
        ema_decay: EMA of the trained weights, saved instead of the raw weights (None: no EMA).
        snr_gamma: Min-SNR γ; None for plain MSE (MediSyn).
        noise_offset: noise-offset strength (0: off).
        caption_dropout: probability of training on the unconditional prompt.
        balance: 'none' (every image once per epoch) or 'class' (every class equally often,
            `medsyn.training.common.class_chances`), as `train_unet`.
        max_grad_norm: gradient clipping.
        mixed_precision: accelerate's 'no', 'fp16' or 'bf16'; the frozen VAE always encodes in float32.
        gradient_checkpointing: trade compute for memory in the U-Net.
        memory_format: 'contiguous' or 'channels_last' (the U-Net's convolutions in NHWC, which cuDNN's
            tensor-core kernels prefer; `benchmarks/train_step.py` measures what it gains).
        compile_mode: `torch.compile` the U-Net's blocks with this mode (`medsyn.sampling.compile_repeated_blocks`;
            'default', 'max-autotune-no-cudagraphs', ...); None: eager.
        checkpoint_every, validation_every: steps between checkpoints / validation grids (0: never).
        validation_prompts: prompts of the validation grid (default: up to 8 distinct captions).
        guidance_scale, sampling_steps: sampler settings of the validation grid.
        seed: seed of batch order and every random draw.
        resume: continue from the newest checkpoint in `<out_dir>/checkpoints`.
        progress: show a progress bar.
        save_pipeline: write `<out_dir>/pipeline` (and `lora/`) at the end; False leaves the trained U-Net
            in the pipeline object only (benchmarks, sweeps).

    Returns:
        {'pipeline_dir', 'lora_dir' (or None), 'steps', 'trained_parameters', 'loss_history',
        'step_seconds'}: the last is each optimizer step's wall-clock seconds (the loss is read every
        step, so queued GPU work is included; so is a checkpoint written at the step's end).
    """
    recipe = training_recipe(locals())  # before anything else is bound: the arguments
    from accelerate.utils import set_seed
    from diffusers import DDPMScheduler
    from diffusers.training_utils import EMAModel, compute_snr

    out_dir = Path(out_dir)
    accelerator = make_accelerator(mixed_precision=mixed_precision)
    rank, world = accelerator.process_index, accelerator.num_processes
    micro_batch = micro_batch_size(batch_size, gradient_accumulation_steps, world)
    set_seed(seed)

    # the pretrained pipeline; everything but the U-Net stays frozen, and the caches are filled once
    pipeline = load_pretrained(pretrained_dir).to(accelerator.device)
    for name in ("vae", "text_encoder", "text_encoder_2"):
        if getattr(pipeline, name, None) is not None:
            getattr(pipeline, name).eval().requires_grad_(False)
    records = split_records(dataset_dir, "train")
    chances = class_chances(records, balance)
    prompts, prompt_of = prompt_rows(records)
    cache = out_dir / "cache"
    with accelerator.main_process_first():  # only the main process writes; the others wait, then read
        if accelerator.is_main_process:
            cache_latent_moments(pipeline.vae, dataset_dir, records, cache)
            cache_prompt_embeddings(lambda batch: encode_with_pipeline(pipeline, batch), [""] + prompts, cache)
    parked = park(
        *(getattr(pipeline, n) for n in ("text_encoder", "text_encoder_2") if getattr(pipeline, n, None) is not None)
    )
    latent_mean, latent_std = (
        np.load(cache / "latent_mean.npy", mmap_mode="r"),
        np.load(cache / "latent_std.npy", mmap_mode="r"),
    )
    hidden = np.load(cache / "prompt_hidden_states.npy", mmap_mode="r")
    pooled = np.load(cache / "prompt_pooled.npy", mmap_mode="r") if is_sdxl(pipeline) else None
    scaling = pipeline.vae.config.scaling_factor
    shift = getattr(pipeline.vae.config, "shift_factor", None) or 0.0
    if latent_mean.shape[-1] != pipeline.unet.config.sample_size:
        # e.g. SDXL (1024 px) fine-tuned on 512 px images: the saved pipeline samples at the trained size
        warnings.warn(
            f"training at {latent_mean.shape[-1] * pipeline.vae_scale_factor} px; the pretrained U-Net's "
            f"default is {pipeline.unet.config.sample_size * pipeline.vae_scale_factor} px. The saved "
            "pipeline's default size will be the training size.",
            stacklevel=2,
        )
        pipeline.unet.register_to_config(sample_size=latent_mean.shape[-1])

    unet = pipeline.unet.train()
    trainable = add_lora(unet, lora_rank, lora_alpha) if lora_rank else list(unet.parameters())
    if gradient_checkpointing:
        unet.enable_gradient_checkpointing()
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {list(MEMORY_FORMATS)}, not {memory_format!r}")
    unet.to(memory_format=MEMORY_FORMATS[memory_format])
    prediction_type = pipeline.scheduler.config.prediction_type
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    ema = EMAModel(trainable, decay=ema_decay) if ema_decay else None
    optimizer = adamw(trainable, lr=lr, weight_decay=1e-2)
    lr_scheduler = make_lr_schedule(optimizer, lr_schedule, lr_warmup_steps, steps)
    if compile_mode:
        compile_repeated_blocks(unet, compile_mode)
    unet, optimizer, lr_scheduler = accelerator.prepare(unet, optimizer, lr_scheduler)
    if ema:
        accelerator.register_for_checkpointing(ema)
    start = resume_step(accelerator, out_dir / "checkpoints", resume, recipe)
    validation_prompts = validation_prompts or prompts[:8]
    # SDXL's micro-conditioning: original size, crop corner, target size (curated images are centre crops)
    size = latent_mean.shape[-1] * pipeline.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32)

    history, step_seconds = [], []
    bar = progress_bar(steps, start, "finetune", progress and accelerator.is_local_main_process)
    for step in range(start, steps):
        began = time.perf_counter()
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
            latents = (torch.from_numpy(latent_mean[d.index] + latent_std[d.index] * d.eps) - shift) * scaling
            rows = np.where(d.dropped, 0, prompt_of[d.index])
            device = accelerator.device
            conditioning = {"encoder_hidden_states": torch.from_numpy(hidden[rows]).to(device)}
            if pooled is not None:
                conditioning["added_cond_kwargs"] = {
                    "text_embeds": torch.from_numpy(pooled[rows]).to(device),
                    "time_ids": time_ids.repeat(len(rows), 1).to(device),
                }
            noisy = noise_scheduler.add_noise(latents, d.noise, d.timesteps)
            target = diffusion_target(noise_scheduler, latents, d.noise, d.timesteps)
            sync = micro == gradient_accumulation_steps - 1
            with accelerator.autocast(), nullcontext() if sync else accelerator.no_sync(unet):
                prediction = unet(noisy.to(device), d.timesteps.to(device), **conditioning).sample
                per_sample = ((prediction.float() - target.to(device)) ** 2).mean(dim=(1, 2, 3))
                weights = min_snr_weights(compute_snr(noise_scheduler, d.timesteps), snr_gamma, prediction_type)
                loss = (weights.to(device) * per_sample).mean() / gradient_accumulation_steps
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
                pipeline.unet = accelerator.unwrap_model(unet).eval()
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
                unet.train()
    bar.close()

    final = accelerator.unwrap_model(unet)
    final.to(memory_format=torch.contiguous_format)
    pipeline.unet = final
    pipeline_dir, lora_dir = out_dir / "pipeline", (out_dir / "lora" if lora_rank else None)
    with ema_weights(ema, trainable):
        if accelerator.is_main_process and save_pipeline:
            if lora_rank:
                _save_lora(pipeline, final, lora_dir)
                merge_adapters(final)  # the saved U-Net is a plain U-Net
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


def _save_lora(pipeline, unet, lora_dir: Path) -> None:
    """The adapters alone, in the format `pipeline.load_lora_weights(lora_dir)` reads."""
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet))
    type(pipeline).save_lora_weights(lora_dir, unet_lora_layers=layers)
