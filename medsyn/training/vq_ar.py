"""vq-ar: train the VQGAN tokenizer (`train_vq`) and the causal language model over its codes
(`train_lm`), as arXiv 2403.06835 / LLM-CXR describe them, with the whole route trainable here.

The tokenizer is a diffusers `VQModel` trained with an L1 + structural-similarity reconstruction
loss, the PatchGAN hinge term with the adaptive weight the VAE already uses, and a quantiser that
does not collapse: an EMA codebook (no gradient reaches the codes) initialised by k-means on the
first batch's latents, with dead codes restarted from random latents and β on the commitment term
(diffusers' legacy quantiser applies it to the codebook term). The saved model opens with
`VQModel.from_pretrained`; its own nearest-neighbour quantiser maps a latent to the same code.

The language model is a transformers causal LM (GPT-2 configuration from random weights by default;
a pretrained one from a local directory with `pretrained_lm_dir`), the loss on the image codes and
`<eoi>` only, the prompt and clue slots dropped for classifier-free guidance.
"""

from contextlib import nullcontext
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsyn.data.captions import source_vocabulary, vocabulary_phrases
from medsyn.data.dataset import split_records
from medsyn.models.text_encoders import require_dir
from medsyn.models.vq_ar import (
    BOI,
    EOI,
    PAD,
    VQARPipeline,
    build_text_tokenizer,
    lm_tokenizer,
    named_terms,
    nearest_codes,
)
from medsyn.training.common import (
    adamw,
    adversarial_term,
    batch_indices,
    cache_images,
    class_chances,
    discriminator_step,
    drawn_indices,
    make_accelerator,
    make_lr_schedule,
    micro_batch_size,
    optimizer_step,
    progress_bar,
    resume_step,
    save_checkpoint,
    spectral_distance,
    step_generator,
    structural_dissimilarity,
    to_model_range,
    training_recipe,
)
from medsyn.training.ldm_compact import PatchDiscriminator

# x4 down-sampling (a 16 x 16 grid at 64 px), as LLM-CXR's 16 x 16 grid at 256 px is x16
VQ_CONFIG = {
    "block_out_channels": [32, 64, 64],
    "layers_per_block": 1,
    "latent_channels": 16,
    "norm_num_groups": 8,
    "mid_block_add_attention": False,
}
# no attention dropout: with it, torch's CPU attention leaves its fused kernel for the plain one and a
# training step of this LM is 1.8-1.9x slower (32 sequences of 315 tokens, 2 cores; benchmarks/lm_step.py).
# GPT-2's tanh GELU as torch's one op (the same function as GPT-2's "gelu_new", written as five
# element-wise ops): on 2 cores no gain beyond noise (1.03x), kept as the LM the steps were chosen
# with. The residual and embedding dropout stay: without them the LM's alignment fell from 0.784 to
# 0.716 (the data of run 22, 600 steps, 12 a class, CFG 4.5)
LM_CONFIG = {"n_embd": 128, "n_layer": 4, "n_head": 4, "attn_pdrop": 0.0, "activation_function": "gelu_pytorch_tanh"}


