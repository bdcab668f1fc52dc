# One front door for developer commands. `make run` and `make test` are the README's two.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: run test check docs bench fmt clean

# constraints.txt pins the versions the suite last passed with, so CI installs what was tested.
$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip "setuptools>=77"
	$(BIN)/pip install --quiet -c constraints.txt -e '.[dev]'
	touch $(STAMP)

## run: install into .venv and start edge on 127.0.0.1:8080 (embedded Redis, demo upstream
##      unless EDGE_REDIS_URL / EDGE_UPSTREAM_URL are set)
run: $(STAMP)
	$(BIN)/edge serve

## test: install, make sure the Debian packages the tests use exist, run the whole suite
test: $(STAMP)
	bash scripts/ensure-packages.sh
	$(BIN)/pytest $(PYTEST_ARGS)

## check: lint, format check, strict typing of the package, the docs build (a broken link or
##        a page left out of the navigation fails it)
check: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .
	$(BIN)/mypy
	site=$$(mktemp -d) && NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir "$$site"; \
	    status=$$?; rm -rf "$$site"; exit $$status

## docs: the reference in docs/ as a site, in site/ (open site/index.html)
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

## bench: edge vs the upstream called directly vs nginx proxy_pass, in one run; writes
##        benchmarks/results/<date>-<host>.{json,md,png}. ARGS=--quick for a 30 s pass,
##        ARGS=--with-litellm to add LiteLLM's proxy (installed in its own venv)
bench: $(STAMP)
	$(BIN)/python -m benchmarks.bench $(ARGS)

fmt: $(STAMP)
	$(BIN)/ruff format .
	$(BIN)/ruff check --fix .

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache *.egg-info site
