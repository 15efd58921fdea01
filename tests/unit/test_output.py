"""Table / JSON / YAML rendering of command results."""

from __future__ import annotations

import json
from typing import Any

import pytest
import yaml

from ambientctl.output import (
    OutputFormat,
    UnknownOutputFormat,
    cell_text,
    header_for,
    parse_output_format,
    render,
    render_table,
)

ROWS: list[dict[str, Any]] = [
    {"namespace": "default", "pod_name": "sleep-1", "address": "127.0.20.1", "waypoint": None},
    {"namespace": "bookinfo", "pod_name": "productpage-v1-abc", "address": "127.0.20.22"},
]


def test_headers_are_istioctl_style() -> None:
    assert header_for("pod_name") == "POD NAME"
    assert header_for("service-vip") == "SERVICE VIP"


def test_table_pads_columns_and_keeps_order() -> None:
    text = render_table(ROWS, ["namespace", "pod_name", "address"])
    lines = text.splitlines()
    assert lines == [
        "NAMESPACE POD NAME           ADDRESS",
        "default   sleep-1            127.0.20.1",
        "bookinfo  productpage-v1-abc 127.0.20.22",
    ]
    assert text.endswith("\n")


def test_table_has_no_trailing_blanks_even_with_empty_last_cell() -> None:
    text = render_table(ROWS, ["pod_name", "waypoint"])
    assert all(line == line.rstrip() for line in text.splitlines())
    assert text.splitlines()[0] == "POD NAME           WAYPOINT"


def test_missing_cells_are_blank_and_columns_stay_aligned() -> None:
    rows: list[dict[str, str]] = [{"a": "x"}, {"a": "longer", "b": "y"}]
    lines = render_table(rows, ["a", "b"]).splitlines()
    assert lines == ["A      B", "x", "longer y"]


def test_cells_never_break_the_line_layout() -> None:
    assert cell_text("two\nlines\tand tab") == "two lines and tab"
    assert cell_text(["a", "b"]) == "a,b"
    assert cell_text(True) == "true"
    assert cell_text(None) == ""
    assert cell_text(15008) == "15008"


def test_render_table_needs_columns() -> None:
    with pytest.raises(ValueError, match="at least one column"):
        render_table(ROWS, [])


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("table", OutputFormat.TABLE),
        ("short", OutputFormat.TABLE),
        ("wide", OutputFormat.WIDE),
        ("JSON", OutputFormat.JSON),
        ("yaml", OutputFormat.YAML),
    ],
)
def test_format_names(name: str, expected: OutputFormat) -> None:
    assert parse_output_format(name) is expected


def test_unknown_format_names_the_accepted_ones() -> None:
    with pytest.raises(UnknownOutputFormat, match="table\\|short\\|wide\\|json\\|yaml"):
        parse_output_format("xml")


def test_json_is_indented_and_round_trips() -> None:
    text = render(ROWS, ["namespace"], "json")
    assert json.loads(text) == ROWS
    assert '\n  {\n    "namespace": "default"' in text


def test_yaml_keeps_key_order_and_dumps_structured_data() -> None:
    structured = [{"zeta": 1, "alpha": ("x", "y")}]
    text = render(ROWS, ["namespace"], OutputFormat.YAML, structured=structured)
    assert text.index("zeta") < text.index("alpha")
    assert yaml.safe_load(text) == [{"zeta": 1, "alpha": ["x", "y"]}]


def test_wide_appends_extra_columns() -> None:
    rows = [{"a": "1", "b": "2"}]
    assert render(rows, ["a"], "short").splitlines()[0] == "A"
    assert render(rows, ["a"], "wide", wide_columns=["b"]).splitlines() == ["A B", "1 2"]
