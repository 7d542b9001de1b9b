"""The install is described three times and must agree: pyproject.toml (what medsyn needs),
requirements.lock (the exact versions the figures are made with, which the README's commands install)
and environment.yml (conda); the README's test command is what CI runs."""

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
    assert pip_block[0] == "-r requirements.lock"
    conda_side = dict(_requirement(s) for s in pip_block[1:])
    assert conda_side == pip_side
    assert "python=3.11" in environment["dependencies"]


def _lock() -> dict[str, str]:
    pins = {}
    for line in (REPO_ROOT / "requirements.lock").read_text().splitlines():
        if line and not line.startswith((" ", "#", "-")):
            name, version = line.split(";")[0].strip().split("==")
            pins[_requirement(name)[0]] = version
    return pins


def test_the_lock_pins_every_dependency_within_pyproject_s_ranges():
    from packaging.specifiers import SpecifierSet

    project = tomllib.loads((REPO_ROOT / "pyproject.toml").read_text())["project"]
    pins = _lock()
    for spec in project["dependencies"] + project["optional-dependencies"]["test"]:
        name, version = _requirement(spec)
        assert name in pins, f"{name} is not in requirements.lock: refresh it (README, 'Installing')"
        assert SpecifierSet(version).contains(pins[name]), (
            f"requirements.lock pins {name}=={pins[name]}, pyproject wants {version}"
        )
    assert len(pins) > 100  # the whole environment, not only the direct dependencies


def test_the_readme_installs_from_the_lock():
    readme = (REPO_ROOT / "README.md").read_text()
    commands = [c for c in re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S) if "pip install" in c]
    assert commands and all("-r requirements.lock" in c for c in commands)


def test_ci_runs_the_readme_test_command():
    readme = (REPO_ROOT / "README.md").read_text()
    commands = re.findall(r"```(?:bash|sh)\n(.*?)```", readme, flags=re.S)
    test_command = next(c.strip() for c in commands if "pytest" in c)
    assert test_command in (REPO_ROOT / ".ci" / "run").read_text()


def test_every_profile_is_valid_and_names_existing_notebooks():
    from medsyn.paths import NOTEBOOKS_DIR, PROFILES_DIR
    from medsyn.profiles import load_profile

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
        assert "parameters" in code[0]["metadata"].get("tags", []), (
            f"{path.name}: first code cell must be tagged parameters"
        )
