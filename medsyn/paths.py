"""Every default path and every environment variable medsyn reads, in one place (STYLE rule 4).

Functions take their paths as arguments; only defaults come from here.
"""

import os
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
PROFILES_DIR = NOTEBOOKS_DIR / "profiles"
MANIFESTS_DIR = REPO_ROOT / "data_manifests"
VOCABULARIES_DIR = MANIFESTS_DIR / "vocabularies"


def runs_dir() -> Path:
    """Where `medsyn reproduce` puts run directories unless `--out` is given (`MEDSYN_RUNS`)."""
    return Path(os.environ.get("MEDSYN_RUNS", REPO_ROOT / "runs"))


def notebook_kernel() -> str:
    """Jupyter kernel the chain runner executes notebooks with (`MEDSYN_KERNEL`, default `python3`)."""
    return os.environ.get("MEDSYN_KERNEL", "python3")


INCEPTION_ENV = "MEDSYN_INCEPTION_WEIGHTS"


def inception_weights_from_environment() -> Path | None:
    """The InceptionV3 weights file for FID named by `MEDSYN_INCEPTION_WEIGHTS`, or None when unset."""
    value = os.environ.get(INCEPTION_ENV)
    return Path(value) if value else None


def open_notebook_name() -> str | None:
    """The stem of the notebook a JupyterLab kernel runs (`JPY_SESSION_NAME`, which Jupyter Server sets
    to the notebook's path); None outside JupyterLab."""
    value = os.environ.get("JPY_SESSION_NAME")
    return Path(value).stem if value else None


def environment_with(**variables: str) -> dict:
    """This process's environment with `variables` set, for a process medsyn starts (for example
    `OMP_NUM_THREADS` for each of several training processes)."""
    return {**os.environ, **variables}
