# ambient-lite: developer and CI entry points. `make test` is what .ci/run runs.

VENV ?= .venv
PY := $(VENV)/bin/python
VENV_STAMP := $(VENV)/.stamp
SYSTEM_STAMP := $(VENV)/.system-deps-stamp
# Debian packages the network-namespace tests and the capture mode use; tcpdump, nc and curl
# are the capture lab's packet captures and unmodified clients (test_capture_lab.py).
SYSTEM_PACKAGES := iproute2 iptables util-linux tcpdump netcat-openbsd curl
PACKAGES := istiod_lite ztunnel waypoint ambientctl ambient_common ambient_api ambient_dataplane fuzz

.PHONY: venv system-deps kubectl demo test lint bench chaos fuzz dist clean distclean

venv: $(VENV_STAMP)

# Rebuilt when pyproject.toml changes (its dependencies may have).
$(VENV_STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install --quiet -e '.[test]'
	@touch $@

system-deps: $(SYSTEM_STAMP)

# Installs only what is missing, once (the stamp); without root or apt-get it explains and
# leaves no stamp, so a later run as root still installs.
$(SYSTEM_STAMP): Makefile
	@missing=""; \
	for pkg in $(SYSTEM_PACKAGES); do \
		dpkg-query -W -f='$${Status}' $$pkg 2>/dev/null | grep -q 'install ok installed' \
			|| missing="$$missing $$pkg"; \
	done; \
	if [ -z "$$missing" ]; then \
		mkdir -p $(VENV) && touch $@; \
	elif [ "$$(id -u)" != 0 ]; then \
		echo "system-deps: not root; not installing:$$missing (tests needing them skip)"; \
	elif ! command -v apt-get >/dev/null 2>&1; then \
		echo "system-deps: no apt-get; please install:$$missing"; \
	else \
		echo "system-deps: installing$$missing"; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			$$missing >/dev/null && \
		mkdir -p $(VENV) && touch $@; \
	fi

# tests/unit/test_manifests.py renders manifests/ with `kubectl kustomize` (offline). Any
# kubectl on PATH will do; without one, Debian's kubernetes-client is installed when root
# (its kubectl 1.20 renders manifests/base and samples; the test says what it cannot do).
kubectl:
	@if command -v kubectl >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
		echo "kubectl: not found and cannot install it here; manifest rendering tests skip"; \
	else \
		echo "kubectl: installing Debian's kubernetes-client"; \
		apt-get update -qq && \
		DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
			kubernetes-client >/dev/null; \
	fi

demo: venv
	$(PY) -m ambientctl demo

lint: venv
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy $(PACKAGES)
	$(VENV)/bin/lint-imports --no-cache

test: venv system-deps kubectl lint
	$(PY) -m pytest -q -p no:cacheprovider --timeout=120 tests

# The benchmark suite (issue 6; never part of `make test`): no mesh vs ambient-lite vs Envoy,
# results in bench/results/<timestamp>.json. QUICK=1 for small sizes (~1-2 min).
BENCH_STAMP := $(VENV)/.bench-stamp
$(BENCH_STAMP): pyproject.toml $(VENV_STAMP)
	$(PY) -m pip install --quiet -e '.[test,bench]'
	@touch $@

bench: $(BENCH_STAMP)
	$(PY) -m bench $(if $(QUICK),--quick)

# The reliability harness (issue 11; never part of `make test`): attacks and faults against a
# live mesh, figures in bench/results/chaos-<timestamp>.json. QUICK=1: ~2 min instead of ~5.
chaos: $(BENCH_STAMP)
	$(PY) -m bench.chaos $(if $(QUICK),--quick)

# Coverage-guided fuzzing of every parser (atheris; never part of `make test`, whose
# tests/unit/test_fuzz_parsers.py runs the same targets under hypothesis, bounded).
# FUZZ_SECONDS per target (default 60); crashes are kept in run/fuzz/.
FUZZ_STAMP := $(VENV)/.fuzz-stamp
$(FUZZ_STAMP): pyproject.toml $(VENV_STAMP)
	$(PY) -m pip install --quiet -e '.[test,fuzz]'
	@touch $@

fuzz: $(FUZZ_STAMP)
	$(PY) -m fuzz --seconds $(or $(FUZZ_SECONDS),60)

# The wheel (examples and manifests inside, see ambientctl/bundled) in dist/.
dist: venv
	$(PY) -m pip wheel --quiet --no-deps -w dist .

clean:
	rm -rf run .mypy_cache .ruff_cache .pytest_cache build .build dist
	find . -path ./$(VENV) -prune -o -name __pycache__ -type d -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) *.egg-info
