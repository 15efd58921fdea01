"""``python -m fuzz [--seconds N] [TARGET ...]``: every target coverage-guided under atheris.

Each target runs in its own process for ``--seconds`` with a corpus kept in
``run/fuzz/corpus/<target>`` (so later runs start where earlier ones stopped); a crash leaves
its input in ``run/fuzz/crash-<target>-*`` and the run exits 1. Prints a line per target as
it goes and a table at the end.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

from fuzz.targets import TARGETS

_RUNS = re.compile(rb"Done (\d+) runs in (\d+) second")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fuzz", description=__doc__)
    parser.add_argument("targets", nargs="*", choices=[[], *TARGETS], metavar="TARGET",
                        help=f"one of {', '.join(TARGETS)} (default: all)")
    parser.add_argument("--seconds", type=int, default=60, help="per target (default 60)")
    parser.add_argument("--state-dir", type=Path, default=Path("run/fuzz"))
    args = parser.parse_args(argv)
    names = args.targets or list(TARGETS)
    rows = []
    for name in names:
        corpus = args.state_dir / "corpus" / name
        corpus.mkdir(parents=True, exist_ok=True)
        print(f"fuzz: {name} for {args.seconds} s ...", flush=True)
        try:
            result = subprocess.run(
                [sys.executable, "-m", "fuzz.one", name, f"-max_total_time={args.seconds}",
                 "-rss_limit_mb=2048", "-timeout=10",
                 f"-artifact_prefix={args.state_dir}/crash-{name}-", str(corpus)],
                capture_output=True, timeout=args.seconds + 120,
            )
        except subprocess.TimeoutExpired:
            rows.append((name, "hung", "-"))
            continue
        done = _RUNS.search(result.stderr)
        outcome = "ok" if result.returncode == 0 else f"CRASH (exit {result.returncode})"
        rows.append((name, outcome, done.group(1).decode() if done else "-"))
        if result.returncode != 0:
            sys.stderr.write(result.stderr.decode("utf-8", "replace")[-4000:])
    width = max(len(name) for name, _, _ in rows)
    print(f"\n{'TARGET':<{width}}  {'RESULT':<18}  RUNS")
    for name, outcome, runs in rows:
        print(f"{name:<{width}}  {outcome:<18}  {runs}")
    return 0 if all(outcome == "ok" for _, outcome, _ in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
