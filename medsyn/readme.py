"""The README's result tables, written from a run's tables, never typed (`medsyn tables`).

A table in a Markdown file is a block between two markers:

    <!-- medsyn-table comparison.csv columns=alignment_macro,FD_domain_clip index=family digits=3 -->
    ...written here...
    <!-- /medsyn-table -->

`render_tables` replaces each block's body with the named CSV of the figures directory (a name with a
folder in it, such as `benchmarks/results/gpu.csv`, is read relative to the README instead; only the
listed columns, in that order; all when `columns` is absent; `rows=a,b` keeps those index values
only; `integers=a,b` shows those columns without decimals), every column that has `<column>_low` / `<column>_high` beside it shown as `value [low, high]`,
and a line under it saying which file, commit and time it came from (the table's provenance record).
A block whose CSV or column is missing stops with an error naming it, and nothing is written.
"""

import json
import re
from pathlib import Path

import pandas as pd

BLOCK = re.compile(r"(<!-- medsyn-table (?P<spec>[^>]*?) -->\n)(?P<body>.*?)(<!-- /medsyn-table -->)", re.DOTALL)


class TableError(ValueError):
    """A marked README table that cannot be written from the figures directory."""


def render_tables(
    markdown: str, figures_dir: str | Path, base: str | Path = ".", only: str | None = None
) -> tuple[str, list[str]]:
    """The Markdown text with every marked table written from `figures_dir` (names with a folder:
    from `base`, the Markdown file's folder), and the CSVs used; with `only`, just the blocks whose
    CSV name starts with it, the others left as they are."""
    used = []

    def replace(match: re.Match) -> str:
        name, options = _spec(match.group("spec"))
        if only is not None and not name.startswith(only):
            return match.group(0)
        used.append(name)
        path = Path(base) / name if "/" in name else Path(figures_dir) / name
        return match.group(1) + _table(path, options) + "\n" + match.group(4)

    text = BLOCK.sub(replace, markdown)
    return text, used


def write_readme_tables(readme: str | Path, figures_dir: str | Path, only: str | None = None) -> list[str]:
    """Rewrite the marked tables of `readme` in place from `figures_dir` (with `only`, those whose CSV
    name starts with it); returns the CSVs used.

    Raises:
        TableError: a block names a CSV or a column that is not there (the file is left as it was).
    """
    path = Path(readme)
    text, used = render_tables(path.read_text(), figures_dir, path.parent, only)
    if not used:
        raise TableError(f"{path} has no '<!-- medsyn-table {only or ''}NAME.csv ... -->' block")
    path.write_text(text)
    return used


def _spec(spec: str) -> tuple[str, dict[str, str]]:
    name, *pairs = spec.split()
    options = {}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if key not in ("columns", "index", "digits", "rows", "integers") or not value:
            raise TableError(
                f"table {name}: unknown or empty option {pair!r} (columns=, index=, rows=, digits=, integers=)"
            )
        options[key] = value
    return name, options


def _table(path: Path, options: dict[str, str]) -> str:
    name = path.name
    if not path.is_file():
        raise TableError(f"{path} not found: run the notebook or benchmark that writes {name} (README)")
    table = pd.read_csv(path)
    if "index" in options:
        table = table.set_index(options["index"])
    if "rows" in options:
        wanted = options["rows"].split(",")
        missing = [row for row in wanted if row not in table.index.astype(str)]
        if missing:
            raise TableError(f"{path}: no rows {missing}")
        table = table.loc[[row for row in table.index if str(row) in wanted]]
    columns = (
        options["columns"].split(",")
        if "columns" in options
        else [c for c in table.columns if not c.endswith(("_low", "_high"))]
    )
    missing = [c for c in columns if c not in table.columns]
    if missing:
        raise TableError(f"{path}: no columns {missing}; it has {list(table.columns)}")
    digits = int(options.get("digits", 3))
    integers = options.get("integers", "").split(",")
    shown = pd.DataFrame(index=table.index)
    for column in columns:
        if column in integers:  # counts, batch sizes: CSV readers make them floats where a cell is empty
            shown[column] = [_cell(table.at[row, column], None, None, 0) for row in table.index]
            continue
        shown[column] = [
            _cell(table.at[row, column], table.at[row, f"{column}_low"], table.at[row, f"{column}_high"], digits)
            if f"{column}_low" in table.columns and f"{column}_high" in table.columns
            else _cell(table.at[row, column], None, None, digits)
            for row in table.index
        ]
    markdown = shown.to_markdown(index="index" in options, disable_numparse=True)
    return markdown + "\n\n" + _source_line(path)


def _cell(value, low, high, digits: int) -> str:
    if isinstance(value, float) and pd.isna(value):
        return "–"
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        return str(value)
    text = f"{value:.{digits}f}"
    if low is not None and not (pd.isna(low) or pd.isna(high)):
        text += f" [{low:.{digits}f}, {high:.{digits}f}]"
    return text


def _source_line(path: Path) -> str:
    record = path.with_name(path.name + ".provenance.json")
    if not record.is_file():
        return f"*Written from `{path.name}` (no provenance record beside it).*"
    provenance = json.loads(record.read_text())
    profile = provenance.get("parameters", {}).get("profile")
    device = provenance.get("parameters", {}).get("device")
    commit = provenance.get("git_commit", "?")
    commit = commit.split("+")[0][:12] + ("+dirty" if commit.endswith("+dirty") else "")
    return (
        f"*Written by `medsyn tables` from `{path.name}`"
        + (f" of a `{profile}` run" if profile else "")
        + (f" on {device}" if device else "")
        + f", commit `{commit}`, {provenance.get('created', '?')}.*"
    )
