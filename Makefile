# snowpipe: set-up, demo and tests. `make demo` and `make test` install what they need
# (Debian packages when run as root, a virtual environment in .venv, the CPU build of torch first).

VENV        ?= .venv
PY          := $(VENV)/bin/python
SNOWPIPE    := $(VENV)/bin/snowpipe
STAMP       := $(VENV)/.snowpipe-installed
TORCH_SPEC  ?= torch==2.13.0
DEMO        ?= demo
DEMO_ARGS   ?= --scenes 4 --size 480
PYTEST_ARGS ?=
RUN_ID      ?= demo-$(shell date +%Y%m%d-%H%M%S)
# The embedded local cluster (snowpipe cluster up) and the batch-script checks (shellcheck) need these too;
# gcc compiles the cloud detector's model (snowpipe build-detector; tests compile a small one).
SYSTEM_PACKAGES := python3 python3-venv python3-dev rsync openssh-client openssh-server e2fsprogs \
                   slurmctld slurmd slurm-client munge slurmdbd mariadb-server shellcheck git gcc

.PHONY: setup system-deps demo demo-local test lint bench clean

setup: $(STAMP)

system-deps:
	@if command -v dpkg >/dev/null 2>&1; then \
	  missing=""; for p in $(SYSTEM_PACKAGES); do dpkg -s $$p >/dev/null 2>&1 || missing="$$missing $$p"; done; \
	  if [ -n "$$missing" ]; then \
	    if [ "$$(id -u)" != 0 ]; then echo "missing Debian packages:$$missing (as root: apt-get install -y$$missing)"; exit 1; fi; \
	    echo "installing Debian packages:$$missing"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $$missing; \
	  fi; \
	fi

$(PY): | system-deps
	python3 -m venv $(VENV)

$(STAMP): pyproject.toml | $(PY)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet "$(TORCH_SPEC)"
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $@

# The README's main command: the demo on the embedded local SLURM cluster, through Ansible.
demo: setup
	$(SNOWPIPE) cluster up
	$(SNOWPIPE) demo-data $(DEMO) $(DEMO_ARGS) --force
	cd ansible && ../$(VENV)/bin/ansible-playbook submit.yml -e config=$(abspath $(DEMO))/pipeline-config.yml \
	  -e run_id=$(RUN_ID) -e wait=true
	@echo "== U-Net predictions of run $(RUN_ID) against the demo's truth:"
	$(PY) bench/annotation_quality.py $(DEMO) --predictions --results .cluster/remote/runs/$(RUN_ID)/results
	@echo "run record: runs/$(RUN_ID).json; run folder: .cluster/remote/runs/$(RUN_ID)/"
	@echo "  results/training/ (checkpoints, curves), results/predictions/ (masks, quicklooks),"
	@echo "  results/testing/ (metrics.json, metrics.csv, plots), logs/ (one file per job and array task)"

# The same pipeline without SLURM: every stage on this machine, outputs beside the demo data.
demo-local: setup
	$(SNOWPIPE) demo-data $(DEMO) $(DEMO_ARGS) --force
	$(SNOWPIPE) run $(DEMO)/pipeline-config.yml
	@echo "== automatic masks against the demo's truth:"
	$(PY) bench/annotation_quality.py $(DEMO)
	@echo "== U-Net predictions against the demo's truth:"
	$(PY) bench/annotation_quality.py $(DEMO) --predictions
	@echo "results: $(DEMO)/annotated_masks/, $(DEMO)/dataset/, $(DEMO)/results/"

lint: setup
	$(VENV)/bin/ruff check pipeline tests bench
	$(VENV)/bin/mypy
	$(VENV)/bin/lint-imports --no-cache
	cd ansible && ../$(VENV)/bin/ansible-lint --profile production --offline -q .

test: setup lint
	$(PY) -m pytest -q $(PYTEST_ARGS)

bench: setup
	$(PY) bench/annotate_scene.py

clean:
	rm -rf $(DEMO) build .pytest_cache .ruff_cache
