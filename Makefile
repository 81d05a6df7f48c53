# armature: `make ablation` and `make test` set up everything they need on a fresh machine.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
ARMS ?= arms/maskgit.yaml
BACKEND ?=
ARGS ?=
STAMP := $(VENV)/.installed

.PHONY: ablation test bench cost-report monitor tensorboard exporter reap cloud-sim system-deps venv clean

# torch is pinned to the CPU build on disk (an unpinned torch pulls GBs of CUDA packages);
# on a GPU machine install a CUDA build of the same version into .venv first.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[test]'
	touch $(STAMP)

venv: $(STAMP)

# Real Prometheus (dashboards and alert rules are tested against it) and OpenSSH (the Vast
# simulator's instances are real sshd processes). Installed only where missing.
system-deps:
	@missing=""; \
	command -v prometheus >/dev/null || missing="$$missing prometheus"; \
	command -v promtool >/dev/null || missing="$$missing prometheus"; \
	test -x /usr/sbin/sshd || missing="$$missing openssh-server"; \
	if [ -n "$$missing" ]; then \
	  echo "installing:$$missing"; \
	  SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq --no-install-recommends $$missing >/dev/null; \
	fi

# BACKEND=vast without VAST_API_KEY talks to the local simulator (`make cloud-sim` in another terminal).
SIM_URL := http://127.0.0.1:8765
ifeq ($(BACKEND),vast)
ifndef VAST_API_KEY
VAST_ENV := VAST_API_KEY=$$(cat runs/vastsim/api_key)
VAST_ARGS := --set vast.server_url=$(SIM_URL)
endif
endif

ablation: $(STAMP)
	@$(if $(VAST_ENV),echo "no VAST_API_KEY: using the Vast simulator at $(SIM_URL) (start it with make cloud-sim)")
	$(VAST_ENV) $(VENV)/bin/armature ablation $(ARMS) $(if $(BACKEND),--backend $(BACKEND)) $(VAST_ARGS) $(ARGS)

# Two pytest workers: most end-to-end tests spend their time waiting on process start-up (Ray, trainers,
# sshd, simulated instances). Three were tried: no faster on 2 cores (load 6-7) and timing tests flaked.
test: $(STAMP) system-deps
	$(PY) -m pytest -q -n 2 --durations=20

bench: $(STAMP) system-deps
	@for b in tests/bench/bench_*.py; do echo "== $$b"; $(PY) $$b || exit 1; done

cost-report: $(STAMP)
	$(VENV)/bin/armature cost $(ARGS)

exporter: $(STAMP)
	$(VENV)/bin/armature exporter $(ARGS)

reap: $(STAMP)
	$(VENV)/bin/armature reap $(ARGS)

# Prometheus and Grafana in docker; without the docker compose plugin, the local prometheus binary
# (`make system-deps` installs it) on infra/prometheus/prometheus.yml in the foreground, data in runs/prometheus
# (PROMETHEUS, PROMETHEUS_PORT and PROMETHEUS_DATA in the environment change the binary, port and folder).
monitor:
	@if docker compose version >/dev/null 2>&1; then \
		docker compose -f infra/docker-compose.yml up -d && \
		echo "Grafana: http://localhost:3000  (Prometheus: http://localhost:9090)"; \
	elif command -v "$${PROMETHEUS:-prometheus}" >/dev/null 2>&1; then \
		echo "docker compose plugin not found (install docker-compose-plugin for Grafana too): running the local" \
			"Prometheus on infra/prometheus/prometheus.yml at http://127.0.0.1:$${PROMETHEUS_PORT:-9090} (Ctrl-C stops)"; \
		data="$${PROMETHEUS_DATA:-runs/prometheus}"; mkdir -p "$$data" && \
		exec "$${PROMETHEUS:-prometheus}" --config.file=infra/prometheus/prometheus.yml \
			--storage.tsdb.path="$$data" --web.listen-address=127.0.0.1:$${PROMETHEUS_PORT:-9090}; \
	else \
		echo "docker compose plugin not found: install docker-compose-plugin, or run Prometheus with" \
			"infra/prometheus/prometheus.yml yourself" >&2; \
		exit 1; \
	fi

# Every curve of a run in TensorBoard (the driver writes them as metrics arrive): make tensorboard RUN=<run_id>
# (TB_PORT changes the port; ARMATURE_HOME the folder that holds the runs, default runs/).
TB_PORT ?= 6006
tensorboard: $(STAMP)
	@test -n "$(RUN)" || { echo "usage: make tensorboard RUN=<run_id> (ids: armature status)" >&2; exit 2; }
	@logdir="$${ARMATURE_HOME:-runs}/$(RUN)/tensorboard"; \
	test -d "$$logdir" || { echo "no TensorBoard logs at $$logdir: is $(RUN) a run id (armature status)?" >&2; exit 2; }; \
	exec $(VENV)/bin/tensorboard --logdir "$$logdir" --port $(TB_PORT)

cloud-sim: $(STAMP) system-deps
	$(PY) -m infra.vastsim --port 8765 --state-dir runs/vastsim

clean:
	rm -rf $(VENV) .pytest_cache
