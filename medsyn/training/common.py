"""What every diffusion family's training loop shares, and nothing else (STYLE rule 6): the batch
order, per-step randomness, Min-SNR weighting, noise offset, on-disk caches and checkpoints.

Resume is exact by construction: batch `k` of a run is a pure function of (seed, k), and every
random draw of step `k` comes from a generator seeded by (seed, k). A checkpoint therefore needs only
the weights, optimizer, LR scheduler, EMA and the step; N steps straight and N/2 + resume + N/2 give
bitwise the same weights on the CPU. (accelerate's own RNG states are saved too, for any library code
that draws from the global generators.)
"""

import json
import os
import shutil
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from medsyn.data.dataset import image_path, load_images, load_rgb


def make_accelerator(**kwargs):
    """An `accelerate.Accelerator` that uses the CPU when there is no CUDA device.

    accelerate runs several CPU processes as one gloo group only when asked for the CPU, so on a
    machine without a GPU `accelerate launch --multi_gpu --num_processes 2 ...` then trains with two
    CPU processes, as on GPUs."""
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState

    # accelerate keeps one mixed-precision setting per process and refuses a second; each training loop
    # (several may run in one notebook kernel) chooses its own. The process group (PartialState) stays.
    AcceleratorState._reset_state(reset_partial_state=False)
    # medsyn's batch sizes are global (split over processes), so the LR scheduler steps once per
    # optimizer step; accelerate's default would step it once per process and shorten warm-ups
    return Accelerator(cpu=not torch.cuda.is_available(), step_scheduler_with_optimizer=False, **kwargs)


def adamw(parameters, lr: float, **kwargs) -> torch.optim.AdamW:
    """AdamW with torch's fused kernel (on the CPU too: about 5x faster per step than the default
    per-tensor loop on a 2-million-parameter U-Net, which is 6 % of a training step)."""
    return torch.optim.AdamW(parameters, lr=lr, fused=True, **kwargs)


# ---------------------------------------------------------------- data order and randomness


def batch_indices(n: int, batch_size: int, seed: int, step: int) -> np.ndarray:
    """Indices of global batch `step`: consecutive slices of one permutation per epoch (seed, epoch).

    A batch that runs past the end of an epoch continues into the next epoch's permutation, so every
    image is seen once per epoch whatever the batch size.
    """
    if n <= 0:
        raise ValueError("cannot draw batches from an empty data set")
    start = step * batch_size
    out = []
    while len(out) < batch_size:
        epoch, offset = divmod(start + len(out), n)
        order = np.random.default_rng([seed, epoch]).permutation(n)
        out.extend(order[offset : offset + batch_size - len(out)].tolist())
    return np.asarray(out)


BALANCES = ("none", "class")


def class_chances(records: list[dict], balance: str) -> np.ndarray | None:
    """Each record's chance of being drawn into a batch: None for 'none' (every image once per epoch,
    `batch_indices`), or for 'class' each class equally likely and its images equally likely within it
    (classes by `medsyn.data.dataset.class_key`), so that a class of 16 images among 1,340 is not seen
    80 times less often than the largest."""
    from medsyn.data.dataset import class_key

    if balance not in BALANCES:
        raise ValueError(f"balance must be one of {BALANCES}, not {balance!r}")
    if balance == "none":
        return None
    _, of_class, counts = np.unique([class_key(r) for r in records], return_inverse=True, return_counts=True)
    return 1.0 / counts[of_class] / len(counts)  # sums to 1


def drawn_indices(n: int, batch_size: int, seed: int, step: int, chances: np.ndarray | None = None) -> np.ndarray:
    """The rows of global batch `step`: `batch_indices` without `chances`, else drawn with replacement
    with those chances (a function of (seed, step), as every other draw)."""
    if chances is None:
        return batch_indices(n, batch_size, seed, step)
    if len(chances) != n:
        raise ValueError(f"{len(chances)} chances for {n} rows")
    return np.random.default_rng([seed, step, 1]).choice(n, size=batch_size, p=chances)


