"""Figures a training notebook shows: loss curves, reconstructions, samples per prompt, alignment."""

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from medsyn.training.common import load_rgb, to_model_range


def plot_loss(history: list[float] | dict[str, list[float]], title: str, smooth: int = 50):
    """Per-step loss (light) and its running mean over `smooth` steps; a dict gives one panel per curve."""
    curves = history if isinstance(history, dict) else {"loss": history}
    fig, axes = plt.subplots(1, len(curves), figsize=(6 * len(curves), 3), squeeze=False)
    for ax, (name, values) in zip(axes[0], curves.items()):
        steps = np.arange(1, len(values) + 1)
        ax.plot(steps, values, color="#4C72B0", alpha=0.3, lw=0.8)
        if len(values) >= smooth:
            ax.plot(steps[smooth - 1:], np.convolve(values, np.ones(smooth) / smooth, mode="valid"), color="#4C72B0")
        if min(values, default=0) > 0:
            ax.set_yscale("log")
        ax.set_xlabel("step")
        ax.set_ylabel(name)
    fig.suptitle(title)
    fig.tight_layout()
    return fig


@torch.no_grad()
def plot_reconstructions(vae_dir: str | Path, dataset_dir: str | Path, records: list[dict], n: int = 8):
    """Real images (top) and their VAE reconstructions from the posterior mean (bottom)."""
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    picked = records[:: max(1, len(records) // n)][:n]
    x = to_model_range(np.stack([load_rgb(Path(dataset_dir) / r["file_name"]).transpose(2, 0, 1) for r in picked]))
    y = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    fig, axes = plt.subplots(2, len(picked), figsize=(1.2 * len(picked), 2.6))
    for i in range(len(picked)):
        for row, batch in enumerate((x, y)):
            axes[row, i].imshow(((batch[i].permute(1, 2, 0).numpy() + 1) * 127.5).astype(np.uint8))
            axes[row, i].axis("off")
    axes[0, 0].set_title("real", fontsize=8, loc="left")
    axes[1, 0].set_title("reconstructed", fontsize=8, loc="left")
    fig.tight_layout()
    return fig


def plot_samples_by_prompt(samples: list[dict], prompts: dict[str, str], per_row: int = 8):
    """One row per class: its prompt and the generated images."""
    names = list(prompts)
    fig, axes = plt.subplots(len(names), per_row, figsize=(per_row * 1.0 + 3.4, len(names) * 1.0), squeeze=False)
    for row, name in enumerate(names):
        images = [s["image"] for s in samples if s["prompt_id"] == row][:per_row]
        for col in range(per_row):
            axes[row, col].axis("off")
            if col < len(images):
                axes[row, col].imshow(images[col])
        axes[row, 0].text(-0.1, 0.5, name, transform=axes[row, 0].transAxes, ha="right", va="center", fontsize=7)
    fig.subplots_adjust(left=0.3, wspace=0.05, hspace=0.05)
    return fig


def alignment_table(result: dict, family: str) -> pd.DataFrame:
    """Per-class accuracy of a probe on generated images, with the macro mean as the last row."""
    table = pd.DataFrame({"class": list(result["per_class"]), family: list(result["per_class"].values())})
    macro = pd.DataFrame({"class": ["macro mean"], family: [result["macro_accuracy"]]})
    return pd.concat([table, macro], ignore_index=True).set_index("class")


def judge_alignment(pipeline_dir: str | Path, prompts: dict[str, str], probe_path: str | Path, family: str,
                    figures_dir: str | Path, parameters: dict, samples_per_prompt: int = 8, sampling_steps: int = 25,
                    guidance_scale: float = 4.0, seed: int = 0) -> dict:
    """The embedded reader study (MediSyn Fig. 3): sample each class prompt, let the classifier trained
    only on real images name each sample's class, and write `<family>_samples.png`,
    `alignment_<family>.csv` and `alignment_<family>.png` (family with '_' for '-') with provenance.

    Args:
        pipeline_dir: a saved text-to-image pipeline.
        prompts: class name -> prompt (`medsyn.data.tables.class_prompts`).
        probe_path: the class probe saved by 01_curate.
        family: the generator family, for titles, columns and file names.
        figures_dir: where figures and tables go.
        parameters: the notebook's parameters, for provenance.
        samples_per_prompt, sampling_steps, guidance_scale, seed: the sampling run.

    Returns:
        the probe's result (accuracy, macro_accuracy, per_class, n) plus `seconds_per_image`.
    """
    import time

    from medsyn.metrics.class_probe import TrainedProbe, plot_per_class_accuracy
    from medsyn.records import save_figure, save_table
    from medsyn.sampling import generate, load_pipeline

    figures, stem = Path(figures_dir), family.replace("-", "_")
    pipeline = load_pipeline(pipeline_dir)
    started = time.perf_counter()
    samples = generate(pipeline, list(prompts.values()), per_prompt=samples_per_prompt, seed=seed,
                       steps=sampling_steps, guidance_scale=guidance_scale)
    seconds = (time.perf_counter() - started) / len(samples)
    save_figure(plot_samples_by_prompt(samples, prompts), figures / f"{stem}_samples.png", parameters, [pipeline_dir])
    images = torch.stack([torch.from_numpy(s["image"]).permute(2, 0, 1).float() / 255 for s in samples])
    result = TrainedProbe.load(probe_path).accuracy_of(images, [list(prompts)[s["prompt_id"]] for s in samples])
    save_table(alignment_table(result, family), figures / f"alignment_{stem}.csv", parameters, [pipeline_dir, probe_path])
    save_figure(plot_per_class_accuracy(result, f"{family}: generated images recognised as their prompted class"),
                figures / f"alignment_{stem}.png", parameters, [pipeline_dir, probe_path])
    return {**result, "seconds_per_image": seconds}
