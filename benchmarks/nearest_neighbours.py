"""The privacy search (`medsyn.metrics.privacy.nearest_neighbours`: every generated image's nearest
training image by cosine similarity) against a plain numpy search in float64, which defines the right
answer: 10⁴ queries × 10⁶ references × 512 dimensions on a GPU, 10³ × 10⁵ on 2 cores.

The data are clustered as image embeddings are (1,000 references per cluster centre, queries near
references, some of them exact copies), so that near-ties occur and exactness is tested where it is
hard. Every neighbour must be the baseline's: the `identical` column is the share that is, and the
script fails if it is not 1. The baseline, being slow, runs on the first `baseline_queries` queries;
throughput is queries per second either way.

    python -m benchmarks.nearest_neighbours --scale gpu
    python -m benchmarks.nearest_neighbours --scale cpu
"""

import time

import numpy as np
import torch

from benchmarks.common import arguments, device_for, finish, peak_memory_gib, reset_peak_memory, row

SETTINGS = {
    "gpu": {"queries": 10_000, "references": 1_000_000, "dimensions": 512, "baseline_queries": 1_000},
    "cpu": {"queries": 1_000, "references": 100_000, "dimensions": 512, "baseline_queries": 200},
}


def embeddings(queries: int, references: int, dimensions: int, seed: int = 0):
    """Clustered references and queries near them (a tenth of the queries exact copies)."""
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(max(references // 1000, 1), dimensions, generator=g)
    owner = torch.randint(0, len(centres), (references,), generator=g)
    reference = centres[owner] + 0.5 * torch.randn(references, dimensions, generator=g)
    picked = torch.randint(0, references, (queries,), generator=g)
    query = reference[picked] + 0.3 * torch.randn(queries, dimensions, generator=g)
    query[: queries // 10] = reference[picked[: queries // 10]]
    return query, reference


def float64_search(queries: torch.Tensor, references: torch.Tensor, chunk: int = 65536):
    """The baseline: numpy in float64, normalised rows, chunked products, argmax (the lower index)."""
    q = queries.double().numpy()
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    best, where = np.full(len(q), -np.inf), np.zeros(len(q), dtype=int)
    for start in range(0, len(references), chunk):
        r = references[start : start + chunk].double().numpy()
        similarity = q @ (r / np.linalg.norm(r, axis=1, keepdims=True)).T
        found = similarity.argmax(axis=1)
        value = similarity[np.arange(len(q)), found]
        better = value > best
        best[better], where[better] = value[better], found[better] + start
    return where, best


def measure(args, rows: list | None = None) -> list[dict]:
    """Append one row per measurement to `rows` as it is made (a run cut short keeps them); return them."""
    from medsyn.metrics.privacy import nearest_neighbours

    device = device_for(args.scale)
    s = SETTINGS[args.scale]
    queries, references = embeddings(s["queries"], s["references"], s["dimensions"])
    model = f"{s['queries']:,} queries × {s['references']:,} references × {s['dimensions']}"
    few = queries[: s["baseline_queries"]]

    began = time.perf_counter()
    truth, _ = float64_search(few, references)
    baseline_seconds = time.perf_counter() - began
    rows = [] if rows is None else rows
    rows.append(
        row(
            "nearest neighbours",
            model,
            "baseline: numpy float64 (matrix products in chunks, argmax)",
            batch=len(few),
            throughput=len(few) / baseline_seconds,
            unit="queries/s",
            identical=1.0,
            note=f"{len(few):,} queries in {baseline_seconds:.1f} s, {torch.get_num_threads()} CPU threads",
        )
    )
    print(f"  baseline: {len(few) / baseline_seconds:.3g} queries/s", flush=True)
    places = [("cpu", torch.device("cpu"))] + ([("cuda", device)] if device.type == "cuda" else [])
    for place, where in places:
        reset_peak_memory(device)
        nearest_neighbours(queries[:8], references[:100_000], device=where)  # warm-up (kernels, allocator)
        began = time.perf_counter()
        searched = queries if place == "cuda" else few  # the full query set on the GPU
        index, _ = nearest_neighbours(searched, references, device=where)
        elapsed = time.perf_counter() - began
        identical = float(np.mean(index[: len(few)] == truth))
        print(f"  medsyn on {place}: {len(searched) / elapsed:.3g} queries/s, identical {identical}", flush=True)
        rows.append(
            row(
                "nearest neighbours",
                model,
                f"medsyn: float32 candidates, float64 re-scoring ({place})",
                batch=len(searched),
                throughput=len(searched) / elapsed,
                unit="queries/s",
                peak_memory_gib=peak_memory_gib(device) if place == "cuda" else float("nan"),
                identical=identical,
                note=f"{len(searched):,} queries in {elapsed:.2f} s, references moved from the CPU included",
            )
        )
        if identical != 1.0:
            raise AssertionError(f"medsyn's search on {place} differs from the float64 baseline: {identical}")
    return rows


if __name__ == "__main__":
    arguments_ = arguments(__doc__.splitlines()[0])
    finish(measure(arguments_), arguments_, {"settings": SETTINGS[arguments_.scale]})
