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
    table, note, alignment, _ = fidelity_table(
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
    # the colour-texture judge: real copies look like their class, noise does not
    assert rows.loc["copies", "colour_texture_within_2x"] == 1.0 and rows.loc["noise", "colour_texture_within_2x"] == 0
    assert rows.loc["copies", "colour_texture_ratio"] < 2 < rows.loc["noise", "colour_texture_ratio"]
    judged = alignment["noise"]["colour_texture"]
    assert list(judged.index) == ["tiny: bar", "tiny: disc"] and not judged["within_2x"].any()
    assert table["FID"].isna().all() and "FID not computed" in note and str(tmp_path / "torch_home") in note
    for metric in (
        "FD_domain_clip",
        "KID_domain_clip",
        "precision",
        "domain_clip_score",
        "alignment_macro",
        "colour_texture_ratio",
    ):
        inside = (table[f"{metric}_low"] <= table[metric] + 1e-9) & (table[metric] <= table[f"{metric}_high"] + 1e-9)
        assert inside.all(), metric
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
        "colour_texture_ratio",
        "colour_texture_within_2x",
    ]
    pd.DataFrame(
        [
            {
                "family": f,
                **{c: i + k / 10 for k, c in enumerate(columns)},
                **{f"{c}_low": i + k / 10 - 0.01 for k, c in enumerate(columns)},
                **{f"{c}_high": i + k / 10 + 0.01 for k, c in enumerate(columns)},
            }
            for i, f in enumerate(["real", "a", "b"])
        ]
    ).to_csv(tmp_path / "fidelity.csv", index=False)
    pd.DataFrame(
        [
            {
                "family": f,
                "specialty": s,
                "pairs": 10,
                "mean": 0.3,
                "mean_low": 0.25,
                "mean_high": 0.35,
                "sd": 0.1,
                "pairs_at_most_0.15": n,
                "share_at_most_low": 0.0,
                "share_at_most_high": 0.4,
                "wilcoxon_p_greater": 0.01,
            }
            for f, n in (("a", 1), ("b", 0))
            for s in ("derm", "all")
        ]
    ).to_csv(tmp_path / "privacy_table.csv", index=False)
    pd.DataFrame(
        [
            # tasks x and y can show utility (2N real resolves better than N); z cannot and is left out
            *(
                {
                    "task": t,
                    "baseline": "real_half",
                    "compared": "real",
                    "difference": d,
                    "low": d - 0.05,
                    "high": d + 0.05,
                }
                for t, d in (("x", 0.1), ("y", 0.2), ("z", 0.03))
            ),
            *(
                {
                    "task": t,
                    "baseline": baseline,
                    "compared": f"real_half+{f}",
                    "difference": d + shift,
                    "low": d + shift - 0.1,
                    "high": d + shift + 0.1,
                }
                for f, d in (("a", 0.02), ("b", -0.04))
                for baseline, shift in (("real_half", 0.0), ("real", -0.15))
                for t in ("x", "y")
            ),
            *(
                {
                    "task": "z",
                    "baseline": "real_half",
                    "compared": f"real_half+{f}",
                    "difference": 0.5,
                    "low": 0.4,
                    "high": 0.6,
                }
                for f in ("a", "b")
            ),
        ]
    ).to_csv(tmp_path / "downstream_bootstrap.csv", index=False)
    pd.DataFrame(
        [
            {
                "family": f,
                "images": 10,
                "seconds_per_image": s,
                "seconds_per_image_low": s - 0.1,
                "seconds_per_image_high": s + 0.1,
            }
            for f, s in (("a", 0.5), ("b", 2.0))
        ]
    ).to_csv(tmp_path / "sampling.csv", index=False)
    table = comparison_table(tmp_path, ["a", "b"])
    assert table.loc["a", "FD_domain_clip"] == 1.1 and table.loc["b", "alignment_macro"] == pytest.approx(2.8)
    assert table.loc["a", "likely_copies"] == "1 / 10" and table.loc["b", "likely_copies"] == "0 / 10"
    assert table.loc["b", "auroc_gain_over_half_real"] == pytest.approx(-0.04)  # z's +0.5 left out
    assert table.loc["b", "auroc_gain_over_double_real"] == pytest.approx(-0.19)
    assert table.loc["a", "auroc_gain_intervals"] == "x: [-0.080, +0.120]; y: [-0.080, +0.120]"
    assert table.loc["a", "downstream_tasks"] == "x, y"
    assert table.loc["b", "seconds_per_image"] == 2.0
    # every number has its interval; the mean gain's combines the tasks' (two tasks, half-width 0.1 each)
    numbers = [
        c
        for c in table.columns
        if c not in ("likely_copies", "auroc_gain_intervals", "downstream_tasks") and not c.endswith(("_low", "_high"))
    ]
    assert all(f"{c}_low" in table and f"{c}_high" in table for c in numbers), numbers
    assert table.loc["a", "auroc_gain_over_half_real_high"] - 0.02 == pytest.approx(0.1 / np.sqrt(2))
    assert table.loc["a", "alignment_macro_low"] == pytest.approx(1.8 - 0.01)
    assert table.loc["b", "likely_copies_share"] == 0.0 and table.loc["b", "likely_copies_share_high"] == 0.4
    assert plot_comparison_has_error_bars(table)
    (tmp_path / "sampling.csv").unlink()
    with pytest.raises(FileNotFoundError, match="sampling.csv is missing"):
        comparison_table(tmp_path, ["a"])


