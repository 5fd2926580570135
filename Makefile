# Two commands do all the set-up: `make book` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: venv book book-if-stale test lock train train-variant search-log bench grade grade-scale exercises lab browser-test clean

venv: $(STAMP)

# The lock pins every package; torch==2.13.0+cpu comes from the wheel on local disk.
$(STAMP): requirements.lock pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; install Python 3.11 or run make PYTHON=/path/to/python3.11"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade "pip>=24"
	$(BIN)/pip install --quiet -r requirements.lock
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/python -m ipykernel install --sys-prefix --name python3 --display-name "Python 3" >/dev/null
	touch $(STAMP)

# Builds the HTML book into book/_build/html, executing every chapter (strict: warnings fail).
# --all: rebuild every page, so no chapter keeps outputs from an older model or package.
# tools/book_inputs.py records what the build read, so that `make test` can tell whether it is stale.
book: $(STAMP)
	bash .ci/install-site-assets
	$(BIN)/python -m attribution_course.exercises sync-book
	$(BIN)/python tools/book_inputs.py write-pending
	$(BIN)/jupyter-book build --all -W -n --keep-going book
	$(BIN)/python tools/book_inputs.py commit

# The book as `make book` builds it: rebuilt unless the last `make book` built it from these very files.
book-if-stale: $(STAMP)
	bash .ci/install-site-assets
	@$(BIN)/python tools/book_inputs.py check || $(MAKE) --no-print-directory book

# Two pytest workers (pytest-xdist), one test file each at a time, so that a file's shared batch is
# graded once; PYTEST_WORKERS=0 runs the suite in one process.
PYTEST_WORKERS ?= 2
test: book-if-stale
	bash .ci/install-actionlint
	$(BIN)/python -m pytest -n $(PYTEST_WORKERS) --dist loadfile

# Regenerate requirements.lock from the current venv (after changing pyproject.toml).
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock

# Retrain the shipped model (SHIPPED_RECIPE; about 10 minutes on one thread, bit-identical weights).
train: $(STAMP)
	$(BIN)/python -m attribution_course.train

# Retrain chapter 6's hedging variant (the first model's run plus a hedging phase; about 11 minutes).
train-variant: $(STAMP)
	$(BIN)/python -m attribution_course.train --variant hedging

# The log of the recipes tried in search of a negative name mover (from each run's training_info.json).
search-log: $(STAMP)
	$(BIN)/python -m attribution_course.search_log docs/negative_head_search/*.json --out docs/negative_head_search.md

# ---- graded exercises (issue 4)
# Re-execute solutions/ (refreshing their stored outputs), regenerate exercises/ from them, verify.
exercises: $(STAMP)
	$(BIN)/python -m attribution_course.exercises generate
	$(BIN)/python -m attribution_course.exercises check

# Open the exercises in JupyterLab (from the lock, like everything else), in exercises/.
# LAB_ARGS passes options, e.g. make lab LAB_ARGS="--no-browser --port 8899".
lab: $(STAMP)
	$(BIN)/jupyter lab --notebook-dir=exercises $(LAB_ARGS)

# Grade one notebook (a copy is graded, in a bubblewrap sandbox; the file is never modified):
#   make grade NB=exercises/03_exact_ablation.ipynb
# or a folder of submissions:  make grade BATCH=submissions/ [CSV=grades.csv]
grade: $(STAMP)
	bash .ci/install-bubblewrap
	@test -n "$(NB)$(BATCH)" || { echo "usage: make grade NB=path/to/notebook.ipynb  or  make grade BATCH=folder [CSV=grades.csv]"; exit 2; }
	$(BIN)/python -m attribution_course.grade $(if $(BATCH),--batch "$(BATCH)" --csv "$(or $(CSV),grades.csv)","$(NB)")

# Grading at scale: LEARNERS learners x 7 generated notebooks (correct, partial, wrong, cheats, untouched),
# graded as one batch; writes scale-output/scale.md and scale.json (times, throughput, load average,
# the extrapolation to 200 x 7).
LEARNERS ?= 5
grade-scale: $(STAMP)
	bash .ci/install-bubblewrap
	$(BIN)/python -m attribution_course.grading.scale --learners $(LEARNERS) --out scale-output

# ---- performance (issue 5)
# Benchmark (every method 5 times after a warm-up, 8-256 prompts: expect well over ten minutes):
# writes bench-output/bench.json and bench.md and prints the table.
# One torch thread by default: timings on a shared 2-core machine are steadier than with two
# competing threads (the table records the thread count). Override with BENCH_THREADS=2.
# To refresh the committed copy: make bench BENCH_ARGS="--markdown docs/performance.md --json docs/performance.json"
BENCH_THREADS ?= 1
bench: $(STAMP)
	$(BIN)/python -m attribution_course.bench --threads $(BENCH_THREADS) $(BENCH_ARGS)

# ---- the site in a real browser (issue 6)
# Installs Debian's chromium + chromium-driver (apt-get; sudo when not root) and the Python driver if
# missing, then runs only the browser tests (tests/browser); screenshots go to test-output/browser/.
browser-test: book-if-stale
	bash .ci/install-chromium
	@$(BIN)/python -c "import playwright.sync_api, PIL" 2>/dev/null || \
	  $(BIN)/pip install --quiet $$(grep -iE '^(playwright|greenlet|pillow)==' requirements.lock)
	REQUIRE_BROWSER_TESTS=1 $(BIN)/python -m pytest -m browser tests/browser

clean:
	rm -rf book/_build
