# `make demo` and `make test` work on a fresh clone: both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdstore-installed
DEMO := demo-out

.PHONY: env demo test clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[teacher,dev]'
	touch $(STAMP)

demo: env
	$(PY) -m featurestore demo-data $(DEMO)/images --per-class 40 --seed 0
	$(PY) -m featurestore build --config configs/demo.yaml --images $(DEMO)/images --out $(DEMO)/store.zarr
	$(PY) -m featurestore inspect $(DEMO)/store.zarr
	$(PY) -m featurestore verify $(DEMO)/store.zarr

test: env
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

clean:
	rm -rf $(DEMO) .pytest_cache