class EMACodebook(nn.Module):
    """The EMA state of a codebook (van den Oord et al. 2017, appendix; Razavi et al. 2019): per code
    an exponential moving count and sum of the latents assigned to it. Registered for checkpointing,
    so a resumed run continues exactly."""

    def __init__(self, codes: int, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros(codes))
        self.register_buffer("total", torch.zeros(codes, dim))
        self.register_buffer("initialised", torch.zeros((), dtype=torch.bool))

    @torch.no_grad()
    def initialise(self, codebook: torch.Tensor, latents: torch.Tensor, seed: int) -> None:
        """k-means (scikit-learn, one run, seeded) of the first batch's latents as the first codes."""
        from sklearn.cluster import KMeans

        codes = codebook.shape[0]
        points = latents.double().cpu().numpy()
        if len(points) < codes:
            raise ValueError(f"k-means needs at least {codes} latents, the first batch has {len(points)}")
        centres = KMeans(n_clusters=codes, n_init=1, random_state=seed).fit(points).cluster_centers_
        codebook.copy_(torch.from_numpy(centres).to(codebook))
        self.count.fill_(1.0)
        self.total.copy_(codebook)
        self.initialised.fill_(True)

    @torch.no_grad()
    def update(
        self, codebook: torch.Tensor, latents: torch.Tensor, codes: torch.Tensor, decay: float, generator
    ) -> int:
        """Move each code towards the mean of its latents; restart a code whose moving count fell
        below 1 % of an even share from a random latent of this batch. Returns how many restarted."""
        onehot = torch.nn.functional.one_hot(codes, codebook.shape[0]).to(latents.dtype)
        self.count.mul_(decay).add_(onehot.sum(0), alpha=1 - decay)
        self.total.mul_(decay).add_(onehot.T @ latents, alpha=1 - decay)
        n = self.count.sum()
        smoothed = (self.count + 1e-5) / (n + codebook.shape[0] * 1e-5) * n  # Laplace smoothing
        codebook.copy_(self.total / smoothed[:, None])
        dead = torch.nonzero(self.count < 0.01 * n / codebook.shape[0]).flatten()
        if len(dead):
            pick = torch.randint(len(latents), (len(dead),), generator=generator)
            codebook[dead] = latents[pick]
            self.count[dead] = 1.0
            self.total[dead] = latents[pick]
        return len(dead)


def make_vq(image_size: int, codes: int, config: dict | None = None):
    from diffusers import VQModel

    cfg = {**VQ_CONFIG, **(config or {})}
    levels = len(cfg["block_out_channels"])
    return VQModel(
        in_channels=3,
        out_channels=3,
        sample_size=image_size,
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        num_vq_embeddings=codes,
        vq_embed_dim=cfg["latent_channels"],
        **cfg,
    )


@torch.no_grad()
def vq_from_autoencoder(vae, codes: int):
    """A `VQModel` that starts as a trained `AutoencoderKL`: before quantisation, its latents are the
    autoencoder's posterior means and its decoder is the autoencoder's decoder (tested).

    The encoder's last 3 x 3 convolution and the 1 x 1 `quant_conv` after it are folded into one
    3 x 3 convolution onto the means (the log-variance rows are dropped), so the code dimension is
    the autoencoder's latent channels; `quant_conv` is then the identity. Everything else is copied.
    The codebook is left for `EMACodebook.initialise` (k-means of the first batch's latents)."""
    cfg = vae.config
    channels = cfg.latent_channels
    shape = ("block_out_channels", "layers_per_block", "latent_channels", "norm_num_groups", "mid_block_add_attention")
    vq = make_vq(cfg.sample_size, codes, {key: cfg[key] for key in shape})  # a block the VAE has not: load fails
    state = {k: v for k, v in vae.state_dict().items() if k.startswith(("encoder.", "decoder.", "post_quant_conv."))}
    mean_rows = vae.quant_conv.weight[:channels, :, 0, 0]  # (L, 2L): the 1 x 1 convolution onto the means
    state["encoder.conv_out.weight"] = torch.einsum("lc,cikw->likw", mean_rows, vae.encoder.conv_out.weight)
    state["encoder.conv_out.bias"] = mean_rows @ vae.encoder.conv_out.bias + vae.quant_conv.bias[:channels]
    state["quant_conv.weight"] = torch.eye(channels)[:, :, None, None]
    state["quant_conv.bias"] = torch.zeros(channels)
    state["quantize.embedding.weight"] = vq.quantize.embedding.weight
    vq.load_state_dict(state)
    return vq


class _Tokenise(nn.Module):
    """Encode, quantise with the straight-through estimator, decode: one forward, so a distributed
    wrapper synchronises every gradient of the step. Returns the reconstruction, the latents (flat)
    and their codes."""

    def __init__(self, vq):
        super().__init__()
        self.vq = vq

    def forward(self, x: torch.Tensor):
        latents = self.vq.encode(x).latents
        codebook = self.vq.quantize.embedding.weight
        codes = nearest_codes(latents.detach(), codebook)
        quantized = codebook[codes].permute(0, 3, 1, 2)
        straight = latents + (quantized - latents).detach()
        reconstruction = self.vq.decode(straight, force_not_quantize=True).sample
        return reconstruction, latents, quantized.detach(), codes


def train_vq(
    dataset_dir: str | Path,
    out_dir: str | Path,
    steps: int = 1000,
    batch_size: int = 16,
    lr: float = 1e-3,
    codes: int = 256,
    beta: float = 0.25,
    codebook_decay: float = 0.99,
    ssim_weight: float = 0.2,
    spectral_weight: float = 0.0,
    adversarial_weight: float = 0.1,
    adversarial_start: int | None = None,
    config: dict | None = None,
    init_from: str | Path | None = None,
    seed: int = 0,
    checkpoint_every: int = 200,
    resume: bool = True,
    mixed_precision: str = "no",
    progress: bool = True,
) -> dict:
    """Train the VQGAN tokenizer on the training split and save it to `<out_dir>/vqvae`.

    Args:
        dataset_dir: curated dataset (one image size).
        out_dir: checkpoints, the image cache and `vqvae/`.
        steps, batch_size, lr: AdamW steps, images per step (over all processes), learning rate.
        codes: codebook size (LLM-CXR: 1,024).
        beta: weight of the commitment term ‖z − sg(e)‖² (the encoder is pulled to its code).
        codebook_decay: EMA decay of the codebook.
        ssim_weight: weight of 1 − SSIM (pytorch-msssim) beside L1: structure without a downloaded LPIPS.
        spectral_weight: weight of the amplitude-spectrum distance (`spectral_distance`), the VAE's
            frequency-aware term; 0: none.
        adversarial_weight, adversarial_start: the PatchGAN hinge term (adaptive weight) and its first
            step (default: three quarters of `steps`); 0 turns it off.
        config: VQModel overrides of `VQ_CONFIG`.
        init_from: a trained `AutoencoderKL` directory (02's VAE) whose encoder and decoder start the
            tokenizer (`vq_from_autoencoder`): only the quantiser is new, so far fewer steps reach a
            given reconstruction. `config` must then be None: the autoencoder's shape is used.
        seed: seed of initialisation, k-means, batch order and code restarts.
        checkpoint_every, resume, mixed_precision, progress: as the other loops.

    Returns:
        {'vq_dir', 'l1_history', 'restarts'} and on the validation split: 'codes_in_use' (share of the
        codebook), 'perplexity' (of the code distribution), 'psnr' (dB) and 'reconstructions' (uint8
        N x H x W x 3, for the classifier ceiling and the figure) with 'originals'.
    """
    recipe = training_recipe(locals())
    from accelerate.utils import set_seed

    out_dir = Path(out_dir)
    accelerator = make_accelerator(mixed_precision=mixed_precision)
    set_seed(seed)
    records = split_records(dataset_dir, "train")
    with accelerator.main_process_first():
        images = cache_images(dataset_dir, records, out_dir / "cache" / "train_images.npy")
    if init_from is None:
        vq = make_vq(images.shape[-1], codes, config)
    elif config is not None:
        raise ValueError("train_vq: give either config (a new tokenizer) or init_from (an autoencoder's shape)")
    else:
        from diffusers import AutoencoderKL

        vae = AutoencoderKL.from_pretrained(require_dir(init_from), local_files_only=True)
        if vae.config.sample_size != images.shape[-1]:
            raise ValueError(
                f"{init_from} was trained at {vae.config.sample_size} px, the images are {images.shape[-1]}"
            )
        vq = vq_from_autoencoder(vae, codes)
    ema = EMACodebook(codes, vq.config.vq_embed_dim)
    tokenise = _Tokenise(vq)
    discriminator = PatchDiscriminator()
    trained = [p for name, p in tokenise.named_parameters() if not name.endswith("quantize.embedding.weight")]
    vq.quantize.embedding.weight.requires_grad_(False)  # the codes move by EMA only
    optimizer = adamw(trained, lr=lr)
    d_optimizer = adamw(discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
    tokenise, discriminator, optimizer, d_optimizer = accelerator.prepare(
        tokenise, discriminator, optimizer, d_optimizer
    )
    accelerator.register_for_checkpointing(ema)
    ema.to(accelerator.device)
    start = resume_step(accelerator, out_dir / "checkpoints", resume, recipe)
    adversarial_start = 3 * steps // 4 if adversarial_start is None else adversarial_start
    rank, world = accelerator.process_index, accelerator.num_processes
    codebook = accelerator.unwrap_model(tokenise).vq.quantize.embedding.weight

    history, restarts = [], 0
    bar = progress_bar(steps, start, "vq", progress and accelerator.is_local_main_process)
    for step in range(start, steps):
        index = batch_indices(len(images), batch_size, seed, step)
        if not ema.initialised:  # every process clusters the same global batch, so all start alike
            with torch.no_grad():
                first = accelerator.unwrap_model(tokenise).vq.encode(to_model_range(images[index]).to(codebook.device))
            ema.initialise(codebook, first.latents.permute(0, 2, 3, 1).reshape(-1, codebook.shape[1]), seed)
        x = to_model_range(images[index[rank::world]]).to(accelerator.device)
        with accelerator.autocast():
            reconstruction, latents, quantized, assigned = tokenise(x)
            l1 = (reconstruction - x).abs().mean()
            structure = structural_dissimilarity(reconstruction, x)
            commitment = beta * ((latents.float() - quantized.float()) ** 2).mean()
            loss = l1 + ssim_weight * structure + commitment
            if spectral_weight:
                loss = loss + spectral_weight * spectral_distance(reconstruction, x)
            adversarial = adversarial_weight > 0 and step >= adversarial_start
            if adversarial:
                last = accelerator.unwrap_model(tokenise).vq.decoder.conv_out.weight
                loss = loss + adversarial_term(l1, discriminator(reconstruction), last, adversarial_weight)
        optimizer.zero_grad(set_to_none=True)
        accelerator.backward(loss)
        optimizer.step()
        if adversarial:
            discriminator_step(accelerator, discriminator, d_optimizer, x, reconstruction)
        # the codebook's EMA step on the whole global batch's latents and codes
        flat = accelerator.gather(latents.detach().float().permute(0, 2, 3, 1).reshape(-1, codebook.shape[1]))
        restarts += ema.update(
            codebook, flat, accelerator.gather(assigned.reshape(-1)), codebook_decay, step_generator(seed, step, 1)
        )
        history.append(l1.item())
        bar.update(1)
        bar.set_postfix(l1=f"{l1.item():.4f}", ssim=f"{1 - structure.item():.3f}", restarts=restarts)
        done = step + 1
        if checkpoint_every and (done % checkpoint_every == 0 or done == steps):
            save_checkpoint(accelerator, out_dir / "checkpoints", done, {"l1": l1.item(), "recipe": recipe})
    bar.close()

    vq = accelerator.unwrap_model(tokenise).vq.eval()
    if accelerator.is_main_process:
        vq.save_pretrained(out_dir / "vqvae")
    return {
        "vq_dir": out_dir / "vqvae",
        "l1_history": history,
        "restarts": restarts,
        **_validate(vq, dataset_dir, out_dir),
    }


@torch.no_grad()
def _validate(vq, dataset_dir, out_dir: Path) -> dict:
    """Codes in use, perplexity and PSNR of the tokenizer on the validation split."""
    held_out = split_records(dataset_dir, "validation")
    val = cache_images(dataset_dir, held_out, out_dir / "cache" / "validation_images.npy")
    codebook = vq.quantize.embedding.weight
    found, pictures = [], []
    for i in range(0, len(val), 64):
        latents = vq.encode(to_model_range(val[i : i + 64])).latents
        codes = nearest_codes(latents, codebook)
        found.append(codes.flatten())
        quantized = codebook[codes].permute(0, 3, 1, 2)
        pictures.append(((vq.decode(quantized, force_not_quantize=True).sample + 1) * 127.5).round().clamp(0, 255))
    used = torch.bincount(torch.cat(found), minlength=codebook.shape[0]).double()
    share = used / used.sum()
    reconstructions = torch.cat(pictures).to(torch.uint8).permute(0, 2, 3, 1).numpy()
    originals = np.asarray(val).transpose(0, 2, 3, 1)
    mse = ((reconstructions.astype(np.float64) - originals) ** 2).mean()
    return {
        "codes_in_use": float((used > 0).double().mean()),
        "perplexity": float(torch.exp(-(share[share > 0] * share[share > 0].log()).sum())),
        "psnr": float(10 * np.log10(255**2 / mse)),
        "reconstructions": reconstructions,
        "originals": originals,
    }


# ---------------------------------------------------------------- the language model over codes


def clue_bank(
    codes: np.ndarray,
    records: list[dict],
    per_term: int = 8,
    prompts: list[str] | None = None,
    terms: list[str] | None = None,
) -> dict[str, list[int]]:
    """The visual codebook of arXiv 2403.06835, from the training split only: for each term, the codes
    most typical of the images that carry it (the largest ratio of their frequency in those images to
    their frequency in all images, among codes seen at least twice in them and more often than in all).

    Args:
        codes: N x H x W code ids of the training images, in `records` order.
        records: the training records.
        per_term: clues kept per term.
        prompts, terms: with both, the terms are vocabulary terms (anatomy, pathology, normal) and an
            image carries those its prompt names (`named_terms`: the co-occurrence of words and
            codes), as retrieval finds them in a prompt; without, the terms are the label terms.
    """
    if any(r["split"] != "train" for r in records):
        raise ValueError("the clue bank is built from training images only")
    if terms is None:
        carried = [set(r["labels"]) for r in records]
        terms = sorted({label for r in records for label in r["labels"]})
    else:
        carried = [set(named_terms(prompt, terms)) for prompt in prompts]
    k = int(codes.max()) + 1
    overall = np.bincount(codes.reshape(-1), minlength=k) / codes.size
    bank = {}
    for term in terms:
        carriers = [i for i, named in enumerate(carried) if term in named]
        if not carriers:
            continue
        mine = codes[carriers].reshape(-1)
        counts = np.bincount(mine, minlength=k)
        ratio = np.where(counts >= 2, counts / len(mine) / np.maximum(overall, 1e-12), 0)
        clues = [int(c) for c in np.argsort(-ratio, kind="stable")[:per_term] if ratio[c] > 1]
        if clues:  # a term that every image carries has no typical code
            bank[term] = clues
    return bank


def bank_of(codes: np.ndarray, records: list[dict], prompts: list[str], prompt_field: str, per_term: int) -> dict:
    """`clue_bank` over label terms for captions; for reports, over the vocabulary terms (and labels)
    of the records' sources that the training reports name."""
    if prompt_field == "text":
        return clue_bank(codes, records, per_term)
    terms = {label for r in records for label in r["labels"]}
    for source in sorted({r["source"] for r in records}):
        vocabulary = source_vocabulary(source)
        terms |= set(vocabulary_phrases(vocabulary)) if vocabulary else set()
    return clue_bank(codes, records, per_term, prompts=prompts, terms=sorted(terms))


def make_lm(vocab_size: int, positions: int, special: dict, config: dict | None = None):
    """A GPT-2 from random weights; `special`: its bos, eos and pad token ids."""
    from transformers import GPT2Config, GPT2LMHeadModel

    settings = {**LM_CONFIG, **(config or {})}
    return GPT2LMHeadModel(GPT2Config(vocab_size=vocab_size, n_positions=positions, **special, **settings))


def train_lm(
    dataset_dir: str | Path,
    vq_dir: str | Path,
    out_dir: str | Path,
    pretrained_lm_dir: str | Path | None = None,
    config: dict | None = None,
    prompt_tokens: int = 16,
    clue_tokens: int = 8,
    prompt_field: str = "text",
    steps: int = 2000,
    batch_size: int = 32,
    gradient_accumulation_steps: int = 1,
    lr: float = 1e-3,
    lr_warmup_steps: int = 100,
    lr_schedule: str = "constant",
    caption_dropout: float = 0.1,
    clue_dropout: float = 0.0,
    balance: str = "none",
    max_grad_norm: float = 1.0,
    mixed_precision: str = "no",
    gradient_checkpointing: bool = False,
    checkpoint_every: int = 500,
    seed: int = 0,
    resume: bool = True,
    progress: bool = True,
) -> dict:
    """Train the causal LM over `[prompt][clues]<boi>[codes]<eoi>` and save the pipeline.

    Args:
        dataset_dir: curated dataset; the training split is used.
        vq_dir: the tokenizer of `train_vq` (frozen).
        out_dir: checkpoints, the code cache and `pipeline/`.
        pretrained_lm_dir: a local causal LM with its tokenizer, to fine-tune fully: its own
            tokenizer with the sequence's special tokens (`lm_tokenizer`), its embeddings and head
            resized to that vocabulary plus the codes, all trained; None: a GPT-2 from `LM_CONFIG` over
            a word tokenizer of the training prompts.
        config: GPT-2 overrides of `LM_CONFIG`.
        prompt_tokens, clue_tokens: the fixed lengths of the prompt and clue slots.
        prompt_field: the record field the prompt is: 'text' (the caption) or 'report' (the
            anatomy-pathology report of curation, arXiv 2403.06835's prompting). With reports, the clue
            bank's terms are the vocabularies' anatomy, pathology and normal terms that the training
            reports name; else the label terms. Sampling (`medsyn.sampling`) prompts with the same
            field (`VQARPipeline.prompt_field`).
        steps, batch_size, lr, lr_warmup_steps: AdamW steps, sequences per step, peak LR and its warm-up.
        gradient_accumulation_steps: micro-batches per step. A step's sequences are drawn as without
            it and split into that many micro-batches; every sequence has as many target tokens, so
            the step's gradient is the same.
        gradient_checkpointing: recompute the LM's layers in the backward pass instead of keeping
            their activations (a 3 B LM's at `paper`'s batch do not fit one GPU otherwise:
            `benchmarks/training_memory.py`).
        lr_schedule: after the warm-up, 'constant' or 'cosine' (to 0 at `steps`; `common.make_lr_schedule`).
        caption_dropout: share of sequences whose prompt and clues are replaced by padding.
        clue_dropout: share of the other sequences whose clues alone are left out (`<clue>` then
            padding), so that the model also samples without clues (the clue ablation of `04`).
        balance: 'none' (every image once per epoch) or 'class' (every class equally often,
            `medsyn.training.common.class_chances`), as the diffusion loops.
        max_grad_norm, mixed_precision, checkpoint_every, seed, resume, progress: as the other loops.

    Returns:
        {'pipeline_dir', 'loss_history'}.
    """
    recipe = training_recipe(locals())
    from accelerate.utils import set_seed
    from diffusers import VQModel

    out_dir = Path(out_dir)
    accelerator = make_accelerator(mixed_precision=mixed_precision)
    # GPT-2's dropout draws from the global generator: each process its own masks (the main process as alone)
    set_seed(seed, device_specific=True)
    records = split_records(dataset_dir, "train")
    micro_batch_size(batch_size, gradient_accumulation_steps, accelerator.num_processes)  # or ValueError
    if prompt_field not in ("text", "report"):
        raise ValueError(f"prompt_field must be 'text' or 'report', got {prompt_field!r}")
    missing = sorted({r["source"] for r in records if prompt_field not in r})
    if missing:
        raise ValueError(f"prompt_field {prompt_field!r}: the records of {missing} have none (curate them again)")
    prompts = [r[prompt_field] for r in records]
    chances = class_chances(records, balance)
    class_field = {"text": "class_text", "report": "class_report"}[prompt_field]
    vq = VQModel.from_pretrained(vq_dir, local_files_only=True).eval().requires_grad_(False)
    if pretrained_lm_dir:  # the LM's own words, so that its embeddings keep their meaning
        tokenizer = lm_tokenizer(require_dir(pretrained_lm_dir, ("config.json", "tokenizer_config.json")))
    else:
        tokenizer = build_text_tokenizer(prompts + [r.get(class_field, r[prompt_field]) for r in records])
    with accelerator.main_process_first():  # the main process writes the cache, the others then read it
        images = cache_images(dataset_dir, records, out_dir / "cache" / "train_images.npy")
    with torch.no_grad():
        all_codes = torch.cat(
            [
                nearest_codes(vq.encode(to_model_range(images[i : i + 64])).latents, vq.quantize.embedding.weight)
                for i in range(0, len(images), 64)
            ]
        )
    codes = vq.config.num_vq_embeddings
    grid = list(all_codes.shape[1:])
    pipeline_config = {
        "grid": grid,
        "codes": codes,
        "prompt_tokens": prompt_tokens,
        "clue_tokens": clue_tokens,
        "clue_bank": bank_of(all_codes.numpy(), records, prompts, prompt_field, clue_tokens) if clue_tokens else {},
        "prompt_field": prompt_field,
    }
    length = prompt_tokens + 1 + clue_tokens + 1 + grid[0] * grid[1] + 1
    if pretrained_lm_dir:
        from transformers import AutoModelForCausalLM

        lm = AutoModelForCausalLM.from_pretrained(pretrained_lm_dir, local_files_only=True)
        lm.resize_token_embeddings(len(tokenizer) + codes)
    else:
        boi, eoi, pad = tokenizer.convert_tokens_to_ids([BOI, EOI, PAD])
        lm = make_lm(
            len(tokenizer) + codes, length, {"bos_token_id": boi, "eos_token_id": eoi, "pad_token_id": pad}, config
        )
    layout = VQARPipeline(vq, lm, tokenizer, pipeline_config)
    sequences = layout.sequences(prompts, all_codes)
    clueless = layout.sequences(prompts, all_codes, clues=False) if clue_dropout else sequences
    unconditional = layout.context([None]).expand(1, -1)
    labels = sequences.clone()
    labels[:, : unconditional.shape[1]] = -100  # the loss on the image codes and <eoi> only

    lm.train()
    if gradient_checkpointing:
        # transformers 5 names it activation checkpointing; earlier releases only gradient checkpointing
        (getattr(lm, "activation_checkpointing_enable", None) or lm.gradient_checkpointing_enable)()
    optimizer = adamw(list(lm.parameters()), lr=lr, weight_decay=1e-2)
    lr_scheduler = make_lr_schedule(optimizer, lr_schedule, lr_warmup_steps, steps)
    lm, optimizer, lr_scheduler = accelerator.prepare(lm, optimizer, lr_scheduler)
    start = resume_step(accelerator, out_dir / "checkpoints", resume, recipe)
    rank, world = accelerator.process_index, accelerator.num_processes
    trainable = list(lm.parameters())
    ema = None  # no EMA of the LM's weights

    history = []
    bar = progress_bar(steps, start, "lm", progress and accelerator.is_local_main_process)
    for step in range(start, steps):
        index = drawn_indices(len(records), batch_size, seed, step, chances)
        draws = torch.rand(2, batch_size, generator=step_generator(seed, step))  # the first row as before
        dropped, without_clues = draws[0] < caption_dropout, draws[1] < clue_dropout
        batch = torch.where(without_clues[:, None], clueless[index], sequences[index])
        batch[dropped, : unconditional.shape[1]] = unconditional
        mine = torch.arange(rank, batch_size, world)  # this process's share, in micro-batches
        for micro, rows in enumerate(mine.chunk(gradient_accumulation_steps)):
            sync = micro == gradient_accumulation_steps - 1
            with accelerator.autocast(), nullcontext() if sync else accelerator.no_sync(lm):
                loss = (
                    lm(
                        input_ids=batch[rows].to(accelerator.device),
                        labels=labels[index][rows].to(accelerator.device),
                    ).loss
                    / gradient_accumulation_steps
                )
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
    bar.close()

    pipeline_dir = out_dir / "pipeline"
    if accelerator.is_main_process:
        VQARPipeline(vq, accelerator.unwrap_model(lm).eval(), tokenizer, pipeline_config).save_pretrained(pipeline_dir)
    accelerator.wait_for_everyone()
    return {"pipeline_dir": pipeline_dir, "loss_history": history, "codes_per_image": grid[0] * grid[1]}
