"""``python -m fuzz.one TARGET [libFuzzer flags] [CORPUS_DIR]``: one target under atheris.

Run by ``python -m fuzz``; the parsers' packages are instrumented for coverage feedback.
"""

from __future__ import annotations

import sys

import atheris

with atheris.instrument_imports(include=[
    "ztunnel", "waypoint", "ambient_dataplane", "ambient_api", "istiod_lite",
]):
    from fuzz.targets import TARGETS


def main() -> None:
    if len(sys.argv) < 2 or sys.argv[1] not in TARGETS:
        sys.exit(f"usage: python -m fuzz.one {{{','.join(TARGETS)}}} [libFuzzer flags]")
    atheris.Setup([sys.argv[0], *sys.argv[2:]], TARGETS[sys.argv[1]])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
