# The two set-up commands of the README: `make demo` and `make test`. Both create the virtual
# environment on first use (CPU torch pinned: an unpinned torch pulls gigabytes of CUDA packages).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e '.[test]'
	touch $@

# The light client's environment (swarm-llm[lite]: py-libp2p and trio, no hivemind, which cannot share
# its process); tests/test_lite_transport.py runs its client there
LITE_VENV ?= .venv-lite
$(LITE_VENV)/.installed: pyproject.toml
	python3 -m venv $(LITE_VENV)
	$(LITE_VENV)/bin/python -m pip install -q --upgrade pip
	$(LITE_VENV)/bin/python -m pip install -q $(TORCH)
	$(LITE_VENV)/bin/python -m pip install -q -e '.[lite]'
	touch $@

.PHONY: demo test venv lite-venv browser
venv: $(VENV)/.installed
lite-venv: $(LITE_VENV)/.installed

demo: $(VENV)/.installed
	$(VENV)/bin/swarm demo

test: $(VENV)/.installed $(LITE_VENV)/.installed browser
	$(PY) -m pytest

# Debian's chromium and its driver, for the health page's headless browser test
browser:
	@command -v chromedriver >/dev/null || (apt-get update -qq && apt-get install -y -qq chromium chromium-driver >/dev/null)