def test_bootstrap_intervals_agree_with_a_plain_resampling_loop():
    """The bias-shifted percentile interval of a two-set statistic (a Fréchet distance of two feature
    sets, each resampled on its own) from medsyn's scipy call and from a plain numpy loop: bounds
    within the Monte Carlo error of 2,000 resamples (a tenth of the interval's width)."""
    from medsyn.intervals import bootstrap_interval
    from medsyn.metrics.fidelity import feature_statistics, frechet_distance

    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 3)), rng.normal(0.5, 1.2, size=(50, 3))

    def fd(i, j):
        return frechet_distance(*feature_statistics(a[i]), *feature_statistics(b[j]))

    low, high = bootstrap_interval(fd, (60, 50), resamples=2000, seed=1)
    loop = np.random.default_rng(2)
    values = [fd(loop.integers(0, 60, 60), loop.integers(0, 50, 50)) for _ in range(2000)]
    estimate = fd(np.arange(60), np.arange(50))
    plain_low, plain_high = np.percentile(values, [2.5, 97.5]) + estimate - np.mean(values)
    width = plain_high - plain_low
    assert abs(low - plain_low) < 0.1 * width and abs(high - plain_high) < 0.1 * width
    assert low < estimate < high
    # a paired difference: the same rows from both sides
    x = rng.normal(size=80)
    y = x + 0.3 + rng.normal(0, 0.1, size=80)
    low, high = bootstrap_interval(lambda i, j: y[i].mean() - x[j].mean(), (80, 80), 2000, seed=3, paired=True)
    loop_values = [(y[i] - x[i]).mean() for i in (loop.integers(0, 80, 80) for _ in range(2000))]
    plain_low, plain_high = np.percentile(loop_values, [2.5, 97.5]) + (y - x).mean() - np.mean(loop_values)
    assert abs(low - plain_low) < 0.1 * (plain_high - plain_low) and abs(high - plain_high) < 0.1 * (
        plain_high - plain_low
    )
    assert high - low < 0.1  # pairing removes the shared spread of x


def test_families_sampled_with_the_same_prompts_and_seeds_get_paired_differences(setup, tmp_path, monkeypatch):
    from medsyn.metrics.evaluate import describe_differences

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.delenv("MEDSYN_INCEPTION_WEIGHTS", raising=False)
    images, train = load_split(setup["data"], "train")
    classes = list(class_fields(train).values())
    prompts = [c["text"] for c in classes]
    plan = [(prompts.index(r["text"]), r["text"], 100 + i) for i, r in enumerate(train[:8])]  # one sampling plan
    rng = np.random.default_rng(5)
    settings = {"scheduler": "none", "steps": 0, "guidance_scale": 0}
    good = [{"prompt_id": p, "prompt": t, "seed": s, "image": images[i]} for i, (p, t, s) in enumerate(plan)]
    bad = [{**g, "image": rng.integers(0, 256, g["image"].shape, dtype=np.uint8)} for g in good]
    write_generated_dataset(good, tmp_path / "good", "good", classes, settings)
    write_generated_dataset(bad, tmp_path / "bad", "bad", classes, settings)
    _, _, _, differences = fidelity_table(
        setup["data"],
        {"good": tmp_path / "good", "bad": tmp_path / "bad"},
        setup["clip"],
        setup["probe"],
        real_split="validation",
        niqe_block=16,
        resamples=300,
    )
    rows = differences.set_index("metric")
    assert set(rows.index) >= {"FD_domain_clip", "precision", "domain_clip_score", "alignment_macro"}
    assert (rows["pairs"] == 8).all() and (rows["family"] == "good").all() and (rows["other"] == "bad").all()
    fd = rows.loc["FD_domain_clip"]
    assert fd["difference"] < 0 and fd["resolved"] and fd["better"] == "good"
    assert rows.loc["domain_clip_score", "better"] == "good"
    assert "FD_domain_clip**: resolved: good better than bad" in describe_differences(differences)


def plot_comparison_has_error_bars(table) -> bool:
    from medsyn.metrics.evaluate import plot_comparison

    figure = plot_comparison(table)
    return all(any(len(c.get_segments()) for c in ax.collections) for ax in figure.axes)


def test_power_table_turns_observed_intervals_into_the_smallest_resolvable_difference(tmp_path):
    import pandas as pd

    from medsyn.metrics.evaluate import power_table

    pd.DataFrame(
        [
            {
                "metric": "alignment_macro",
                "family": "a",
                "other": "b",
                "pairs": 264,
                "difference": d,
                "low": d - w,
                "high": d + w,
                "resolved": abs(d) > w,
            }
            for d, w in ((0.05, 0.0392), (-0.01, 0.0588), (0.02, 0.0196))
        ]
    ).to_csv(tmp_path / "fidelity_differences.csv", index=False)
    pd.DataFrame(
        [
            {
                "task": "t",
                "baseline": "real_half",
                "compared": c,
                "difference": d,
                "low": d - 0.04,
                "high": d + 0.04,
                "se": se,
                "replicates": 3,
                "test_images": 320,
            }
            for c, d, se in (("real", 0.09, 0.02), ("real_half+a", 0.01, 0.03))
        ]
    ).to_csv(tmp_path / "downstream_bootstrap.csv", index=False)
    power = power_table(tmp_path)
    # median half-width 0.0392 -> standard error 0.02 -> 2.8 standard errors at 80 % power
    assert power.loc["alignment_macro", "standard_error"] == pytest.approx(0.02, rel=1e-3)
    assert power.loc["alignment_macro", "detectable"] == pytest.approx(0.056, rel=1e-3)
    assert (
        power.loc["alignment_macro", "resolved"] == "2 of 3"
        and power.loc["alignment_macro", "largest_observed"] == 0.05
    )
    auroc = power.loc["test macro-AUROC (t)"]
    assert auroc["standard_error"] == pytest.approx(0.025) and auroc["units"] == "320 test images"
    assert "3 replicates" in auroc["compared"] and auroc["resolved"] == "1 of 2"
