# cellarena — the two set-up commands are `make run` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2
PROFILE ?= workflow/profiles/default
LB_PORT ?= 8501

.PHONY: install run test leaderboard lock clean-results lint

install: $(STAMP)

# Exact pins from requirements.lock (made by `make lock`), then the project itself without deps.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

run: install
	$(BIN)/snakemake --profile $(PROFILE) --cores $(CORES)
	@$(BIN)/cellarena summary results/scores.parquet

test: install
	$(BIN)/python -m pytest $(PYTEST_ARGS)

leaderboard: install
	$(BIN)/streamlit run leaderboard/app.py --server.address 127.0.0.1 --server.port $(LB_PORT) \
		--server.headless true --browser.gatherUsageStats false -- --scores results/scores.parquet

lint: install
	$(BIN)/snakemake --lint --cores 1

# Re-resolve the exact pins from pyproject.toml's ranges (needs pip-tools).
lock:
	$(BIN)/python -m pip install --quiet pip-tools
	$(BIN)/pip-compile --quiet --extra test --strip-extras --no-emit-index-url --no-emit-find-links \
		-o requirements.lock pyproject.toml

clean-results:
	rm -rf results/fetch_dataset results/prepare_dataset results/make_split results/run_annotation \
		results/tuning results/aggregate_scores results/build_leaderboard results/logs results/benchmarks results/scores.parquet
