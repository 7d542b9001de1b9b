"""The chain runner: `medsyn reproduce --profile NAME` executes the stage notebooks in order with
papermill and the profile's parameters, and records the run.

A profile (`notebooks/profiles/<name>.yaml`) names the notebooks to run and their parameters:
`common` goes to every notebook that declares the parameter, `<notebook>` blocks to that notebook
only (a name the notebook does not declare is an error, so a typo cannot pass silently). String
values may contain `{run}` (the run directory) and `{repo}` (the repository root).
"""

import datetime
import json
import time
from pathlib import Path

import yaml

from medsyn.paths import NOTEBOOKS_DIR, PROFILES_DIR, REPO_ROOT, notebook_kernel, runs_dir
from medsyn.records import environment_record


class ChainError(RuntimeError):
    """A notebook of the chain failed; the message names the notebook and the cell."""


def profile_path(profile: str | Path) -> Path:
    """A profile name (`smoke`, `default`, `paper`) or a path to a profile YAML file."""
    path = Path(profile)
    if path.suffix in (".yaml", ".yml"):
        if not path.is_file():
            raise FileNotFoundError(f"profile file not found: {path}")
        return path
    path = PROFILES_DIR / f"{profile}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise FileNotFoundError(f"unknown profile '{profile}': no {path} (known: {known})")
    return path


def load_profile(profile: str | Path) -> dict:
    """Read a profile and check its shape."""
    path = profile_path(profile)
    with open(path) as f:
        data = yaml.safe_load(f)
    if not isinstance(data, dict) or "notebooks" not in data:
        raise ValueError(f"{path.name}: a profile needs a 'notebooks' list")
    unknown = set(data) - {"name", "description", "notebooks", "common"} - set(data["notebooks"])
    if unknown:
        raise ValueError(f"{path.name}: unknown keys {sorted(unknown)} (parameter blocks must name a listed notebook)")
    data.setdefault("name", path.stem)
    return data


def _substitute(value, run_dir: Path):
    if isinstance(value, str):
        return value.replace("{run}", str(run_dir)).replace("{repo}", str(REPO_ROOT))
    if isinstance(value, list):
        return [_substitute(v, run_dir) for v in value]
    if isinstance(value, dict):
        return {k: _substitute(v, run_dir) for k, v in value.items()}
    return value


def notebook_parameters(profile: dict, notebook: str, declared: set[str], run_dir: Path) -> dict:
    """The parameters one notebook receives: the declared subset of `common`, then its own block."""
    own = profile.get(notebook, {}) or {}
    undeclared = sorted(set(own) - declared)
    if undeclared:
        raise ValueError(
            f"profile '{profile['name']}' sets {undeclared} for {notebook}, "
            f"which its parameters cell does not declare (declared: {sorted(declared)})"
        )
    common = {k: v for k, v in (profile.get("common", {}) or {}).items() if k in declared}
    return _substitute({**common, **own}, run_dir)


