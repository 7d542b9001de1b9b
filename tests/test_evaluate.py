"""The fidelity protocol on a tiny data set: a "generator" that returns real images scores near the
real floor, one that returns noise scores far from it, on equal sample counts; FID is reported
missing, with where the weights were looked for, when there are none."""

import numpy as np
import pytest
from tiny_models import TINY_CLIP, write_tiny_dataset

from medsyn.data.dataset import class_fields, load_split
from medsyn.metrics.evaluate import equal_counts, fidelity_table, plot_fidelity, plot_real_and_generated
from medsyn.sampling import write_generated_dataset
from medsyn.training.class_probe import train_class_probe
from medsyn.training.domain_clip import train_domain_clip


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("evaluate")
    data = write_tiny_dataset(root / "data", size=32, n=48)
    clip = train_domain_clip(data, root / "clip", epochs=20, batch_size=16, lr=1e-3, config=TINY_CLIP, progress=False)
    images, train = load_split(data, "train")
    probe = train_class_probe(data, train, epochs=20, seed=0, progress=False)
    probe.save(root / "probe.pt")
    classes = list(class_fields(train).values())
    prompts = [c["text"] for c in classes]
    assert prompts == ["A cyan bar.", "A red disc."]
    settings = {"scheduler": "none", "steps": 0, "guidance_scale": 0}
    copies = [
        {"prompt_id": prompts.index(r["text"]), "prompt": r["text"], "seed": i, "image": image}
        for i, (r, image) in enumerate(zip(train, images))
    ]
    rng = np.random.default_rng(0)
    noise = [{**s, "image": rng.integers(0, 256, s["image"].shape, dtype=np.uint8)} for s in copies[:30]]
    write_generated_dataset(copies, root / "copies", "copies", classes, settings)
    write_generated_dataset(noise, root / "noise", "noise", classes, settings)
    return {"data": data, "clip": clip["model_dir"], "probe": root / "probe.pt", "root": root}


