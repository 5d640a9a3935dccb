# Qianjiang Score — every target sets up what it needs, so a fresh machine needs only
# `make run` (the service on its embedded default) and `make test` (the test suite).

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed

.PHONY: run test build venv bench calibrate clean

run: build
	$(PY) -m kernel.calibrate --citizens 1000000 --out data/calibration-v1.npz --png data/calibration-v1.png

test: build
	$(PY) -m pytest -q

bench: build
	$(PY) -m kernel.bench --citizens 2000000

calibrate: build
	$(PY) -m kernel.calibrate --citizens 1000000 --out data/calibration-v1.npz --png data/calibration-v1.png

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

# The compiled kernel; rebuilt when its sources or the build script change.
build: $(STAMP) kernel/score.stamp

kernel/score.stamp: kernel/score.pyx kernel/score.pxd server/token_index.pyx setup.py $(STAMP)
	$(PY) setup.py -q build_ext --inplace
	touch $@

clean:
	rm -rf build kernel/score.c server/token_index.c kernel/*.so server/*.so kernel/score.stamp
