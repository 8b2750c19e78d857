# The two commands of the README's quickstart; each sets up .venv first if it is missing.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cmkd-installed

.PHONY: demo test setup clean-runs

demo: $(STAMP)
	$(VENV)/bin/cmkd run gin/demo.gin --run-dir runs

# The linter first: it takes a second and names the file and line.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

setup: $(STAMP)

# Re-installs when the package metadata changes; the plugin is installed so tests can use it.
$(STAMP): pyproject.toml plugins/cmkd-crnn/pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,cloud,export,hf]' -e plugins/cmkd-crnn
	touch $(STAMP)

clean-runs:
	rm -rf runs
