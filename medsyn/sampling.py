"""Sampling from a saved pipeline: every image carries the seed that regenerates it on its own."""

import inspect
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from medsyn.data.dataset import (
    class_fields,
    class_prompts,
    image_file_name,
    image_path,
    is_dataset,
    read_records,
    split_records,
    write_records,
)


def image_seed(seed: int, index: int) -> int:
    """The seed of image `index` of a sampling run with base `seed`."""
    return int(np.random.default_rng([seed, index]).integers(2**31))


def load_pipeline(path: str | Path):
    """A diffusers pipeline, or a vq-ar pipeline (`medsyn.models.vq_ar`), from a local directory
    (never the network), on the CPU."""
    from diffusers import DiffusionPipeline

    from medsyn.models.text_encoders import require_dir
    from medsyn.models.vq_ar import CONFIG_FILE, VQARPipeline

    if (Path(path) / CONFIG_FILE).is_file():
        return VQARPipeline.from_pretrained(path)
    pipeline = DiffusionPipeline.from_pretrained(require_dir(path, ("model_index.json",)), local_files_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def image_size(pipeline) -> int:
    """The side, in pixels, of the images a pipeline makes by default: its denoiser's sample size (in
    latent pixels, set by medsyn's training loops to the trained size) times the autoencoder's scale.
    FLUX's transformer has no sample size; its pipeline's default stands in. A vq-ar pipeline knows its own."""
    if hasattr(pipeline, "grid"):
        return pipeline.sample_size
    denoiser = pipeline.unet if hasattr(pipeline, "unet") else pipeline.transformer
    latent = getattr(denoiser.config, "sample_size", None) or pipeline.default_sample_size
    if hasattr(pipeline, "vae_scale_factor"):
        return latent * pipeline.vae_scale_factor
    return latent * 2 ** (len(pipeline.movq.config.block_out_channels) - 1)  # Kandinsky's MoVQ


def _call_options(pipeline) -> dict:
    """Keyword arguments a pipeline family needs to sample as it was trained."""
    parameters = inspect.signature(pipeline.__call__).parameters
    if "clean_caption" in parameters:
        # PixArt: the prompt as trained (no caption cleaning), at the trained size (no aspect-ratio bins),
        # and no more tokens than its text encoder has positions (120, PixArt-α's, for T5)
        return {
            "clean_caption": False,
            "use_resolution_binning": False,
            "max_sequence_length": min(120, pipeline.tokenizer.model_max_length),
        }
    if hasattr(pipeline, "tokenizer_2") and "max_sequence_length" in parameters:
        # FLUX: T5 prompts of the length trained on (its transformer attends to padding too)
        return {"max_sequence_length": min(512, pipeline.tokenizer_2.model_max_length)}
    return {}


@torch.no_grad()
def generate(
    pipeline,
    prompts: list[str],
    per_prompt: int,
    seed: int,
    steps: int = 25,
    guidance_scale: float = 4.0,
    batch_size: int = 32,
    batch_seconds: list | None = None,
    call_options: dict | None = None,
) -> list[dict]:
    """`per_prompt` images for each prompt, in batches; returns dicts with prompt_id, prompt, seed and
    the uint8 image; `batch_seconds`, when given, receives each batch's seconds per image. The image with record seed s is `pipeline(prompt, generator=torch.Generator()
    .manual_seed(s), ...)` alone: each image's starting noise comes from its own generator.

    Args:
        pipeline: a text-to-image diffusers pipeline.
        prompts: the prompts; an empty prompt is rejected.
        per_prompt: images per prompt.
        seed: base seed of the run.
        steps: sampler steps (the pipeline's own scheduler).
        guidance_scale: classifier-free guidance scale.
        batch_size: images per pipeline call.
        call_options: further arguments of every pipeline call (vq-ar's `clues=False`).
    """
    if any(not p.strip() for p in prompts):
        raise ValueError("empty prompt: every prompt must say what to generate")
    pairs = [(i, p) for i, p in enumerate(prompts) for _ in range(per_prompt)]
    jobs = [(i, p, image_seed(seed, n)) for n, (i, p) in enumerate(pairs)]
    size, options = image_size(pipeline), {**_call_options(pipeline), **(call_options or {})}
    out = []
    for start in range(0, len(jobs), batch_size):
        chunk = jobs[start : start + batch_size]
        began = time.perf_counter()
        images = pipeline(
            [p for _, p, _ in chunk],
            height=size,
            width=size,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            output_type="np",
            generator=[torch.Generator().manual_seed(s) for _, _, s in chunk],
            **options,
        ).images
        if batch_seconds is not None:
            batch_seconds.append((time.perf_counter() - began) / len(chunk))
        for (i, p, s), image in zip(chunk, images):
            out.append({"prompt_id": i, "prompt": p, "seed": s, "image": np.rint(image * 255).astype(np.uint8)})
    return out


# the `memory_format` options of sampling and training: NCHW, or NHWC for cuDNN's tensor-core convolutions
MEMORY_FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def compile_repeated_blocks(denoiser, mode: str = "default"):
    """`torch.compile` each transformer and residual block of a U-Net or DiT in place (regional
    compilation, as diffusers recommends for its transformers): the blocks repeat, so a few compiled
    graphs serve them all and compiling takes a fraction of the whole network's time, while most of the
    FLOPs (attention, feed-forward, normalisation + activation + convolution) are in them. The
    parameters' names do not change, so saving and loading work as before.

    Args:
        denoiser: a diffusers U-Net or transformer.
        mode: torch.compile's mode ('default', 'max-autotune-no-cudagraphs', ...).
    """
    from diffusers.models.attention import BasicTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D

    # one graph per block shape: SDXL's U-Net has about 20 kinds of block, more than dynamo's default 8
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, 64)
    blocks = [m for m in denoiser.modules() if isinstance(m, (BasicTransformerBlock, ResnetBlock2D))]
    if not blocks:
        raise ValueError(f"{type(denoiser).__name__} has no transformer or residual blocks to compile")
    for block in blocks:
        block.compile(mode=mode)
    return denoiser