def micro_batch_size(batch_size: int, gradient_accumulation_steps: int, processes: int) -> int:
    """Images per micro-batch (all processes together) of a global batch split over accumulation steps;
    it must also split evenly over the processes."""
    micro = batch_size // gradient_accumulation_steps
    if micro * gradient_accumulation_steps != batch_size or micro % processes:
        raise ValueError(
            f"batch_size {batch_size} must split evenly over {gradient_accumulation_steps} accumulation "
            f"steps and {processes} processes"
        )
    return micro


def step_generator(seed: int, step: int, stream: int = 0) -> torch.Generator:
    """A CPU generator for the random draws of one step (noise, timesteps, caption dropout)."""
    return torch.Generator().manual_seed(int(np.random.default_rng([seed, step, stream]).integers(2**62)))


@dataclass
class Draws:
    """The random draws of one global (micro-)batch, this process's share.

    index: dataset rows; eps: N(0, 1) for sampling latents from cached posteriors; noise: diffusion
    noise; timesteps: diffusion timesteps; dropped: True where the caption is replaced by the
    unconditional prompt."""

    index: np.ndarray
    eps: np.ndarray
    noise: torch.Tensor
    timesteps: torch.Tensor
    dropped: np.ndarray


def draw_batch(
    seed: int,
    draw: int,
    n: int,
    batch_size: int,
    latent_shape: tuple,
    num_train_timesteps: int,
    caption_dropout: float,
    noise_offset: float = 0.0,
    rank: int = 0,
    world: int = 1,
    chances: np.ndarray | None = None,
) -> Draws:
    """Everything random about global batch `draw`, drawn for the whole batch and then sliced to this
    process: any number of processes trains on the images, noise and timesteps one process would.
    `chances` (`class_chances`) draws the rows with replacement instead of epoch by epoch."""
    mine = slice(rank, None, world)
    generator = step_generator(seed, draw)
    shape = (batch_size, *latent_shape)
    eps = torch.randn(shape, generator=generator)[mine].numpy()
    dropped = (torch.rand(batch_size, generator=generator) < caption_dropout)[mine].numpy()
    noise = sample_noise(shape, generator, noise_offset)[mine]
    timesteps = torch.randint(0, num_train_timesteps, (batch_size,), generator=generator)[mine]
    return Draws(
        index=drawn_indices(n, batch_size, seed, draw, chances)[mine],
        eps=eps,
        noise=noise,
        timesteps=timesteps,
        dropped=dropped,
    )


# ---------------------------------------------------------------- loss pieces


def min_snr_weights(snr: torch.Tensor, gamma: float | None, prediction_type: str) -> torch.Tensor:
    """Min-SNR-γ loss weights (Hang et al., ICCV 2023) for a loss on the network's own target.

    Both weightings equal min(SNR, γ) on the x0 error: for ε-prediction ‖x0 − x̂0‖² = ‖ε − ε̂‖² / SNR,
    for v-prediction ‖x0 − x̂0‖² = ‖v − v̂‖² / (SNR + 1). Dividing by SNR for v-prediction, as some
    scripts did, down-weights every noisy step. γ = None gives weight 1.

    Args:
        snr: SNR(t) = α_t² / σ_t² per sample.
        gamma: the clamp γ (the paper uses 5).
        prediction_type: 'epsilon', 'v_prediction' or 'sample'.
    """
    if gamma is None:
        return torch.ones_like(snr)
    clamped = torch.clamp(snr, max=gamma)
    if prediction_type == "epsilon":
        return clamped / snr
    if prediction_type == "v_prediction":
        return clamped / (snr + 1)
    if prediction_type == "sample":
        return clamped
    raise ValueError(f"unknown prediction_type {prediction_type!r}")


