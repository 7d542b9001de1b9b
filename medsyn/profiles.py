"""Profiles, what each stage notebook receives from one, and the preflight check of what a profile
needs on disk before anything runs.

A profile (`notebooks/profiles/<name>.yaml`) names the notebooks to run and their parameters:
`common` goes to every notebook that declares the parameter, `<notebook>` blocks to that notebook
only (a name the notebook does not declare is an error, so a typo cannot pass silently). String
values may contain `{run}` (the run directory) and `{repo}` (the repository root). Every notebook
also receives `profile`, the profile's name: a stage notebook run without one stops in its setup
cell and says how to get one (`medsyn.records.notebook_parameters`).
"""

import itertools
from dataclasses import dataclass
from pathlib import Path

import yaml

from medsyn.paths import PROFILES_DIR, REPO_ROOT


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


def notebook_parameters(
    profile: dict, notebook: str, declared: set[str], run_dir: Path, overrides: dict | None = None
) -> dict:
    """The parameters one notebook receives: `profile` (the profile's name), the declared subset of
    `common`, its own block, then the declared subset of `overrides` (the command line's `-p`)."""
    own = profile.get(notebook, {}) or {}
    undeclared = sorted(set(own) - declared)
    if undeclared:
        raise ValueError(
            f"profile '{profile['name']}' sets {undeclared} for {notebook}, "
            f"which its parameters cell does not declare (declared: {sorted(declared)})"
        )
    common = {k: v for k, v in (profile.get("common", {}) or {}).items() if k in declared}
    chosen = {k: v for k, v in (overrides or {}).items() if k in declared}
    named = {"profile": profile["name"]} if "profile" in declared else {}
    return _substitute({**named, **common, **own, **chosen}, run_dir)


# What a profile can name that must be on disk before the chain starts, unless a notebook earlier in
# the chain writes it: parameter -> (what it is, the file that must be inside a directory; None for a file).
LOCAL_INPUTS = {
    "finetune_pretrained_dir": ("pretrained SD 1.x / SDXL pipeline, diffusers layout (MediSyn)", "model_index.json"),
    "flux_pretrained_dir": ("FLUX.1 pipeline, diffusers layout (MSDM's LoRA baseline)", "model_index.json"),
    "kandinsky_prior_dir": ("Kandinsky 2.2 prior pipeline, diffusers layout", "model_index.json"),
    "kandinsky_decoder_dir": ("Kandinsky 2.2 decoder pipeline, diffusers layout", "model_index.json"),
    "pretrained_dir": ("PixArt-α pipeline, diffusers layout (Med-Art)", "model_index.json"),
    "vae_dir": ("autoencoder, diffusers layout", "config.json"),
    "text_encoder_path": ("text encoder, transformers layout", "config.json"),
    "embedder_dir": ("open_clip image encoder (MediSyn: BiomedCLIP)", "open_clip_config.json"),
    "domain_clip_dir": ("domain CLIP, open_clip layout", "open_clip_config.json"),
    "curated_dir": ("curated dataset", "medsyn_dataset.json"),
    "held_out_dir": ("held-out dataset of other patients (01_curate's held_out_sources)", "medsyn_dataset.json"),
    "probe_path": ("real-image class probe", None),
    "imagenet_weights": ("ImageNet ResNet-50 weights (torchvision state dict)", None),
    "inception_weights": ("InceptionV3 weights for FID (torch-fidelity's; or set $MEDSYN_INCEPTION_WEIGHTS)", None),
    "pipelines": ("saved pipeline to sample", "model_index.json"),
    "vlm_dir": ("vision-language model for captions, transformers layout", "config.json"),
    "report_llm_dir": ("instruction-tuned language model for reports, transformers layout", "config.json"),
    "pretrained_lm_dir": ("causal language model to fine-tune over image codes, transformers layout", "config.json"),
}

# What each stage notebook writes, by parameter: inputs inside these paths come from the chain itself.
STAGE_OUTPUTS = {
    "01_curate": ("curated_dir", "probe_path", "domain_clip_dir", "held_out_dir"),
    "02_train_ldm": ("models_dir", "finetune_dir", "pretrain_dir", "large_lora_dir"),
    "03_train_dit_hldf": ("models_dir", "template_captions_dir"),
    "04_train_vq_ar": ("models_dir",),
    "05_sample": ("generated_dir",),
}


