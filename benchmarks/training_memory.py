"""How much GPU memory each training loop of the `paper` profile needs at its published sizes, and
the largest micro-batch that trains without gradient checkpointing, counted on fake tensors: no
weight is allocated and nothing is computed, so it runs in about a minute on the CPU.

    python -m benchmarks.training_memory --readme          # writes benchmarks/results/training_memory.csv
    python -m benchmarks.training_memory --gib 139 --out /tmp/h200.csv   # another device's memory
    python -m benchmarks.training_memory --measure         # on a GPU: the same loops, measured

For each loop, the models it holds on the device are built from their published configurations
on the meta device and turned into fake tensors, in the dtypes the loop gives them (`bf16` mixed
precision, as `paper.yaml` trains: trainable weights float32, LoRA's frozen weights bf16), and one
forward pass of its loss runs under CPU autocast. Three parts, in bytes:

- `weights`: every parameter and buffer of the models the loop keeps on the device while it trains
  (text towers parked in host memory once their embeddings are cached are not among them);
- `training_state`: per trainable parameter a float32 gradient, AdamW's two moments and, where the
  loop keeps one, an EMA copy;
- `activations`: the tensors autograd saves for the backward pass at the loop's micro-batch (batch /
  gradient_accumulation_steps), each storage once and the models' own weights left out: autocast's
  bf16 copies of float32 weights, then what grows with the batch.

`need_gib` is their sum and `largest_micro_batch` the most images or sequences per micro-batch whose
sum fits in `--gib`. The sum holds every weight gradient beside every saved activation, where a
backward pass frees activations as gradients appear, and it leaves out the activations' own
gradients and the allocator's slack; the `calibration` row sets it against the peak the SDXL
training step measured on a GPU (`gpu.csv`), and `--measure` measures every loop on one.
"""

import argparse
import os
from pathlib import Path

import pandas as pd
import torch

from benchmarks.architectures import (
    CLIP_BIGG,
    CLIP_L,
    FLUX_1_DEV,
    FLUX_VAE,
    PIXART_XL_512,
    SDXL_UNET,
    VAE,
)
from benchmarks.common import README, RESULTS_DIR, peak_memory_gib, reset_peak_memory

GIB = 2**30
# databricks/dolly-v2-3b (Pythia-2.8B, GPT-NeoX): LLM-CXR's language model, fully fine-tuned
DOLLY_V2_3B = {
    "hidden_size": 2560,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "intermediate_size": 10240,
    "rotary_pct": 0.25,
    "vocab_size": 50280,
    "max_position_embeddings": 2048,
    "use_parallel_residual": True,
}


def saved_bytes(forward, held_already=()) -> int:
    """Bytes of the tensors autograd saves for the backward pass while `forward()` runs, each storage
    counted once (a view saves its base's storage; a tensor saved by two operations is held once),
    leaving out the storages of `held_already` (the models' own weights, counted as weights: a
    bf16 weight used as it is, or a float32 one outside autocast, is saved without a copy)."""
    from torch.multiprocessing.reductions import StorageWeakRef

    counted = {StorageWeakRef(t.untyped_storage()): 0 for t in held_already}
    held = {}

    def pack(tensor):
        storage = StorageWeakRef(tensor.untyped_storage())
        if storage not in counted:
            held[storage] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        forward()
    return sum(held.values())


def resident_bytes(*models) -> int:
    """Parameters and buffers, at the dtypes they are held in."""
    return sum(t.numel() * t.element_size() for m in models for t in [*m.parameters(), *m.buffers()])


def training_state_bytes(trainable: list, ema: bool) -> int:
    """float32 gradients and AdamW's two moments (and an EMA copy) per trainable parameter."""
    return sum(p.numel() for p in trainable) * 4 * (3 + ema)