def sample_noise(shape, generator: torch.Generator, offset: float = 0.0) -> torch.Tensor:
    """Gaussian noise plus `offset` × a per-channel constant (the noise offset of Guttenberg 2023),
    which lets a model learn overall brightness; 0 turns it off."""
    noise = torch.randn(shape, generator=generator)
    if offset:
        noise = noise + offset * torch.randn(shape[0], shape[1], *([1] * (len(shape) - 2)), generator=generator)
    return noise


def diffusion_target(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """What the network is trained to predict under the scheduler's prediction type."""
    kind = scheduler.config.prediction_type
    if kind == "epsilon":
        return noise
    if kind == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    if kind == "sample":
        return latents
    raise ValueError(f"unknown prediction_type {kind!r}")


# the attention projections of every transformer block: where MSDM's and diffusers' LoRA scripts put adapters
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


def add_lora(
    model,
    rank: int,
    alpha: float | None = None,
    targets: list[str] = LORA_TARGETS,
    frozen_dtype: torch.dtype | None = None,
) -> list[torch.nn.Parameter]:
    """Freeze a diffusers model and add peft LoRA adapters (Gaussian init, so the model starts as it
    was) on the modules named by `targets` (default: the attention projections); return the adapters'
    parameters, the only ones trained, which are float32 (mixed precision's master weights).

    `frozen_dtype` (`storage_dtype`'s, under mixed precision) stores the frozen weights in that dtype
    first, as diffusers' LoRA scripts do: half the memory of float32, and no cast of every weight to
    it at every step under autocast."""
    from peft import LoraConfig, inject_adapter_in_model

    if frozen_dtype is not None:
        model.to(frozen_dtype)
    config = LoraConfig(r=rank, lora_alpha=alpha or rank, init_lora_weights="gaussian", target_modules=targets)
    model.requires_grad_(False)
    if hasattr(model, "add_adapter"):
        model.add_adapter(config)
    else:  # diffusers gives some models (PixArt's transformer) no adapter methods: peft injects the layers
        inject_adapter_in_model(config, model)
    trainable = [p for p in model.parameters() if p.requires_grad]
    for parameter in trainable:  # peft makes them in the frozen weights' dtype
        parameter.data = parameter.data.float()
    return trainable


def storage_dtype(mixed_precision: str) -> torch.dtype | None:
    """The dtype frozen weights are stored in under accelerate's `mixed_precision` ('bf16', 'fp16'),
    or None ('no': they stay as loaded)."""
    return {"bf16": torch.bfloat16, "fp16": torch.float16}.get(mixed_precision)


def merge_adapters(model):
    """Merge the LoRA adapters into the weights and remove them: a plain diffusers model again
    (changed in place, and returned)."""
    if hasattr(model, "fuse_lora"):
        model.fuse_lora()
        model.unload_lora()
        return model
    from peft.tuners.tuners_utils import BaseTunerLayer

    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            module.merge()
            parent, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent) if parent else model, child, module.get_base_layer())
    return model


# ---------------------------------------------------------------- caches on disk (memory-mapped)


def cache_images(dataset_dir: str | Path, records: list[dict], cache_path: str | Path) -> np.memmap:
    """Write the records' images to one uint8 N x 3 x H x W `.npy` and return it memory-mapped.

    An existing cache with the same shape and file list is reused.
    """
    cache_path = Path(cache_path)
    index_path = cache_path.with_suffix(".json")
    names = [r["file_name"] for r in records]
    if cache_path.is_file() and index_path.is_file() and json.loads(index_path.read_text()) == names:
        return np.load(cache_path, mmap_mode="r")
    first = load_rgb(image_path(dataset_dir, records[0]))
    cache_path.parent.mkdir(parents=True, exist_ok=True)
    array = np.lib.format.open_memmap(cache_path, mode="w+", dtype=np.uint8, shape=(len(names), 3, *first.shape[:2]))
    for i, (name, record) in enumerate(zip(names, records)):
        image = load_rgb(image_path(dataset_dir, record))
        if image.shape != first.shape:
            raise ValueError(f"{name} is {image.shape[:2]}, the others {first.shape[:2]}: curate at one size")
        array[i] = image.transpose(2, 0, 1)
    array.flush()
    index_path.write_text(json.dumps(names))
    return np.load(cache_path, mmap_mode="r")


