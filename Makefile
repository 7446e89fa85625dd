# FCDM: one-command set-up. `make demo` runs the whole pipeline on a CPU; `make test` runs the tests.
# Both create .venv with the package installed (editable) the first time.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.fcdm-installed

.PHONY: install test lint demo demo-quick eval-env summary clean-demo help

help:
	@echo "make demo      - the whole pipeline (data, train, sample, evaluate) on the digits demo, CPU, < 10 min"
	@echo "make test      - install (if needed), lint (ruff) and run the test suite (TEST_WORKERS=2 processes)"
	@echo "make lint      - ruff check (pyflakes, pycodestyle, import order; pyproject.toml)"
	@echo "make install   - create $(VENV) and install the package with its test extras (incl. TensorFlow CPU)"
	@echo "make eval-env  - add TensorFlow (CPU) for the exact ADM evaluator backend"
	@echo "make summary   - params and GFLOPs of every registered model"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -c "import torch, torchvision" 2>/dev/null || $(PY) -m pip install torch==2.14.1 torchvision==0.29.1
	$(PY) -m pip install -e ".[test,eval-tf]"  # eval-tf: the suite runs the TF evaluator's tests too
	touch $(STAMP)

install: $(STAMP)

# test files are spread over TEST_WORKERS processes (pytest-xdist; a file's tests stay together, so its module
# fixtures are built once); TEST_WORKERS=0 runs them in this process, one after another
TEST_WORKERS ?= 2
test: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m pytest -q $(if $(filter 0,$(TEST_WORKERS)),,-n $(TEST_WORKERS) --dist loadfile)

lint: $(STAMP)
	$(PY) -m ruff check .

demo: $(STAMP)
	$(PY) train_gen/demo.py

demo-quick: $(STAMP)
	$(PY) train_gen/demo.py --quick

eval-env: $(STAMP)
	$(PY) -m pip install -e ".[eval-tf]"

summary: $(STAMP)
	$(PY) -m models.summary

clean-demo:
	rm -rf results/demo

# Wheels the GPU machine lacks (benchmarks/gpu_wheels.txt), for cp312 manylinux x86-64, into .whl/
# (git-ignored, ~16 MiB); benchmarks/gpu_suite.sh installs them there. Needs PyPI; no venv needed.
GPU_WHEEL_PLATFORMS := manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64 manylinux1_x86_64
.PHONY: gpu-wheels
gpu-wheels:
	rm -rf .whl && mkdir -p .whl
	$(PYTHON) -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
		$(addprefix --platform ,$(GPU_WHEEL_PLATFORMS)) -d .whl -r benchmarks/gpu_wheels.txt
	@du -sh .whl
