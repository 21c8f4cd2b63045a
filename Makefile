# cellarena — the two set-up commands are `make run` and `make test`.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2
PROFILE ?= workflow/profiles/default
LB_PORT ?= 8501

.PHONY: install run test leaderboard lock clean-results lint validate regress reference

install: $(STAMP)

# Exact pins from requirements.lock (made by `make lock`), then the project itself without deps.
$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r requirements.lock
	$(BIN)/python -m pip install --quiet --no-deps -e .
	@touch $(STAMP)

# After an interruption (Ctrl-C, kill -9, a power cut) `make run` again continues where it stopped:
# a lock the stopped run left is removed when no Snakemake process runs here, and the profile
# re-runs the jobs it left unfinished (rerun-incomplete).
UNLOCK_STALE := $(BIN)/python workflow/scripts/unlock_stale.py $(BIN)/snakemake --profile $(PROFILE)

run: install
	$(UNLOCK_STALE)
	$(BIN)/snakemake --profile $(PROFILE) --cores $(CORES)
	@$(BIN)/cellarena summary results/scores.parquet
	@$(BIN)/cellarena regress --scores results/scores.parquet --report-only

# Check model folders as a pull request is checked (MODELS=models/my_model; default: every folder).
MODELS ?=
validate: install
	$(BIN)/cellarena validate $(if $(MODELS),$(MODELS),--all)

# The CI regression plan (a subset of the default plan), compared with results/reference/.
regress: install
	$(UNLOCK_STALE)
	$(BIN)/snakemake --profile $(PROFILE) --cores $(CORES) --configfile workflow/config.ci.yaml
	$(BIN)/cellarena regress --scores results/ci/scores.parquet

# After `make run`: rewrite the committed reference results (prints what changes; commit the diff).
reference: install
	$(BIN)/cellarena reference --scores results/scores.parquet

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

# Every output under results/ (all of it is git-ignored) except the committed reference.
clean-results:
	find results -mindepth 1 -maxdepth 1 ! -name reference -exec rm -rf {} +
