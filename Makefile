# Two commands do all the set-up: `make book` and `make test` (see README.md).
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false
export PYDEVD_DISABLE_FILE_VALIDATION := 1

.PHONY: venv book test lock train bench grade exercises browser-test clean

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
book: $(STAMP)
	$(BIN)/python -m attribution_course.exercises sync-book
	$(BIN)/jupyter-book build -W -n --keep-going book

test: book
	$(BIN)/python -m pytest

# Regenerate requirements.lock from the current venv (after changing pyproject.toml).
lock: $(STAMP)
	$(BIN)/pip freeze --exclude-editable | grep -v '^-e ' > requirements.lock

# Retrain the shipped model (a few minutes on 2 cores).
train: $(STAMP)
	$(BIN)/python -m attribution_course.train

# ---- graded exercises (issue 4)
# Regenerate exercises/ from solutions/ (and re-execute the solutions to refresh reference outputs).
exercises: $(STAMP)
	$(BIN)/python -m attribution_course.exercises generate

# Grade one notebook: make grade NB=exercises/03_exact_ablation.ipynb
grade: $(STAMP)
	$(BIN)/python -m attribution_course.grade $(NB)

# ---- performance (issue 5)
bench: $(STAMP)
	$(BIN)/python -m attribution_course.bench

# ---- the site in a real browser (issue 6)
browser-test: book
	@echo "browser-test: not built yet"; exit 1

clean:
	rm -rf book/_build
