"""Shared fixtures: one small embedded corpus, curated once per test session."""

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from medsyn.data.corpus import SOURCES, write_corpus  # noqa: E402
from medsyn.data.curate import curate  # noqa: E402
from medsyn.data.dataset import read_records  # noqa: E402
from medsyn.paths import MANIFESTS_DIR  # noqa: E402

EMBEDDED_MANIFESTS = [MANIFESTS_DIR / f"{name}.yaml" for name in SOURCES]


@pytest.fixture(scope="session")
def corpus(tmp_path_factory) -> dict:
    """A written embedded corpus (8 patients per source, 64 px raw) and its ground truth."""
    root = tmp_path_factory.mktemp("corpus")
    truth = write_corpus(root / "raw", patients=8, seed=3, size=64, progress=False)
    return {"raw": root / "raw", "truth": truth}


@pytest.fixture(scope="session")
def curated(corpus, tmp_path_factory) -> dict:
    """That corpus curated at 32 px with every embedded manifest."""
    out = tmp_path_factory.mktemp("curated") / "dataset"
    result = curate(EMBEDDED_MANIFESTS, corpus["raw"], out, size=32, seed=0, progress=False)
    records = read_records(out)
    return {"out": out, "result": result, "records": records, **corpus}


def pydicom_file(name: str) -> Path:
    """A DICOM test file shipped with pydicom or the pydicom-data package (never downloaded)."""
    import pydicom

    for base in (Path(pydicom.__file__).parent / "data" / "test_files",):
        if (base / name).is_file():
            return base / name
    import data_store  # the pydicom-data package

    path = Path(data_store.__file__).parent / "data" / name
    if not path.is_file():
        pytest.fail(f"DICOM test file {name} is in neither pydicom nor pydicom-data")
    return path
