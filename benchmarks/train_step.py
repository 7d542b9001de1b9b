"""Training-step throughput of medsyn's fine-tuning loop (`medsyn.training.ldm_finetune.finetune_unet`,
MediSyn's recipe) against a baseline set up as diffusers' `examples/text_to_image/train_text_to_image_sdxl.py`
runs with its defaults, on the SDXL base and SD 1.5 U-Nets at 512² (random weights, real configurations);
and of Med-Art's loop (`medsyn.training.dit_hldf.train_dit` from a pretrained directory) against the
same baseline step on PixArt-α XL's transformer, with and without its pixel-space term (HLDF).

The baseline, as that script's defaults have it: float32 (no `--mixed_precision`), diffusers' default
attention (PyTorch SDPA), `torch.optim.AdamW` (its default multi-tensor loop), no gradient
checkpointing, gradient clipping at 1, VAE latents and text embeddings computed before training (the
script's `dataset.map`), the loss read every step (its logging). Both train at the same batch.

medsyn's variants, each measured on its own: bf16 autocast (float32 master weights) with fused AdamW;
plus channels_last; plus `torch.compile`. Model-FLOP utilisation counts the U-Net's forward and backward
FLOPs (torch's FLOP counter, one image) against the matrix-multiply peak measured in this run.

    python -m benchmarks.train_step --scale gpu   # an H100 / H200: SDXL at 512², batch 8
    python -m benchmarks.train_step --scale cpu   # 2 cores: the same code on small configurations
"""

import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from benchmarks.architectures import build_pipeline, parameters_of, save_flux, save_pixart
from benchmarks.common import (
    COMPILE_SECONDS,
    arguments,
    device_for,
    finish,
    matmul_peak,
    peak_memory_gib,
    reset_peak_memory,
    row,
    time_left,
)

# per scale: image side, batch, warm-up steps (compilation, cuDNN's autotuning) and timed steps
SETTINGS = {
    "gpu": {"size": 512, "batch": 8, "warmup": 3, "steps": 8, "images": 32},
    "cpu": {"size": 128, "batch": 4, "warmup": 2, "steps": 6, "images": 16},
}
PROMPTS = [
    "Chest X-ray, PA view: cardiomegaly.",
    "Chest X-ray, PA view: no finding.",
    "Endoscopy: a polyp in the colon.",
    "Dermoscopy: melanoma.",
]


def write_images(directory: Path, n: int, size: int) -> Path:
    """A curated-format dataset of `n` random images with captions (all in the training split)."""
    from PIL import Image

    from medsyn.data.dataset import image_path, write_records

    if (directory / "train" / "metadata.jsonl").is_file():
        return directory
    rng = np.random.default_rng(0)
    records = []
    for i in range(n):
        record = {
            "file_name": f"{i:04d}.png",
            "text": PROMPTS[i % len(PROMPTS)],
            "split": "train",
            "labels": [str(i % len(PROMPTS))],
            "source": "benchmark",
            "specialty": "benchmark",
            "image_type": "noise",
            "patient_id": f"benchmark-{i}",
        }
        path = image_path(directory, record)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        records.append(record)
    write_records(directory, records, kind="curated")
    return directory


def conditioning(pipeline, batch: int, size: int, device) -> dict:
    """The U-Net's text conditioning for `batch` images, computed once (as the script precomputes it)."""
    from medsyn.training.ldm_finetune import encode_with_pipeline, is_sdxl

    encoded = encode_with_pipeline(pipeline, [PROMPTS[i % len(PROMPTS)] for i in range(batch)])
    out = {"encoder_hidden_states": encoded["hidden_states"].to(device)}
    if is_sdxl(pipeline):
        time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=torch.float32, device=device)
        out["added_cond_kwargs"] = {"text_embeds": encoded["pooled"].to(device), "time_ids": time_ids.repeat(batch, 1)}
    return out


