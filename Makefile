# The two commands of the README:
#   make lab    bring up the lab and run site.yml against it
#   make test   the whole test suite (what .ci/run calls)
SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c
VENV := $(CURDIR)/.venv
export PATH := $(VENV)/bin:$(PATH)
export ANSIBLE_FORCE_COLOR ?= false
export PY_COLORS ?= 0

.PHONY: bootstrap lab lab-up lab-status lab-summary lab-down site test checks unit lint sanity molecule collection clean

bootstrap:
	scripts/bootstrap.sh

## Lab -------------------------------------------------------------------------
lab: bootstrap lab-up site lab-summary

lab-up:
	python lab/labctl.py up

site:
	ansible-playbook site.yml -i inventories/lab

lab-status:
	python lab/labctl.py status

# What the lab is and what it serves: hosts, then the plan from the facts site.yml gathered.
lab-summary: lab-status
	aphrodite-deploy plan -i inventories/lab

lab-down:
	python lab/labctl.py down --all

## Tests -----------------------------------------------------------------------
# The static checks run beside the Molecule lanes: a scenario spends most of its time
# waiting on its hosts, so on 2 cores this saves their whole duration (about 6 minutes).
test: bootstrap
	$(MAKE) --no-print-directory -j2 checks molecule

# unit, lint and sanity one after another, their output printed whole when they end.
checks:
	@mkdir -p tests/output
	@if { $(MAKE) --no-print-directory unit && $(MAKE) --no-print-directory lint \
	     && $(MAKE) --no-print-directory sanity; } > tests/output/checks.log 2>&1; then \
	  cat tests/output/checks.log; echo "checks: unit, lint and sanity passed"; \
	else \
	  cat tests/output/checks.log; echo "checks: FAILED (log above, tests/output/checks.log)"; exit 1; \
	fi

unit:
	pytest -q -p no:cacheprovider tests/unit tests/integration

lint:
	yamllint --strict .
	ansible-lint --profile production
	shellcheck scripts/*.sh .ci/run

sanity:
	scripts/sanity.sh

# Two scenarios at a time, each on its own lab network (scripts/molecule_lanes.py).
molecule:
	python scripts/molecule_lanes.py

collection:
	ansible-galaxy collection build --force --output-path dist .

clean: lab-down
	rm -rf dist tests/output