def fake(build):
    """`build()`'s models made on the meta device (nothing allocated; peft's adapters and dtype casts
    work there as on a GPU), then every parameter and buffer turned into a fake CPU tensor of the same
    dtype, so that `loss(b)` runs under CPU autocast without computing anything. Returns the fake
    mode to run `loss` in, the models, their trainable parameters and `loss`."""
    from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode

    mode, cpu, made = FakeTensorMode(), torch.device("cpu"), {}
    with torch.device("meta"):
        models, loss = build()

    def faked(tensor, parameter: bool):
        if id(tensor) not in made:  # a tied weight is one tensor
            tensor_ = FakeTensor(mode, tensor.data, cpu)
            made[id(tensor)] = torch.nn.Parameter(tensor_, tensor.requires_grad) if parameter else tensor_
        return made[id(tensor)]

    for model in models:
        for module in model.modules():
            for name, tensor in module._parameters.items():
                if tensor is not None:
                    module._parameters[name] = faked(tensor, True)
            for name, tensor in module._buffers.items():
                if tensor is not None:
                    module._buffers[name] = faked(tensor, False)
    trainable = list({id(p): p for m in models for p in m.parameters() if p.requires_grad}.values())
    return mode, models, trainable, loss


def autocast():
    """bf16 autocast on the device tensors are made on: the CPU for the count (fake tensors), the GPU
    when `--measure` builds the models there."""
    return torch.autocast(torch.get_default_device().type, dtype=torch.bfloat16)


# ------------------------------------------------------------------ the loops, as they hold their models
# each builds the models the loop keeps on the device, the trained ones in train mode with gradients,
# and returns them with `loss(b)`: one forward pass of the loop's loss on a micro-batch of b


def _frozen(models: list) -> list:
    return [model.eval().requires_grad_(False) for model in models]


def _sdxl(text_towers: bool = False):
    """`ldm_finetune.finetune_unet` on SDXL base 1.0 (MediSyn): the U-Net trained in full in float32
    beside the VAE; the text towers are parked in host memory once the prompts are cached
    (`common.park`), and on the device only with `text_towers` (as the loop held them before)."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    unet = UNet2DConditionModel(**SDXL_UNET).train()
    frozen = [AutoencoderKL(**VAE)]
    if text_towers:
        frozen += [
            CLIPTextModel(CLIPTextConfig(**CLIP_L)),
            CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_BIGG)),
        ]

    def loss(b: int):
        with autocast():
            prediction = unet(
                torch.randn(b, 4, 64, 64),
                torch.randint(0, 1000, (b,)),
                encoder_hidden_states=torch.randn(b, 77, 2048),
                added_cond_kwargs={"text_embeds": torch.randn(b, 1280), "time_ids": torch.randn(b, 6)},
            ).sample
        return ((prediction.float() - torch.randn(b, 4, 64, 64)) ** 2).mean()

    return [unet, *_frozen(frozen)], loss


def _pixart(hldf_batch: int):
    """`dit_hldf.train_dit` on PixArt-XL-2-512x512 (Med-Art): the transformer trained in full in
    float32 with EMA beside the VAE (T5-XXL parked in host memory once the prompts are cached), and
    `hldf_batch` of each micro-batch's x_0 estimates decoded in float32 for the pixel term."""
    from diffusers import AutoencoderKL, PixArtTransformer2DModel

    from medsyn.training.dit_hldf import colour_distribution_distance

    transformer = PixArtTransformer2DModel(**PIXART_XL_512).train()
    vae = AutoencoderKL(**VAE)
    frozen = [vae]

    def loss(b: int):
        with autocast():
            prediction = transformer(
                torch.randn(b, 4, 64, 64),
                encoder_hidden_states=torch.randn(b, 120, 4096),
                encoder_attention_mask=torch.ones(b, 120),
                timestep=torch.randint(0, 1000, (b,)),
                added_cond_kwargs={"resolution": None, "aspect_ratio": None},
            ).sample
        latent = ((prediction[:, :4].float() - torch.randn(b, 4, 64, 64)) ** 2).mean()
        k = min(b, hldf_batch)
        decoded = vae.decode(prediction[:k, :4].float() / vae.config.scaling_factor).sample  # float32
        real = torch.rand(k, 3, 512, 512) * 2 - 1
        pixel = (decoded - real).abs().mean() + colour_distribution_distance(decoded, real).mean()
        return latent + pixel

    return [transformer, *_frozen(frozen)], loss


