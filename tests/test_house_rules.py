"""The house rules that a later change could quietly break (README, "Layout"): notebooks that only tell
and share one shape, one source for each parameter, marked copies that still match, and imports that
only point down the layers."""

import ast
import importlib
import inspect
import json
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import papermill
import pytest
import yaml

from medsyn.paths import NOTEBOOKS_DIR, PROFILES_DIR, REPO_ROOT
from medsyn.records import notebook_parameters

NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))


def _cells(path: Path) -> list[dict]:
    return json.loads(path.read_text())["cells"]


def _source(cell: dict) -> str:
    # IPython's magics and shell escapes are not Python
    return "\n".join(line for line in "".join(cell["source"]).splitlines() if not line.lstrip().startswith(("%", "!")))


def test_there_are_notebooks_to_check():
    assert len(NOTEBOOKS) >= 8


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_no_notebook_cell_defines_a_function_or_class_or_loops(notebook):
    """STYLE rule 1: the notebook tells, medsyn does. Comprehensions that list what was written are
    fine; a `for` or `while` statement over data belongs in the package."""
    found = []
    for i, cell in enumerate(_cells(notebook)):
        if cell["cell_type"] != "code":
            continue
        for node in ast.walk(ast.parse(_source(cell))):
            if isinstance(
                node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef | ast.Lambda | ast.For | ast.While
            ):
                found.append(f"cell {i}: {type(node).__name__} at line {node.lineno}")
    assert not found, found


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_every_notebook_has_the_house_shape(notebook):
    """Title with Reads / Writes -> parameters -> setup -> steps, each a header and code ending in a
    visible check -> a closing cell listing what was written."""
    cells = _cells(notebook)
    title = "".join(cells[0]["source"])
    assert cells[0]["cell_type"] == "markdown" and title.startswith("# ")
    assert "**Reads**" in title and "**Writes**" in title
    assert cells[1]["cell_type"] == "code" and cells[1]["metadata"].get("tags") == ["parameters"]
    setup = "".join(cells[2]["source"])
    assert cells[2]["cell_type"] == "code" and "parameters = notebook_parameters(globals())" in setup
    assert "environment_record()" in setup
    assert cells[-2]["cell_type"] == "markdown" and "".join(cells[-2]["source"]).startswith("## Written")
    assert cells[-1]["cell_type"] == "code"

    steps, current = [], None
    for cell in cells[3:]:
        if cell["cell_type"] == "markdown" and "".join(cell["source"]).startswith("## "):
            current = {"header": "".join(cell["source"]).splitlines()[0], "code": []}
            steps.append(current)
        elif cell["cell_type"] == "code":
            assert current is not None, "a code cell after the setup cell before any step header"
            current["code"].append(_source(cell))
    assert len(steps) >= 2
    for step in steps:
        assert step["code"], f"{step['header']}: no code"
        last = ast.parse(step["code"][-1]).body[-1]
        while isinstance(last, ast.If):  # a step that runs only in some settings shows its check inside
            last = last.body[-1]
        assert isinstance(last, ast.Expr | ast.Assert), f"{step['header']}: ends without a visible check"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_the_parameter_record_is_derived_from_the_parameters_cell_and_every_parameter_is_used(notebook):
    cells = _cells(notebook)
    declared = set(papermill.inspect_notebook(str(notebook)))
    namespace = {"In": [], "Out": {}}  # what IPython puts there too
    exec(_source(cells[1]), namespace)  # noqa: S102 - the notebook's own literals
    namespace["profile"] = "test"  # as the chain injects it
    namespace.pop("__builtins__")
    assert set(notebook_parameters(namespace)) == declared
    lines = _source(cells[1]).splitlines()
    for statement in ast.parse(_source(cells[1])).body:
        assert isinstance(statement, ast.Assign), f"the parameters cell holds only assignments: line {statement.lineno}"
        ast.literal_eval(statement.value)  # a typed literal, nothing computed
        span = lines[statement.lineno - 1 : statement.end_lineno]
        assert any("#" in line for line in span), f"parameter without a comment: {span[0]}"
    used = set()
    for cell in cells[2:]:
        if cell["cell_type"] == "code":
            used |= {n.id for n in ast.walk(ast.parse(_source(cell))) if isinstance(n, ast.Name)}
    assert "profile" in declared  # notebook_parameters(globals()) reads it: without a profile, the notebook stops
    assert declared - {"profile"} <= used, f"declared and never used: {sorted(declared - used - {'profile'})}"


def test_profiles_share_what_is_shared():
    """Paths every notebook reads and the family list live in `common`, once."""
    for profile in sorted(PROFILES_DIR.glob("*.yaml")):
        data = yaml.safe_load(profile.read_text())
        for name in ("curated_dir", "generated_dir", "figures_dir", "families"):
            assert name in data["common"], f"{profile.name}: {name} is not in common"
        repeated = {
            name
            for notebook in data["notebooks"]
            for name, value in (data.get(notebook) or {}).items()
            if name in data["common"] and data["common"][name] == value
        }
        assert not repeated, f"{profile.name} repeats common values in notebook blocks: {sorted(repeated)}"


COPY = re.compile(r'^(\s*)# Copied from ([\w.]+), block "([^"]+)"\s*$')


def _block(lines: list[str], start: int) -> str:
    """The lines after a marker up to its `# End block`, dedented."""
    end = next(i for i in range(start + 1, len(lines)) if lines[i].strip() == "# End block")
    return textwrap.dedent("\n".join(lines[start + 1 : end]))


def test_marked_copies_still_match_their_original():
    """Where a training loop keeps a deliberate copy of shared lines, it is marked as diffusers marks
    its copies; a copy that drifts from the original fails here."""
    copies = 0
    for path in sorted((REPO_ROOT / "medsyn").rglob("*.py")):
        lines = path.read_text().splitlines()
        for i, line in enumerate(lines):
            match = COPY.match(line)
            if not match:
                continue
            module, _, name = match.group(2).rpartition(".")
            original = inspect.getsource(getattr(importlib.import_module(module), name)).splitlines()
            begin = next(
                k for k, text in enumerate(original) if text.strip().startswith(f'# Begin block "{match.group(3)}"')
            )
            assert _block(lines, i) == _block(original, begin), f"{path.name}:{i + 1} differs from {match.group(2)}"
            copies += 1
    assert copies >= 3


def test_imports_point_down_the_layers():
    """The contracts in pyproject.toml ([tool.importlinter]): data -> models -> sampling -> training ->
    metrics -> experiments -> the commands, and metrics never import training."""
    command = shutil.which("lint-imports", path=str(Path(sys.executable).parent)) or shutil.which("lint-imports")
    if command is None:
        pytest.fail("lint-imports (import-linter, a test dependency) is not installed")
    run = subprocess.run(
        [command, "--config", str(REPO_ROOT / "pyproject.toml")],
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stdout + run.stderr
