# kvmfleet: `make demo` shows it work on this machine, `make test` runs the whole suite.
# Both install what they need; run them as root on a Debian machine with /dev/kvm.

SHELL := /bin/bash
PYTHON ?= /usr/bin/python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
PYTEST_ARGS ?=

.PHONY: install deps lint typecheck test unit demo demo-stop bench bench-libvirt bench-deploy bench-demo ansible-lint \
	molecule clean

# Debian packages the suite needs (servers, collectd, debootstrap, venv support)
deps:
	./scripts/install-deps

# --system-site-packages: the libvirt source needs Debian's python3-libvirt (the role makes the hosts' venv the same
# way); --ignore-installed keeps every other package the venv's own, whatever the system has in dist-packages.
$(STAMP): setup.cfg pyproject.toml requirements-ansible.txt
	$(PYTHON) -m venv --system-site-packages $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet --ignore-installed -e '.[test]' -r requirements-ansible.txt
	touch $(STAMP)

install: $(STAMP)

lint: install
	$(BIN)/ruff check plugins tests bench scripts/demo scripts/generate

# also run by `make test` (tests/ansible/test_lint.py); here for a quick look
ansible-lint: install
	PATH=$(BIN):$$PATH $(BIN)/yamllint -s roles playbooks inventories molecule
	PATH=$(BIN):$$PATH $(BIN)/ansible-lint

# the simulated fleet: create, converge, idempotence, verify, destroy (also run by `make test`)
molecule: deps install
	PATH=$(BIN):$$PATH $(BIN)/molecule test

typecheck: install
	$(BIN)/mypy

unit: install
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

test: deps install lint typecheck
	$(BIN)/pytest -q $(PYTEST_ARGS)

# `make demo STOP=1` is `make demo-stop`
demo: $(if $(STOP),,deps install)
	./scripts/demo $(if $(STOP),--stop)

demo-stop:
	./scripts/demo --stop

bench: deps install
	$(BIN)/python bench/read_cost.py
	$(BIN)/python bench/ship_cost.py

# 50 real libvirt domains (about 4 minutes to boot their SeaBIOS on a shadow-paging KVM)
bench-libvirt: deps install
	$(BIN)/python bench/read_cost.py --vms 50 --vcpus 2 --libvirt 50

bench-deploy: deps install
	bench/deploy_time.sh

bench-demo: deps install
	bench/demo_time.sh

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache
