"""The chain runner: `medsyn reproduce --profile NAME` checks that what the profile needs is on disk,
executes the stage notebooks in order with papermill and the profile's parameters, and records the
run; `medsyn notebook` writes one stage notebook with a profile's parameters, to open and run cell by
cell. Profiles and their parameters: `medsyn.profiles`.
"""

import datetime
import json
import time
from pathlib import Path

from medsyn.paths import NOTEBOOKS_DIR, notebook_kernel, runs_dir
from medsyn.profiles import PreflightError, load_profile, notebook_parameters, preflight
from medsyn.records import environment_record


class ChainError(RuntimeError):
    """A notebook of the chain failed; the message names the notebook and the cell."""


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
        PreflightError: before anything runs, listing every pretrained model, weight file and raw source
            the profile names that is not on disk (`medsyn.profiles.preflight`).
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
    declared = declared_parameters(spec, notebooks_dir, overrides)
    missing = preflight(spec, declared, run_dir, overrides)
    if missing:
        raise PreflightError(spec["name"], missing)

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
        parameters = notebook_parameters(spec, name, declared[name], run_dir, overrides)
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


def declared_parameters(spec: dict, notebooks_dir: str | Path, overrides: dict | None = None) -> dict[str, set[str]]:
    """Notebook -> the parameters its parameters cell declares, for every notebook of the profile;
    an override no notebook declares is an error."""
    import papermill

    declared = {}
    for name in spec["notebooks"]:
        source = Path(notebooks_dir) / f"{name}.ipynb"
        if not source.is_file():
            raise FileNotFoundError(f"profile '{spec['name']}' lists {name}, but {source} does not exist")
        declared[name] = set(papermill.inspect_notebook(str(source)))
    unknown = sorted(set(overrides or {}) - set().union(*declared.values()))
    if unknown:
        raise ValueError(f"overrides {unknown}: no notebook of profile '{spec['name']}' declares them")
    return declared


def check_profile(
    profile: str | Path,
    out_dir: str | Path | None = None,
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
    overrides: dict | None = None,
) -> list:
    """`medsyn preflight`: what a run of the profile would find missing (`medsyn.profiles.Missing`)."""
    spec = load_profile(profile)
    run_dir = (Path(out_dir) if out_dir else runs_dir() / spec["name"]).resolve()
    return preflight(spec, declared_parameters(spec, notebooks_dir, overrides), run_dir, overrides)


def write_notebook(
    notebook: str,
    profile: str | Path,
    out_dir: str | Path | None = None,
    notebooks_dir: str | Path = NOTEBOOKS_DIR,
    overrides: dict | None = None,
    kernel: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write one stage notebook with the profile's parameters injected, as the chain would run it, into
    the run directory's root (`<run>/<notebook>.ipynb`), to open in JupyterLab and run cell by cell:
    its working directory is then the run directory, as in the chain. The earlier notebooks' outputs
    are read from the run directory; nothing is executed here.

    Raises:
        FileExistsError: the copy exists (it may hold edits or outputs) and `overwrite` is False.
    """
    import nbformat
    from papermill.iorw import load_notebook_node
    from papermill.parameterize import parameterize_notebook

    spec = load_profile(profile)
    if notebook not in spec["notebooks"]:
        raise ValueError(f"{notebook!r} is not a notebook of profile '{spec['name']}': {spec['notebooks']}")
    run_dir = (Path(out_dir) if out_dir else runs_dir() / spec["name"]).resolve()
    declared = declared_parameters(spec, notebooks_dir, overrides)
    target = run_dir / f"{notebook}.ipynb"
    if target.exists() and not overwrite:
        raise FileExistsError(f"{target} exists (it may hold your edits); remove it or pass --force")
    parameters = notebook_parameters(spec, notebook, declared[notebook], run_dir, overrides)
    nb = load_notebook_node(str(Path(notebooks_dir) / f"{notebook}.ipynb"))
    nb = parameterize_notebook(nb, parameters, kernel_name=kernel or notebook_kernel())
    run_dir.mkdir(parents=True, exist_ok=True)
    nbformat.write(nb, target)
    return target


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
