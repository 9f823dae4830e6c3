# The README's two commands: `make demo` and `make test`. Both set themselves up.
PYTHON ?= python3.11
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo serve test test-fast worker lint format bench clean

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "need $(PYTHON) (Python 3.11) on PATH" >&2; exit 1; }
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev,demo]'
	@touch $(STAMP)

# The training demo: starts the embedded server itself (or uses --server / ESPER_URL),
# trains a too-small MLP static, 4x wider and grown, then trains Tamiyo's policy.
# Flags: make demo DEMO_ARGS='--epochs 30 --policy random'  (see --help)
demo: $(STAMP)
	$(BIN)/python -m examples.demo $(DEMO_ARGS)

# The embedded default as a long-running server on :8000 (admin, API, worker threads).
serve: $(STAMP)
	$(BIN)/python manage.py migrate --no-input
	@echo "admin login: user 'admin', password 'esper-admin' (embedded default only)"
	@echo "API token:   $$($(BIN)/python manage.py esper_token admin --create --superuser --password esper-admin)"
	$(BIN)/python manage.py serve 127.0.0.1:8000

test: $(STAMP)
	$(BIN)/python -m pytest $(PYTEST_ARGS)

test-fast: $(STAMP)
	$(BIN)/python -m pytest -m fast $(PYTEST_ARGS)

worker: $(STAMP)
	$(BIN)/celery -A esper_site worker -Q compile,train -l INFO

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

# Every benchmark on the embedded default (JSON and plots in benchmarks/results/); the
# MNIST-1D growth run (8 to 17 minutes here) is `benchmarks/growth.py --dataset mnist1d`.
bench: $(STAMP)
	$(BIN)/python benchmarks/compile.py
	$(BIN)/python benchmarks/overhead.py
	$(BIN)/python benchmarks/policy.py
	$(BIN)/python benchmarks/growth.py
	$(BIN)/python benchmarks/growth_timing.py

clean:
	rm -rf .esper .pytest_cache