def optimise_for_sampling(
    pipeline,
    device: str | torch.device | None = None,
    dtype: str = "float32",
    memory_format: str = "contiguous",
    compile_mode: str | None = None,
):
    """Put a diffusers pipeline where and how it samples fastest; returns it (changed in place).

    Each setting is measured on its own by `benchmarks/sampling.py` (README, "Performance"): bfloat16
    weights run the denoiser on a GPU's tensor cores (its range is float32's, so the VAE decodes
    without the overflow float16 needs an upcast for); channels_last suits cuDNN's convolutions;
    `torch.compile` fuses the denoiser's small operations. A vq-ar pipeline is only moved.

    Args:
        pipeline: a diffusers text-to-image pipeline (or a vq-ar one).
        device: where to sample (default: where it is).
        dtype: 'float32', 'bfloat16' or 'float16' for every component.
        memory_format: 'contiguous' or 'channels_last' for the denoiser and the VAE (Kandinsky's MoVQ).
        compile_mode: `torch.compile` mode for the denoiser's blocks (`compile_repeated_blocks`); None: eager.
    """
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"dtype must be 'float32', 'bfloat16' or 'float16', not {dtype!r}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {list(MEMORY_FORMATS)}, not {memory_format!r}")
    if hasattr(pipeline, "grid"):
        return pipeline.to(device) if device else pipeline
    pipeline.to(device, getattr(torch, dtype)) if device else pipeline.to(dtype=getattr(torch, dtype))
    name = "unet" if hasattr(pipeline, "unet") else "transformer"
    decoder = "vae" if hasattr(pipeline, "vae") else "movq"  # Kandinsky 2.2 decodes with its MoVQ
    for part in (name, decoder):
        getattr(pipeline, part).to(memory_format=MEMORY_FORMATS[memory_format])
    if compile_mode:
        compile_repeated_blocks(getattr(pipeline, name), compile_mode)
    return pipeline


