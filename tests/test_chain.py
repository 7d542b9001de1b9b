"""The chain runner executes notebooks with papermill and names the notebook and cell that fail."""

import json
import subprocess
import sys
import time

import datasets
import nbformat
import pandas as pd
import pytest
import yaml

from medsyn.chain import ChainError, check_profile, reproduce, write_notebook
from medsyn.data.dataset import class_prompts, read_records, split_records
from medsyn.paths import NOTEBOOKS_DIR
from medsyn.profiles import PreflightError, load_profile, notebook_parameters


def test_smoke_profile_runs_the_chain_end_to_end(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))  # no Inception weights: FID must be left out
    monkeypatch.delenv("MEDSYN_INCEPTION_WEIGHTS", raising=False)
    run_dir = reproduce("smoke", tmp_path / "run", progress=False)
    record = json.loads((run_dir / "run.json").read_text())
    assert [n["status"] for n in record["notebooks"]] == ["ok"] * len(record["profile"]["notebooks"])
    assert record["environment"]["git_commit"]
    executed = nbformat.read(run_dir / "notebooks" / "01_curate.ipynb", as_version=4)
    assert any("injected-parameters" in c.metadata.get("tags", []) for c in executed.cells)
    for name in (
        "dataset_specialty_by_split.csv",
        "dataset_image_type_by_split.png",
        "dataset_examples.png",
        "dataset_class_probe.png",
    ):
        assert (run_dir / "figures" / name).is_file(), name
        provenance = json.loads((run_dir / "figures" / f"{name}.provenance.json").read_text())
        assert provenance["parameters"]["size"] == 32 and provenance["inputs"]
    curated = run_dir / "data" / "curated"
    summary = json.loads((curated / "curation_summary.json").read_text())
    assert {s: len(read_records(curated, s)) for s in ("train", "validation", "test")} == summary["images_by_split"]
    loaded = datasets.load_dataset("imagefolder", data_dir=str(curated))
    assert {split: len(loaded[split]) for split in loaded} == summary["images_by_split"]
    # 02_train_ldm: a pipeline diffusers loads, and the alignment table of its samples
    assert (run_dir / "models" / "ldm_compact" / "unet_training" / "pipeline" / "model_index.json").is_file()
    assert (run_dir / "figures" / "alignment_ldm_compact.csv.provenance.json").is_file()
    # the fine-tune starts from a U-Net pretrained on the generic corpus, not from the compact pipeline
    pretraining = read_records(run_dir / "models" / "ldm_pretrain" / "corpus")
    assert pretraining and {r["source"] for r in pretraining} == {"generic"}
    assert (run_dir / "figures" / "ldm_finetune_pretraining.png.provenance.json").is_file()
    # the DiT with HLDF, the domain CLIP and its exported text tower
    for family, pipeline in (("ldm_finetune", "ldm_finetune/pipeline"), ("dit_hldf", "dit_hldf/pipeline")):
        assert (run_dir / "models" / pipeline / "model_index.json").is_file(), family
        assert (run_dir / "figures" / f"alignment_{family}.csv.provenance.json").is_file(), family
    assert (run_dir / "models" / "domain_clip" / "model" / "open_clip_config.json").is_file()
    assert (run_dir / "models" / "domain_clip" / "text_encoder_sd" / "text_encoder" / "config.json").is_file()
    # 05-07: a generated dataset per family, the fidelity table, the privacy table with its planted controls
    classes = class_prompts(split_records(curated, "train"))
    for family in ("ldm-compact", "ldm-finetune", "dit-hldf", "vq-ar"):
        assert len(read_records(run_dir / "data" / "generated" / family)) == 3 * len(classes)
    # fine-tuned and from-scratch are different models: the same seeds give other images
    compact, finetuned = (
        {r["seed"]: r["sha256"] for r in read_records(run_dir / "data" / "generated" / f)}
        for f in ("ldm-compact", "ldm-finetune")
    )
    assert compact.keys() == finetuned.keys() and all(compact[s] != finetuned[s] for s in compact)
    # 04: the vq-ar tokenizer's report, and its images recorded as autoregressive samples
    tokenizer = pd.read_csv(run_dir / "figures" / "vq_ar_tokenizer.csv")
    assert 0 < tokenizer.loc[0, "codes_in_use"] <= 1 and tokenizer.loc[0, "psnr_db"] > 0
    assert {r["scheduler"] for r in read_records(run_dir / "data" / "generated" / "vq-ar")} == {"autoregressive"}
    for name in (
        "sampling.csv",
        "generated_vs_real.png",
        "fidelity.csv",
        "fidelity.png",
        "privacy_pairs.csv",
        "privacy_table.csv",
        "privacy_distances.png",
        "privacy_closest_pairs.png",
    ):
        assert (run_dir / "figures" / f"{name}.provenance.json").is_file(), name
    fidelity = pd.read_csv(run_dir / "figures" / "fidelity.csv").set_index("family")
    assert list(fidelity.index) == ["real", "ldm-compact", "ldm-finetune", "dit-hldf", "vq-ar"]
    assert fidelity["FD_domain_clip"].notna().all() and fidelity["FID"].isna().all()  # no Inception weights here
    pairs = pd.read_csv(run_dir / "figures" / "privacy_pairs.csv")
    assert (pairs.loc[pairs["planted"], "tiled_l2"] == 0).all() and pairs["planted"].sum() == 4
    # 08: three training sets plus one per family, and their bootstrap comparisons
    # (two replicates each), tested on the held-out patients' test split that 01 curated
    downstream = pd.read_csv(run_dir / "figures" / "downstream.csv")
    sets = ["real", "real_half", "real_half+ldm-compact", "real_half+dit-hldf"]
    assert downstream["training_set"].tolist() == sets * 2 and downstream["replicate"].tolist() == [0] * 4 + [1] * 4
    held_out = read_records(run_dir / "data" / "held_out", "test")
    assert set(downstream["test_images"]) == {len(held_out)} and {r["source"] for r in held_out} == {"brats"}
    assert (run_dir / "figures" / "downstream_roc_brats.png.provenance.json").is_file()
    assert (run_dir / "figures" / "downstream_gaps.png.provenance.json").is_file()
    bootstrap = pd.read_csv(run_dir / "figures" / "downstream_bootstrap.csv")
    assert len(bootstrap) == 5 and (bootstrap["replicates"] == 2).all() and bootstrap["detectable"].gt(0).all()
    # 09: the comparison, and a blinded study ready to serve (no answers yet)
    comparison = pd.read_csv(run_dir / "figures" / "comparison.csv").set_index("family")
    assert list(comparison.index) == ["ldm-compact", "ldm-finetune", "dit-hldf", "vq-ar"]
    assert (run_dir / "reader_study" / "study.json").is_file()
    power = pd.read_csv(run_dir / "figures" / "power.csv").set_index("measure")
    assert power["detectable"].notna().all() and "test macro-AUROC (brats)" in power.index
    assert (run_dir / "figures" / "reader_study.png.provenance.json").is_file()