def _flux(rank: int, sequence: int):
    """`lora_large.finetune_flux` on FLUX.1-dev (MSDM's large baseline): LoRA adapters (float32) on
    the transformer's bf16 weights, beside the VAE (both text towers parked in host memory once the
    prompts are cached)."""
    from diffusers import AutoencoderKL, FluxTransformer2DModel

    from medsyn.training.common import add_lora
    from medsyn.training.lora_large import FLUX_LORA_TARGETS

    transformer = FluxTransformer2DModel(**FLUX_1_DEV).train()
    add_lora(transformer, rank, None, FLUX_LORA_TARGETS, torch.bfloat16)
    frozen = [AutoencoderKL(**FLUX_VAE)]
    tokens = 32 * 32  # 512² images: 64² latents packed into 2 x 2 patches

    def loss(b: int):
        with autocast():
            prediction = transformer(
                hidden_states=torch.randn(b, tokens, 64),
                timestep=torch.rand(b),
                guidance=torch.ones(b),
                pooled_projections=torch.randn(b, 768),
                encoder_hidden_states=torch.randn(b, sequence, 4096),
                txt_ids=torch.zeros(sequence, 3),
                img_ids=torch.zeros(tokens, 3),
            ).sample
        return ((prediction.float() - torch.randn(b, tokens, 64)) ** 2).mean()

    return [transformer, *_frozen(frozen)], loss


def _dolly(length: int, added_tokens: int):
    """`vq_ar.train_lm` from Dolly-v2-3b (arXiv 2403.06835 after LLM-CXR): the LM fully fine-tuned,
    its vocabulary grown by the image codes and special tokens, the loss on the codes."""
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM

    lm = GPTNeoXForCausalLM(GPTNeoXConfig(**DOLLY_V2_3B)).train()
    lm.resize_token_embeddings(DOLLY_V2_3B["vocab_size"] + added_tokens, mean_resizing=False)
    vocabulary = lm.config.vocab_size

    def loss(b: int):
        ids = torch.randint(0, vocabulary, (b, length))
        with autocast():
            return lm(input_ids=ids, labels=ids).loss

    return [lm], loss


def _compact_unet(side: int, channels: int, context: int, tokens: int):
    """`ldm_compact.train_unet` (MSDM's compact model from scratch): `UNET_CONFIG` on `side`² latents,
    conditioned on `tokens` text states of width `context`, with EMA."""
    from diffusers import UNet2DConditionModel

    from medsyn.training.ldm_compact import UNET_CONFIG

    unet = UNet2DConditionModel(
        sample_size=side, in_channels=channels, out_channels=channels, cross_attention_dim=context, **UNET_CONFIG
    ).train()

    def loss(b: int):
        with autocast():
            prediction = unet(
                torch.randn(b, channels, side, side),
                torch.randint(0, 1000, (b,)),
                encoder_hidden_states=torch.randn(b, tokens, context),
            ).sample
        return ((prediction.float() - torch.randn(b, channels, side, side)) ** 2).mean()

    return [unet], loss