def image_grid(images: list[np.ndarray], columns: int) -> Image.Image:
    """Tile equally sized uint8 images into one picture, row by row."""
    h, w = images[0].shape[:2]
    rows = -(-len(images) // columns)
    grid = np.zeros((rows * h, columns * w, 3), dtype=np.uint8)
    for k, image in enumerate(images):
        r, c = divmod(k, columns)
        grid[r * h : (r + 1) * h, c * w : (c + 1) * w] = image if image.ndim == 3 else image[..., None]
    return Image.fromarray(grid)


# MediSyn samples with Euler, 50 steps, CFG 7; DPM-Solver++ reaches similar images in fewer steps
SCHEDULERS = {
    "euler": ("EulerDiscreteScheduler", {}),
    "dpmsolver++": ("DPMSolverMultistepScheduler", {"algorithm_type": "dpmsolver++"}),
    "ddim": ("DDIMScheduler", {}),
}


def sampler_settings(pipeline, scheduler: str, steps: int, guidance_scale: float) -> dict:
    """The settings recorded with each image: the diffusion sampler's, or for an autoregressive
    pipeline (vq-ar), which has no scheduler and always decodes H x W steps, those it ran with."""
    if hasattr(pipeline, "grid"):
        return {
            "scheduler": "autoregressive",
            "steps": pipeline.grid[0] * pipeline.grid[1],
            "guidance_scale": guidance_scale,
        }
    return {"scheduler": scheduler, "steps": steps, "guidance_scale": guidance_scale}


def set_scheduler(pipeline, name: str) -> None:
    """Replace the pipeline's sampler by `name` (a key of `SCHEDULERS`, or 'pipeline' to keep its own),
    keeping the trained noise schedule and prediction type. An autoregressive pipeline has none.

    Every replacement starts from the pipeline's own sampler, which 'pipeline' puts back. A
    flow-matching pipeline (FLUX) samples 'euler' with its own flow-matching Euler and 'dpmsolver++'
    on flow sigmas (its shift kept; only with dynamic shifting, as FLUX.1-dev's); it has no DDIM.
    Kandinsky 2.2's combined pipeline samples latents in its decoder, whose sampler is the one
    replaced; that decoder does not scale its model inputs as Euler needs them scaled, so it takes
    'dpmsolver++' or 'ddim', and 'euler' is refused.
    """
    import inspect

    import diffusers

    if hasattr(pipeline, "grid"):
        return
    if name != "pipeline" and name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; choose from {['pipeline', *SCHEDULERS]}")
    sampler = getattr(pipeline, "decoder_pipe", pipeline)  # Kandinsky 2.2: the decoder samples the latents
    if not hasattr(sampler, "_own_scheduler"):  # every replacement starts from the pipeline's own sampler
        sampler._own_scheduler = sampler.scheduler
    own = sampler._own_scheduler
    config = own.config
    if name == "pipeline":
        replacement = own
    else:
        cls, options = SCHEDULERS[name]
        if "shift" in config:  # a flow-matching schedule
            if name not in ("euler", "dpmsolver++"):
                raise ValueError(
                    f"{type(pipeline).__name__} samples a flow: choose 'euler', 'dpmsolver++' or 'pipeline'"
                )
            if name == "dpmsolver++" and not config.get("use_dynamic_shifting", False):
                raise ValueError(  # FluxPipeline passes `mu`, which DPM-Solver takes with dynamic shifting only
                    f"{type(pipeline).__name__}'s flow schedule has a static shift, on which diffusers' "
                    "DPM-Solver++ does not run: choose 'euler' or 'pipeline'"
                )
            flow = {"prediction_type": "flow_prediction", "use_flow_sigmas": True, "flow_shift": config["shift"]}
            cls, options = {
                "euler": ("FlowMatchEulerDiscreteScheduler", {}),
                "dpmsolver++": ("DPMSolverMultistepScheduler", {**options, **flow}),
            }[name]
        elif sampler is not pipeline and name == "euler":
            raise ValueError(
                f"{type(pipeline).__name__}'s decoder does not scale its model inputs as Euler needs: "
                "choose 'dpmsolver++', 'ddim' or 'pipeline' for it (05_sample's family_schedulers)"
            )
        target = getattr(diffusers, cls)
        accepted = set(inspect.signature(target.__init__).parameters)
        replacement = target.from_config({k: v for k, v in config.items() if k in accepted}, **options)
        # FluxPipeline reads the bounds of its dynamic shift from its sampler's configuration
        bounds = ("base_shift", "max_shift", "base_image_seq_len", "max_image_seq_len")
        replacement.register_to_config(**{k: config[k] for k in bounds if k in config and k not in replacement.config})
    sampler.scheduler = replacement
    if sampler is not pipeline:
        pipeline.scheduler = replacement  # the combined pipeline registers the decoder's sampler too


def write_generated_dataset(
    samples: list[dict], out_dir: str | Path, model: str, classes: list[dict], settings: dict
) -> Path:
    """Write generated images as a dataset in the curated format (`medsyn.data.dataset`: one `train`
    split), each record with `model`, `seed` and `prompt_id` so that any image can be regenerated on
    its own, and the `source`, `labels`, `specialty` and `image_type` of the class its prompt names.

    Args:
        samples: `generate`'s output.
        out_dir: the dataset directory (must not hold a dataset already).
        model: the generator's name (e.g. 'ldm-compact').
        classes: per prompt id, the fields the images inherit (`medsyn.data.dataset.class_fields`).
        settings: sampler settings recorded with every image (scheduler, steps, guidance_scale).

    Returns:
        the dataset directory.
    """
    import hashlib

    out_dir = Path(out_dir)
    if is_dataset(out_dir):
        raise FileExistsError(f"{out_dir} holds a dataset: write each generated dataset to a new directory")
    records = []
    for sample in samples:
        digest = hashlib.sha256(sample["image"].tobytes()).hexdigest()
        record = {
            "file_name": image_file_name(digest, f"_{sample['seed']}"),
            "split": "train",
            **classes[sample["prompt_id"]],
            "text": sample["prompt"],
            "patient_id": f"synthetic-{model}",
            "sha256": digest,
            "model": model,
            "seed": sample["seed"],
            "prompt_id": sample["prompt_id"],
            **settings,
        }
        path = image_path(out_dir, record)
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(sample["image"]).save(path)
        records.append(record)
    write_records(out_dir, records, kind="generated")
    return out_dir


def sample_class_prompts(
    pipeline_dir: str | Path,
    dataset_dir: str | Path,
    out_dir: str | Path,
    model: str,
    per_prompt: int,
    seed: int = 0,
    scheduler: str = "euler",
    steps: int = 50,
    guidance_scale: float = 7.0,
    batch_size: int = 32,
    batch_seconds: list | None = None,
    precision: str = "float32",
) -> Path:
    """`per_prompt` images for each class prompt of a curated dataset's training split, written as a
    generated dataset (`write_generated_dataset`). Defaults are MediSyn's sampler: Euler, 50 steps,
    CFG 7. Returns the dataset directory; `batch_seconds` receives each batch's seconds per image.
    Sampling runs on a GPU when there is one, in `precision` ('float32', or 'bfloat16': 2.5 times the
    images per second on an H200, `benchmarks/sampling.py`), which every image's record states: a seed
    regenerates its image at the same precision."""
    if is_dataset(out_dir):  # before any sampling work
        raise FileExistsError(f"{out_dir} holds a dataset: write each generated dataset to a new directory")
    classes = list(class_fields(split_records(dataset_dir, "train")).values())
    pipeline = load_pipeline(pipeline_dir)
    optimise_for_sampling(pipeline, "cuda" if torch.cuda.is_available() else "cpu", dtype=precision)
    set_scheduler(pipeline, scheduler)
    field = getattr(pipeline, "prompt_field", "text")  # a vq-ar LM trained on reports gets its class's report
    samples = generate(
        pipeline,
        [c[field] for c in classes],
        per_prompt=per_prompt,
        seed=seed,
        steps=steps,
        guidance_scale=guidance_scale,
        batch_size=batch_size,
        batch_seconds=batch_seconds,
    )
    # a vq-ar pipeline is only moved (`optimise_for_sampling`): it samples in float32 whatever was asked
    settings = {
        **sampler_settings(pipeline, scheduler, steps, guidance_scale),
        "precision": "float32" if hasattr(pipeline, "grid") else precision,
    }
    inherited = [{k: v for k, v in c.items() if k != "report"} for c in classes]  # `text` is the prompt used
    return write_generated_dataset(samples, out_dir, model, inherited, settings)


def sample_families(
    pipelines: dict[str, str | Path],
    dataset_dir: str | Path,
    generated_dir: str | Path,
    per_prompt: int,
    seed: int = 0,
    scheduler: str = "euler",
    steps: int = 50,
    guidance_scale: float = 7.0,
    batch_size: int = 32,
    precision: str = "float32",
    family_schedulers: dict[str, str] | None = None,
) -> pd.DataFrame:
    """Sample every family's pipeline into `<generated_dir>/<family>` (`sample_class_prompts`, on a GPU
    when there is one, in `precision`), with one sampler for all but the families `family_schedulers`
    names (family -> sampler, for a pipeline that cannot take `scheduler`: Kandinsky 2.2 takes no
    Euler, `set_scheduler`). A family whose generated dataset already exists is kept when it was
    sampled with the same settings and count; otherwise this stops and names the directory to remove.

    Returns:
        one row per family: images, status ('sampled' or 'kept'), seconds per image in the pipeline
        calls (the mean over batches) with its 95 % bootstrap interval over batches, the whole run's
        seconds with loading and writing (NaN when kept), and the sampler settings.
    """
    from medsyn.intervals import mean_interval

    if not pipelines:
        raise ValueError("no pipelines to sample: give family -> saved pipeline directory")
    family_schedulers = family_schedulers or {}
    unknown = sorted(set(family_schedulers) - set(pipelines))
    if unknown:
        raise ValueError(f"family_schedulers names families with no pipeline: {unknown}")
    prompts = len(class_prompts(split_records(dataset_dir, "train")))
    rows = []
    for family, pipeline_dir in pipelines.items():
        out = Path(generated_dir) / family
        sampler = family_schedulers.get(family, scheduler)
        settings = {"scheduler": sampler, "steps": steps, "guidance_scale": guidance_scale, "precision": precision}
        started, batches = time.perf_counter(), []
        if is_dataset(out):
            kept = read_records(out)
            expected = dict(settings)
            if kept[0].get("scheduler") == "autoregressive":  # vq-ar: no scheduler, its own steps, float32
                expected.update(scheduler="autoregressive", steps=kept[0].get("steps"), precision="float32")
            # datasets written before precision was recorded were sampled in float32
            recorded = {"precision": "float32", **kept[0]}
            differing = {k: recorded.get(k) for k, v in expected.items() if recorded.get(k) != v}
            if differing or len(kept) != per_prompt * prompts:
                raise ValueError(
                    f"{out} holds images sampled differently ({differing or f'{len(kept)} images'}); "
                    "remove it to resample"
                )
            status = "kept"
        else:
            sample_class_prompts(
                pipeline_dir,
                dataset_dir,
                out,
                family,
                per_prompt,
                seed=seed,
                scheduler=sampler,
                steps=steps,
                guidance_scale=guidance_scale,
                batch_size=batch_size,
                batch_seconds=batches,
                precision=precision,
            )
            status = "sampled"
        seconds = time.perf_counter() - started
        written = read_records(out)
        rows.append(
            {
                "family": family,
                "images": len(written),
                "status": status,
                # the pipeline calls' time per image (its interval over batches); loading and writing apart
                "seconds_per_image": float(np.mean(batches)) if batches else float("nan"),
                **dict(zip(("seconds_per_image_low", "seconds_per_image_high"), mean_interval(batches))),
                "seconds_total": seconds if status == "sampled" else float("nan"),
                **{k: {"precision": "float32", **written[0]}.get(k) for k in settings},  # as recorded: vq-ar's differ
            }
        )
    return pd.DataFrame(rows)
