"""The README's result tables are written from a run's CSVs (`medsyn tables`), never typed."""

import json

import pandas as pd
import pytest

from medsyn.cli import main
from medsyn.readme import TableError, render_tables

README = """# results

<!-- medsyn-table comparison.csv index=family columns=alignment_macro,likely_copies digits=2 -->
| old | typed |
<!-- /medsyn-table -->

text between

<!-- medsyn-table power.csv index=measure rows=alignment_macro columns=detectable -->
<!-- /medsyn-table -->
"""


def _figures(tmp_path):
    figures = tmp_path / "figures"
    figures.mkdir()
    pd.DataFrame(
        {
            "family": ["a", "b"],
            "alignment_macro": [0.8123, float("nan")],
            "alignment_macro_low": [0.75, float("nan")],
            "alignment_macro_high": [0.86, float("nan")],
            "likely_copies": ["1 / 10", "0 / 10"],
        }
    ).to_csv(figures / "comparison.csv", index=False)
    (figures / "comparison.csv.provenance.json").write_text(
        json.dumps(
            {
                "git_commit": "0123456789abcdef0123+dirty",
                "created": "2026-11-29T20:41:03+00:00",
                "parameters": {"profile": "default"},
            }
        )
    )
    pd.DataFrame({"measure": ["alignment_macro", "FD"], "detectable": [0.051, 0.02]}).to_csv(
        figures / "power.csv", index=False
    )
    return figures


def test_marked_tables_come_from_the_csvs_with_intervals_and_their_source(tmp_path):
    figures = _figures(tmp_path)
    text, used = render_tables(README, figures)
    assert used == ["comparison.csv", "power.csv"]
    assert "| old | typed |" not in text and "text between" in text
    assert "0.81 [0.75, 0.86]" in text and "1 / 10" in text and "| b        | –" in text
    assert "commit `0123456789ab+dirty`, 2026-11-29T20:41:03+00:00" in text and "`default` run" in text
    assert "0.051" in text and "0.020" not in text  # only the asked-for row
    assert render_tables(text, figures)[0] == text  # writing again changes nothing


def test_the_command_rewrites_the_readme_and_names_what_is_missing(tmp_path, capsys):
    figures = _figures(tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text(README)
    assert main(["tables", "--readme", str(readme), "--figures", str(figures)]) == 0
    assert "0.81 [0.75, 0.86]" in readme.read_text()
    (figures / "power.csv").unlink()
    before = readme.read_text()
    assert main(["tables", "--readme", str(readme), "--figures", str(figures)]) == 2
    assert "power.csv not found" in capsys.readouterr().err and readme.read_text() == before
    with pytest.raises(TableError, match="no columns"):
        render_tables("<!-- medsyn-table comparison.csv columns=FID -->\n<!-- /medsyn-table -->", figures)


def test_a_table_named_with_a_folder_is_read_beside_the_readme_and_only_selects_blocks(tmp_path):
    figures = _figures(tmp_path)
    results = tmp_path / "benchmarks" / "results"
    results.mkdir(parents=True)
    pd.DataFrame(
        {"variant": ["baseline", "medsyn"], "batch": [8, None], "throughput": [10.0, 31.5], "ratio": [1.0, 3.15]}
    ).to_csv(results / "gpu.csv", index=False)
    (results / "gpu.csv.provenance.json").write_text(
        json.dumps({"git_commit": "feed", "created": "2026-11-30", "parameters": {"device": "NVIDIA H200"}})
    )
    markdown = (
        README + "\n<!-- medsyn-table benchmarks/results/gpu.csv digits=1 integers=batch -->\n<!-- /medsyn-table -->\n"
    )
    text, used = render_tables(markdown, figures, tmp_path, only="benchmarks/")
    assert used == ["benchmarks/results/gpu.csv"]
    assert "| old | typed |" in text  # the figures' blocks are left as they were
    assert "31.5" in text and "3.1" in text and "on NVIDIA H200" in text
    assert "| 8       |" in text and "8.0" not in text  # a count with an empty cell stays a count
    text, used = render_tables(markdown, figures, tmp_path)
    assert used == ["comparison.csv", "power.csv", "benchmarks/results/gpu.csv"]
