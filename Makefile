# Two entry points: `make test` and `make demo`. Both create .venv when missing and install
# what they need. The CPU torch pin goes in first so nothing can pull a CUDA build; a python3
# that already has torch (a GPU machine) is reused through --system-site-packages instead.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: test demo bench info lint setup clean

$(VENV)/.installed-%: pyproject.toml
	@if [ ! -x $(PY) ]; then \
	  if $(PYTHON) -c "import torch" 2>/dev/null; then \
	    echo "reusing the torch of $(PYTHON) (not replacing it)"; \
	    $(PYTHON) -m venv --system-site-packages $(VENV); \
	  else \
	    $(PYTHON) -m venv $(VENV); \
	  fi; \
	fi
	@$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install $(TORCH_PIN)
	$(PY) -m pip install -e '.[$*]'
	@touch $@

setup: $(VENV)/.installed-test

test: $(VENV)/.installed-test
	$(PY) -m pytest $(PYTEST_ARGS)

demo: $(VENV)/.installed-demo
	$(PY) -m fastpbn demo

bench: $(VENV)/.installed-bench
	$(PY) -m fastpbn bench --quick

info: $(VENV)/.installed-test
	$(PY) -m fastpbn info

lint: $(VENV)/.installed-dev
	$(PY) -m ruff check fastpbn kernels csrc tests bench

clean:
	rm -rf $(VENV) build *.egg-info