def cache_latent_moments(vae, dataset_dir: str | Path, records: list[dict], cache_dir: Path) -> None:
    """Posterior mean and std of every training image, as memory-mapped float32 `.npy` files; the
    frozen VAE (in float32: an fp16 SD/SDXL VAE overflows to black images) reads each image once, and
    each step samples z = mean + std * ε from the cache. A VQ autoencoder (Kandinsky's MoVQ) encodes
    deterministically: its std is 0."""
    cache_dir.mkdir(parents=True, exist_ok=True)
    if vae.dtype != torch.float32:
        vae = vae.to(torch.float32)
    for start in range(0, len(records), 64):
        batch = load_images(dataset_dir, records[start : start + 64]).transpose(0, 3, 1, 2)
        with torch.no_grad():
            encoded = vae.encode(to_model_range(batch).to(vae.device))
        if hasattr(encoded, "latent_dist"):
            moments = encoded.latent_dist.mean, encoded.latent_dist.std
        else:
            moments = encoded.latents, torch.zeros_like(encoded.latents)
        if start == 0:
            shape = (len(records), *moments[0].shape[1:])
            mean = np.lib.format.open_memmap(cache_dir / "latent_mean.npy", mode="w+", dtype=np.float32, shape=shape)
            std = np.lib.format.open_memmap(cache_dir / "latent_std.npy", mode="w+", dtype=np.float32, shape=shape)
        mean[start : start + 64] = moments[0].cpu().numpy()
        std[start : start + 64] = moments[1].cpu().numpy()
    mean.flush()
    std.flush()


def prompt_rows(records: list[dict], field: str = "text") -> tuple[list[str], np.ndarray]:
    """The distinct captions (sorted) and, per record, its caption's row in the prompt cache, where
    row 0 is the empty (unconditional) prompt. `field`: `text` (the training caption) or `class_text`
    (the label template alone, for Med-Art's template-against-VLM comparison)."""
    prompts = sorted({r.get(field, r["text"]) for r in records})
    row = {prompt: 1 + i for i, prompt in enumerate(prompts)}
    return prompts, np.array([row[r.get(field, r["text"])] for r in records])