def _notebook(path, cells):
    nb = nbformat.v4.new_notebook()
    nb.cells = [nbformat.v4.new_code_cell(c) for c in cells]
    nb.cells[0].metadata["tags"] = ["parameters"]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, path)


def test_a_failing_notebook_is_named_with_its_cell(tmp_path):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(notebooks / "01_ok.ipynb", ["x = 1", "y = x + 1"])
    _notebook(notebooks / "02_broken.ipynb", ["n = 3", "m = n * 2", "raise ValueError(f'bad input {n}')"])
    profile = tmp_path / "p.yaml"
    profile.write_text(
        yaml.safe_dump({"name": "t", "notebooks": ["01_ok", "02_broken"], "common": {"x": 5}, "02_broken": {"n": 4}})
    )
    with pytest.raises(ChainError) as err:
        reproduce(profile, tmp_path / "run", notebooks_dir=notebooks, progress=False)
    message = str(err.value)
    assert "02_broken" in message and "cell 3" in message and "ValueError: bad input 4" in message
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert [n["status"] for n in record["notebooks"]] == ["ok", "failed"]


def test_profile_parameters_must_be_declared_by_the_notebook(tmp_path):
    profile = {
        "name": "t",
        "notebooks": ["01_curate"],
        "common": {"seed": 1, "unrelated": 2},
        "01_curate": {"sise": 64},
    }
    with pytest.raises(ValueError, match=r"\['sise'\].*01_curate"):
        notebook_parameters(profile, "01_curate", {"size", "seed"}, tmp_path)
    profile["01_curate"] = {"size": 64, "raw_dir": "{run}/raw"}
    assert notebook_parameters(profile, "01_curate", {"size", "seed", "raw_dir"}, tmp_path) == {
        "seed": 1,
        "size": 64,
        "raw_dir": f"{tmp_path}/raw",
    }