def test_real_copies_score_near_the_floor_and_noise_far_from_it(setup, tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("MEDSYN_INCEPTION_WEIGHTS", raising=False)
    table, note, alignment = fidelity_table(
        setup["data"],
        {"copies": setup["root"] / "copies", "noise": setup["root"] / "noise"},
        setup["clip"],
        setup["probe"],
        real_split="validation",
        niqe_block=16,
    )
    rows = table.set_index("family")
    assert list(rows.index) == ["real", "copies", "noise"]
    assert (rows["compared"] == 8).all()  # 8 validation images: every set is compared on 8
    assert rows.loc["copies", "FD_domain_clip"] < 0.5 * rows.loc["noise", "FD_domain_clip"]
    assert rows.loc["copies", "alignment_macro"] == 1.0 and rows.loc["noise", "alignment_macro"] <= 0.75
    assert rows.loc["copies", "domain_clip_score"] > rows.loc["noise", "domain_clip_score"]
    assert rows.loc["noise", "precision"] == 0.0
    assert table["MS_SSIM_within_class"].isna().all()  # 32 px: too small for five scales (64 px is tested below)
    assert set(alignment) == {"copies", "noise"} and alignment["copies"]["per_class"] == {
        "tiny: bar": 1.0,
        "tiny: disc": 1.0,
    }
    assert table["FID"].isna().all() and "FID not computed" in note and str(tmp_path / "torch_home") in note
    assert plot_fidelity(table).axes
    figure = plot_real_and_generated(setup["data"], {"copies": setup["root"] / "copies"}, split="validation")
    assert len(figure.axes) == 2 * 2 * 2  # 2 classes x (real, copies) x 2 images


def test_within_class_ms_ssim_tells_copies_from_noise():
    from medsyn.metrics.evaluate import within_class_ms_ssim

    rng = np.random.default_rng(1)
    base = rng.integers(0, 256, (2, 64, 64, 3), dtype=np.uint8)
    same = np.concatenate([np.repeat(base[:1], 3, axis=0), np.repeat(base[1:], 3, axis=0)])
    classes = ["a"] * 3 + ["b"] * 3
    assert within_class_ms_ssim(same, classes, pairs=6) == (pytest.approx(1.0, abs=1e-5), 3)
    noise = rng.integers(0, 256, (6, 64, 64, 3), dtype=np.uint8)
    assert within_class_ms_ssim(noise, classes, pairs=6)[0] < 0.2


def test_equal_counts_and_unknown_prompts(setup, tmp_path):
    a, b = equal_counts(np.zeros(10), np.zeros(4), seed=1)
    assert len(a) == len(b) == 4 and len(set(a)) == 4
    stranger = [{"prompt_id": 0, "prompt": "A green star.", "seed": 0, "image": np.zeros((32, 32, 3), np.uint8)}] * 2
    write_generated_dataset(stranger, tmp_path / "stranger", "x", [{"source": "tiny", "labels": ["star"]}], {})
    with pytest.raises(ValueError, match="not classes of"):
        fidelity_table(
            setup["data"],
            {"x": tmp_path / "stranger"},
            setup["clip"],
            setup["probe"],
            real_split="validation",
            niqe_block=16,
        )


def test_memorisation_finds_copies_and_the_planted_control(setup):
    from medsyn.metrics.evaluate import memorisation_pairs, plot_closest_pairs, plot_distances
    from medsyn.metrics.privacy import COPY_THRESHOLD, memorisation_table, memorisation_tables

    generated = {"copies": setup["root"] / "copies", "noise": setup["root"] / "noise"}
    pairs = memorisation_pairs(setup["data"], generated, setup["clip"], seed=3)
    assert len(pairs) == 40 + 30 + 2  # every generated image plus one planted copy per family
    planted = pairs[pairs["planted"]]
    assert (planted["tiled_l2"] == 0).all()
    assert all(row.file_name == f"planted copy of {row.nearest_training}" for row in planted.itertuples())
    copies, noise = (pairs[(pairs["family"] == f) & ~pairs["planted"]] for f in ("copies", "noise"))
    assert (copies["tiled_l2"] <= COPY_THRESHOLD).all()  # a generator that returns training images is caught
    assert (noise["tiled_l2"] > COPY_THRESHOLD).all()
    table = memorisation_table(noise["tiled_l2"], noise["specialty"].tolist()).set_index("specialty")
    assert table.loc["all", "pairs"] == 30 and table.loc["all", "wilcoxon_p_greater"] < 1e-6
    per_family = memorisation_tables(pairs)  # planted controls left out
    assert per_family.loc[("copies", "all"), "pairs"] == 40 and per_family.loc[("noise", "all"), "pairs"] == 30
    assert per_family.loc[("copies", "all"), "pairs_at_most_0.15"] == 40
    assert per_family.loc["noise"].equals(table)
    assert plot_distances(pairs, COPY_THRESHOLD).axes
    assert len(plot_closest_pairs(pairs, setup["data"], generated, per_family=3).axes) == 2 * 6


def test_comparison_table_collects_each_familys_numbers(tmp_path):
    import pandas as pd

    from medsyn.metrics.evaluate import comparison_table

    columns = [
        "FID",
        "FD_domain_clip",
        "KID_domain_clip",
        "precision",
        "recall",
        "NIQE_generated",
        "MS_SSIM_within_class",
        "domain_clip_score",
        "alignment_macro",
    ]
    pd.DataFrame(
        [{"family": f, **{c: i + k / 10 for k, c in enumerate(columns)}} for i, f in enumerate(["real", "a", "b"])]
    ).to_csv(tmp_path / "fidelity.csv", index=False)
    pd.DataFrame(
        [
            {
                "family": f,
                "specialty": s,
                "pairs": 10,
                "mean": 0.3,
                "sd": 0.1,
                "pairs_at_most_0.15": n,
                "wilcoxon_p_greater": 0.01,
            }
            for f, n in (("a", 1), ("b", 0))
            for s in ("derm", "all")
        ]
    ).to_csv(tmp_path / "privacy_table.csv", index=False)
    pd.DataFrame(
        [
            {
                "task": t,
                "baseline": "real_half",
                "compared": f"real_half+{f}",
                "difference": d,
                "low": d - 0.1,
                "high": d + 0.1,
                "resamples": 100,
            }
            for f, d in (("a", 0.02), ("b", -0.04))
            for t in ("x", "y")
        ]
    ).to_csv(tmp_path / "downstream_bootstrap.csv", index=False)
    pd.DataFrame([{"family": f, "images": 10, "seconds_per_image": s} for f, s in (("a", 0.5), ("b", 2.0))]).to_csv(
        tmp_path / "sampling.csv", index=False
    )
    table = comparison_table(tmp_path, ["a", "b"])
    assert table.loc["a", "FD_domain_clip"] == 1.1 and table.loc["b", "alignment_macro"] == pytest.approx(2.8)
    assert table.loc["a", "likely_copies"] == "1 / 10" and table.loc["b", "likely_copies"] == "0 / 10"
    assert table.loc["b", "auroc_gain_over_half_real"] == pytest.approx(-0.04)
    assert table.loc["a", "auroc_gain_intervals"] == "x: [-0.080, +0.120]; y: [-0.080, +0.120]"
    assert table.loc["b", "seconds_per_image"] == 2.0
    (tmp_path / "sampling.csv").unlink()
    with pytest.raises(FileNotFoundError, match="sampling.csv is missing"):
        comparison_table(tmp_path, ["a"])