def cache_prompt_embeddings(
    encode, prompts: list[str], cache_dir: Path, batch_size: int = 256
) -> dict[str, np.ndarray]:
    """Encode each distinct prompt once into memory-mapped float32 files `prompt_<name>.npy`.

    Args:
        encode: list of prompts -> dict of tensors with a leading prompt axis (hidden states, and
            whatever else the model needs: attention mask, pooled embedding).
        prompts: the rows; by convention row 0 is the empty (unconditional) prompt.
        cache_dir: where the files and `prompts.json` go.

    Returns:
        the arrays, memory-mapped, by name.
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for start in range(0, len(prompts), batch_size):
        for name, value in encode(prompts[start : start + batch_size]).items():
            value = value.float().cpu().numpy()
            if start == 0:
                arrays[name] = np.lib.format.open_memmap(
                    cache_dir / f"prompt_{name}.npy",
                    mode="w+",
                    dtype=np.float32,
                    shape=(len(prompts), *value.shape[1:]),
                )
            arrays[name][start : start + batch_size] = value
    for array in arrays.values():
        array.flush()
    (cache_dir / "prompts.json").write_text(json.dumps(prompts))
    return {name: np.load(cache_dir / f"prompt_{name}.npy", mmap_mode="r") for name in arrays}


def to_model_range(images: np.ndarray) -> torch.Tensor:
    """uint8 N x 3 x H x W -> float in [-1, 1]."""
    return torch.from_numpy(np.asarray(images, dtype=np.float32)) / 127.5 - 1


# ---------------------------------------------------------------- checkpoints


def complete_checkpoints(checkpoint_dir: str | Path) -> list[Path]:
    """The complete checkpoints (`step_NNNNNNN` with a `trainer_state.json`), newest first; half-written
    ones (still named `*.tmp`) are not among them."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    done = [
        p
        for p in checkpoint_dir.glob("step_*")
        if p.is_dir() and not p.name.endswith(".tmp") and (p / "trainer_state.json").is_file()
    ]
    return sorted(done, reverse=True)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The newest complete checkpoint, or None."""
    done = complete_checkpoints(checkpoint_dir)
    return done[0] if done else None


# a loop's arguments that say how long it runs, how it reports (validation grids) and how it saves memory:
# a run may be resumed with other values of these (more steps, say), never with another value of the rest
NOT_RECIPE = (
    "steps",
    "resume",
    "progress",
    "checkpoint_every",
    "validation_every",
    "validation_prompts",
    "guidance_scale",
    "sampling_steps",
    "gradient_checkpointing",
)


def training_recipe(arguments: dict) -> dict:
    """The recipe a run's checkpoints record and a resumed run must repeat: the training loop's
    arguments (call with `locals()` first thing in the loop) but paths and `NOT_RECIPE`, as JSON values.
    Under a decaying LR schedule the step count is the schedule's length, so it stays in the recipe."""
    decays = arguments.get("lr_schedule", "constant") != "constant"
    return json.loads(
        json.dumps(
            {
                k: v
                for k, v in arguments.items()
                if (k not in NOT_RECIPE or (k == "steps" and decays)) and not k.endswith(("_dir", "_path"))
            },
            default=str,
        )
    )


LR_SCHEDULES = ("constant", "cosine")


def make_lr_schedule(optimizer, name: str, warmup_steps: int, steps: int):
    """The LR schedule of a training loop (diffusers' `get_scheduler`): a linear warm-up over
    `warmup_steps`, then 'constant' or 'cosine' (half a cosine from the peak to 0 at `steps`;
    Loshchilov & Hutter 2017)."""
    from diffusers.optimization import get_scheduler

    if name not in LR_SCHEDULES:
        raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {name!r}")
    if name == "constant":
        return get_scheduler("constant_with_warmup", optimizer, num_warmup_steps=warmup_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup_steps, num_training_steps=steps)


def save_checkpoint(accelerator, checkpoint_dir: str | Path, step: int, state: dict, keep: int = 2) -> Path:
    """Save the accelerator state (models, optimizers, LR schedulers, registered objects such as EMA,
    RNG states) plus `trainer_state.json` (the step and `state`, which holds the recipe), atomically:
    written under a temporary name and renamed, so an interrupted save never leaves a checkpoint that
    looks complete. Keeps the newest `keep`."""
    checkpoint_dir = Path(checkpoint_dir)
    final = checkpoint_dir / f"step_{step:07d}"
    temporary = checkpoint_dir / f"step_{step:07d}.tmp"
    if accelerator.is_main_process:
        shutil.rmtree(temporary, ignore_errors=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(temporary))
    if accelerator.is_main_process:
        (temporary / "trainer_state.json").write_text(json.dumps({"step": step, **state}, indent=2))
        if final.exists():
            shutil.rmtree(final)
        os.replace(temporary, final)
        for old in complete_checkpoints(checkpoint_dir)[keep:]:
            shutil.rmtree(old)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, checkpoint: str | Path) -> dict:
    """Restore what `save_checkpoint` wrote; return its trainer state (with `step`)."""
    accelerator.load_state(str(checkpoint))
    return json.loads((Path(checkpoint) / "trainer_state.json").read_text())


class RecipeMismatchError(ValueError):
    """A run would resume checkpoints trained with another recipe."""


