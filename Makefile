# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both install what they need (QEMU via apt when missing, Python deps into .venv).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
QEMU   := qemu-system-x86_64
DEMO_SOCK ?= $(CURDIR)/qmpmux-demo.sock

.PHONY: setup qemu demo test lint bench bench-quick clean

$(BIN)/qmpmux: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "qmpmux needs Python 3.11+"'
	@$(PYTHON) -m venv $(VENV) || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

qemu:
	@command -v $(QEMU) >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-system-x86; }
	@command -v $(QEMU) >/dev/null || { echo "$(QEMU) is still missing" >&2; exit 1; }

setup: $(BIN)/qmpmux qemu

demo: setup
	@command -v socat >/dev/null || { apt-get update -qq && apt-get install -y -qq socat; } || true
	@echo "qmpmux is serving a fresh QEMU on $(DEMO_SOCK); in another terminal try:"
	@echo "  socat - UNIX-CONNECT:$(DEMO_SOCK)      then type {\"execute\":\"qmp_capabilities\"}"
	@echo "  $(BIN)/qmp-shell $(DEMO_SOCK)"
	@echo "Ctrl-C shuts QEMU down cleanly."
	$(BIN)/qmpmux --listen unix:$(DEMO_SOCK) --spawn -- $(QEMU) -machine none -nodefaults -display none

test: setup
	$(BIN)/python -m pytest -q
	$(MAKE) --no-print-directory lint

lint: $(BIN)/qmpmux
	$(BIN)/ruff check qmpmux tests bench
	$(BIN)/ruff format --check qmpmux tests bench
	$(BIN)/mypy

bench: setup
	$(BIN)/python -m bench

bench-quick: setup
	$(BIN)/python -m bench --quick

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
