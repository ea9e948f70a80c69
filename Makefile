# One venv per checkout; every target installs first if needed.
PY ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-stamp

.PHONY: install demo test test-all bench lint clean

$(STAMP): setup.py
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(BIN)/python experiments/demo.py --workdir runs/demo

test: install
	$(BIN)/python -m pytest -q -m "not slow" -n 2 --durations=15

test-all: install
	$(BIN)/python -m pytest -q

bench: install
	cd experiments && ../$(BIN)/python bench_step.py --out ../runs/bench_step.json
	$(BIN)/python experiments/bench_train.py --out runs/bench_train.json
	$(BIN)/python experiments/bench_regularizers.py --out runs/bench_regularizers.json
	$(BIN)/python experiments/bench_quantize.py --out runs/bench_quantize.json
	$(BIN)/python experiments/bench_stages.py --out runs/bench_stages.json

lint: install
	$(BIN)/ruff check qarjax configs experiments tests
	$(BIN)/ruff format --check qarjax configs experiments tests

clean:
	rm -rf runs .pytest_cache
