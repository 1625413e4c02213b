# `make demo` and `make test` set up their own virtual environment (.venv).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install demo test test-fast costs clean bazel-test

$(STAMP): pyproject.toml setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,pretrained]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dplg-demo --workdir=demo_run

test: $(STAMP)
	$(PY) -m pytest

test-fast: $(STAMP)
	$(PY) -m pytest -m "not slow"

costs: $(STAMP)
	$(PY) -m dplg_tf.cli.costs --backbone=resnet50 --image_size=512

clean:
	rm -rf $(VENV) build *.egg-info bazel-*

# Bazel (Debian's bazel-bootstrap, offline) on the fast unit tests.
bazel-test: $(STAMP)
	DPLG_PYTHON=$(abspath $(PY)) bazel test //tests:unit
