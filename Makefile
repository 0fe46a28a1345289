# Local virtualenv workflow. `make demo` and `make test` work on a fresh clone.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: install demo test clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test,faiss]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gradosr fit --protocol mnist-sample --split 0 --out runs/demo
	$(VENV)/bin/gradosr evaluate runs/demo

test: $(STAMP)
	$(PY) -m pytest tests

clean:
	rm -rf $(VENV) runs .pytest_cache
