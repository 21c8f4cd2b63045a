# cellarena — the two set-up commands are `make run` and `make test`.
PYTHON ?= python3.11
# 3.11, 3.12 or 3.13 (`make run PYTHON=python3.12`): picks the lock, where pins that differ by
# Python live, and the venv (.venv for 3.11, .venv312, .venv313) unless VENV is given.
PYVER  := $(shell $(PYTHON) -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null)
VENV   ?= $(if $(filter-out 3.11,$(PYVER)),.venv$(subst .,,$(PYVER)),.venv)
LOCK   := requirements-py$(or $(PYVER),-none).lock
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
CORES  ?= 2
PROFILE ?= workflow/profiles/default
LB_PORT ?= 8501

.PHONY: install run run-extended test leaderboard lock clean-results lint validate regress reference

install: $(STAMP)

# Exact pins from the lock of $(PYTHON)'s version (made by `make lock`), then the project without deps.
$(STAMP): $(LOCK) pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(VENV_IS_PYVER)
	$(BIN)/python -m pip install --quiet --upgrade "pip>=24"
	$(BIN)/python -m pip install --quiet -r $(LOCK)
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

# The extended plan: the default plan plus the offline datasets beyond human blood
# (workflow/config.extended.yaml); after `make run`, only the new datasets' jobs run.
run-extended: install
	$(UNLOCK_STALE)
	$(BIN)/snakemake --profile $(PROFILE) --cores $(CORES) --configfile workflow/config.extended.yaml
	@$(BIN)/cellarena summary results/scores.parquet

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

# Re-resolve the exact pins from pyproject.toml's ranges for $(PYTHON)'s version (needs pip-tools).
# A new version's lock starts from the 3.11 lock, so it keeps every pin that still resolves there.
# Each of the three: `make lock`, `make lock PYTHON=python3.12`, `make lock PYTHON=python3.13`.
lock:
	@test -n "$(PYVER)" || { echo "'$(PYTHON)' did not run: pass PYTHON=python3.1x" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(VENV_IS_PYVER)
	$(BIN)/python -m pip install --quiet pip-tools
	@test -f $(LOCK) || cp requirements-py3.11.lock $(LOCK)
	$(BIN)/pip-compile --quiet --extra test --strip-extras --no-emit-index-url --no-emit-find-links \
		-o $(LOCK) pyproject.toml

# An existing venv of another Python (say .venv made by 3.11, with VENV=.venv PYTHON=python3.12)
# would get the wrong lock: refuse.
VENV_IS_PYVER = $(BIN)/python -c 'import sys; v = "%d.%d" % sys.version_info[:2]; \
	sys.exit(None if v == "$(PYVER)" else f"$(VENV) holds Python {v}, not $(PYVER) ($(PYTHON)): remove it or pass VENV=<another folder>")'

# A Python with no lock (or none found): say so instead of make's "no rule to make target".
requirements-py%.lock:
	@echo "$(if $(PYVER),No lock for Python $(PYVER),'$(PYTHON)' did not run) (locks: $(wildcard requirements-py*.lock))." >&2
	@echo "Pass PYTHON=python3.11, python3.12 or python3.13 (a path, or PYENV_VERSION=3.12.1 under pyenv)." >&2
	@exit 1

# Every output under results/ (all of it is git-ignored) except the committed reference.
clean-results:
	find results -mindepth 1 -maxdepth 1 ! -name reference -exec rm -rf {} +
