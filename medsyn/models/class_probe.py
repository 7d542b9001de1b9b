"""A small CNN classifier of a dataset's classes (`medsyn.data.dataset.class_key`), trained only on
real curated images (`medsyn.training.class_probe`): it checks that classes are visually distinct and
judges whether a generated image shows its prompted class (the embedded analogue of MediSyn's reader
study, Fig. 3; MSDM reports 92.4 % such alignment)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from medsyn.data.dataset import class_key, load_images


def to_probe_input(images: np.ndarray) -> torch.Tensor:
    """uint8 N x H x W x 3 images -> float N x 3 x H x W in [0, 1], the probe's input."""
    return torch.from_numpy(np.ascontiguousarray(images)).permute(0, 3, 1, 2).float() / 255


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class ClassProbe(nn.Module):
    """Four conv blocks, pooled to a 4 x 4 grid, and a linear head (~0.2 M parameters); any input size.

    The grid keeps coarse position, which radiographs need (an effusion is basal, the heart central);
    global average pooling would discard it."""

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(
            *_block(3, width // 2),
            nn.MaxPool2d(2),
            *_block(width // 2, width),
            nn.MaxPool2d(2),
            *_block(width, width),
            nn.MaxPool2d(2),
            *_block(width, width),
            nn.AdaptiveAvgPool2d(4),
            nn.Flatten(),
        )
        self.head = nn.Linear(width * 16, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


@dataclass
class TrainedProbe:
    model: ClassProbe
    classes: list[str]

    def save(self, path: str | Path) -> Path:
        """Write the weights and class list to one file (a dict saved with torch.save)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "classes": self.classes,
                "width": self.model.head.in_features // 16,
                "state_dict": self.model.state_dict(),
            },
            path,
        )
        return path

    @classmethod
    def load(cls, path: str | Path) -> "TrainedProbe":
        """Read what `save` wrote."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"class probe not found: {path} (written by notebooks/01_curate)")
        saved = torch.load(path, weights_only=True)
        model = ClassProbe(len(saved["classes"]), width=saved["width"])
        model.load_state_dict(saved["state_dict"])
        return cls(model=model.eval(), classes=saved["classes"])

    @torch.no_grad()
    def predict(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        """Class indices for images N x 3 x H x W in [0, 1]."""
        self.model.eval()
        return torch.cat(
            [self.model(images[i : i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]
        ).numpy()

    def accuracy(self, dataset_dir: str | Path, records: list[dict]) -> dict:
        """Overall and macro accuracy plus per-class accuracy of `records` (classes from `class_key`)."""
        return self.accuracy_of(to_probe_input(load_images(dataset_dir, records)), [class_key(r) for r in records])

    def accuracy_of(self, images: torch.Tensor, classes: list[str]) -> dict:
        """Accuracy of images N x 3 x H x W in [0, 1] whose true classes are `classes`."""
        unknown = set(classes) - set(self.classes)
        if unknown:
            raise ValueError(f"classes the probe was not trained on: {sorted(unknown)}")
        truth = np.array([self.classes.index(c) for c in classes])
        predicted = self.predict(images)
        per_class = {self.classes[c]: float((predicted[truth == c] == c).mean()) for c in np.unique(truth)}
        return {
            "accuracy": float((predicted == truth).mean()),
            "macro_accuracy": float(np.mean(list(per_class.values()))),
            "per_class": per_class,
            "n": len(classes),
        }
