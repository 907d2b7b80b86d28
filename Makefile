VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: test demo bench clean

# `make demo` installs the library alone; `make test` adds the test and environment extras
# (torch as a reference, libtpu for `steppo plan`, TextWorld/TextArena).
$(VENV)/.installed-base: pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: $(VENV)/.installed-base
	$(PY) -m pip install -q -e '.[test,envs]'
	touch $@

# The tests run on host CPU devices; libtpu (the '.[tpu]' compiler, in the test extra) is only
# used by `steppo plan`'s ahead-of-time compiles, which need no TPU backend.
test: $(VENV)/.installed-test
	JAX_PLATFORMS=cpu $(PY) -m pytest -n 2 -q tests

demo: $(VENV)/.installed-base
	$(VENV)/bin/steppo demo

bench: $(VENV)/.installed-test
	PYTHONPATH=. $(PY) benchmarks/credit.py

clean:
	rm -rf $(VENV) runs
