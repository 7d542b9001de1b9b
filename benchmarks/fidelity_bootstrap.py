"""The bootstrap intervals of `06_fidelity`'s two-set metrics (Fréchet distance, KID, precision, recall),
computed as the notebook computes them (`medsyn.metrics.evaluate`: the Fréchet distance's trace from a
symmetric eigenproblem; KID, precision and recall from kernels and distances computed once per set
pair and the draws' row counts, precision and recall from one computation per draw) against the plain way (every draw calls
torch-fidelity's Fréchet distance and KID on the drawn rows, and precision and recall each run the
k-NN estimator), on features shaped like the `default` profile's (264 generated and 329 real images, the
domain CLIP's 128 dimensions), 500 resamples. The intervals must be the same: the `identical` column
is 1 when every bound agrees to 1e-9, and the script fails if one does not. The arithmetic runs on
the CPU at either scale, as it does in the notebook.

    python -m benchmarks.fidelity_bootstrap --scale cpu
"""

import time

import numpy as np

from benchmarks.common import arguments, finish, row

# the same at both scales: the arithmetic is on the CPU either way
SETTINGS = {scale: {"generated": 264, "real": 329, "dimensions": 128, "resamples": 500} for scale in ("cpu", "gpu")}


def features(generated: int, real: int, dimensions: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Clustered features, the generated set shifted a little from the real one."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(22, dimensions))
    real_rows = centres[rng.integers(0, 22, real)] + 0.6 * rng.normal(size=(real, dimensions))
    generated_rows = centres[rng.integers(0, 22, generated)] + 0.7 * rng.normal(size=(generated, dimensions)) + 0.1
    return generated_rows, real_rows


def measure(args, rows: list | None = None) -> list[dict]:
    from medsyn.intervals import bootstrap_interval
    from medsyn.metrics.evaluate import _set_measures
    from medsyn.metrics.fidelity import feature_statistics, frechet_distance, kernel_distance, precision_recall

    s = SETTINGS[args.scale]
    generated, real = features(s["generated"], s["real"], s["dimensions"])
    sizes = (len(generated), len(real))
    model = f"{s['generated']} generated × {s['real']} real × {s['dimensions']}, {s['resamples']} resamples"
    plain = {
        "FD_domain_clip": lambda g, r: frechet_distance(
            *feature_statistics(generated[g]), *feature_statistics(real[r])
        ),
        "KID_domain_clip": lambda g, r: kernel_distance(real[r], generated[g], subsets=10)[0],
        "precision": lambda g, r: precision_recall(real[r], generated[g])["precision"],
        "recall": lambda g, r: precision_recall(real[r], generated[g])["recall"],
    }
    empty = np.zeros(0)
    two, _, _ = _set_measures(generated, real, None, None, empty, empty, empty, empty, (empty, empty), empty)
    rows = [] if rows is None else rows
    intervals = {}
    for variant, statistics in (
        ("baseline: torch-fidelity on every draw, precision and recall apart", plain),
        (
            "medsyn: symmetric FD trace, KID and precision/recall from row counts",
            {k: two[k] for k in plain},
        ),
    ):
        intervals[variant], each = [], {}
        for name, statistic in statistics.items():
            began = time.perf_counter()
            intervals[variant].append(bootstrap_interval(statistic, sizes, s["resamples"], 0))
            each[name] = time.perf_counter() - began
        elapsed = sum(each.values())
        first = next(iter(intervals.values()))
        identical = float(np.allclose(intervals[variant], first, rtol=1e-9, atol=1e-12))
        print(f"  {variant}: {elapsed:.1f} s, identical {identical}", flush=True)
        seconds = ", ".join(f"{name} {t:.1f} s" for name, t in each.items())
        rows.append(
            row(
                "fidelity bootstrap",
                model,
                variant,
                batch=s["resamples"],
                throughput=len(plain) * s["resamples"] / elapsed,
                unit="resamples/s",
                identical=identical,
                note=seconds,
            )
        )
        if identical != 1.0:
            raise AssertionError(f"{variant} gives other intervals than the baseline: {intervals}")
    return rows


if __name__ == "__main__":
    arguments_ = arguments(__doc__.splitlines()[0])
    finish(measure(arguments_), arguments_, {"settings": SETTINGS[arguments_.scale]})
