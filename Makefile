# `make demo` and `make test` work on a fresh clone: both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdstore-installed
DEMO := demo-out

.PHONY: env demo test bench bench-gpu clean

env: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install --quiet -e '.[teacher,dev]'
	touch $(STAMP)

demo: env
	rm -rf $(DEMO)
	$(PY) -m featurestore demo-data $(DEMO)/images --per-class 40 --seed 0
	$(PY) -m featurestore demo-data $(DEMO)/val --per-class 10 --seed 1
	$(PY) -m featurestore build --config configs/demo.yaml --images $(DEMO)/images --out $(DEMO)/store.zarr
	$(PY) -m featurestore inspect $(DEMO)/store.zarr
	$(PY) -m featurestore verify $(DEMO)/store.zarr
	$(PY) -m trainer fit --config configs/students/demo.yaml --store $(DEMO)/store.zarr --out $(DEMO)/run
	$(PY) -m trainer eval --model $(DEMO)/run/student.pt --images $(DEMO)/val --save $(DEMO)/run/eval.json
	$(PY) -m trainer export --run $(DEMO)/run --format onnx
	$(PY) -m trainer report $(DEMO)/run --eval $(DEMO)/run/eval.json

test: env
	HF_HUB_OFFLINE=1 $(PY) -m pytest -q

bench: env
	$(PY) -m benchmarks.run --profile cpu

bench-gpu: env
	$(PY) -m benchmarks.run --profile gpu

clean:
	rm -rf $(DEMO) .pytest_cache
