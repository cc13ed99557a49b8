# petseg: `make run` runs the workflow on the embedded data; `make test` runs the test suite.
# Both set up .venv first (Python 3.12 from PATH or pyenv, packages from requirements.lock).

VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# The first Python 3.12 that actually runs: on PATH (pyenv shims may point nowhere), then pyenv's versions.
PYTHON312 ?= $(shell for p in python3.12 $$(command -v pyenv >/dev/null 2>&1 && ls -d "$$(pyenv root)"/versions/3.12*/bin/python3.12 2>/dev/null | sort -rV); do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' >/dev/null 2>&1 && { command -v "$$p"; break; }; done)
# Metaflow records who ran a flow and refuses "root": fall back to "petseg" there.
export USERNAME := $(or $(filter-out root,$(USERNAME)),$(filter-out root,$(shell id -un)),petseg)
# Parallel flow tasks: each training task uses 2 threads (the flow's --threads), so cores / 2.
WORKERS ?= $(shell n=$$(( $$(nproc) / 2 )); echo $$(( n > 0 ? n : 1 )))
IMAGE ?= petseg:latest
VARIANT ?= cpu

.PHONY: install run test test-fast cluster-build image clean

install: $(STAMP)

$(STAMP): requirements.lock requirements-dev.lock setup.py
	@if [ -z "$(PYTHON312)" ]; then \
		echo "error: Python 3.12 not found (seldon-core 1.19 needs it)." >&2; \
		echo "Install python3.12 (e.g. 'pyenv install 3.12.1' or your OS package) or set PYTHON312=/path/to/python3.12." >&2; \
		exit 1; fi
	$(PYTHON312) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.lock
	$(PY) -m pip install --quiet --no-deps --no-build-isolation -e .
	$(PY) -m pip check
	touch $(STAMP)

run: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) flows/seg_flow.py run --max-workers $(WORKERS) $(ARGS)

# The test cluster's binaries (kube-apiserver ... kubelet) and the project's image, cached in /var/cache/petseg-k8s.
cluster-build: install
	tests/support/cluster/build.sh
	PYTHON=$(CURDIR)/$(PY) tests/support/cluster/image.sh >/dev/null

# Every tier, fastest first (pytest.ini's testpaths): unit, serving, flow, cluster.
test: install cluster-build
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest

# The unit tier only: the library, in a few minutes.
test-fast: install
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest tests/unit

# Docker where an engine answers, else podman, else buildah: the same Dockerfile.
image:
	@if docker info >/dev/null 2>&1; then builder="docker build"; \
	elif command -v podman >/dev/null 2>&1; then builder="podman build"; \
	elif command -v buildah >/dev/null 2>&1; then builder="buildah bud"; \
	else echo "error: no image builder: install Docker, podman or buildah" >&2; exit 1; fi; \
	echo "$$builder --build-arg VARIANT=$(VARIANT) -t $(IMAGE) ."; \
	$$builder --build-arg VARIANT=$(VARIANT) -t $(IMAGE) .

clean:
	rm -rf $(VENV) .metaflow build *.egg-info