def _autoencoder(kind: str, side: int, config: dict | None, codes: int, ssim_weight: float):
    """The autoencoders' loops at `side`² px, as they run in their last quarter (the discriminator on):
    `ldm_compact.train_vae` (kind 'vae', `make_vae`) or `vq_ar.train_vq` (kind 'vq', `make_vq`):
    reconstruction, 1 − SSIM and the generator's PatchGAN term under autocast; the discriminator
    trains on its own optimizer."""
    from medsyn.training.common import structural_dissimilarity
    from medsyn.training.ldm_compact import PatchDiscriminator, _Autoencode, make_vae
    from medsyn.training.vq_ar import _Tokenise, make_vq

    discriminator = PatchDiscriminator()
    if kind == "vae":
        vae = make_vae(side, config)
        model, down = _Autoencode(vae).train(), 2 ** (len(vae.config.block_out_channels) - 1)
    else:
        vq = make_vq(side, codes, config)
        vq.quantize.embedding.weight.requires_grad_(False)  # the codes move by EMA only
        model = _Tokenise(vq).train()

    def loss(b: int):
        x = torch.rand(b, 3, side, side) * 2 - 1
        with autocast():
            if kind == "vae":
                eps = torch.randn(b, vae.config.latent_channels, side // down, side // down)
                reconstruction, kl = model(x, eps)
                extra = 1e-6 * kl
            else:
                reconstruction, latents, quantized, _ = model(x)
                extra = 0.25 * ((latents.float() - quantized.float()) ** 2).mean()
            l1 = (reconstruction - x).abs().mean()
            generator = -discriminator(reconstruction).mean()
            return l1 + extra + ssim_weight * structural_dissimilarity(reconstruction, x) + 0.1 * generator

    return [model, discriminator], loss


def activation_bytes(mode, models: list, loss, b: int) -> int:
    """Saved-tensor bytes of one forward pass of `loss` on a micro-batch of b, the models' own
    parameters and buffers left out."""
    own = [t for model in models for t in [*model.parameters(), *model.buffers()]]
    with mode:
        return saved_bytes(lambda: loss(b), own)


def largest_micro_batch(fits, most: int = 4096) -> int:
    """The largest b ≤ `most` for which `fits(b)` (true up to some b, false after), 0 if none."""
    if not fits(1):
        return 0
    low, high = 1, 2
    while high <= most and fits(high):
        low, high = high, high * 2
    high = min(high, most + 1)
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (middle, high) if fits(middle) else (low, middle)
    return low


def measure(loop: dict, gib: float) -> dict:
    """One row: what `loop` holds at its micro-batch, and the largest micro-batch that fits in `gib`
    without gradient checkpointing."""
    mode, models, trainable, loss = fake(loop["build"])
    weights, state = resident_bytes(*models), training_state_bytes(trainable, loop["ema"])
    micro = loop["batch"] // loop["accumulation"]
    activations = activation_bytes(mode, models, loss, micro)
    return {
        "loop": loop["name"],
        "model": loop["model"],
        "batch": loop["batch"],
        "accumulation": loop["accumulation"],
        "micro_batch": micro,
        "checkpointing": loop["checkpointing"],
        "parameters_b": sum(p.numel() for m in models for p in m.parameters()) / 1e9,
        "trainable_b": sum(p.numel() for p in trainable) / 1e9,
        "weights_gib": weights / GIB,
        "training_state_gib": state / GIB,
        "activations_gib": activations / GIB,
        "need_gib": (weights + state + activations) / GIB,
        "largest_micro_batch": largest_micro_batch(
            lambda b: weights + state + activation_bytes(mode, models, loss, b) <= gib * GIB
        ),
    }


def _profile(name: str) -> dict:
    import yaml

    return yaml.safe_load((README.parent / "notebooks" / "profiles" / f"{name}.yaml").read_text())


def notebook_settings(profile: dict, notebook: str) -> dict:
    """A notebook's parameters under `profile`: its parameters cell (its own literals), then the
    profile's values for it."""
    import json

    cells = json.loads((README.parent / "notebooks" / f"{notebook}.ipynb").read_text())["cells"]
    source = next("".join(c["source"]) for c in cells if "parameters" in c.get("metadata", {}).get("tags", []))
    values = {}
    exec(source, {}, values)
    return {**values, **profile.get(notebook, {})}


def paper_loops(profile: dict) -> list[dict]:
    """The training loops of `profile` (`paper`) with its settings: batch, accumulation,
    checkpointing, EMA."""
    from medsyn.training.ldm_compact import VAE_CONFIG

    ldm, dit, vq = (notebook_settings(profile, n) for n in ("02_train_ldm", "03_train_dit_hldf", "04_train_vq_ar"))
    side = profile["common"]["size"]
    grid = 16 * 16  # LLM-CXR's codes per image (paper: a x32 tokenizer on 512 px images)
    length = vq["prompt_tokens"] + 1 + vq["clue_tokens"] + 1 + grid + 1
    vae = {**VAE_CONFIG, **(ldm["vae_config"] or {})}
    latent_side = side // 2 ** (len(vae["block_out_channels"]) - 1)
    if ldm["text_encoder"] != "minilm":
        raise ValueError("the count knows MiniLM's width (384, 32 tokens) only as ldm-compact's text encoder")
    return [
        {
            "name": "ldm-compact vae",
            "model": f"AutoencoderKL {vae['block_out_channels']}, {side}², discriminator on",
            "build": lambda: _autoencoder("vae", side, ldm["vae_config"], 0, ldm["vae_ssim_weight"]),
            "batch": ldm["vae_batch_size"],
            "accumulation": 1,
            "checkpointing": False,
            "ema": False,
        },
        {
            "name": "ldm-compact",
            "model": f"compact U-Net on {latent_side}² latents",
            "build": lambda: _compact_unet(latent_side, vae["latent_channels"], 384, 32),
            "batch": ldm["unet_batch_size"],
            "accumulation": ldm["gradient_accumulation_steps"],
            "checkpointing": False,
            "ema": bool(ldm["ema_decay"]),
        },
        {
            "name": "ldm-finetune",
            "model": "SDXL base 1.0 U-Net, full",
            "build": _sdxl,
            "batch": ldm["finetune_batch_size"],
            "accumulation": ldm["finetune_gradient_accumulation_steps"],
            "checkpointing": ldm["finetune_gradient_checkpointing"],
            "ema": bool(ldm["finetune_ema_decay"]),
        },
        {
            "name": "dit-hldf",
            "model": f"PixArt-XL-2-512x512, full, HLDF on {dit['hldf_batch']}",
            "build": lambda: _pixart(dit["hldf_batch"]),
            "batch": dit["batch_size"],
            "accumulation": dit["gradient_accumulation_steps"],
            "checkpointing": dit["gradient_checkpointing"],
            "ema": bool(dit["ema_decay"]),
        },
        {
            "name": "flux-lora",
            "model": f"FLUX.1-dev, LoRA rank {ldm['large_lora_rank']}",
            "build": lambda: _flux(ldm["large_lora_rank"], 512),
            "batch": ldm["large_lora_batch_size"],
            "accumulation": ldm["large_lora_gradient_accumulation_steps"],
            "checkpointing": ldm["large_lora_gradient_checkpointing"],
            "ema": False,
        },
        {
            "name": "vq-ar tokenizer",
            "model": f"VQModel {(vq['vq_config'] or {}).get('block_out_channels')}, {side}², discriminator on",
            "build": lambda: _autoencoder("vq", side, vq["vq_config"], vq["codes"], 0.2),
            "batch": vq["vq_batch_size"],
            "accumulation": 1,
            "checkpointing": False,
            "ema": False,
        },
        {
            "name": "vq-ar",
            "model": f"Dolly-v2-3b, full, {length} tokens",
            "build": lambda: _dolly(length, 4 + vq["codes"]),
            "batch": vq["lm_batch_size"],
            "accumulation": vq["lm_gradient_accumulation_steps"],
            "checkpointing": vq["lm_gradient_checkpointing"],
            "ema": False,
        },
    ]


# `finetune_unet` has parked its text towers in host memory after caching since this day; a GPU run
# measured before it held them on the device
TOWERS_PARKED_SINCE = "2026-12-06"


def calibration(gib: float) -> dict | None:
    """The count against a measurement: the SDXL training step that `train_step.py` measured on a GPU
    (`gpu.csv`: `finetune_unet` in bf16 with fused AdamW, batch 8), counted here as the loop held it
    on the day of that run (`TOWERS_PARKED_SINCE`); None when no GPU run has measured it."""
    import json

    path = RESULTS_DIR / "gpu.csv"
    if not path.exists():
        return None
    measured = pd.read_csv(path)
    measured = measured[
        (measured["benchmark"] == "training step")
        & measured["model"].str.startswith("SDXL")
        & (measured["variant"] == "medsyn: bf16 autocast, fused AdamW")
    ].dropna(subset=["peak_memory_gib"])
    if measured.empty:
        return None
    found = measured.iloc[0]
    created = json.loads(path.with_name(path.name + ".provenance.json").read_text())["created"]
    towers = created < TOWERS_PARKED_SINCE
    where = "on the device" if towers else "parked"
    loop = {"name": "calibration", "model": f"SDXL base 1.0 U-Net, full, text towers {where} (gpu.csv's step)"}
    loop["build"] = lambda: _sdxl(text_towers=towers)
    counted = measure(
        {**loop, "batch": int(found["batch"]), "accumulation": 1, "checkpointing": False, "ema": False}, gib
    )
    return {**counted, "measured_gib": float(found["peak_memory_gib"])}


def measured_peak(loop: dict, device: torch.device) -> float:
    """GiB the loop's models, training state and loss hold at its micro-batch on `device` (CUDA), with
    random weights built there: the peak of a second step (the first allocates AdamW's moments);
    `inf` when it runs out of memory."""
    import gc

    with torch.device(device):
        models, loss = loop["build"]()
    trainable = list({id(p): p for m in models for p in m.parameters() if p.requires_grad}.values())
    optimizer = torch.optim.AdamW(trainable, fused=True)
    ema = [p.detach().clone() for p in trainable] if loop["ema"] else []
    micro = loop["batch"] // loop["accumulation"]
    try:
        for step in range(2):
            if step:
                reset_peak_memory(device)
            with torch.device(device):
                loss(micro).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        return peak_memory_gib(device)  # NaN on the CPU, where no allocator counts
    except torch.OutOfMemoryError:
        return float("inf")
    finally:
        del models, loss, trainable, optimizer, ema
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def measure_on_gpu(out: Path) -> pd.DataFrame:
    """Every loop of `paper.yaml` run for two steps at its micro-batch on the GPU: what the count
    predicts, measured (`inf`: out of memory). Written to `out` with its provenance after each loop."""
    from medsyn.records import save_table

    device, rows = torch.device("cuda"), []
    for loop in paper_loops(_profile("paper")):
        rows.append(
            {"loop": loop["name"], "micro_batch": loop["batch"] // loop["accumulation"]}
            | {"measured_gib": measured_peak(loop, device)}
        )
        print(
            f"{loop['name']}: {rows[-1]['measured_gib']:.1f} GiB at micro-batch {rows[-1]['micro_batch']}", flush=True
        )
        table = pd.DataFrame(rows).set_index("loop")
        save_table(  # after every loop: a run stopped by its time limit keeps what it measured
            table,
            out,
            {"device": torch.cuda.get_device_name(device), "torch": torch.__version__, "cuda": torch.version.cuda},
            [README.parent / "notebooks" / "profiles" / "paper.yaml"],
        )
    return table


def with_measured(table: pd.DataFrame, measured_path: Path) -> pd.DataFrame:
    """The count with each loop's measured peak from a GPU run (`--measure`), where it measured the
    same micro-batch; the calibration row keeps gpu.csv's."""
    if not measured_path.exists():
        return table
    measured = pd.read_csv(measured_path, index_col="loop")
    same = measured.index.intersection(table.index)
    same = same[measured.loc[same, "micro_batch"].to_numpy() == table.loc[same, "micro_batch"].to_numpy()]
    if "measured_gib" not in table:
        table["measured_gib"] = float("nan")
    table.loc[same, "measured_gib"] = measured.loc[same, "measured_gib"]
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gib", type=float, default=78.0, help="device memory (default: an H100's usable 78 GiB)")
    parser.add_argument("--out", type=Path, default=None, help="results CSV (default: in benchmarks/results/)")
    parser.add_argument("--readme", action="store_true", help="rewrite the README's table from the results")
    parser.add_argument("--measure", action="store_true", help="on a GPU: run each loop two steps and measure it")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()  # "should be kept in float32: []" of every bf16 cast
    measured_path = RESULTS_DIR / "training_memory_gpu.csv"
    if args.measure:
        if not torch.cuda.is_available():
            parser.error("--measure runs the loops on a CUDA device; without one, count (no --measure)")
        measure_on_gpu(args.out or measured_path)
        return
    args.out = args.out or RESULTS_DIR / "training_memory.csv"
    rows = []
    for loop in [*paper_loops(_profile("paper")), None]:
        rows.append(measure(loop, args.gib) if loop else calibration(args.gib))
        if rows[-1] is None:
            rows.pop()
            continue
        print(
            f"{rows[-1]['loop']}: {rows[-1]['need_gib']:.1f} GiB at micro-batch {rows[-1]['micro_batch']}", flush=True
        )
    table = with_measured(pd.DataFrame(rows).set_index("loop"), measured_path)
    table["fits"] = table["need_gib"] <= args.gib
    if "measured_gib" in table:
        table["measured_over_counted"] = table["measured_gib"] / table["need_gib"]
    with pd.option_context("display.width", 200, "display.max_columns", None):
        print(table.to_string(float_format=lambda v: f"{v:.3g}"))
    from medsyn.records import save_table

    save_table(
        table,
        args.out,
        {"device_gib": args.gib, "profile": "paper", "torch": torch.__version__, "counted_on": "fake tensors"},
        [
            p
            for p in (README.parent / "notebooks" / "profiles" / "paper.yaml", RESULTS_DIR / "gpu.csv", measured_path)
            if p.exists()
        ],
    )
    if args.readme:
        from medsyn.readme import write_readme_tables

        write_readme_tables(README, README.parent, only=str(args.out.resolve().relative_to(README.parent)))


if __name__ == "__main__":
    main()
