# Two commands on a fresh machine: `make demo` and `make test`. Both build .venv first.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: demo test env build lint clean

env: $(STAMP)

# torch first and alone (the CPU wheel on disk); then the pinned deps; then the project without build
# isolation, so building csrc/ uses this torch-free environment's pybind11 and never fetches another torch.
$(STAMP): setup.py requirements.txt $(wildcard csrc/*/*/*.cpp csrc/*/*/*.h)
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --disable-pip-version-check torch==2.13.0
	$(BIN)/pip install -q --disable-pip-version-check -r requirements.txt
	$(BIN)/pip install -q --disable-pip-version-check --no-build-isolation --no-deps -e .
	touch $(STAMP)

build: $(STAMP)
	$(BIN)/python setup.py -q build_ext --inplace

demo: $(STAMP)
	$(BIN)/python -m reallm.apps.demo

test: $(STAMP)
	$(BIN)/python -m pytest -q tests

lint: $(STAMP)
	$(BIN)/ruff check reallm planner executor tests

clean:
	rm -rf $(VENV) build *.egg-info outputs assets