@dataclass(frozen=True)
class Missing:
    """One thing a profile needs that is not on disk."""

    notebook: str
    parameter: str
    what: str
    path: str

    def __str__(self) -> str:
        return f"{self.notebook} · {self.parameter}: {self.what}, looked for at {self.path}"


class PreflightError(ValueError):
    """Things a run needs are missing; the message lists every one."""

    def __init__(self, profile: str, missing: list[Missing]):
        self.missing = missing
        lines = "\n".join(f"  - {m}" for m in missing)
        super().__init__(f"profile '{profile}' needs {len(missing)} thing(s) that are not on disk:\n{lines}")


def _in_run(path: str | Path, run_dir: Path) -> Path:
    """A path as a notebook of the chain sees it: relative ones from the run directory, its cwd."""
    path = Path(path)
    return path if path.is_absolute() else run_dir / path


def _inside(path: Path, produced: list[Path]) -> bool:
    return any(path == p or p in path.parents for p in produced)


def _absent(path: Path, needs: str | None) -> bool:
    if needs is None:
        return not path.is_file()
    return not (path / needs).is_file()


def _raw_sources(notebook: str, parameters: dict) -> list[Missing]:
    """With `corpus: none`, each manifest's source folder under `raw_dir` with at least one image file
    its `include` patterns match, and its tables."""
    from medsyn.data.curate import table_paths
    from medsyn.data.manifest import load_manifest, resolve_manifest

    if parameters.get("corpus") != "none":
        return []
    raw = Path(parameters["raw_dir"])
    missing = []
    for name in parameters.get("manifests", []):
        manifest = load_manifest(resolve_manifest(name))
        root = raw / manifest["root"]
        what = f"raw source {manifest['name']} ({manifest.get('title', manifest['name'])}; see its manifest's notes)"
        if not root.is_dir():
            missing.append(Missing(notebook, "raw_dir", what, str(root)))
            continue
        patterns = manifest["reader"]["include"]
        if not any(p.is_file() for p in itertools.chain.from_iterable(root.glob(g) for g in patterns)):
            missing.append(Missing(notebook, "raw_dir", f"{what}: no file matching {patterns}", str(root)))
        for relative in table_paths(manifest):
            if not (root / relative).is_file():
                missing.append(Missing(notebook, "raw_dir", f"{what}: its table", str(root / relative)))
    return missing


def preflight(
    profile: dict, declared: dict[str, set[str]], run_dir: Path, overrides: dict | None = None
) -> list[Missing]:
    """Everything the profile's notebooks read from disk that no earlier notebook of the chain writes
    and that is not there: pretrained pipelines and weights, local encoders, raw sources (with
    `corpus: none`) and, when `require_fid` is set, InceptionV3's weights. Nothing is loaded; the
    check reads directory listings only, so a `paper` run with nothing on disk ends in seconds.

    Args:
        profile: a loaded profile.
        declared: notebook -> the parameters its parameters cell declares.
        run_dir: the run directory `{run}` stands for.
        overrides: command-line overrides, as the chain applies them.
    """
    produced: list[Path] = []
    missing: list[Missing] = []
    for notebook in profile["notebooks"]:
        parameters = notebook_parameters(profile, notebook, declared[notebook], run_dir, overrides)
        outputs = STAGE_OUTPUTS.get(notebook, ())
        for name, value in parameters.items():
            if name in outputs or name not in LOCAL_INPUTS or value is None:
                continue
            what, needs = LOCAL_INPUTS[name]
            paths = value.items() if isinstance(value, dict) else [(None, value)]
            for key, path in paths:
                path = _in_run(path, run_dir)
                if not _inside(path, produced) and _absent(path, needs):
                    label = f"{what} ({key})" if key else what
                    shown = path / needs if needs else path
                    missing.append(Missing(notebook, name, label, str(shown)))
        if parameters.get("require_fid") and parameters.get("inception_weights") is None:
            from medsyn.metrics.fidelity import inception_places

            places = inception_places(None)
            if not any(place.is_file() for _, place in places):
                where = "; ".join(f"{name}: {place}" for name, place in places)
                missing.append(Missing(notebook, "inception_weights", LOCAL_INPUTS["inception_weights"][0], where))
        missing += _raw_sources(notebook, parameters)
        produced += [_in_run(parameters[name], run_dir) for name in outputs if parameters.get(name)]
    return missing
