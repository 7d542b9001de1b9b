"""Training the class probe (`medsyn.models.class_probe`) on real curated images."""

from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from medsyn.data.dataset import class_key, load_images
from medsyn.models.class_probe import ClassProbe, TrainedProbe, to_probe_input


def train_class_probe(
    dataset_dir: str | Path,
    records: list[dict],
    epochs: int = 15,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> TrainedProbe:
    """Train a `ClassProbe` on `records` (AdamW with cosine decay, horizontal flips), one class per `class_key`.

    Args:
        dataset_dir: the dataset the records' `file_name`s are relative to.
        records: training records (real images only).
        epochs: passes over the data.
        batch_size: images per step.
        lr: AdamW learning rate.
        seed: seed of initialisation and batch order.
        progress: show a progress bar.
    """
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    classes = sorted({class_key(r) for r in records})
    images = to_probe_input(load_images(dataset_dir, records))
    targets = torch.tensor([classes.index(class_key(r)) for r in records])
    model = ClassProbe(len(classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    steps = epochs * -(-len(images) // batch_size)
    # cosine decay to zero: the last weights are a settled model, not a snapshot of a noisy step
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, steps))
    model.train()
    for _ in tqdm(range(epochs), desc="class probe", unit="epoch", disable=not progress):
        order = torch.randperm(len(images), generator=generator)
        for start in range(0, len(images), batch_size):
            batch = order[start : start + batch_size]
            x = images[batch]
            flip = torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5
            x = torch.where(flip, x.flip(3), x)
            loss = nn.functional.cross_entropy(model(x), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return TrainedProbe(model=model, classes=classes)
