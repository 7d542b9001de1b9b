"""A small CNN classifier trained only on real curated images, used to check that classes are
visually distinct and, later, to judge whether a generated image shows its prompted class (the
embedded analogue of MediSyn's reader study, Fig. 3; MSDM reports 92.4% such alignment)."""

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from medsyn.data.tables import class_key


def load_images(dataset_dir: str | Path, records: list[dict]) -> torch.Tensor:
    """Images of `records` as float tensor N x 3 x H x W in [0, 1] (grey repeated to RGB)."""
    arrays = [np.asarray(Image.open(Path(dataset_dir) / r["file_name"]).convert("RGB")) for r in records]
    return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float() / 255


def _block(c_in: int, c_out: int) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU()]


class ClassProbe(nn.Module):
    """Four conv blocks, pooled to a 4 x 4 grid, and a linear head (~0.2 M parameters); any input size.

    The grid keeps coarse position, which radiographs need (an effusion is basal, the heart central);
    global average pooling would discard it."""

    def __init__(self, num_classes: int, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(*_block(3, width // 2), nn.MaxPool2d(2), *_block(width // 2, width), nn.MaxPool2d(2),
                                      *_block(width, width), nn.MaxPool2d(2), *_block(width, width),
                                      nn.AdaptiveAvgPool2d(4), nn.Flatten())
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
        torch.save({"classes": self.classes, "width": self.model.head.in_features // 16,
                    "state_dict": self.model.state_dict()}, path)
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
        return torch.cat([self.model(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]).numpy()

    def accuracy(self, dataset_dir: str | Path, records: list[dict]) -> dict:
        """Overall and macro accuracy plus per-class accuracy of `records` (classes from `class_key`)."""
        return self.accuracy_of(load_images(dataset_dir, records), [class_key(r) for r in records])

    def accuracy_of(self, images: torch.Tensor, classes: list[str]) -> dict:
        """Accuracy of images N x 3 x H x W in [0, 1] whose true classes are `classes`."""
        unknown = set(classes) - set(self.classes)
        if unknown:
            raise ValueError(f"classes the probe was not trained on: {sorted(unknown)}")
        truth = np.array([self.classes.index(c) for c in classes])
        predicted = self.predict(images)
        per_class = {self.classes[c]: float((predicted[truth == c] == c).mean()) for c in np.unique(truth)}
        return {"accuracy": float((predicted == truth).mean()), "macro_accuracy": float(np.mean(list(per_class.values()))),
                "per_class": per_class, "n": len(classes)}


def train_class_probe(dataset_dir: str | Path, records: list[dict], epochs: int = 15, batch_size: int = 64,
                      lr: float = 2e-3, seed: int = 0, progress: bool = True) -> TrainedProbe:
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
    images = load_images(dataset_dir, records)
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
            batch = order[start:start + batch_size]
            x = images[batch]
            flip = torch.rand(len(batch), 1, 1, 1, generator=generator) < 0.5
            x = torch.where(flip, x.flip(3), x)
            loss = nn.functional.cross_entropy(model(x), targets[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    return TrainedProbe(model=model, classes=classes)


def plot_per_class_accuracy(result: dict, title: str = "Held-out accuracy of a classifier trained on real images"):
    """Horizontal bars of `TrainedProbe.accuracy(...)['per_class']`, with the macro mean as a line."""
    import matplotlib.pyplot as plt

    names = sorted(result["per_class"])
    values = [result["per_class"][n] for n in names]
    fig, ax = plt.subplots(figsize=(7, 0.28 * len(names) + 1.2))
    ax.barh(names, values, color="#4C72B0")
    ax.axvline(result["macro_accuracy"], color="k", ls="--", lw=1, label=f"macro {result['macro_accuracy']:.2f}")
    ax.set_xlim(0, 1)
    ax.set_xlabel("accuracy")
    ax.set_title(title, fontsize=10)
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig
