# `make demo` and `make test` work on a fresh clone: both create .venv first.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.kdstore-installed
TORCH := torch==2.14.1 torchvision==0.29.1
DEMO := demo-out
STUDENT := configs/students/demo.yaml
# every demo student trains the same number of optimizer steps (30 passes over 100 labelled + 400
# unlabelled images at batch 32), so no run wins by training longer
DEMO_STEPS := 480
RUNS := $(DEMO)/labels-alone $(DEMO)/distilled $(DEMO)/distilled+unlabelled

.PHONY: env demo demo-data demo-sweep test bench bench-gpu clean

env: $(STAMP)

# uv installs everything, torch and torchvision pinned, in parallel (about 70 s on 2 cores, pip alone
# takes 110 s), bytecode included so that imports stay fast where PYTHONDONTWRITEBYTECODE is set; pip
# takes over where uv cannot reach the package index (uv reads no pip.conf)
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet uv
	$(VENV)/bin/uv pip install --quiet --python $(PY) --compile-bytecode $(TORCH) -e '.[teacher,dev,track]' \
		|| $(PY) -m pip install --quiet $(TORCH) -e '.[teacher,dev,track]'
	touch $(STAMP)

# A teacher that knows the classes, few labels, many unlabelled images, a store; then three students
# trained the same way for the same number of steps (labels alone, distilled, distilled with the
# unlabelled images too), each scored as the grader scores on images no run saw, in one table.
demo: demo-data
	$(PY) -m featurestore build --config configs/demo.yaml --teacher $(DEMO)/teacher --images $(DEMO)/labelled \
		--unlabeled $(DEMO)/unlabelled --out $(DEMO)/store.zarr
	$(PY) -m featurestore inspect $(DEMO)/store.zarr
	$(PY) -m featurestore verify $(DEMO)/store.zarr
	$(PY) -m trainer fit --config $(STUDENT) --store $(DEMO)/store.zarr --out $(DEMO)/labels-alone \
		--w-kd 0 --w-pooled 0 --w-patches 0 --no-unlabeled --steps $(DEMO_STEPS)
	$(PY) -m trainer fit --config $(STUDENT) --store $(DEMO)/store.zarr --out $(DEMO)/distilled --no-unlabeled \
		--steps $(DEMO_STEPS)
	$(PY) -m trainer fit --config $(STUDENT) --store $(DEMO)/store.zarr --out $(DEMO)/distilled+unlabelled \
		--steps $(DEMO_STEPS)
	for run in $(RUNS); do \
		$(PY) -m trainer eval --model $$run/student.pt --images $(DEMO)/fresh --save $$run/eval.json > /dev/null || exit 1; \
	done
	$(PY) -m trainer export --run $(DEMO)/distilled+unlabelled --format onnx
	$(PY) -m featurestore show $(DEMO)/store.zarr --images 0,1,2,3 --max-views 8 --out $(DEMO)/views.png
	$(PY) -m trainer report $(RUNS) --html $(DEMO)/report.html --title "kdstore demo"

demo-data: env
	rm -rf $(DEMO)
	$(PY) -m featurestore demo-teacher $(DEMO)/teacher --steps 240
	$(PY) -m featurestore demo-data $(DEMO)/labelled --per-class 14 --seed 0
	$(PY) -m featurestore demo-data $(DEMO)/unlabelled --per-class 40 --seed 2 --flat
	$(PY) -m featurestore demo-data $(DEMO)/fresh --per-class 20 --seed 1

# `trainer sweep` of three recipes on the demo data, 3 seeds, every recipe at the same optimizer steps
# (about 25 minutes on 2 cores): the strong-teacher row of the README's defaults table.
demo-sweep: demo-data
	$(PY) -m featurestore demo-data $(DEMO)/labelled-20 --per-class 20 --seed 0
	$(PY) -m featurestore build --config configs/demo.yaml --teacher $(DEMO)/teacher --images $(DEMO)/labelled-20 \
		--unlabeled $(DEMO)/unlabelled --out $(DEMO)/sweep-store.zarr --val-fraction 0.5
	$(PY) -m trainer sweep --config $(STUDENT) --store $(DEMO)/sweep-store.zarr --out $(DEMO)/sweep --epochs 30 \
		--recipes labels,base:labelled,base --seeds 3 --eval-images $(DEMO)/fresh

# two test processes of one thread each: a 2-core machine kept busy without oversubscription
test: env
	$(VENV)/bin/ruff check .
	OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 $(PY) -m pytest -q -n auto --maxprocesses 4 --dist worksteal --durations=15

bench: env
	$(PY) -m benchmarks.run --profile cpu

bench-gpu: env
	$(PY) -m benchmarks.run --profile gpu

clean:
	rm -rf $(DEMO) .pytest_cache
