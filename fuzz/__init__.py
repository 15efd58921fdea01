"""Fuzzing targets for every parser a peer or a user can feed (issue 11).

``fuzz.targets`` holds one check per parser: bytes in, and the parser must answer with a
result or its own error type. ``tests/unit/test_fuzz_parsers.py`` runs them (and structured
properties) under hypothesis in ``make test``; ``make fuzz`` (``python -m fuzz``) runs them
coverage-guided under atheris for longer, never as part of ``make test``.
"""
