"""The chain's time budget as a ratio: `medsyn reproduce --profile NAME` of this checkout and of a
reference commit, one after the other on this machine, and the ratio of their times. Machines differ
by up to 2x (the same `default` chain took 26.5 and 44 minutes on two 2-core machines), so the budget
of the issues is a ratio to the chain at commit `aaed6c7` measured on the same machine, with nothing
else running; this script is that measurement, written down once.

The reference runs from a detached git worktree of the commit with this checkout's environment (its
package first on `PYTHONPATH`, the installed lock's packages under it), so no second environment is
installed. Each chain's time is the sum of its notebooks' seconds in its `run.json` (what the README
reports); the wall time from start to finish is printed beside it.

    python -m benchmarks.chain_ratio --profile default            # this checkout, then aaed6c7
    python -m benchmarks.chain_ratio --profile smoke --order reference-first

Nothing else may run meanwhile: two PyTorch processes on 2 cores slow each other 2-30x.
"""

import argparse
import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd

REPO = Path(__file__).resolve().parent.parent
REFERENCE = "aaed6c7"  # three families, before the intervals and the downstream experiment with power


def worktree(commit: str, place: Path) -> Path:
    """A detached worktree of `commit` at `place` (made once; reused when it holds that commit)."""
    full = subprocess.run(["git", "rev-parse", commit], cwd=REPO, capture_output=True, text=True, check=True)
    if place.exists():
        there = subprocess.run(["git", "rev-parse", "HEAD"], cwd=place, capture_output=True, text=True, check=True)
        if there.stdout.strip() != full.stdout.strip():
            raise ValueError(f"{place} holds {there.stdout.strip()[:12]}, not {commit}; remove it or choose --work")
        return place
    subprocess.run(["git", "worktree", "add", "--detach", str(place), commit], cwd=REPO, check=True)
    return place


def run_chain(root: Path, profile: str, out: Path) -> dict:
    """`medsyn reproduce` of the checkout at `root` into `out`; returns its `run.json`."""
    environment = {**os.environ, "PYTHONPATH": str(root)}  # this checkout's package, not the installed one
    command = [sys.executable, "-m", "medsyn.cli", "reproduce", "--profile", profile, "--out", str(out)]
    print(f"== {root}: {' '.join(command[1:])}", flush=True)
    subprocess.run(command, cwd=root, env=environment, check=True)
    return json.loads((out / "run.json").read_text())


def chain_seconds(record: dict) -> tuple[float, float, dict]:
    """(the sum of the notebooks' seconds, the wall seconds from start to finish, notebook -> seconds)."""
    notebooks = {n["notebook"]: n["seconds"] for n in record["notebooks"]}
    started, finished = (datetime.datetime.fromisoformat(record[k]) for k in ("started", "finished"))
    return sum(notebooks.values()), (finished - started).total_seconds(), notebooks


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", default="default")
    parser.add_argument("--reference", default=REFERENCE, help="the commit the budget is a ratio to")
    parser.add_argument("--work", type=Path, default=Path("/tmp/medsyn-chain-ratio"), help="worktree and runs")
    parser.add_argument("--order", choices=["current-first", "reference-first"], default="current-first")
    args = parser.parse_args()
    commit = subprocess.run(
        ["git", "describe", "--always", "--dirty", "--abbrev=12"], cwd=REPO, capture_output=True, text=True
    ).stdout.strip()
    chains = {"current": REPO, "reference": worktree(args.reference, args.work / f"reference-{args.reference}")}
    order = list(chains) if args.order == "current-first" else list(chains)[::-1]
    measured = {}
    for name in order:
        measured[name] = chain_seconds(run_chain(chains[name], args.profile, args.work / f"runs-{name}"))
    table = pd.DataFrame({name: measured[name][2] for name in chains}).rename(
        columns={"current": f"current ({commit})", "reference": f"reference ({args.reference})"}
    )
    table.loc["sum of notebooks"] = [measured[name][0] for name in chains]
    table.loc["wall"] = [measured[name][1] for name in chains]
    table["ratio"] = table.iloc[:, 0] / table.iloc[:, 1]
    print(table.round(2).to_string())
    print(
        f"\n{args.profile}: {measured['current'][0] / 60:.1f} min against {measured['reference'][0] / 60:.1f} min "
        f"for {args.reference}: {measured['current'][0] / measured['reference'][0]:.3f}x ({args.order})"
    )
    table.to_csv(args.work / f"chain_ratio_{args.profile}.csv")


if __name__ == "__main__":
    main()