def training_flops_per_image(denoiser, latent: int, condition: dict, device) -> float:
    """Forward + backward FLOPs of one image through a U-Net or a transformer (torch.utils.flop_counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.randn(1, denoiser.config.in_channels, latent, latent, device=device)
    counter = FlopCounterMode(display=False)
    with counter:
        prediction = denoiser(x, timestep=torch.tensor([500], device=device), **first(condition, 1), return_dict=False)
        prediction[0].float().pow(2).mean().backward()
    denoiser.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


def first(condition: dict, n: int) -> dict:
    """The conditioning of the first `n` images (None entries, PixArt's unused size conditions, kept)."""
    return {k: first(v, n) if isinstance(v, dict) else (v if v is None else v[:n]) for k, v in condition.items()}


def baseline_steps(pipeline, batch: int, size: int, warmup: int, steps: int, device) -> list[float]:
    """train_text_to_image_sdxl.py's step with its defaults (see the module docstring); seconds per step."""
    from diffusers import DDPMScheduler

    condition = conditioning(pipeline, batch, size, device)
    return denoiser_steps(
        pipeline.unet,
        DDPMScheduler.from_config(pipeline.scheduler.config),
        condition,
        batch,
        size // pipeline.vae_scale_factor,
        warmup,
        steps,
        device,
    )


def denoiser_steps(
    denoiser, noise_scheduler, condition: dict, batch: int, latent: int, warmup: int, steps: int, device
) -> list[float]:
    """The baseline's training step on any denoiser (a learned variance's half of the output left out of
    the MSE, as medsyn's loops leave it); seconds per step after `warmup`."""
    denoiser.train().requires_grad_(True)
    model_input = torch.randn(batch, denoiser.config.in_channels, latent, latent, device=device)  # cached latents
    optimizer = torch.optim.AdamW(denoiser.parameters(), lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-2, eps=1e-8)
    times = []
    for _ in range(warmup + steps):
        began = time.perf_counter()
        noise = torch.randn_like(model_input)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (batch,), device=device).long()
        noisy = noise_scheduler.add_noise(model_input, noise, timesteps)
        prediction = denoiser(noisy, timestep=timesteps, **condition, return_dict=False)[0]
        prediction = prediction[:, : noise.shape[1]]
        loss = torch.nn.functional.mse_loss(prediction.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(denoiser.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()  # the script logs the loss every step
        times.append(time.perf_counter() - began)
    del optimizer
    denoiser.zero_grad(set_to_none=True)
    return times[warmup:]


# what a timed run of one of medsyn's loops leaves out: checkpoints, validation grids, resuming, the bar
TIMED_RUN = {"checkpoint_every": 0, "validation_every": 0, "resume": False, "progress": False}


def medsyn_steps(pipeline, dataset: Path, out: Path, batch: int, warmup: int, steps: int, **options) -> dict:
    """`finetune_unet` itself on the same pipeline object, for `warmup` + `steps` steps; its result."""
    from medsyn.training.ldm_finetune import finetune_unet

    return finetune_unet(
        dataset,
        pipeline,
        out,
        steps=warmup + steps,
        batch_size=batch,
        **TIMED_RUN,
        save_pipeline=False,
        **options,
    )


def loop_row(loop, model: str, variant: str, batch: int, warmup: int, flops: float, peak: float, device) -> dict:
    """The row of one of medsyn's loops: `loop()` trains `warmup` untimed and then the timed steps and
    returns the loop's result (its `step_seconds`); running out of memory is a row that says so."""
    reset_peak_memory(device)
    began = time.perf_counter()
    try:
        result = loop()
    except torch.OutOfMemoryError as error:
        return row("training step", model, variant, batch=batch, note=f"out of memory: {error}"[:200])
    note = f"first {warmup} steps (warm-up) not timed; run {time.perf_counter() - began:.0f} s"
    return step_row(model, variant, batch, result["step_seconds"][warmup:], flops, peak, device, note)


def step_row(model: str, variant: str, batch: int, times: list[float], flops: float, peak: float, device, note=""):
    """A table row: images/s from the median step, the peak memory, and model-FLOP utilisation."""
    rate = batch / float(np.median(times))
    print(f"  {variant}: {rate:.2f} images/s", flush=True)
    return row(
        "training step",
        model,
        variant,
        batch=batch,
        throughput=rate,
        unit="images/s",
        peak_memory_gib=peak_memory_gib(device),
        mfu=rate * flops / peak,
        note=note,
    )


def variants(scale: str) -> list[tuple[str, dict]]:
    """medsyn's settings, each adding one optimisation; compilation only where a GPU pays it back."""
    listed = [
        ("medsyn: bf16 autocast, fused AdamW", {"mixed_precision": "bf16"}),
        ("+ channels_last", {"mixed_precision": "bf16", "memory_format": "channels_last"}),
    ]
    if scale == "gpu":
        listed.append(
            (
                "+ torch.compile",
                {"mixed_precision": "bf16", "memory_format": "channels_last", "compile_mode": "default"},
            )
        )
    else:  # bf16 does not speed up a CPU (DESIGN, measured): medsyn's CPU profiles train in float32
        listed.insert(0, ("medsyn: float32, fused AdamW", {"mixed_precision": "no"}))
    return listed


def measure(args, rows: list | None = None, models=("sd15", "sdxl")) -> list[dict]:
    """Append one row per measurement to `rows` as it is made (a run cut short keeps them), the U-Nets'
    then PixArt-α's (`measure_pixart`); return them. FLUX's (`measure_flux`) is a benchmark of its own."""
    device = device_for(args.scale)
    settings = SETTINGS[args.scale]
    peak = matmul_peak(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32, 8192 if device.type == "cuda" else 1024
    )
    dataset = write_images(args.work / f"images_{settings['size']}", settings["images"], settings["size"])
    rows = [] if rows is None else rows
    for kind in models:
        name = {"sdxl": "SDXL base U-Net", "sd15": "SD 1.5 U-Net"}[kind]
        pipeline = build_pipeline(kind, args.scale, args.work, device)
        model = f"{name} ({parameters_of(pipeline.unet) / 1e9:.2f} B), {settings['size']}²"
        latent = settings["size"] // pipeline.vae_scale_factor
        batch = settings["batch"]
        flops = training_flops_per_image(
            pipeline.unet, latent, conditioning(pipeline, 1, settings["size"], device), device
        )
        print(f"{model}: {flops / 1e9:.3g} GFLOP per training image; peak {peak / 1e12:.3g} TFLOP/s", flush=True)

        reset_peak_memory(device)
        try:
            times = baseline_steps(pipeline, batch, settings["size"], settings["warmup"], settings["steps"], device)
        except torch.OutOfMemoryError:
            reset_peak_memory(device)
            batch //= 2  # the float32 baseline is the larger: both run at the batch it fits
            times = baseline_steps(pipeline, batch, settings["size"], settings["warmup"], settings["steps"], device)
        rows.append(
            step_row(
                model,
                "baseline: diffusers train_text_to_image_sdxl.py defaults (float32, SDPA, AdamW)",
                batch,
                times,
                flops,
                peak,
                device,
            )
        )
        for variant, options in variants(args.scale):
            if "compile_mode" in options and (kind != "sdxl" or time_left(args) < COMPILE_SECONDS):
                # compiled for the headline model only, and only when the run has time for it
                rows.append(
                    row(
                        "training step",
                        model,
                        variant,
                        batch=batch,
                        note="not run: compiled for SDXL only, when time allows",
                    )
                )
                continue
            work = args.work / f"run_{kind}"
            loop = partial(
                medsyn_steps, pipeline, dataset, work, batch, settings["warmup"], settings["steps"], **options
            )
            rows.append(loop_row(loop, model, variant, batch, settings["warmup"], flops, peak, device))
        del pipeline
        reset_peak_memory(device)
    return measure_pixart(args, rows)


def pixart_condition(transformer, batch: int, device) -> dict:
    """PixArt's conditioning of `batch` images as cached: 120 T5 token embeddings and their mask; no
    size conditions at 512 px."""
    return {
        "encoder_hidden_states": torch.randn(batch, 120, transformer.config.caption_channels, device=device),
        "encoder_attention_mask": torch.ones(batch, 120, device=device),
        "added_cond_kwargs": {"resolution": None, "aspect_ratio": None},
    }


def pixart_variants(scale: str, batch: int) -> list[tuple[str, dict]]:
    """medsyn's settings of Med-Art's loop, each adding one thing; EMA off throughout (the baseline has none)."""
    listed = [
        ("medsyn: bf16 autocast, fused AdamW", {"mixed_precision": "bf16", "hldf_weight": 0.0}),
        (
            "+ HLDF pixel term (Med-Art; a quarter of the batch decoded)",
            {"mixed_precision": "bf16", "hldf_weight": 1.0, "hldf_batch": max(1, batch // 4)},
        ),
    ]
    if scale == "cpu":
        listed.insert(0, ("medsyn: float32, fused AdamW", {"mixed_precision": "no", "hldf_weight": 0.0}))
    return listed


def measure_pixart(args, rows: list | None = None) -> list[dict]:
    """Med-Art's fine-tune of PixArt-α (`train_dit` from a pretrained directory) against the baseline
    step on the same transformer; one row per measurement, appended as it is made."""
    from diffusers import DDPMScheduler, PixArtAlphaPipeline

    from medsyn.training.dit_hldf import train_dit

    device = device_for(args.scale)
    settings = SETTINGS[args.scale]
    peak = matmul_peak(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32, 8192 if device.type == "cuda" else 1024
    )
    dataset = write_images(args.work / f"images_{settings['size']}", settings["images"], settings["size"])
    directory = save_pixart(args.scale, args.work / f"pixart_{args.scale}")
    pipeline = PixArtAlphaPipeline.from_pretrained(directory, local_files_only=True)
    transformer = pipeline.transformer.to(device)
    model = f"PixArt-α XL transformer ({parameters_of(transformer) / 1e9:.2f} B), {settings['size']}²"
    latent, batch = settings["size"] // pipeline.vae_scale_factor, settings["batch"]
    flops = training_flops_per_image(transformer, latent, pixart_condition(transformer, 1, device), device)
    print(f"{model}: {flops / 1e9:.3g} GFLOP per training image", flush=True)
    rows = [] if rows is None else rows
    reset_peak_memory(device)
    noise_scheduler = DDPMScheduler.from_config(pipeline.scheduler.config)
    condition = pixart_condition(transformer, batch, device)
    times = denoiser_steps(
        transformer, noise_scheduler, condition, batch, latent, settings["warmup"], settings["steps"], device
    )
    rows.append(step_row(model, "baseline: the same step (float32, SDPA, AdamW)", batch, times, flops, peak, device))
    del pipeline, transformer, condition
    reset_peak_memory(device)
    for variant, options in pixart_variants(args.scale, batch):
        loop = partial(
            train_dit,
            dataset,
            args.work / "run_pixart",
            pretrained_dir=directory,
            steps=settings["warmup"] + settings["steps"],
            batch_size=batch,
            ema_decay=None,
            **TIMED_RUN,
            **options,
        )
        rows.append(loop_row(loop, model, variant, batch, settings["warmup"], flops, peak, device))
    return rows


# the U-Nets' settings at batch 2: FLUX.1-dev's LoRA step at its published size needs most of an H100
# without gradient checkpointing
FLUX_SETTINGS = {scale: {**options, "batch": 2} for scale, options in SETTINGS.items()}
FLUX_RANK = 16  # the paper profile's large_lora_rank, in both the baseline and medsyn's loop
FLUX_SECONDS = 240  # what building, saving and loading FLUX.1-dev and its rows take on a GPU


def flux_inputs(pipeline, batch: int, size: int, device, dtype) -> dict:
    """FLUX's cached inputs for `batch` images: latents, 512 T5 token states, CLIP's pooled embedding
    and the packed image's and the text's positions, as `finetune_flux` feeds them."""
    transformer = pipeline.transformer
    latent, channels = size // pipeline.vae_scale_factor, transformer.config.in_channels // 4
    return {
        "latents": torch.randn(batch, channels, latent, latent, device=device),
        "hidden": torch.randn(batch, 512, transformer.config.joint_attention_dim, device=device, dtype=dtype),
        "pooled": torch.randn(batch, transformer.config.pooled_projection_dim, device=device, dtype=dtype),
        "image_ids": pipeline._prepare_latent_image_ids(1, latent // 2, latent // 2, device, dtype),
        "text_ids": torch.zeros(512, 3, device=device, dtype=dtype),
    }


def flux_step(pipeline, inputs: dict, dtype) -> torch.Tensor:
    """One rectified-flow LoRA step's forward pass and loss (the velocity's MSE), as both loops take it."""
    transformer, latents = pipeline.transformer, inputs["latents"]
    n, channels, height, width = latents.shape
    sigma = torch.rand(n, device=latents.device).view(-1, 1, 1, 1)
    noise = torch.randn_like(latents)
    packed = pipeline._pack_latents((1 - sigma) * latents + sigma * noise, n, channels, height, width)
    prediction = transformer(
        hidden_states=packed.to(dtype),
        timestep=sigma.flatten().to(dtype),
        guidance=torch.full((n,), 3.5, device=latents.device, dtype=dtype),
        pooled_projections=inputs["pooled"][:n],
        encoder_hidden_states=inputs["hidden"][:n],
        txt_ids=inputs["text_ids"],
        img_ids=inputs["image_ids"],
        return_dict=False,
    )[0]
    scale = pipeline.vae_scale_factor
    prediction = pipeline._unpack_latents(prediction, height * scale, width * scale, scale)
    return torch.nn.functional.mse_loss(prediction.float(), (noise - latents).float())


def flux_baseline(pipeline, batch: int, size: int, warmup: int, steps: int, device) -> tuple[list[float], float]:
    """diffusers' train_dreambooth_lora_flux.py as its defaults have it (float32 weights, no mixed
    precision, `torch.optim.AdamW`, no gradient checkpointing, clipping at 1, the loss read every
    step) at medsyn's rank, on cached latents and prompt embeddings; seconds per step after `warmup`,
    and one image's forward + backward FLOPs (torch's FLOP counter: the frozen weights get no gradient)."""
    from peft import LoraConfig
    from torch.utils.flop_counter import FlopCounterMode

    from medsyn.training.lora_large import FLUX_LORA_TARGETS

    transformer = pipeline.transformer.to(device, torch.float32).requires_grad_(False)
    config = LoraConfig(
        r=FLUX_RANK, lora_alpha=FLUX_RANK, init_lora_weights="gaussian", target_modules=FLUX_LORA_TARGETS
    )
    transformer.add_adapter(config)
    transformer.train()
    trainable = [p for p in transformer.parameters() if p.requires_grad]
    inputs = flux_inputs(pipeline, batch, size, device, torch.float32)
    counter = FlopCounterMode(display=False)
    with counter:
        flux_step(pipeline, {**inputs, "latents": inputs["latents"][:1]}, torch.float32).backward()
    optimizer = torch.optim.AdamW(trainable, lr=1e-4, betas=(0.9, 0.999), weight_decay=1e-4, eps=1e-8)
    times = []
    for _ in range(warmup + steps):
        began = time.perf_counter()
        loss = flux_step(pipeline, inputs, torch.float32)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad()
        loss.item()
        times.append(time.perf_counter() - began)
    return times[warmup:], float(counter.get_total_flops())


def measure_flux(args, rows: list | None = None) -> list[dict]:
    """MSDM's FLUX.1-dev LoRA (`finetune_flux` from a saved pipeline) against diffusers' FLUX LoRA
    script's defaults on the same transformer; one row per measurement, appended as it is made."""
    from diffusers import FluxPipeline

    from medsyn.training.lora_large import finetune_flux

    device = device_for(args.scale)
    settings = FLUX_SETTINGS[args.scale]
    batch = settings["batch"]
    rows = [] if rows is None else rows
    model = f"FLUX.1-dev transformer, LoRA rank {FLUX_RANK}, {settings['size']}²"
    if args.scale == "gpu" and time_left(args) < FLUX_SECONDS:
        rows.append(row("training step", model, "-", batch=batch, note="not run: the run's budget was spent"))
        return rows
    peak = matmul_peak(
        device, torch.bfloat16 if device.type == "cuda" else torch.float32, 8192 if device.type == "cuda" else 1024
    )
    dataset = write_images(args.work / f"images_{settings['size']}", settings["images"], settings["size"])
    directory = save_flux(args.scale, args.work / f"flux_{args.scale}", device)
    pipeline = FluxPipeline.from_pretrained(directory, local_files_only=True)
    model = f"FLUX.1-dev transformer ({parameters_of(pipeline.transformer) / 1e9:.2f} B), LoRA rank {FLUX_RANK}, {settings['size']}²"
    reset_peak_memory(device)
    try:
        times, flops = flux_baseline(pipeline, batch, settings["size"], settings["warmup"], settings["steps"], device)
        rows.append(
            step_row(
                model,
                "baseline: diffusers train_dreambooth_lora_flux.py defaults (float32, AdamW)",
                batch,
                times,
                flops,
                peak,
                device,
            )
        )
    except torch.OutOfMemoryError as error:
        rows.append(row("training step", model, "baseline", batch=batch, note=f"out of memory: {error}"[:200]))
        flops = float("nan")
    del pipeline
    reset_peak_memory(device)
    variants = [("medsyn: bf16 autocast, frozen weights in bf16, fused AdamW", {"mixed_precision": "bf16"})]
    if args.scale == "cpu":
        variants.insert(0, ("medsyn: float32, fused AdamW", {"mixed_precision": "no"}))
    for variant, options in variants:
        loop = partial(
            finetune_flux,
            dataset,
            directory,
            args.work / "run_flux",
            steps=settings["warmup"] + settings["steps"],
            batch_size=batch,
            lora_rank=FLUX_RANK,
            **TIMED_RUN,
            **options,
        )
        rows.append(loop_row(loop, model, variant, batch, settings["warmup"], flops, peak, device))
    return rows


if __name__ == "__main__":
    arguments_ = arguments(__doc__.splitlines()[0])
    finish(
        measure_flux(arguments_, measure(arguments_)),
        arguments_,
        {"settings": SETTINGS[arguments_.scale], "flux": FLUX_SETTINGS[arguments_.scale]},
    )