# recipe keys that the loops gained after checkpoints had been written, with what a checkpoint that
# lacks one was trained with: such a checkpoint resumes under that value and no other
ADDED_RECIPE_KEYS = {"lr_schedule": "constant", "gradient_accumulation_steps": 1}  # the latter: vq-ar's LM


def resume_step(accelerator, checkpoint_dir: str | Path, resume: bool | str, recipe: dict | None = None) -> int:
    """The step a loop starts from: that of the newest checkpoint that loads, restored into the
    accelerator (models, optimizer, LR scheduler, EMA, RNG states), or 0.

    A checkpoint that fails to load (truncated, corrupt) is named in a warning and the next older one
    is tried. A checkpoint trained with another recipe is not resumed: that is an error naming the
    values that differ, unless `resume` is 'override' (then it is resumed, with a warning, and the
    differences are recorded in the checkpoints that follow, under `recipe_overridden`).

    Args:
        accelerator: the loop's accelerator, after `prepare` and `register_for_checkpointing`.
        checkpoint_dir: where `save_checkpoint` writes.
        resume: True (resume if the recipe matches), False (start at 0) or 'override'.
        recipe: this run's `training_recipe`.

    Raises:
        RecipeMismatchError: the newest checkpoint's recipe differs and `resume` is not 'override'.
        RuntimeError: checkpoints exist but none loads (the message names each and why).
    """
    if resume not in (True, False, "override"):
        raise ValueError(f"resume must be True, False or 'override', got {resume!r}")
    candidates = complete_checkpoints(checkpoint_dir) if resume else []
    if candidates and recipe is not None:
        saved = json.loads((candidates[0] / "trainer_state.json").read_text()).get("recipe")
        if saved is not None:
            saved = {**{k: v for k, v in ADDED_RECIPE_KEYS.items() if k in recipe}, **saved}
        keys = (set(saved or {}) | set(recipe)) - {"recipe_overridden"}
        differing = (
            {k: (saved.get(k), recipe.get(k)) for k in sorted(keys) if saved.get(k) != recipe.get(k)}
            if saved is not None
            else {}
        )
        if differing and resume != "override":
            listed = ", ".join(f"{k}: {old!r} in the checkpoint, {new!r} now" for k, (old, new) in differing.items())
            raise RecipeMismatchError(
                f"{candidates[0]} was trained with another recipe ({listed}); use a new output "
                "directory, or resume='override' to continue it anyway"
            )
        if differing:
            warnings.warn(f"resuming {candidates[0]} with a different recipe: {sorted(differing)}", stacklevel=2)
            recipe["recipe_overridden"] = {k: {"checkpoint": old, "now": new} for k, (old, new) in differing.items()}
    failures = []
    for checkpoint in candidates:
        try:
            return load_checkpoint(accelerator, checkpoint)["step"]
        except Exception as error:  # noqa: BLE001 - any library error while reading a damaged checkpoint
            failures.append(f"{checkpoint}: {type(error).__name__}: {error}")
            warnings.warn(
                f"checkpoint {checkpoint} does not load ({type(error).__name__}: {error}); trying the next older one",
                stacklevel=2,
            )
    if failures:
        raise RuntimeError("no checkpoint loads; remove them to start again:\n" + "\n".join(failures))
    return 0


def optimizer_step(accelerator, parameters: list, optimizer, lr_scheduler, ema, max_grad_norm: float) -> None:
    """One update: clip the gradients, step the optimizer and the LR schedule, clear the gradients,
    and move the EMA (if any) towards the new weights."""
    accelerator.clip_grad_norm_(parameters, max_grad_norm)
    optimizer.step()
    lr_scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    if ema:
        ema.step(parameters)


