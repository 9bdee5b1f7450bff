# The two commands of the README. Both work on a fresh machine: they create .venv and install first.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch is pinned in the same pip call as everything else, so no multi-GB CUDA build is pulled in.
PINS := torch==2.13.0 mlflow==3.17.2

.PHONY: demo test install clean clean-all realsize

$(BIN)/visor: pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(PINS) -e ".[test,eval]"
	# lmms-eval's torchvision wheel is a CUDA build that fails to load beside torch+cpu, and transformers imports
	# torchvision whenever it is installed: remove it (docs/eval.md)
	$(BIN)/python -m pip uninstall -q -y torchvision
	touch $(BIN)/visor

install: $(BIN)/visor

demo: install
	HF_HUB_OFFLINE=1 $(BIN)/visor pipeline --config experiments/debug/pipeline.yaml

test: install
	HF_HUB_OFFLINE=1 $(BIN)/python -m pytest -q -ra tests

# the real 0.5B recipe at real shapes on this machine (~15 min, ~25 GB disk while it runs; docs/scale.md)
realsize: install
	HF_HUB_OFFLINE=1 $(BIN)/visor realsize --out runs/realsize

# run directories and caches go; the MLflow store (runs/mlflow.db and runs/mlartifacts) stays: `make clean-all` for both
clean:
	find runs -mindepth 1 -maxdepth 1 ! -name mlflow.db ! -name mlartifacts -exec rm -rf {} + 2>/dev/null || true
	rm -rf .pytest_cache

clean-all:
	rm -rf runs .pytest_cache
