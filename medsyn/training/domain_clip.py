"""Training the domain CLIP (`medsyn.models.domain_clip`) on the curated image-caption pairs with
open_clip's contrastive loss (Radford et al. 2021; open_clip's recipe: AdamW, warm-up, cosine decay)."""

from pathlib import Path

import numpy as np
import torch

from medsyn.data.dataset import class_prompts, split_records
from medsyn.models.domain_clip import DOMAIN_CLIP_CONFIG, normalise, save_domain_clip, zero_shot_accuracy
from medsyn.training.common import batch_indices, cache_images, progress_bar


def train_domain_clip(
    dataset_dir: str | Path,
    out_dir: str | Path,
    epochs: int = 30,
    batch_size: int = 64,
    lr: float = 5e-4,
    weight_decay: float = 0.1,
    config: dict | None = None,
    seed: int = 0,
    progress: bool = True,
) -> dict:
    """Train a CLIP on the training split with open_clip's contrastive loss; save it to `<out_dir>/model`.

    Args:
        dataset_dir: curated dataset (one image size).
        out_dir: the image cache and `model/`.
        epochs: passes over the training images; batch_size: pairs per step.
        lr, weight_decay: AdamW with a cosine schedule after a 5 % warm-up (open_clip's recipe).
        config: overrides of `DOMAIN_CLIP_CONFIG` (open_clip `model_cfg` keys).
        seed: seed of initialisation and batch order.
        progress: show a progress bar.

    Returns:
        {'model_dir', 'loss_history', 'zero_shot_accuracy'}: the last is the validation images' accuracy
        at picking their own class's prompt among all class prompts.
    """
    import open_clip
    from open_clip.loss import ClipLoss

    out_dir = Path(out_dir)
    torch.manual_seed(seed)
    records = split_records(dataset_dir, "train")
    images = cache_images(dataset_dir, records, out_dir / "cache" / "train_images.npy")
    cfg = {**DOMAIN_CLIP_CONFIG, **(config or {})}
    cfg["vision_cfg"] = {**cfg["vision_cfg"], "image_size": int(images.shape[-1])}
    model = open_clip.CLIP(**cfg, output_dict=True)
    tokenizer = open_clip.tokenizer.SimpleTokenizer(context_length=cfg["text_cfg"]["context_length"])
    texts = tokenizer([r["text"] for r in records])
    steps = max(1, epochs * len(records) // batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    warmup = max(1, steps // 20)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(1.0, s / steps)))
    )
    loss_fn = ClipLoss()
    history = []
    bar = progress_bar(steps, 0, "domain CLIP", progress)
    model.train()
    for step in range(steps):
        index = np.sort(batch_indices(len(records), batch_size, seed, step))
        out = model(normalise(images[index]), texts[index])
        loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        scheduler.step()
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            model.logit_scale.clamp_(0, np.log(100))
        history.append(loss.item())
        bar.update(1)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()

    model.eval()
    model_dir = out_dir / "model"
    save_domain_clip(model, cfg, model_dir)
    held_out = split_records(dataset_dir, "validation")
    prompts = class_prompts(records)
    accuracy = zero_shot_accuracy(model, tokenizer, dataset_dir, held_out, prompts)
    return {"model_dir": model_dir, "loss_history": history, "zero_shot_accuracy": accuracy}