def test_unknown_profile_is_a_clear_error():
    with pytest.raises(FileNotFoundError, match="unknown profile 'nope'.*smoke"):
        load_profile("nope")


def test_reproduce_command_reports_failure_with_non_zero_exit(tmp_path):
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "t", "notebooks": ["99_missing"]}))
    run = subprocess.run(
        [sys.executable, "-m", "medsyn", "reproduce", "--profile", str(profile), "--out", str(tmp_path / "r")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert run.returncode != 0 and "99_missing" in run.stderr


def test_the_chain_can_be_steered_from_a_notebook_a_subset_overrides_and_resume(tmp_path, capsys):
    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    # each notebook appends its name and its parameter to a log in the run directory
    log = "open('log.txt', 'a').write(f'{name} {value}\\n')"
    for name in ("01_a", "02_b", "03_c"):
        _notebook(
            notebooks / f"{name}.ipynb",
            [f"value = 1\nfail = False\nname = '{name}'", log, "assert not fail, 'asked to fail'"],
        )
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "t", "notebooks": ["01_a", "02_b", "03_c"], "02_b": {"value": 2}}))
    run = tmp_path / "run"
    reproduce(profile, run, notebooks_dir=notebooks, progress=True)
    assert "[2/3] 02_b" in capsys.readouterr().out
    reproduce(profile, run, notebooks_dir=notebooks, progress=False, start="02_b", overrides={"value": 7})
    reproduce(profile, run, notebooks_dir=notebooks, progress=False, only=["03_c"])
    reproduce(profile, run, notebooks_dir=notebooks, progress=False, only=["01_a"])
    assert (run / "log.txt").read_text().splitlines() == [
        "01_a 1",
        "02_b 2",
        "03_c 1",
        "02_b 7",
        "03_c 7",
        "03_c 1",
        "01_a 1",
    ]
    record = json.loads((run / "run.json").read_text())
    assert record["selected"] == ["01_a"] and [n["notebook"] for n in record["notebooks"]] == ["01_a", "02_b", "03_c"]
    # a failure in the middle, then a resume from the failed notebook once the cause is removed
    failing = tmp_path / "failing.yaml"
    failing.write_text(yaml.safe_dump({"name": "t", "notebooks": ["01_a", "02_b", "03_c"], "02_b": {"fail": True}}))
    with pytest.raises(ChainError, match="--resume"):
        reproduce(failing, tmp_path / "run2", notebooks_dir=notebooks, progress=False)
    reproduce(profile, tmp_path / "run2", notebooks_dir=notebooks, progress=False, resume=True)
    assert (tmp_path / "run2" / "log.txt").read_text().splitlines() == ["01_a 1", "02_b 1", "02_b 2", "03_c 1"]
    # mistakes are named
    with pytest.raises(ValueError, match="have not run"):
        reproduce(profile, tmp_path / "fresh", notebooks_dir=notebooks, progress=False, start="03_c")
    with pytest.raises(ValueError, match="no notebook of profile 't' declares"):
        reproduce(profile, run, notebooks_dir=notebooks, progress=False, overrides={"valeu": 3})


