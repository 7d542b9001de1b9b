"""`medsyn sample`: a generated dataset in the curated format, every image regenerable from its record."""

import numpy as np
import pytest
import torch
from PIL import Image
from tiny_models import save_tiny_sd, write_tiny_dataset

from medsyn.cli import main
from medsyn.data.dataset import class_key, image_path, read_records
from medsyn.sampling import generate, load_pipeline, optimise_for_sampling, set_scheduler


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("sample")
    return {"data": write_tiny_dataset(root / "data", size=32), "sd": save_tiny_sd(root / "sd")}


def test_sample_writes_a_generated_dataset_whose_images_regenerate(tiny, tmp_path):
    out = tmp_path / "generated"
    assert (
        main(
            [
                "sample",
                "--pipeline",
                str(tiny["sd"]),
                "--dataset",
                str(tiny["data"]),
                "--out",
                str(out),
                "--model",
                "tiny-sd",
                "--per-prompt",
                "3",
                "--scheduler",
                "euler",
                "--steps",
                "4",
                "--guidance",
                "7",
                "--seed",
                "5",
            ]
        )
        == 0
    )
    records = read_records(out)
    assert len(records) == 2 * 3 and len({r["seed"] for r in records}) == 6
    assert {r["text"] for r in records} == {"A red disc.", "A cyan bar."}
    for r in records:
        assert r["model"] == "tiny-sd" and r["scheduler"] == "euler" and r["split"] == "train"
        # the record names the class its prompt asks for, as a real record does
        assert class_key(r) == ("tiny: disc" if r["text"] == "A red disc." else "tiny: bar")
        assert image_path(out, r).is_file()
    # one image alone, from its record
    r = records[4]
    pipeline = load_pipeline(tiny["sd"])
    set_scheduler(pipeline, r["scheduler"])
    alone = pipeline(
        r["text"],
        num_inference_steps=r["steps"],
        guidance_scale=r["guidance_scale"],
        height=32,
        width=32,
        output_type="np",
        generator=torch.Generator().manual_seed(r["seed"]),
    ).images[0]
    written = np.asarray(Image.open(image_path(out, r)))
    assert np.abs(np.rint(alone * 255) - written).max() <= 1
    # never overwrite a generated dataset
    assert (
        main(
            [
                "sample",
                "--pipeline",
                str(tiny["sd"]),
                "--dataset",
                str(tiny["data"]),
                "--out",
                str(out),
                "--model",
                "tiny-sd",
                "--per-prompt",
                "1",
                "--steps",
                "2",
            ]
        )
        == 2
    )


def test_unknown_scheduler_and_missing_pipeline(tiny, tmp_path, capsys):
    with pytest.raises(ValueError, match="unknown scheduler"):
        set_scheduler(load_pipeline(tiny["sd"]), "heun-ish")
    assert (
        main(
            [
                "sample",
                "--pipeline",
                str(tmp_path / "none"),
                "--dataset",
                str(tiny["data"]),
                "--out",
                str(tmp_path / "g"),
                "--model",
                "x",
            ]
        )
        == 2
    )
    assert str(tmp_path / "none") in capsys.readouterr().err


def test_optimise_for_sampling_sets_precision_and_layout_and_refuses_unknown_settings(tmp_path):
    pipeline = load_pipeline(save_tiny_sd(tmp_path / "sd"))
    reference = generate(pipeline, ["A red disc."], per_prompt=1, seed=3, steps=3)[0]["image"]
    optimise_for_sampling(pipeline, "cpu", dtype="bfloat16", memory_format="channels_last")
    assert pipeline.unet.dtype == torch.bfloat16 and pipeline.text_encoder.dtype == torch.bfloat16
    assert pipeline.unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    image = generate(pipeline, ["A red disc."], per_prompt=1, seed=3, steps=3)[0]["image"]
    # the same image to bfloat16's precision (8 bits of mantissa): close, not equal
    assert 0 < np.abs(image.astype(int) - reference).mean() < 8
    with pytest.raises(ValueError, match="dtype"):
        optimise_for_sampling(pipeline, dtype="int8")
    with pytest.raises(ValueError, match="memory_format"):
        optimise_for_sampling(pipeline, memory_format="nhwc")


def test_one_sampler_for_all_but_the_families_named(tiny, tmp_path):
    """`family_schedulers` gives a family its own sampler (Kandinsky takes no Euler): its records and
    its row say so, a rerun keeps it, and a family that has no pipeline is refused."""
    from medsyn.sampling import sample_families

    options = {"per_prompt": 1, "steps": 2, "scheduler": "euler", "family_schedulers": {"b": "ddim"}}
    pipelines = {"a": tiny["sd"], "b": tiny["sd"]}
    table = sample_families(pipelines, tiny["data"], tmp_path / "gen", **options)
    assert table.set_index("family")["scheduler"].to_dict() == {"a": "euler", "b": "ddim"}
    assert {r["scheduler"] for r in read_records(tmp_path / "gen" / "b")} == {"ddim"}
    a, b = (read_records(tmp_path / "gen" / f) for f in "ab")  # the same model and seeds, two samplers
    assert [r["seed"] for r in a] == [r["seed"] for r in b]
    assert {r["file_name"] for r in a}.isdisjoint(r["file_name"] for r in b)  # named by their pixels' hash
    again = sample_families(pipelines, tiny["data"], tmp_path / "gen", **options)
    assert list(again["status"]) == ["kept", "kept"]
    with pytest.raises(ValueError, match="holds images sampled differently"):
        sample_families(pipelines, tiny["data"], tmp_path / "gen", **{**options, "family_schedulers": {}})
    with pytest.raises(ValueError, match=r"no pipeline: \['c'\]"):
        sample_families(pipelines, tiny["data"], tmp_path / "other", **{**options, "family_schedulers": {"c": "ddim"}})
