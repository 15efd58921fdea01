"""Render command results as a table, JSON or YAML, the way istioctl's ``-o`` flag does.

Rows are plain dicts; a table shows the chosen columns in order under upper-case headers
(``pod_name`` -> ``POD NAME``), padded like Go's tabwriter so the output lines up in a
terminal and stays greppable. JSON and YAML dump the structured data unchanged so scripts get
every field, not just the ones that fit a table.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from enum import StrEnum
from typing import Any

import yaml


class OutputFormat(StrEnum):
    TABLE = "table"
    WIDE = "wide"
    JSON = "json"
    YAML = "yaml"


# What ``-o`` accepts; ``short`` is istioctl's name for the default table.
FORMAT_ALIASES: dict[str, OutputFormat] = {
    "table": OutputFormat.TABLE,
    "short": OutputFormat.TABLE,
    "wide": OutputFormat.WIDE,
    "json": OutputFormat.JSON,
    "yaml": OutputFormat.YAML,
}

COLUMN_GAP = " "


class UnknownOutputFormat(ValueError):
    """``-o`` named a format we do not render."""


def parse_output_format(name: str) -> OutputFormat:
    """Map a user's ``-o`` value to a format, naming the accepted values when it is wrong."""
    try:
        return FORMAT_ALIASES[name.strip().lower()]
    except KeyError:
        accepted = "|".join(FORMAT_ALIASES)
        raise UnknownOutputFormat(
            f"unknown output format {name!r}; expected one of {accepted}"
        ) from None


def header_for(column: str) -> str:
    """``pod_name`` -> ``POD NAME``: istioctl's header style."""
    return column.replace("_", " ").replace("-", " ").upper()


def cell_text(value: Any) -> str:
    """One table cell: lists joined by commas, nothing that could break the line layout."""
    if value is None:
        text = ""
    elif isinstance(value, bool):
        text = "true" if value else "false"
    elif isinstance(value, list | tuple | set | frozenset):
        text = ",".join(cell_text(v) for v in value)
    elif isinstance(value, dict):
        text = ",".join(f"{k}={cell_text(v)}" for k, v in value.items())
    else:
        text = str(value)
    return " ".join(text.split()) if any(c in text for c in "\t\r\n") else text


def render_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str]) -> str:
    """A header line plus one line per row, each column padded to its widest cell.

    The last column is not padded, so no line carries trailing blanks.
    """
    if not columns:
        raise ValueError("render_table needs at least one column")
    lines = [[header_for(c) for c in columns]]
    lines.extend([cell_text(row.get(c)) for c in columns] for row in rows)
    widths = [max(len(line[i]) for line in lines) for i in range(len(columns))]
    out = []
    for line in lines:
        padded = [cell.ljust(widths[i]) for i, cell in enumerate(line[:-1])]
        out.append(COLUMN_GAP.join([*padded, line[-1]]).rstrip())
    return "\n".join(out) + "\n"


def render_json(data: Any) -> str:
    return json.dumps(data, indent=2, default=str) + "\n"


def render_yaml(data: Any) -> str:
    return yaml.safe_dump(_plain(data), sort_keys=False, default_flow_style=False)


def _plain(data: Any) -> Any:
    """safe_dump refuses tuples and enum subclasses of str; turn them into plain values."""
    if isinstance(data, Mapping):
        return {str(k): _plain(v) for k, v in data.items()}
    if isinstance(data, list | tuple):
        return [_plain(v) for v in data]
    if isinstance(data, StrEnum):
        return str(data.value)
    if data is None or isinstance(data, bool | int | float | str):
        return data
    return str(data)


def render(
    rows: Sequence[Mapping[str, Any]],
    columns: Sequence[str],
    fmt: OutputFormat | str,
    *,
    wide_columns: Sequence[str] = (),
    structured: Any = None,
) -> str:
    """Render ``rows`` in ``fmt``.

    ``wide_columns`` are appended for ``-o wide``. JSON/YAML dump ``structured`` when given
    (the raw objects the rows were made from), else the rows themselves.
    """
    fmt = fmt if isinstance(fmt, OutputFormat) else parse_output_format(fmt)
    if fmt is OutputFormat.TABLE:
        return render_table(rows, columns)
    if fmt is OutputFormat.WIDE:
        return render_table(rows, [*columns, *wide_columns])
    data = structured if structured is not None else [dict(r) for r in rows]
    if fmt is OutputFormat.JSON:
        return render_json(data)
    return render_yaml(data)