def test_every_stage_notebook_run_as_it_stands_stops_in_its_setup_cell_with_one_sentence(tmp_path):
    """As JupyterLab's "Run All" runs it: nbclient, no parameters injected, the working directory a
    fresh folder. Nothing may be written there, and the one error names the command to use."""
    from nbclient import NotebookClient
    from nbclient.exceptions import CellExecutionError

    for path in sorted(NOTEBOOKS_DIR.glob("*.ipynb")):
        nb = nbformat.read(path, as_version=4)
        with pytest.raises(CellExecutionError):
            NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
        errors = [
            (i, output)
            for i, cell in enumerate(nb.cells)
            if cell.cell_type == "code"
            for output in cell.outputs
            if output.output_type == "error"
        ]
        assert [i for i, _ in errors] == [2], path.name  # the setup cell, right after the parameters cell
        ((_, error),) = errors
        assert error.ename == "ProfileRequired" and len(error.traceback) == 1, path.name
        sentence = error.traceback[0]
        assert "medsyn notebook" in sentence and "medsyn reproduce --profile default" in sentence
        assert sentence.count(". ") == 0 and sentence.endswith("."), sentence  # one sentence
        assert not any(tmp_path.iterdir()), f"{path.name} wrote {list(tmp_path.iterdir())}"


def test_medsyn_notebook_writes_a_stage_notebook_with_the_profiles_parameters(tmp_path):
    """The copy carries the chain's parameters (profile, {run}, overrides), runs cell by cell in
    nbclient from the run directory as JupyterLab would run it, and is never overwritten silently."""
    from nbclient import NotebookClient

    notebooks = tmp_path / "notebooks"
    notebooks.mkdir()
    _notebook(
        notebooks / "01_a.ipynb",
        [
            "profile = None\nout = 'here.txt'\nvalue = 1",
            "from medsyn.records import notebook_parameters\nparameters = notebook_parameters(globals())",
            "open(out, 'w').write(f\"{profile} {value}\")",
        ],
    )
    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump({"name": "t", "notebooks": ["01_a"], "01_a": {"out": "{run}/out.txt"}}))
    run = tmp_path / "run"
    path = write_notebook("01_a", profile, run, notebooks_dir=notebooks, overrides={"value": 9})
    assert path == run.resolve() / "01_a.ipynb"
    nb = nbformat.read(path, as_version=4)
    NotebookClient(nb, kernel_name="python3", resources={"metadata": {"path": str(path.parent)}}).execute()
    assert (run / "out.txt").read_text() == "t 9"
    with pytest.raises(FileExistsError, match="--force"):
        write_notebook("01_a", profile, run, notebooks_dir=notebooks)
    with pytest.raises(ValueError, match="not a notebook of profile"):
        write_notebook("02_b", profile, run, notebooks_dir=notebooks)
    # the real stage notebooks: what the copy receives is what the chain passes
    copy = write_notebook("06_fidelity", "default", tmp_path / "default")
    injected = next(
        c for c in nbformat.read(copy, as_version=4).cells if "injected-parameters" in c.metadata.get("tags", [])
    )
    assert 'profile = "default"' in injected.source and f'"{(tmp_path / "default").resolve()}/data/curated"' in (
        injected.source
    )


def _isolated_environment(tmp_path) -> dict:
    import os

    env = {k: v for k, v in os.environ.items() if k != "MEDSYN_INCEPTION_WEIGHTS"}
    return {**env, "TORCH_HOME": str(tmp_path / "torch_home")}


