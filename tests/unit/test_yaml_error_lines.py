"""A YAML typo is reported at the typo's line, not where the parser noticed it (issue 16)."""

from __future__ import annotations

import pytest
import yaml

from istiod_lite.sources.validation import yaml_error_reason

LOADERS = [yaml.SafeLoader, getattr(yaml, "CSafeLoader", yaml.SafeLoader)]


@pytest.mark.parametrize("loader", LOADERS)
@pytest.mark.parametrize(
    ("text", "reported"),
    [
        # a top-level key without its ':' (the parser notices on the next line)
        ("a: 1\nb 2\nc: 3\n", "line 2, column 1"),
        # a nested key without its ':' runs into the next line as one plain scalar
        ("metadata:\n  name reviews\n  namespace: demo\nspec: {}\n", "line 2, column 3"),
        # the wrongly indented line itself
        ("key: value\n  bad: indent\n", "line 2"),
        ("a:\n  b: 1\n c: 2\n", "line 3"),
        # a key with a ':' does not move the report up
        ("metadata:\n  name: x\n  bad key: a: b\n", "line 3"),
    ],
)
def test_the_reported_line_is_the_typo(loader: type, text: str, reported: str) -> None:
    with pytest.raises(yaml.YAMLError) as caught:
        list(yaml.load_all(text, Loader=loader))
    reason = yaml_error_reason(caught.value, text)
    assert reason.startswith(f"YAML syntax error at {reported}"), reason
    assert "\n" not in reason
