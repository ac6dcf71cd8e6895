# `make demo` and `make test` each set up a fresh machine: a .venv with torch 2.13.0 (the CPU
# build is installed first so pip never resolves a multi-GB CUDA build) and this package.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.trainplan-installed

.PHONY: demo test install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --disable-pip-version-check torch==2.13.0
	$(PY) -m pip install -q --disable-pip-version-check -e '.[dev,hf]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/trainplan inspect plans/gpt3-175b-a100.yaml
	$(VENV)/bin/trainplan plan plans/gpt3-175b-a100.yaml -o out/gpt3-175b-a100
	$(VENV)/bin/trainplan run plans/laptop-gpt-tiny.yaml --nproc 4 --steps 5

test: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider --durations=15

bench: $(STAMP)
	$(PY) bench/trace_speed.py
	$(PY) bench/plan_speed.py
	$(PY) bench/validate_zero.py
	$(PY) bench/validate_megatron.py

clean:
	rm -rf $(VENV) build *.egg-info
