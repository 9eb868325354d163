# make demo   - install, fetch the Houses photos into data/, train the demo model
# make test   - install, run the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
HOUSES_ZIP := ../shared/datasets/houses-dataset-400.zip
# The local copy of the Houses Dataset where there is one; else replicate downloads it from GitHub.
HOUSES_SOURCE ?= $(if $(wildcard $(HOUSES_ZIP)),$(HOUSES_ZIP),https://github.com/emanhamed/Houses-dataset/archive/refs/heads/master.zip)

.PHONY: install demo test bench bench-predict clean

install: $(VENV)/.installed

# pip --quiet: its per-package lines (and one "Successfully installed" line thousands of characters
# long) would fill `make demo > demo.log`; errors and warnings still show.
$(VENV)/.installed: pyproject.toml
	@echo "installing replicate into $(VENV) (the first time: PyTorch and its CUDA libraries, a few GB, minutes)"
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --progress-bar off -e '.[dev,lite,ray]'
	$(BIN)/replicate --help > /dev/null
	touch $@

demo: install
	$(BIN)/replicate data houses --source "$(HOUSES_SOURCE)"
	$(BIN)/replicate demo

test: install
	$(BIN)/lint-imports --no-cache
	$(BIN)/ruff check replicate tests benchmarks
	$(BIN)/ruff format --check replicate tests benchmarks
	$(BIN)/python -m pytest

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache

# replicate vs a plain PyTorch baseline on data/rooms (about 10 minutes on 2 CPU cores)
bench: install
	test -d data/rooms || $(BIN)/replicate data houses --source "$(HOUSES_SOURCE)"
	$(BIN)/python benchmarks/bench.py

# tagging speed: fastai vs ONNX Runtime fp32 vs int8, resnet18 and densenet121 at 224 px (about 5 minutes on 2 CPU cores)
bench-predict: install
	test -d data/rooms || $(BIN)/replicate data houses --source "$(HOUSES_SOURCE)"
	$(BIN)/python benchmarks/predict_bench.py $(if $(RUNS),--runs $(RUNS))
