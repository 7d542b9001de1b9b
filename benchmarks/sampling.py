"""Sampling throughput of medsyn's sampler (`medsyn.sampling.generate` after `optimise_for_sampling`)
against `StableDiffusionXLPipeline` with its defaults, at equal steps and equal images: MediSyn's
Euler sampler (50 steps, guidance 7) and DPM-Solver++ (20 steps), SDXL at 512² (random weights, the
published configuration).

The baseline is the pipeline as constructed (float32, SDPA attention, guidance batched with the
conditional pass, as diffusers' pipelines always do), called once for all images. A second reference
row is the pipeline in float16, as diffusers' documentation loads it. medsyn's variants, each on its
own: bfloat16 weights; plus channels_last; plus `torch.compile` of the U-Net.

    python -m benchmarks.sampling --scale gpu
    python -m benchmarks.sampling --scale cpu
"""

import torch

from benchmarks.architectures import build_pipeline
from benchmarks.common import (
    COMPILE_SECONDS,
    arguments,
    device_for,
    finish,
    peak_memory_gib,
    reset_peak_memory,
    row,
    seconds,
    time_left,
)

SETTINGS = {
    "gpu": {"size": 512, "images": 4, "repeats": 2},
    "cpu": {"size": 128, "images": 4, "repeats": 2},
}
# DPM-Solver++ first: the Euler run compiles last, when the run has time
SAMPLERS = {"DPM-Solver++, 20 steps, CFG 7": ("dpmsolver++", 20), "Euler, 50 steps, CFG 7": ("euler", 50)}
PROMPTS = [
    "Chest X-ray, PA view: cardiomegaly.",
    "Endoscopy: a polyp in the colon.",
    "Dermoscopy: melanoma.",
    "Brain MRI, T2: glioma.",
]


def pipeline_call(pipeline, prompts: list[str], size: int, steps: int):
    """The baseline: one call of the pipeline with its defaults (and the sampler's steps and CFG 7)."""
    generators = [torch.Generator().manual_seed(i) for i in range(len(prompts))]
    return lambda: pipeline(
        prompts, height=size, width=size, num_inference_steps=steps, guidance_scale=7.0, generator=generators
    )


def medsyn_call(pipeline, prompts: list[str], steps: int):
    from medsyn.sampling import generate

    return lambda: generate(
        pipeline, prompts, per_prompt=1, seed=0, steps=steps, guidance_scale=7.0, batch_size=len(prompts)
    )


def caller(pipeline, prompts: list[str], size: int, pipeline_defaults: bool):
    """steps -> a call that samples every prompt once with that many steps."""
    if pipeline_defaults:
        return lambda steps: pipeline_call(pipeline, prompts, size, steps)
    return lambda steps: medsyn_call(pipeline, prompts, steps)


def measure(args, rows: list | None = None) -> list[dict]:
    """Append one row per measurement to `rows` as it is made (a run cut short keeps them); return them."""
    from medsyn.sampling import optimise_for_sampling, set_scheduler

    device = device_for(args.scale)
    settings = SETTINGS[args.scale]
    size, n = settings["size"], settings["images"]
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    variants = [
        ("baseline: StableDiffusionXLPipeline defaults (float32)", None),
        ("reference: the pipeline in float16 (diffusers' documented use)", {"dtype": "float16"}),
        ("medsyn: bfloat16", {"dtype": "bfloat16"}),
        ("+ channels_last", {"dtype": "bfloat16", "memory_format": "channels_last"}),
    ]
    if args.scale == "gpu":
        variants.append(
            (
                "+ torch.compile",
                {"dtype": "bfloat16", "memory_format": "channels_last", "compile_mode": "default"},
            )
        )
    if device.type == "cpu":  # half precision is slower on a CPU; medsyn samples in float32 there
        variants = [v for v in variants if not v[1] or v[1].get("dtype") != "float16"]
        variants[1:] = [
            ("medsyn: float32", {"dtype": "float32"}),
            ("+ channels_last", {"dtype": "float32", "memory_format": "channels_last"}),
        ]
    rows = [] if rows is None else rows
    for sampler, (scheduler, steps) in SAMPLERS.items():
        pipeline = build_pipeline("sdxl", args.scale, args.work, device)
        set_scheduler(pipeline, scheduler)
        # medsyn samples at the trained size, which its training loops record as the sample size
        pipeline.unet.register_to_config(sample_size=size // pipeline.vae_scale_factor)
        model = f"SDXL, {size}², {sampler}"
        for variant, options in variants:
            if options and "compile_mode" in options and (scheduler != "euler" or time_left(args) < COMPILE_SECONDS):
                rows.append(
                    row("sampling", model, variant, batch=n, note="not run: compiled for Euler only, when time allows")
                )
                continue
            reset_peak_memory(device)
            if options is not None:
                optimise_for_sampling(pipeline, device, **options)
            call = caller(pipeline, prompts, size, pipeline_defaults=options is None or variant.startswith("reference"))
            call(2)()  # warm-up at the same shapes (cuDNN's choices, compilation), two steps
            # the float32 baseline is the slow one: one timed call of it on a GPU
            repeats = 1 if options is None and device.type == "cuda" else settings["repeats"]
            times = seconds(call(steps), device, warmup=0, repeats=repeats)
            rate = n / min(times)
            print(f"  {model} / {variant}: {rate:.3g} images/s", flush=True)
            rows.append(
                row(
                    "sampling",
                    model,
                    variant,
                    batch=n,
                    throughput=rate,
                    unit="images/s",
                    peak_memory_gib=peak_memory_gib(device),
                    note=f"best of {len(times)} timed calls of {n} images, after a two-step warm-up call",
                )
            )
        del pipeline
        reset_peak_memory(device)
    return rows


if __name__ == "__main__":
    arguments_ = arguments(__doc__.splitlines()[0])
    finish(measure(arguments_), arguments_, {"settings": SETTINGS[arguments_.scale]})
