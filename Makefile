# Two commands do all set-up on a fresh machine:
#   make train   creates .venv, installs pinned dependencies, runs the default KD-QAT job
#   make test    creates .venv, installs pinned dependencies (plus test-only ones), runs the tests
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
ARGS   ?=

.PHONY: train test test-fast bench clean-venv

# torch first (pinned), then the project itself, editable, built against that torch (its C++
# neighbour kernels, when setup.py builds them), with the test-only pins of the `dev` extra.
$(STAMP): requirements.txt requirements-dev.txt requirements-openvino.txt pyproject.toml $(wildcard setup.py models/csrc/*)
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip setuptools wheel
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-build-isolation -e ".[dev]"
	touch $(STAMP)

train: $(STAMP)
	$(PY) tools/train_kd_qat.py $(ARGS)

# The whole suite, slow end-to-end tests included; CI runs exactly this. Two workers, one test
# file each at a time (module fixtures such as a trained run are built once); one torch thread
# per worker (tests/conftest.py), so the two never fight over the two cores.
# KDQAT_REQUIRE_KERNELS=1: the compiled neighbour ops must have been built by the set-up above
# (tests/test_models_kernels.py fails otherwise instead of skipping).
test: $(STAMP)
	KDQAT_REQUIRE_KERNELS=1 $(PY) -m pytest -q -n 2 --dist loadfile $(ARGS)

# Unit tests only (skips @pytest.mark.slow), for a quick loop while editing.
test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow" $(ARGS)

bench: $(STAMP)
	$(PY) tools/benchmark.py $(ARGS)

clean-venv:
	rm -rf $(VENV)
