# The two commands of the README: `make run` (the whole system) and `make test`.
# Both create .venv with everything on first use.

VENV ?= .venv
PYTHON ?= python3
DEMO_VMS ?= 3
PORT ?= 8888
# Where the embedded PostgreSQL keeps its data (empty: the default, see the README).
DATA_DIR ?=
ARGS ?=
# Jupyter refuses to run as root unless told; the demo is meant to run anywhere.
ALLOW_ROOT := $(shell [ "$$(id -u)" = 0 ] && echo --allow-root)

# Where the JupyterHub test finds Node's configurable-http-proxy when it is not on PATH.
PROXY := .cache/node/node_modules/.bin/configurable-http-proxy

.PHONY: run test install proxy

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e '.[test,bench]'
	touch $@

install: $(VENV)/.installed

# Only if missing; without npm the JupyterHub test skips and says why.
proxy:
	@command -v configurable-http-proxy >/dev/null || [ -x $(PROXY) ] || \
	  if command -v npm >/dev/null; then \
	    npm install --no-save --no-audit --no-fund --loglevel=error --prefix .cache/node configurable-http-proxy@5; \
	  else echo "npm is missing: the JupyterHub test will be skipped"; fi

run: $(VENV)/.installed
	$(VENV)/bin/jupyter lablink --demo-vms=$(DEMO_VMS) --port=$(PORT) --no-browser $(ALLOW_ROOT) \
		$(if $(DATA_DIR),--LabLink.embedded_data_dir=$(DATA_DIR)) $(ARGS)

test: $(VENV)/.installed proxy
	$(VENV)/bin/python -m pytest $(PYTEST_ARGS)
