VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,envs]'
	touch $(STAMP)

# The tests run on host CPU devices; libtpu (the '.[tpu]' compiler, in the test extra) is only
# used by `steppo plan`'s ahead-of-time compiles, which need no TPU backend.
test: $(STAMP)
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 -q tests

demo: $(STAMP)
	$(VENV)/bin/steppo demo

bench: $(STAMP)
	PYTHONPATH=. $(PY) benchmarks/credit.py

clean:
	rm -rf $(VENV) runs
