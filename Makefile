# Two commands on a fresh machine:  `make demo`  and  `make test`.
# Both install what they need (QEMU via apt when missing, Python deps into .venv).

PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
QEMU   := qemu-system-x86_64
DEMO_SOCK ?= $(CURDIR)/qmpmux-demo.sock

PREFIX ?= /opt/qmpmux
UNITDIR ?= /etc/systemd/system

.PHONY: setup qemu demo test lint bench bench-quick clean install

$(BIN)/qmpmux: pyproject.toml
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "qmpmux needs Python 3.11+"'
	@$(PYTHON) -m venv $(VENV) || { apt-get update -qq && apt-get install -y -qq python3-venv && $(PYTHON) -m venv $(VENV); }
	$(BIN)/pip install -q -e '.[dev]'
	@touch $@

qemu:
	@command -v $(QEMU) >/dev/null || { apt-get update -qq && apt-get install -y -qq qemu-system-x86; }
	@command -v $(QEMU) >/dev/null || { echo "$(QEMU) is still missing" >&2; exit 1; }
	@# The curl block driver (a module) serves the test of credentials in block filenames.
	@! command -v dpkg >/dev/null || dpkg -s qemu-block-extra >/dev/null 2>&1 || { apt-get update -qq && apt-get install -y -qq qemu-block-extra; } || true

setup: $(BIN)/qmpmux qemu

demo: setup
	@command -v socat >/dev/null || { apt-get update -qq && apt-get install -y -qq socat; } || true
	@echo "qmpmux is serving a fresh QEMU on $(DEMO_SOCK); in another terminal try:"
	@echo "  socat - UNIX-CONNECT:$(DEMO_SOCK)      then type {\"execute\":\"qmp_capabilities\"}"
	@echo "  $(BIN)/qmp-shell $(DEMO_SOCK)"
	@echo "Ctrl-C shuts QEMU down cleanly."
	$(BIN)/qmpmux --listen unix:$(DEMO_SOCK) --shutdown-timeout 0 --spawn -- $(QEMU) -machine none -nodefaults -display none

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

# A non-editable install into its own venv (no file of it refers back to this tree), the
# config reference and README beside it, and the units pointed at $(PREFIX).
install:
	@$(PYTHON) -c 'import sys; assert sys.version_info >= (3, 11), "qmpmux needs Python 3.11+"'
	$(PYTHON) -m venv $(PREFIX)
	$(PREFIX)/bin/pip install -q .
	install -d $(PREFIX)/share/qmpmux $(UNITDIR)
	install -m 0644 systemd/qmpmux.toml.example systemd/qmpmux-host.toml.example README.md $(PREFIX)/share/qmpmux/
	for unit in systemd/qmpmux@.service systemd/qmpmux@.socket systemd/qmpmux-readonly@.socket systemd/qmpmux.service; do \
		sed 's|/opt/qmpmux|$(PREFIX)|g' $$unit > $(UNITDIR)/$$(basename $$unit); \
		chmod 0644 $(UNITDIR)/$$(basename $$unit); \
	done
	@echo "installed $(PREFIX)/bin/qmpmux and units in $(UNITDIR); now: systemctl daemon-reload"

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache *.egg-info
