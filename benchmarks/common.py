"""What the benchmark scripts share: the command line, the device, timing, the measured matrix-multiply
peak that model-FLOP utilisation is taken against, and writing the results table with its provenance."""

import argparse
import gc
import os
import platform
import sys
import time
from pathlib import Path

import pandas as pd
import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"


def stand_ins():
    """The tests' builders of stand-in models (`tests/tiny_models.py`: the real classes and layouts,
    tiny widths), which the benchmarks use rather than copy."""
    tests = str(README.parent / "tests")
    if tests not in sys.path:
        sys.path.insert(0, tests)
    import tiny_models

    return tiny_models


# one row per measurement; `ratio` is the row's throughput over its benchmark's baseline row
COLUMNS = [
    "benchmark",
    "model",
    "variant",
    "batch",
    "throughput",
    "unit",
    "ratio",
    "peak_memory_gib",
    "mfu",
    "identical",
    "note",
]


def arguments(description: str, add=None) -> argparse.Namespace:
    """`--scale cpu|gpu` (default: gpu when CUDA is there), `--out` (a results CSV), `--work` and
    `--budget`; `add(parser)` adds a script's own options first."""
    parser = argparse.ArgumentParser(description=description)
    if add:
        add(parser)
    parser.add_argument("--scale", choices=["cpu", "gpu"], default="gpu" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--out", type=Path, default=None, help="results CSV (default: print only)")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medsyn-benchmarks"), help="scratch directory")
    parser.add_argument("--budget", type=float, default=None, help="seconds; compilation is skipped when short")
    args = parser.parse_args()
    args.deadline = time.monotonic() + args.budget if args.budget else None
    if args.scale == "gpu" and not torch.cuda.is_available():
        parser.error("--scale gpu needs a CUDA device; use --scale cpu here")
    return args


# a compiled variant's compilation takes minutes: it is skipped (and says so) when less is left
COMPILE_SECONDS = 180


def time_left(args) -> float:
    deadline = getattr(args, "deadline", None)
    return float("inf") if deadline is None else deadline - time.monotonic()


def device_for(scale: str) -> torch.device:
    return torch.device("cuda" if scale == "gpu" else "cpu")


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if "model name" in line
        ),
        platform.processor() or "CPU",
    )
    return f"{torch.get_num_threads()} CPU threads ({model})"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def seconds(function, device: torch.device, warmup: int = 1, repeats: int = 3) -> list[float]:
    """Wall-clock seconds of `repeats` calls after `warmup` untimed ones, the device drained around each."""
    for _ in range(warmup):
        function()
    times = []
    for _ in range(repeats):
        synchronize(device)
        began = time.perf_counter()
        function()
        synchronize(device)
        times.append(time.perf_counter() - began)
    return times


def matmul_peak(device: torch.device, dtype: torch.dtype, size: int, repeats: int = 10) -> float:
    """FLOP/s of a size³ matrix product in `dtype` on random data, measured now: the ceiling that
    model-FLOP utilisation is taken against (the datasheet's is higher than any program reaches)."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = seconds(lambda: a @ b, device, warmup=3, repeats=repeats)
    return 2 * size**3 / (sum(times) / len(times))


def reset_peak_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_gib(device: torch.device) -> float:
    """The most device memory tensors held since the last reset (NaN on the CPU, where no allocator counts)."""
    return torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else float("nan")


def row(benchmark: str, model: str, variant: str, **values) -> dict:
    return {"benchmark": benchmark, "model": model, "variant": variant, **values}


def with_ratios(rows: list[dict]) -> pd.DataFrame:
    """The rows as a table in `COLUMNS` order, each throughput divided by its benchmark and model's
    first row (the baseline, which every script measures first)."""
    table = pd.DataFrame(rows).reindex(columns=COLUMNS)
    baseline = table.groupby(["benchmark", "model"], sort=False)["throughput"].transform("first")
    table["ratio"] = table["throughput"] / baseline
    return table


def finish(rows: list[dict], args: argparse.Namespace, parameters: dict) -> pd.DataFrame:
    """Print the table and, with `--out`, write it with its provenance (device, versions, parameters)."""
    from medsyn.records import save_table

    table = with_ratios(rows)
    with pd.option_context("display.width", 200, "display.max_columns", None, "display.max_colwidth", 60):
        print(table.to_string(index=False, float_format=lambda v: f"{v:.3g}"))
    if args.out:
        device = device_for(args.scale)
        save_table(
            table.set_index(["benchmark", "model", "variant"]),
            args.out,
            {
                "scale": args.scale,
                "device": device_name(device),
                "torch": torch.__version__,
                "cuda": torch.version.cuda if device.type == "cuda" else None,
                "threads": torch.get_num_threads(),
                "hostname_cores": os.cpu_count(),
                **parameters,
            },
            [],
        )
    return table
