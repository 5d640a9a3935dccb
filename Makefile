# Qianjiang Score — every target sets up what it needs, so a fresh machine needs only
# `make run` (the service on its embedded default) and `make test` (the test suite).

PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
STAMP   = $(VENV)/.installed
LOADTEST_STAMP = $(VENV)/.loadtest-installed

.PHONY: run test build venv bench calibrate loadbench loadtest-deps clean

# The service on its embedded default: SQLite under data/, seeded once with a synthetic city
# of 100,000 people (development: qjscore serve alone never seeds); later starts reuse the
# data. Pass options with ARGS="--workers 2".
SEED_CITIZENS ?= 100000

run: build
	$(VENV)/bin/qjscore serve --seed-citizens $(SEED_CITIZENS) $(ARGS)

test: build $(LOADTEST_STAMP)
	$(PY) -m pytest -q

bench: build
	$(PY) -m kernel.bench --citizens 2000000

loadbench: build
	$(PY) -m loadtest.bench

# Locust and its gevent stack: for load tests, and for the suite's Locust test.
loadtest-deps: $(LOADTEST_STAMP)

$(LOADTEST_STAMP): requirements-loadtest.txt $(STAMP)
	$(PY) -m pip install -q -r requirements-loadtest.txt
	touch $@

calibrate: build
	$(PY) -m kernel.calibrate --citizens 1000000 --out data/calibration-report.npz --png data/calibration-report.png

venv: $(STAMP)

$(STAMP): requirements.txt requirements-dev.txt requirements-pg.txt
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements-dev.txt
	touch $(STAMP)

# The compiled kernel; rebuilt when its sources or the build script change.
build: $(STAMP) kernel/score.stamp $(VENV)/bin/qjscore

# The qjscore command: a launcher and a .pth naming this checkout (what an editable install
# gives, without building the extensions a second time or its warning box).
$(VENV)/bin/qjscore: scripts/install_command.py $(STAMP)
	$(PY) scripts/install_command.py

kernel/score.stamp: kernel/score.pyx kernel/score.pxd server/token_index.pyx server/bulk_read.pyx clients/fuse.pyx setup.py $(STAMP) | sqlite-header
	$(PY) setup.py -q build_ext --inplace
	touch $@

# server/bulk_read.pyx includes sqlite3.h (it links the system libsqlite3, the one Python's
# sqlite3 module uses). A fresh Debian machine may lack the header: libsqlite3-dev is then
# installed with apt-get (as root), as scripts/pg_test_server.sh installs PostgreSQL.
.PHONY: sqlite-header
sqlite-header:
	@if ! echo '#include <sqlite3.h>' | $(CC) -E -x c - >/dev/null 2>&1; then \
		if [ "$$(id -u)" -ne 0 ] || ! command -v apt-get >/dev/null 2>&1; then \
			echo "sqlite3.h not found: install SQLite's development files (Debian: apt-get install libsqlite3-dev)" >&2; exit 1; \
		fi; \
		echo "installing libsqlite3-dev with apt-get (sqlite3.h is missing)" >&2; \
		apt="env DEBIAN_FRONTEND=noninteractive apt-get install -y -q --no-install-recommends libsqlite3-dev"; \
		$$apt >&2 </dev/null || { apt-get update -q >&2 </dev/null && $$apt >&2 </dev/null; }; \
	fi

clean:
	rm -rf build kernel/score.c server/token_index.c server/bulk_read.c clients/fuse.c kernel/*.so server/*.so clients/*.so kernel/score.stamp
