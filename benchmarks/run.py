"""Every benchmark in one run (training steps, vq-ar's LM step, sampling, nearest neighbours, FID features,
the bootstrap intervals of 06 and 08, FLUX's LoRA step), one table with each row's ratio to its baseline, written with
its provenance and, with `--readme`, into the README's marked performance tables. One benchmark that fails is reported as a row and the others run.

    python -m benchmarks.run --scale gpu --out benchmarks/results/gpu.csv --readme
    python -m benchmarks.run --scale cpu --out benchmarks/results/cpu.csv --readme   # 2 cores, minutes
"""

import os
import signal
import time
import traceback

import torch

from benchmarks import (
    downstream_bootstrap,
    fidelity_bootstrap,
    inception,
    lm_step,
    nearest_neighbours,
    sampling,
    train_step,
)
from benchmarks.common import README, RESULTS_DIR, arguments, device_for, finish, row

# the quick ones first, FLUX's LoRA step (minutes at its published size) last: a run cut short still
# reports the others; each is (measure(args, rows), its settings per scale)
BENCHMARKS = {
    "nearest neighbours": (nearest_neighbours.measure, nearest_neighbours.SETTINGS),
    "fidelity bootstrap": (fidelity_bootstrap.measure, fidelity_bootstrap.SETTINGS),
    "downstream bootstrap": (downstream_bootstrap.measure, downstream_bootstrap.SETTINGS),
    "FID features": (inception.measure, inception.SETTINGS),
    "training step": (train_step.measure, train_step.SETTINGS),
    "lm step": (lm_step.measure, lm_step.SETTINGS),
    "sampling": (sampling.measure, sampling.SETTINGS),
    "FLUX LoRA step": (train_step.measure_flux, train_step.FLUX_SETTINGS),
}


def main() -> None:
    def own_options(parser):
        parser.add_argument("--only", nargs="*", choices=list(BENCHMARKS), default=None, help="run these only")
        parser.add_argument("--readme", action="store_true", help="rewrite the README's tables from the results")

    args = arguments(__doc__.splitlines()[0], own_options)
    args.out = args.out or RESULTS_DIR / f"{args.scale}.csv"
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing is downloaded: the models are built here
    from diffusers.utils import logging as diffusers_logging

    diffusers_logging.set_verbosity_error()
    device = device_for(args.scale)
    rows, seconds = [], {}

    def stop(signum, frame):  # `timeout` sends SIGTERM: the rows measured so far are still written
        raise SystemExit(f"stopped by signal {signum}")

    signal.signal(signal.SIGTERM, stop)
    try:
        for name, (measure, _) in BENCHMARKS.items():
            if args.only and name not in args.only:
                continue
            began = time.perf_counter()
            print(f"== {name}", flush=True)
            try:
                measure(args, rows)
            except Exception as error:  # one failure is reported; the other benchmarks still run
                traceback.print_exc()
                rows.append(row(name, "-", "failed", note=f"{type(error).__name__}: {error}"[:300]))
            seconds[name] = round(time.perf_counter() - began, 1)
            print(f"== {name}: {seconds[name]} s", flush=True)
            if device.type == "cuda":
                torch.cuda.empty_cache()
    finally:
        finish(rows, args, {"seconds": seconds, "settings": settings(args.scale)})
    if args.readme:
        from medsyn.readme import write_readme_tables

        used = write_readme_tables(
            README, README.parent, only=str(args.out.resolve().parent.relative_to(README.parent))
        )
        print(f"README: wrote {', '.join(used)}")


def settings(scale: str) -> dict:
    return {name: options[scale] for name, (_, options) in BENCHMARKS.items()}


if __name__ == "__main__":
    main()
