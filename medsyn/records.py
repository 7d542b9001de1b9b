"""Every figure and table is written through `save_figure` / `save_table`, which also write its
provenance (STYLE rule 10): parameters, git commit, package versions and hashes of the inputs."""

import datetime
import hashlib
import json
import platform
import subprocess
from importlib import metadata
from pathlib import Path

from medsyn.paths import REPO_ROOT, open_notebook_name

PACKAGES = (
    "medsyn",
    "torch",
    "torchvision",
    "diffusers",
    "transformers",
    "accelerate",
    "open_clip_torch",
    "numpy",
    "scipy",
    "pandas",
    "pillow",
    "pydicom",
    "nibabel",
    "imagehash",
    "matplotlib",
    "seaborn",
    "papermill",
    "datasets",
)


def git_commit() -> str:
    """The repository's HEAD commit, with '+dirty' when tracked files changed; 'unknown' outside git."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True, check=True, timeout=10
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return commit + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def package_versions() -> dict[str, str]:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def environment_record() -> dict:
    """Python, platform, git commit and package versions: the setup cell of every notebook shows this."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "git_commit": git_commit(),
        "packages": package_versions(),
    }


def file_sha256(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def input_hashes(inputs: list[str | Path]) -> dict[str, str]:
    """SHA-256 of each input file; a dataset directory is represented by its splits' `metadata.jsonl`
    files (hashed together in split-folder order), any other directory as 'directory'."""
    hashes = {}
    for item in inputs:
        path = Path(item)
        metadata = sorted(path.glob("*/metadata.jsonl")) if path.is_dir() else []
        if metadata:
            digest = hashlib.sha256()
            for part in metadata:
                digest.update(file_sha256(part).encode())
            hashes[str(item)] = digest.hexdigest()
        elif path.is_dir():
            hashes[str(item)] = "directory"
        else:
            hashes[str(item)] = file_sha256(path) if path.is_file() else "missing"
    return hashes


def write_provenance(output: str | Path, parameters: dict, inputs: list[str | Path]) -> Path:
    """Write `<output>.provenance.json` beside an output file and return its path."""
    output = Path(output)
    record = {
        "output": output.name,
        "output_sha256": file_sha256(output),
        "created": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "parameters": parameters,
        "inputs": input_hashes(inputs),
        **environment_record(),
    }
    path = output.with_name(output.name + ".provenance.json")
    path.write_text(json.dumps(record, indent=2, default=str))
    return path


# what a notebook's parameters cell may bind: typed literals (STYLE: papermill's parameters cell)
LITERALS = (str, int, float, bool, type(None), list, dict, tuple)
IPYTHON_NAMES = {"In", "Out", "exit", "quit", "get_ipython"}


class ProfileRequired(RuntimeError):
    """A stage notebook run as it stands, without a profile's parameters."""

    def _render_traceback_(self) -> list[str]:  # IPython shows this sentence instead of a traceback
        return [f"{type(self).__name__}: {self}"]


def notebook_parameters(namespace: dict) -> dict:
    """A notebook's parameters, read from its namespace rather than typed again: every name bound to a
    literal when the setup cell runs (right after the parameters cell and papermill's injected
    overrides). Call it in the setup cell before assigning anything else.

    Args:
        namespace: the notebook's `globals()`.

    Raises:
        ProfileRequired: the notebook's `profile` parameter is unset, so the parameters cell's values
            (the papers' scale, paths relative to wherever the notebook was opened) were not replaced
            by a profile's: the notebook stops before doing anything and says how to get them.
    """
    if namespace.get("profile", "") is None:
        name = open_notebook_name() or "<this notebook's name, such as 06_fidelity>"
        raise ProfileRequired(
            f"this notebook needs a profile's parameters: open the copy that `medsyn notebook {name} --profile "
            "default` writes into the run directory, or run the whole chain with `medsyn reproduce --profile default`."
        )
    return {
        name: value
        for name, value in namespace.items()
        if not name.startswith("_") and name not in IPYTHON_NAMES and isinstance(value, LITERALS)
    }


def save_figure(fig, path: str | Path, parameters: dict, inputs: list[str | Path], dpi: int = 150) -> Path:
    """Save a matplotlib figure (PNG, or the suffix given) with its provenance record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, bbox_inches="tight")
    write_provenance(path, parameters, inputs)
    return path


def save_table(table, path: str | Path, parameters: dict, inputs: list[str | Path]) -> Path:
    """Save a pandas DataFrame as CSV with its provenance record."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    table.to_csv(path)
    write_provenance(path, parameters, inputs)
    return path
