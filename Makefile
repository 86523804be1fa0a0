# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed

.PHONY: demo test browser-test install clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[cpu,test]'
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/featurepipe run data/demo

# Two processes, a test file each at a time (pytest-xdist, --dist loadfile keeps a file's shared fixtures
# in one process): on 2 cores the suite took 672 s against 949 s in one (the tests are mostly Python and
# graph building, one core each). TEST_WORKERS=0 runs it in one process.
TEST_WORKERS ?= 2

test: $(STAMP)
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# The report and serve's page checked in headless Chromium (tests/system/test_report_browser.py,
# test_serve_browser.py); `make test` skips them when Chromium is missing. Installing it needs root and
# apt (Debian/Ubuntu).
browser-test: $(STAMP)
	command -v chromium >/dev/null || (apt-get update -qq && apt-get install -y chromium)
	TF_CPP_MIN_LOG_LEVEL=2 $(BIN)/python -m pytest -q tests/system/test_report_browser.py tests/system/test_serve_browser.py

# The virtual environment and every entry of ./cache (featurepipe/core/cachedirs.py ENTRIES), run
# directories included. tests/test_makefile.py fails when an entry is added to cachedirs and not here.
clean:
	rm -rf $(VENV) cache/features cache/weights cache/hashes.sqlite cache/refs cache/evaluations cache/inspections cache/dedup cache/report-charts cache/runs
