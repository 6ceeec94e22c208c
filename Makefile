# Two entry points (see README "Quick start"): `make demo` and `make test`.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
LS_VENV := .ls-venv
PYTEST_ARGS ?=

.PHONY: install test lint demo simulate bench clean

$(VENV)/.installed: pyproject.toml
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[test]'
	# Animal-MNIST data for the benchmarks; --no-deps: its metadata pulls in tensorflow.
	$(BIN)/pip install -q --no-deps animal-mnist
	touch $@

# Label Studio pins its own dependencies, so it lives in its own venv.
$(LS_VENV)/.installed:
	$(PY) -m venv $(LS_VENV)
	# sentry-sdk 3 (2026-12) refuses the options Label Studio 1.23 starts it with.
	$(LS_VENV)/bin/pip install -q 'label-studio>=1.23,<1.24' 'sentry-sdk>=2.16,<3'
	touch $@

install: $(VENV)/.installed

lint: install
	$(BIN)/ruff check amls_cli ml_backend import_tools tests benchmarks demo

test: $(VENV)/.installed $(LS_VENV)/.installed
	$(BIN)/ruff check amls_cli ml_backend import_tools tests benchmarks demo
	AMLS_LABEL_STUDIO_BIN=$(abspath $(LS_VENV))/bin/label-studio $(BIN)/pytest -q $(PYTEST_ARGS)

# Headless active-learning simulation on real FIRST radio galaxies (bent-tailed = rare);
# the model looks at the central half of each cutout, where FIRST sources are.
simulate: install
	test -f runs/first/store.h5 || $(BIN)/python -m benchmarks.datasets first --rare Bent --out runs/first
	$(BIN)/amls simulate runs/first/store.h5 --truth runs/first/truth.csv --cycles 3 --center-crop 0.5

# The product: Label Studio + this backend on real FIRST radio galaxies (Ctrl-C stops all).
demo: $(VENV)/.installed $(LS_VENV)/.installed
	$(BIN)/python -m demo.run_demo

clean:
	rm -rf $(VENV) $(LS_VENV) runs .pytest_cache
