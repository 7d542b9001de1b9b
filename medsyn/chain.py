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
) -> Path:
    """Execute the profile's notebooks in order; return the run directory.

    The run directory holds `notebooks/` (the executed copies), whatever the notebooks write under
    `{run}`, and `run.json` (profile, parameters, environment, per-notebook status and seconds).

    Args:
        profile: profile name or YAML path.
        out_dir: run directory; default `runs/<profile>` (or `$MEDSYN_RUNS/<profile>`).
        notebooks_dir: where the stage notebooks live.
        kernel: Jupyter kernel name; default `python3` (or `$MEDSYN_KERNEL`).
        progress: show papermill's progress bars.

    Raises:
        ChainError: naming the failed notebook and cell, and the executed copy with the traceback.
    """
    import papermill
    from papermill.exceptions import PapermillExecutionError

    spec = load_profile(profile)
    run_dir = Path(out_dir) if out_dir else runs_dir() / spec["name"]
    run_dir = run_dir.resolve()
    (run_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    record = {
        "profile": spec,
        "started": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "environment": environment_record(),
        "notebooks": [],
    }

    def save_record():
        (run_dir / "run.json").write_text(json.dumps(record, indent=2, default=str))

    for name in spec["notebooks"]:
        source = Path(notebooks_dir) / f"{name}.ipynb"
        if not source.is_file():
            raise FileNotFoundError(f"profile '{spec['name']}' lists {name}, but {source} does not exist")
        declared = set(papermill.inspect_notebook(str(source)))
        parameters = notebook_parameters(spec, name, declared, run_dir)
        executed = run_dir / "notebooks" / source.name
        entry = {"notebook": name, "parameters": parameters, "executed": str(executed)}
        record["notebooks"].append(entry)
        start = time.perf_counter()
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
                seconds=round(time.perf_counter() - start, 1),
                cell_index=err.cell_index,
                error=f"{err.ename}: {err.evalue}",
            )
            save_record()
            raise ChainError(
                f"notebook {name} failed in cell {err.cell_index} (execution count {err.exec_count}): "
                f"{err.ename}: {err.evalue}\nexecuted copy with the full traceback: {executed}"
            ) from None
        entry.update(status="ok", seconds=round(time.perf_counter() - start, 1))
        save_record()
    record["finished"] = datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")
    save_record()
    return run_dir
