# Two entry points for a fresh machine:
#   make demo   set up .venv and run the main job on the embedded default data
#   make test   set up .venv and run the test suite
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: venv demo test clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	@# CPU machines: the pinned CPU build of torch first, from PyTorch's CPU wheel index, so that
	@# nothing pulls the multi-GB CUDA build that PyPI serves for Linux; where that index cannot be
	@# reached (an internal mirror, a local wheel), the plain pin.
	@if command -v nvidia-smi >/dev/null 2>&1; then \
		$(PY) -m pip install -q 'torch>=2.6,<2.15'; \
	else \
		$(PY) -m pip install -q --timeout 15 --retries 1 --index-url $(TORCH_CPU_INDEX) torch==2.13.0 \
			|| $(PY) -m pip install -q torch==2.13.0; \
	fi
	$(PY) -m pip install -q -e '.[dev]'
	@touch $(STAMP)

demo: venv
	$(PY) -m jobs.pipeline

test: venv
	$(PY) -m pytest -q tests

clean:
	rm -rf $(VENV)
