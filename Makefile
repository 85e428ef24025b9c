# The README's two commands are `make demo` (the main job) and `make test` (the tests).
# Both create .venv on first use: torch==2.13.0 is installed first so pip takes the local CPU
# wheel instead of the multi-GB CUDA build, then the package with its test extras.

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
FIT_CONFIG := --config examples/configs/fashion_mnist.yaml --config examples/configs/optim/ring.yaml

.PHONY: install data demo test lint bench bench-quick bench-gr clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[test,bench,models]"
	touch $@

install: $(VENV)/.installed

data: install
	$(PY) -m examples.data.fetch fashion-mnist

# Main job: a small CNN on Fashion-MNIST with RING through the LightningCLI (progress bar,
# checkpoint in runs/fashion_mnist/checkpoints), then the test accuracy of the last checkpoint.
demo: data
	rm -rf runs/fashion_mnist/checkpoints
	$(PY) -m examples.train fit $(FIT_CONFIG)
	$(PY) -m examples.train test $(FIT_CONFIG) --ckpt_path runs/fashion_mnist/checkpoints/last.ckpt

# Benchmarks (benchmarks/README.md): the full side-by-side run regenerates the committed
# benchmarks/results/ (96 minutes measured on 2 cores, 2026-12-07); the quick one (2 min 41 s measured on 2 cores with
# the data fetched: training subsets, one seed, no sweep) writes runs/bench-quick/.
bench: install
	$(PY) -m examples.data.fetch all
	$(PY) -m benchmarks.suite --profile full --out benchmarks/results --command "make bench" $(BENCH_FLAGS)

bench-quick: install
	$(PY) -m examples.data.fetch all
	$(PY) -m benchmarks.suite --profile quick --out runs/bench-quick --command "make bench-quick"

# The GR study (issue 21; benchmarks/results/gr/README.md): every regime, the placements of ρ
# and the lr robustness sweeps, resumable (rerun to continue); one benchmark at a time.
bench-gr: install
	$(PY) -m examples.data.fetch all
	$(PY) -m benchmarks.gr_study benchmarks/results/gr --run

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m pip install --quiet ruff
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

clean:
	rm -rf runs lightning_logs .pytest_cache