def structural_dissimilarity(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """1 − SSIM (pytorch-msssim, 7-pixel window) of images in [-1, 1]: the structural term the
    autoencoders use beside L1, in place of a downloaded LPIPS network."""
    from pytorch_msssim import ssim

    return 1 - ssim((reconstruction.float() + 1) / 2, (x.float() + 1) / 2, data_range=1.0, win_size=7)


def spectral_distance(reconstruction: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """The mean absolute difference of the two images' 2-D amplitude spectra (`torch.fft.rfft2`,
    orthonormal, per channel), for images in [-1, 1]: a frequency-aware reconstruction term. It
    ignores where fine texture sits (a circular shift leaves an amplitude spectrum unchanged) and
    charges its loss: L1 and SSIM reward a decoder that blurs what it cannot place, this term does not
    (what it changed on `default`, seed by seed: README, "The shared VAE")."""
    amplitude = torch.fft.rfft2(reconstruction.float(), norm="ortho").abs()
    return (amplitude - torch.fft.rfft2(x.float(), norm="ortho").abs()).abs().mean()


def adversarial_term(
    reconstruction_loss: torch.Tensor, fake_logits: torch.Tensor, last_layer: torch.Tensor, weight: float
):
    """The generator's PatchGAN hinge term, times the adaptive weight of Esser et al. (2021, eq. 7):
    the ratio of the reconstruction gradient to the adversarial gradient at the decoder's last layer
    (a fixed weight let the adversarial term swamp reconstruction, measured on the VAE)."""
    g_loss = -fake_logits.mean()
    g_rec = torch.autograd.grad(reconstruction_loss, last_layer, retain_graph=True)[0]
    g_adv = torch.autograd.grad(g_loss, last_layer, retain_graph=True)[0]
    balance = (g_rec.norm() / (g_adv.norm() + 1e-4)).clamp(0, 1e4).detach()
    return weight * balance * g_loss


def discriminator_step(accelerator, discriminator, optimizer, real: torch.Tensor, fake: torch.Tensor) -> None:
    """One hinge-loss step of the discriminator on real images and detached reconstructions."""
    with accelerator.autocast():
        loss = 0.5 * (torch.relu(1 - discriminator(real)).mean() + torch.relu(1 + discriminator(fake.detach())).mean())
    optimizer.zero_grad(set_to_none=True)
    accelerator.backward(loss)
    optimizer.step()


@contextmanager
def ema_weights(ema, parameters):
    """Within the block the trained parameters hold their EMA (diffusers' EMAModel; no-op for None)."""
    if ema is None:
        yield
        return
    parameters = list(parameters)  # a generator such as model.parameters() would be spent by the first call
    ema.store(parameters)
    ema.copy_to(parameters)
    try:
        yield
    finally:
        ema.restore(parameters)


def park(*models) -> list:
    """Frozen towers whose outputs a loop has cached (the text encoders, once the prompt embeddings are
    on disk) wait in host memory while it trains, not in the accelerator's: T5-XXL alone holds 17.7 GiB
    in float32 (`benchmarks/training_memory.py`). `save_validation_grid` brings them back for its grid.
    Returns them."""
    for model in models:
        model.to("cpu")
    return list(models)


def save_validation_grid(
    pipeline,
    prompts: list[str],
    guidance_scale: float,
    steps: int,
    seed: int,
    path: Path,
    parked: list = (),
    device: torch.device | str = "cpu",
) -> None:
    """Sample each validation prompt twice with the pipeline as it is and save one grid image; the
    `parked` towers (`park`) are on `device` for it and back in host memory after."""
    from medsyn.sampling import generate, image_grid

    for model in parked:
        model.to(device)
    try:
        samples = generate(pipeline, prompts, per_prompt=2, seed=seed, steps=steps, guidance_scale=guidance_scale)
    finally:
        park(*parked)
    path.parent.mkdir(parents=True, exist_ok=True)
    image_grid([s["image"] for s in samples], columns=2 * 4).save(path)


def progress_bar(total: int, start: int, desc: str, enabled: bool):
    return tqdm(total=total, initial=start, desc=desc, unit="step", disable=not enabled)
