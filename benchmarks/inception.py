"""Inception feature extraction for FID (`medsyn.metrics.fidelity.inception_features`: torch-fidelity's
TF-compatible InceptionV3, random weights saved where the real file would be), in images per second,
float32 as FID requires: on the CPU with the package's default batch (the baseline), and on the GPU.

    python -m benchmarks.inception --scale gpu
    python -m benchmarks.inception --scale cpu
"""

import time
from pathlib import Path

import numpy as np
import torch

from benchmarks.common import arguments, device_for, finish, peak_memory_gib, reset_peak_memory, row

SETTINGS = {
    "gpu": {"images": 2000, "size": 512, "baseline_images": 200, "batch": 200},
    "cpu": {"images": 100, "size": 128, "baseline_images": 100, "batch": 50},
}


def random_inception(path: Path) -> Path:
    """torch-fidelity's InceptionV3 with random weights, saved as its weights file."""
    import torch_fidelity.feature_extractor_inceptionv3 as module

    if path.is_file():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    original = module.FeatureExtractorInceptionV3.load_state_dict
    module.FeatureExtractorInceptionV3.load_state_dict = lambda self, state: None
    try:
        torch.save({}, path)  # the constructor reads a file; the patch ignores what it holds
        torch.manual_seed(0)
        model = module.FeatureExtractorInceptionV3(
            "inception-v3-compat", ["2048"], feature_extractor_weights_path=str(path)
        )
    finally:
        module.FeatureExtractorInceptionV3.load_state_dict = original
    torch.save(model.state_dict(), path)
    return path


def measure(args, rows: list | None = None) -> list[dict]:
    """Append one row per measurement to `rows` as it is made (a run cut short keeps them); return them."""
    from medsyn.metrics.fidelity import INCEPTION_FILE, inception_features

    device = device_for(args.scale)
    s = SETTINGS[args.scale]
    weights = random_inception(args.work / "inception" / INCEPTION_FILE)
    images = np.random.default_rng(0).integers(0, 256, (s["images"], s["size"], s["size"], 3), dtype=np.uint8)
    model = f"InceptionV3 (FID), {s['size']}² uint8 images resized to 299²"
    rows = [] if rows is None else rows
    places = [("cpu", 50, s["baseline_images"])] + (
        [("cuda", s["batch"], s["images"])] if device.type == "cuda" else []
    )
    features = {}
    for place, batch, n in places:
        reset_peak_memory(device)
        inception_features(images[:batch], weights, batch_size=batch, device=place)  # warm-up
        began = time.perf_counter()
        features[place] = inception_features(images[:n], weights, batch_size=batch, device=place)
        elapsed = time.perf_counter() - began
        variant = "baseline: CPU, batch 50 (the package's default)" if place == "cpu" else f"medsyn: GPU, batch {batch}"
        print(f"  {variant}: {n / elapsed:.3g} images/s", flush=True)
        rows.append(
            row(
                "FID features",
                model,
                variant,
                batch=batch,
                throughput=n / elapsed,
                unit="images/s",
                peak_memory_gib=peak_memory_gib(device) if place == "cuda" else float("nan"),
                note=f"{n:,} images in {elapsed:.1f} s, float32",
            )
        )
    if "cuda" in features:  # the same features on either device, to float32's accuracy
        n = len(features["cpu"])
        difference = np.abs(features["cuda"][:n] - features["cpu"]).max() / np.abs(features["cpu"]).max()
        rows[-1]["note"] += f"; largest difference from the CPU's features {difference:.1e} (relative)"
    return rows


if __name__ == "__main__":
    arguments_ = arguments(__doc__.splitlines()[0])
    finish(measure(arguments_), arguments_, {"settings": SETTINGS[arguments_.scale]})
