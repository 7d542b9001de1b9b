"""Figures of the training notebooks: loss curves and reconstructions."""

import textwrap
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import torch

from medsyn.data.dataset import load_images
from medsyn.training.common import to_model_range


def plot_loss(history: list[float] | dict[str, list[float]], title: str, smooth: int = 50):
    """Per-step loss (light) and its running mean over `smooth` steps; a dict gives one panel per curve."""
    curves = history if isinstance(history, dict) else {"loss": history}
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 3), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        steps = np.arange(1, len(values) + 1)
        ax.plot(steps, values, color="#4C72B0", alpha=0.3, lw=0.8)
        if len(values) >= smooth:
            ax.plot(steps[smooth - 1 :], np.convolve(values, np.ones(smooth) / smooth, mode="valid"), color="#4C72B0")
        if min(values, default=0) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def round_trip(vae, images: np.ndarray, batch_size: int = 64) -> np.ndarray:
    """uint8 N x H x W x 3 images through an AutoencoderKL (encode to the posterior mean, decode),
    back as uint8."""
    out = []
    for start in range(0, len(images), batch_size):
        x = to_model_range(images[start : start + batch_size].transpose(0, 3, 1, 2))
        y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
        out.append(np.rint((y.permute(0, 2, 3, 1).numpy() + 1) * 127.5).astype(np.uint8))
    return np.concatenate(out)


def plot_reconstructions(vae_dir: str | Path, dataset_dir: str | Path, records: list[dict], n: int = 8):
    """Real images (top) and their VAE reconstructions from the posterior mean (bottom)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    picked = records[:: max(1, len(records) // n)][:n]
    originals = load_images(dataset_dir, picked)
    return plot_image_pairs(originals, round_trip(vae, originals), "the autoencoder's round trip", n=len(picked))


def plot_pretraining(
    corpus_dir: str | Path,
    pipeline_dir: str | Path,
    n: int = 8,
    seed: int = 0,
    steps: int = 20,
    guidance_scale: float = 4.0,
):
    """What ldm-finetune's pretraining taught: generic corpus images (top) and the pretrained model's
    images for the same captions (bottom), `n` evenly spread over the corpus."""
    from medsyn.data.dataset import read_records
    from medsyn.sampling import generate, load_pipeline

    records = read_records(corpus_dir, "train")
    picked = records[:: max(1, len(records) // n)][:n]
    pipeline = load_pipeline(pipeline_dir)
    pipeline.set_progress_bar_config(disable=True)
    prompts = [r["text"] for r in picked]
    drawn = generate(pipeline, prompts, 1, seed, steps=steps, guidance_scale=guidance_scale)
    fig, axes = plt.subplots(2, len(picked), figsize=(1.5 * len(picked), 3.9), squeeze=False)
    for column, (image, sample) in enumerate(zip(load_images(corpus_dir, picked), drawn)):
        for row, pixels in enumerate((image, sample["image"])):
            axes[row, column].imshow(pixels)
            axes[row, column].set_xticks([])
            axes[row, column].set_yticks([])
        axes[0, column].set_title(textwrap.fill(prompts[column].removeprefix("a "), 22), fontsize=6)
    axes[0, 0].set_ylabel("corpus", fontsize=8)
    axes[1, 0].set_ylabel("pretrained", fontsize=8)
    fig.suptitle("ldm-finetune's starting point: a U-Net pretrained on the generic corpus", fontsize=9)
    fig.tight_layout()
    return fig


def plot_image_pairs(originals: np.ndarray, reconstructions: np.ndarray, title: str, n: int = 8):
    """Real images (top) and what a tokenizer or autoencoder gives back (bottom), `n` evenly spread;
    uint8 N x H x W x 3 each."""
    picked = np.arange(0, len(originals), max(1, len(originals) // n))[:n]
    fig, axes = plt.subplots(2, len(picked), figsize=(1.2 * len(picked), 3.0), squeeze=False, layout="constrained")
    for column, i in enumerate(picked):
        for row, images in enumerate((originals, reconstructions)):
            axes[row, column].imshow(images[i])
            axes[row, column].axis("off")
    axes[0, 0].set_title("real", fontsize=7, loc="left")
    axes[1, 0].set_title("reconstructed", fontsize=7, loc="left")
    fig.suptitle(title, fontsize=9)
    return fig


@torch.no_grad()
def autoencoder_ceiling(vae_dir: str | Path, dataset_dir: str | Path, records: list[dict], probe_path: str | Path):
    """What a latent family can reach at best: real held-out images through the autoencoder
    (encode to the posterior mean, decode), judged per class.

    Per class: the reconstruction PSNR (dB, per image, then the mean), the colour error (the mean
    absolute difference of each image's per-channel means, 0-255) and the share of reconstructions the
    real-image classifier of 01 (`medsyn.models.class_probe`) still assigns to their class, beside its
    share on the originals. The last column is what the autoencoder keeps of each class, the ceiling a
    latent family's alignment is read against; it is not a hard bound, since a generator's latents need
    not be those of real images (on `default` at 0b767dd, ldm-compact's 0.79 exceeded its VAE's 0.74).

    Args:
        vae_dir: a saved `AutoencoderKL`.
        dataset_dir: curated dataset; records: the images to judge (held-out ones: validation, test).
        probe_path: the class probe 01 trained on real images.

    Returns:
        a DataFrame indexed by class, with a last row 'macro mean' (means over classes).
    """
    import pandas as pd
    from diffusers import AutoencoderKL

    from medsyn.data.dataset import class_key
    from medsyn.models.class_probe import TrainedProbe, to_probe_input

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    originals = load_images(dataset_dir, records)
    reconstructed = round_trip(vae, originals)
    difference = reconstructed.astype(np.float64) - originals
    psnr = 10 * np.log10(255.0**2 / np.maximum((difference**2).mean(axis=(1, 2, 3)), 1e-10))
    colour = np.abs(difference.mean(axis=(1, 2))).mean(axis=1)
    classes = np.array([class_key(r) for r in records])
    probe = TrainedProbe.load(probe_path)
    on_reconstructions = probe.accuracy_of(to_probe_input(reconstructed), classes.tolist())["per_class"]
    on_originals = probe.accuracy_of(to_probe_input(originals), classes.tolist())["per_class"]
    table = pd.DataFrame(
        {
            "images": [int((classes == c).sum()) for c in on_originals],
            "psnr_db": [float(psnr[classes == c].mean()) for c in on_originals],
            "colour_error": [float(colour[classes == c].mean()) for c in on_originals],
            "classifier_on_originals": list(on_originals.values()),
            "classifier_on_reconstructions": list(on_reconstructions.values()),
        },
        index=pd.Index(list(on_originals), name="class"),
    )
    table.loc["macro mean"] = table.mean()
    table.loc["macro mean", "images"] = int(table["images"].iloc[:-1].sum())
    return table