def reproduce(
    profile: str | Path,
    out_dir: str | Path | None = None,
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
    kernel: str | None = None,
    progress: bool = True,
    start: str | None = None,
    only: list[str] | None = None,
    overrides: dict | None = None,
    resume: bool = False,
) -> Path:
    """Execute the profile's notebooks in order (or a part of them); return the run directory.

    The run directory holds `notebooks/` (the executed copies), whatever the notebooks write under
    `{run}`, and `run.json` (profile, overrides, parameters, environment, per-notebook status and
    seconds). A part of the chain reuses what the earlier notebooks wrote into the run directory: from
    `06_fidelity` on, say, every figure is drawn again without training anything.

    Args:
        profile: profile name or YAML path.
        out_dir: run directory; default `runs/<profile>` (or `$MEDSYN_RUNS/<profile>`).
        notebooks_dir: where the stage notebooks live.
        kernel: Jupyter kernel name; default `python3` (or `$MEDSYN_KERNEL`).
        progress: show a line per notebook (its place in the chain, the time so far) and papermill's bars.
        start: run from this notebook on; those before it must have run in this run directory.
        only: run just these notebooks (in the profile's order).
        overrides: parameter -> value for every notebook that declares it, over the profile (papermill's
            `-p NAME VALUE`); a name no notebook declares is an error.
        resume: start from the first notebook of the last run in this directory that did not finish.

    Raises:
        ChainError: naming the failed notebook and cell, and the executed copy with the traceback.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    spec = load_profile(profile)
    run_dir = Path(out_dir) if out_dir else runs_dir() / spec["name"]
    run_dir = run_dir.resolve()
    previous = json.loads((run_dir / "run.json").read_text()) if (run_dir / "run.json").is_file() else {}
    done = [n["notebook"] for n in previous.get("notebooks", []) if n.get("status") == "ok"]
    if resume:
        if not previous:
            raise ValueError(f"nothing to resume: {run_dir / 'run.json'} does not exist")
        start = next((name for name in spec["notebooks"] if name not in done), None)
        if start is None:
            raise ValueError(f"nothing to resume: every notebook of {run_dir} finished")
    selected = _select(spec["notebooks"], start, only, done, run_dir)
    overrides = dict(overrides or {})
    declared = {}
    for name in spec["notebooks"]:
        source = Path(notebooks_dir) / f"{name}.ipynb"
        if not source.is_file():
            raise FileNotFoundError(f"profile '{spec['name']}' lists {name}, but {source} does not exist")
        declared[name] = set(papermill.inspect_notebook(str(source)))
    unknown = sorted(set(overrides) - set().union(*declared.values()))
    if unknown:
        raise ValueError(f"overrides {unknown}: no notebook of profile '{spec['name']}' declares them")

    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    kept = [n for n in previous.get("notebooks", []) if n["notebook"] not in selected and n.get("status") == "ok"]
    record = {
        "profile": spec,
        "overrides": overrides,
        "selected": selected,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": environment_record(),
        "notebooks": kept,
    }

    def save_record():
        # kept and new entries in the profile's order, whichever part of the chain ran this time
        record["notebooks"].sort(key=lambda entry: spec["notebooks"].index(entry["notebook"]))
        (run_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))

    began = time.perf_counter()
    for place, name in enumerate(selected, 1):
        source = Path(notebooks_dir) / f"{name}.ipynb"
        parameters = notebook_parameters(spec, name, declared[name], run_dir)
        parameters.update({k: v for k, v in overrides.items() if k in declared[name]})
        executed = run_dir / "notebooks" / source.name
        entry = {"notebook": name, "parameters": parameters, "executed": str(executed)}
        record["notebooks"].append(entry)
        if progress:
            print(f"[{place}/{len(selected)}] {name} ({_minutes(time.perf_counter() - began)} so far)", flush=True)
        start_time = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(source),
                str(executed),
                parameters=parameters,
                kernel_name=kernel or notebook_kernel(),
                cwd=str(run_dir),
                progress_bar=progress,
            )
        except PapermillExecutionError as err:
            entry.update(
                status="failed",
                seconds=round(time.perf_counter() - start_time, 1),
                cell_index=err.cell_index,
                error=f"{err.ename}: {err.evalue}",
            )
            save_record()
            raise ChainError(
                f"notebook {name} failed in cell {err.cell_index} (execution count {err.exec_count}): "
                f"{err.ename}: {err.evalue}\nexecuted copy with the full traceback: {executed}\n"
                f"after a fix: medsyn reproduce --profile {profile} --out {run_dir} --resume"
            ) from None
        entry.update(status="ok", seconds=round(time.perf_counter() - start_time, 1))
        save_record()
    record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    save_record()
    return run_dir


def _select(
    notebooks: list[str], start: str | None, only: list[str] | None, done: list[str], run_dir: Path
) -> list[str]:
    """The notebooks to run: all, from `start` on (those before it must have run here), or `only`."""
    if start is not None and only:
        raise ValueError("give a notebook to start from or a list of notebooks to run, not both")
    for name in [start] if start else only or []:
        if name not in notebooks:
            raise ValueError(f"{name!r} is not a notebook of this profile: {notebooks}")
    if only:
        return [name for name in notebooks if name in only]
    if start is None:
        return list(notebooks)
    before = notebooks[: notebooks.index(start)]
    missing = [name for name in before if name not in done]
    if missing:
        raise ValueError(f"cannot start from {start}: {missing} have not run in {run_dir}")
    return notebooks[notebooks.index(start) :]


def _minutes(seconds: float) -> str:
    return f"{int(seconds // 60)} min {int(seconds % 60)} s"
