"""The install is described twice (pyproject.toml for pip, environment.yml for conda) and must agree;
the README's test command is what CI runs."""

import re
import tomllib

import yaml

from medsyn.paths import REPO_ROOT


def _requirement(spec: str) -> tuple[str, str]:
    name, version = re.match(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*)$", spec).groups()
    return re.sub(r"[-_.]+", "-", name).lower(), version.replace(" ", "")


def test_environment_yml_lists_the_same_packages_as_pyproject():
    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pip_side = dict(_requirement(s) for s in project["dependencies"] + project["optional-dependencies"]["test"])
    environment = yaml.safe_load((REPO_ROOT / "environment.yml").read_text())
    pip_block = next(d["pip"] for d in environment["dependencies"] if isinstance(d, dict) and "pip" in d)
    conda_side = dict(_requirement(s) for s in pip_block)
    assert conda_side == pip_side
    assert "python=3.11" in environment["dependencies"]


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_command = next(c.strip() for c in commands if "pytest" in c)
    assert test_command in (REPO_ROOT / ".ci" / "run").read_text()


def test_every_profile_is_valid_and_names_existing_notebooks():
    from medsyn.chain import load_profile
    from medsyn.paths import NOTEBOOKS_DIR, PROFILES_DIR

    for path in PROFILES_DIR.glob("*.yaml"):
        profile = load_profile(path)
        for name in profile["notebooks"]:
            assert (NOTEBOOKS_DIR / f"{name}.ipynb").is_file(), (path.name, name)


def test_notebooks_are_committed_without_outputs():
    import json

    from medsyn.paths import NOTEBOOKS_DIR

    for path in NOTEBOOKS_DIR.glob("*.ipynb"):
        notebook = json.loads(path.read_text())
        code = [c for c in notebook["cells"] if c["cell_type"] == "code"]
        assert all(not c["outputs"] and c["execution_count"] is None for c in code), path.name
        assert "parameters" in code[0]["metadata"].get("tags", []), f"{path.name}: first code cell must be tagged parameters"