def test_a_paper_run_with_nothing_on_disk_lists_everything_missing_within_seconds(tmp_path):
    began = time.perf_counter()
    run = subprocess.run(
        [sys.executable, "-m", "medsyn", "reproduce", "--profile", "paper", "--out", str(tmp_path / "paper")],
        capture_output=True,
        text=True,
        timeout=120,
        env=_isolated_environment(tmp_path),
    )
    seconds = time.perf_counter() - began
    assert run.returncode != 0 and seconds < 30, (run.returncode, seconds)
    listed = [line for line in run.stderr.splitlines() if line.startswith("  - ")]
    paper = load_profile("paper")
    expected = [f"raw_dir: raw source {name} " for name in paper["01_curate"]["manifests"]] + [
        "vlm_dir",
        "report_llm_dir",
        "finetune_pretrained_dir",
        "flux_pretrained_dir",
        "kandinsky_prior_dir",
        "kandinsky_decoder_dir",
        "pretrained_dir",
        "pretrained_lm_dir",
        "inception_weights",
        "embedder_dir",
        "imagenet_weights",
    ]
    assert len(listed) == len(expected), run.stderr
    for item in expected:
        assert sum(f" {item}" in line for line in listed) == 1, (item, run.stderr)
    assert not (tmp_path / "paper" / "notebooks").exists()  # nothing ran


def test_preflight_counts_what_is_there_and_what_the_chain_writes_itself(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("MEDSYN_INCEPTION_WEIGHTS", raising=False)
    out = tmp_path / "paper"
    before = {str(m) for m in check_profile("paper", out)}
    chexpert = out / "data" / "raw" / "chexpert" / "CheXpert-v1.0-small"
    (chexpert / "train" / "patient00001" / "study1").mkdir(parents=True)
    (chexpert / "train" / "patient00001" / "study1" / "view1_frontal.jpg").write_bytes(b"jpeg")
    sdxl = out / "pretrained" / "stable-diffusion-xl-base-1.0"
    sdxl.mkdir(parents=True)
    (sdxl / "model_index.json").write_text("{}")
    after = {str(m) for m in check_profile("paper", out)}
    gone, new = before - after, after - before
    assert len(gone) == 2 and any("finetune_pretrained_dir" in m for m in gone) and any("chexpert" in m for m in gone)
    assert len(new) == 1 and "chexpert" in next(iter(new)) and "its table" in next(iter(new))  # images alone are not it
    (chexpert / "train.csv").write_text("Path\n")
    assert not any("chexpert" in str(m) for m in check_profile("paper", out))
    # the embedded profiles need nothing on disk: every model they read, an earlier notebook writes
    assert check_profile("default", tmp_path / "default") == []
    assert check_profile("smoke", tmp_path / "smoke") == []
    with pytest.raises(PreflightError, match="embedder_dir"):
        reproduce("default", tmp_path / "d", overrides={"embedder_dir": str(tmp_path / "nowhere")}, progress=False)


def test_the_paper_rehearsal_has_every_model_the_paper_profile_reads(tmp_path, monkeypatch):
    """`benchmarks/paper_rehearsal.py` is paper.yaml with only its `REHEARSAL` changes, and its stand-ins
    leave the preflight nothing missing: a model the paper profile comes to read needs a stand-in
    there before the rehearsal can run (README, "The `paper` profile, rehearsed")."""
    from benchmarks.paper_rehearsal import REHEARSAL, rehearsal_profile, write_stand_ins

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("MEDSYN_INCEPTION_WEIGHTS", raising=False)
    pretrained, run_dir = tmp_path / "pretrained", tmp_path / "run"
    write_stand_ins(pretrained)
    path = rehearsal_profile("cpu", pretrained, run_dir)
    assert check_profile(path, run_dir) == []
    rehearsal, paper = load_profile(path), load_profile("paper")
    for block in paper:
        if block in ("name", "description"):
            continue
        kept = (
            {k: v for k, v in paper[block].items() if k not in REHEARSAL.get(block, {})}
            if isinstance(paper[block], dict)
            else paper[block]
        )
        ours = {k: v for k, v in rehearsal[block].items() if k in kept} if isinstance(kept, dict) else rehearsal[block]
        assert json.loads(json.dumps(ours).replace(str(pretrained), "{run}/pretrained")) == kept, block
