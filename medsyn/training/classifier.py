"""MediSyn's downstream classifier (Methods 4.3.5): torchvision's ResNet-50, trained with AdamW on
real and synthetic images, the epoch with the best validation score kept. ImageNet weights come only
from a local file. For small images and a few hundred training images (the embedded `default`),
`architecture="compact"` trains the class probe's four-block CNN instead, which learns from random
initialisation in a few epochs where a ResNet-50 barely moves."""

from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from medsyn.models.class_probe import ClassProbe
from medsyn.training.common import adamw

ARCHITECTURES = ("resnet50", "compact")

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def resnet50(outputs: int, imagenet_weights: str | Path | None = None) -> tuple[nn.Module, str]:
    """torchvision's ResNet-50 with an `outputs`-way head; ImageNet weights from a local file only.
    Returns the model and how it was initialised, for the record."""
    from torchvision.models import resnet50 as build

    model = build(weights=None)
    if imagenet_weights is not None:
        path = Path(imagenet_weights)
        if not path.is_file():
            raise FileNotFoundError(f"ImageNet weights not found: {path} (medsyn never downloads weights)")
        model.load_state_dict(torch.load(path, map_location="cpu", weights_only=True))
        initialisation = f"ImageNet weights from {path}"
    else:
        initialisation = "random initialisation (no ImageNet weights given)"
    model.fc = nn.Linear(model.fc.in_features, outputs)
    return model, initialisation


def build_classifier(
    architecture: str, outputs: int, imagenet_weights: str | Path | None = None
) -> tuple[nn.Module, str]:
    """The downstream classifier: 'resnet50' (MediSyn's; `resnet50`) or 'compact' (the class probe's
    CNN, `medsyn.models.class_probe.ClassProbe`, random initialisation only). Returns the model and
    how it was initialised, for the record."""
    if architecture == "resnet50":
        model, initialisation = resnet50(outputs, imagenet_weights)
        return model, f"ResNet-50, {initialisation}"
    if architecture == "compact":
        if imagenet_weights is not None:
            raise ValueError("ImageNet weights are for the ResNet-50; the compact CNN starts from random weights")
        return ClassProbe(outputs), "compact CNN (the class probe's), random initialisation"
    raise ValueError(f"unknown classifier architecture {architecture!r}; choose from {ARCHITECTURES}")


def _inputs(images: np.ndarray) -> torch.Tensor:
    x = torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255
    return (x - torch.tensor(IMAGENET_MEAN)[:, None, None]) / torch.tensor(IMAGENET_STD)[:, None, None]


def predict(model: nn.Module, images: np.ndarray | torch.Tensor, multilabel: bool, batch_size: int = 64) -> np.ndarray:
    """Sigmoid (multi-label) or softmax (multi-class) scores of uint8 N x H x W x 3 images, or of
    their `_inputs` (converted once by a caller that scores the same images every epoch)."""
    model.eval()
    x = images if isinstance(images, torch.Tensor) else _inputs(images)
    with torch.inference_mode():
        logits = torch.cat([model(x[i : i + batch_size]) for i in range(0, len(x), batch_size)])
    return (torch.sigmoid(logits) if multilabel else torch.softmax(logits, dim=1)).numpy()


def train_classifier(
    images: np.ndarray,
    targets: np.ndarray,
    val_images: np.ndarray,
    val_targets: np.ndarray,
    outputs: int,
    multilabel: bool,
    validation_metric: Callable[[np.ndarray, np.ndarray], float],
    epochs: int = 15,
    lr: float = 1e-4,
    batch_size: int = 32,
    imagenet_weights: str | Path | None = None,
    seed: int = 0,
    progress: bool = True,
    architecture: str = "resnet50",
) -> dict:
    """MediSyn's downstream classifier: ResNet-50 (or the compact CNN, `build_classifier`), AdamW at
    `lr`, `epochs` epochs with horizontal flips, the epoch with the best validation score kept.

    Args:
        images, targets: uint8 N x H x W x 3 training images and their `task_targets`.
        val_images, val_targets: the validation images and targets the epoch is chosen on.
        outputs: labels (multi-label) or classes (multi-class).
        multilabel: sigmoid + binary cross-entropy, else softmax + cross-entropy.
        validation_metric: (targets, scores) -> score, higher is better (MediSyn: macro-AUROC).
        epochs, lr, batch_size: the schedule (MediSyn: 15 epochs, AdamW 1e-4, 32).
        imagenet_weights: a local torchvision ResNet-50 weights file; None: random initialisation.
        seed: initialisation, batch order and flips.
        progress: show a progress bar.
        architecture: 'resnet50' or 'compact' (`build_classifier`).

    Returns:
        {'model' (the best epoch's weights), 'initialisation', 'val_auroc' per epoch, 'best_epoch', 'loss' per epoch}.
    """
    torch.manual_seed(seed)
    model, initialisation = build_classifier(architecture, outputs, imagenet_weights)
    optimizer = adamw(model.parameters(), lr=lr)
    loss_fn = nn.BCEWithLogitsLoss() if multilabel else nn.CrossEntropyLoss()
    y = torch.from_numpy(targets) if multilabel else torch.from_numpy(targets).long()
    generator = torch.Generator().manual_seed(seed)
    best, best_state, history, losses = -1.0, None, [], []
    val_inputs = _inputs(val_images)  # scored after every epoch
    for _ in tqdm(range(epochs), desc=architecture, unit="epoch", disable=not progress):
        model.train()
        order, total = torch.randperm(len(images), generator=generator), 0.0
        for start in range(0, len(images), batch_size):
            index = order[start : start + batch_size]
            x = _inputs(images[index.numpy()])
            flip = torch.rand(len(index), generator=generator) < 0.5
            x[flip] = x[flip].flip(-1)
            loss = loss_fn(model(x), y[index])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(index)
        losses.append(total / len(images))
        history.append(validation_metric(val_targets, predict(model, val_inputs, multilabel)))
        if history[-1] > best:
            best, best_state = history[-1], {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(best_state)
    return {
        "model": model,
        "initialisation": initialisation,
        "val_auroc": history,
        "best_epoch": int(np.argmax(history)) + 1,
        "loss": losses,
    }
