# The two commands on a fresh machine:  `make demo`  (the end-to-end demo)  and  `make test`  (the test suite).
# Both create .venv and install what they need; nothing has to be installed by hand first.

PYTHON ?= python3.11
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(VENV)/bin/pip
STAMP  := $(VENV)/.installed-$(shell cat pyproject.toml constraints.txt | sha1sum | cut -c1-12)

.PHONY: venv demo test test-all bench lint clean

venv: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch is pinned through constraints.txt (the CPU build); the agent itself never depends on it.
	$(PIP) install -q -c constraints.txt -e '.[server,test,dev,bench]' 'torch==2.13.0'
	rm -f $(VENV)/.installed-* && touch $@

demo: venv
	$(PY) -m demo

test: venv
	$(PY) -m pytest -q -m "not soak" -p no:cacheprovider

test-all: venv
	$(PY) -m pytest -q -p no:cacheprovider

bench: venv
	$(PY) -m bench

lint: venv
	$(VENV)/bin/ruff check agent server common tests bench demo
	$(VENV)/bin/mypy agent common

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache build *.egg-info
