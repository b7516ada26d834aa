# Argosy: `make demo` runs the whole thing on the local sandbox; `make test` runs the tests.
SHELL := /bin/bash
PY := .venv/bin/python
VENV_INPUTS := images/constraints.txt operator/pyproject.toml gateway/pyproject.toml tests/testkit/pyproject.toml .ci/requirements-dev.in

.PHONY: help venv sandbox-build sandbox-up sandbox-down sandbox-status manifests manifests-check lint test test-apiserver-restart test-unit test-e2e \
        bench-gateway bench-routing bench-operator fuzz-gateway demo clean

help: ## list the targets
	@grep -E '^[a-z0-9-]+:.*## ' $(MAKEFILE_LIST) | sed 's/:.*## /\t/' | column -t -s "$$(printf '\t')"

venv: .venv/.installed ## create .venv with the locked dependencies

.venv/.installed: $(VENV_INPUTS)
	@echo "==> installing Python dependencies into .venv (locked: images/constraints.txt)"
	@test -x $(PY) || python3 -m venv .venv
	@$(PY) -m pip --version >/dev/null 2>&1 || $(PY) -m ensurepip >/dev/null
	@$(PY) -m pip install -q --disable-pip-version-check uv
	@$(PY) -m uv pip install -q --python $(PY) -c images/constraints.txt \
		-e operator -e gateway -e tests/testkit -r .ci/requirements-dev.in
	@touch $@

sandbox-build: venv ## build etcd, Kubernetes, kwok, helm; install the vLLM CPU runtime (~6 GB); make the stand-in model
	@$(PY) -m argosy_sandbox build

sandbox-up: venv ## start the local Kubernetes sandbox (idempotent)
	@$(PY) -m argosy_sandbox up

sandbox-down: ## stop every sandbox process
	@if [ -x $(PY) ]; then $(PY) -m argosy_sandbox down; fi

sandbox-status: venv ## show the sandbox's components and nodes
	@$(PY) -m argosy_sandbox status

manifests: sandbox-build ## regenerate the CRD, the chart's CRD template, the install manifest and the API reference
	@$(PY) -m argosy_operator.crd
	@$(PY) manifests/install/render.py
	@$(PY) -m argosy_operator.docgen

manifests-check: sandbox-build ## fail when a generated file is stale
	@$(PY) -m argosy_operator.crd --check
	@$(PY) manifests/install/render.py --check
	@$(PY) -m argosy_operator.docgen --check

STRICT_MODULES := operator/argosy_operator/planner operator/argosy_operator/builders.py \
	operator/argosy_operator/group_builders.py operator/argosy_operator/groups.py operator/argosy_operator/programs \
	operator/argosy_operator/diffplan.py operator/argosy_operator/status.py operator/argosy_operator/observe.py \
	operator/argosy_operator/workqueue.py operator/argosy_operator/docgen.py operator/argosy_operator/sticky.py \
	operator/argosy_operator/lease.py operator/argosy_operator/backendkey.py \
	gateway/argosy_gateway/policies.py gateway/argosy_gateway/podload.py gateway/argosy_gateway/routetable.py gateway/argosy_gateway/parsing.py \
	gateway/argosy_gateway/responsestore.py gateway/argosy_gateway/ratelimit.py gateway/argosy_gateway/discovery/cluster.py \
	tests/testkit/argosy_sandbox/kubelet_plan.py operator/argosy_operator/autoscaler.py

lint: venv ## ruff everywhere, mypy --strict on the pure modules
	@$(PY) -m ruff check operator gateway tests
	@$(PY) -m mypy --strict $(STRICT_MODULES)

test-unit: venv ## unit tests only (no sandbox)
	@$(PY) -m pytest -q tests/unit

test-e2e: sandbox-build ## end-to-end tests against the sandbox
	@$(PY) -m pytest -q -m e2e tests

test: sandbox-build ## every test: unit and end-to-end (starts or reuses the sandbox)
	@$(PY) -m pytest -q --durations=25 tests

test-apiserver-restart: sandbox-build ## only the case that restarts a second sandbox's kube-apiserver mid-rollout (make test runs it too)
	@$(PY) -m pytest -q -m apiserver_restart tests

# The peer in bench-gateway and bench-routing (a Rust binary on PyPI), pinned so runs compare.
VLLM_ROUTER_VERSION := 0.1.17

.PHONY: bench-peers
bench-peers: venv
	@test -x .venv/bin/vllm-router || $(PY) -m uv pip install -q --python $(PY) -c images/constraints.txt \
		vllm-router==$(VLLM_ROUTER_VERSION) || echo "vllm-router not installed: its rows are skipped"

bench-gateway: bench-peers ## gateway vs direct, nginx and vllm-router, side by side (docs/benchmarks.md); BENCH_ARGS=--quick
	@command -v wrk >/dev/null || { apt-get update -qq && apt-get install -y -qq wrk; }
	@command -v nginx >/dev/null || apt-get install -y -qq nginx-light || echo "nginx not installed: its rows are skipped"
	@$(PY) tests/bench/bench_gateway.py $(BENCH_ARGS)

FUZZ_REQUESTS ?= 20000
fuzz-gateway: venv ## fuzz the gateway with FUZZ_REQUESTS generated requests (make test runs 1000); FUZZ_SEED=n
	@ARGOSY_FUZZ_REQUESTS=$(FUZZ_REQUESTS) ARGOSY_FUZZ_SEED=$(FUZZ_SEED) $(PY) -m pytest -q -s \
		tests/unit/gateway/test_gateway_fuzz.py

bench-routing: bench-peers ## routing quality: round robin, least outstanding, prefix affinity, vllm-router cache_aware (docs/benchmarks.md); BENCH_ARGS=--quick
	@$(PY) tests/bench/bench_routing.py $(BENCH_ARGS)

bench-operator: sandbox-build ## 100, 500 and 1,000 LLMDeployments on 200 simulated GPU nodes (docs/benchmarks.md); BENCH_ARGS=--counts 100
	@$(PY) tests/bench/bench_operator_scale.py $(BENCH_ARGS)

demo: sandbox-build ## sandbox + helm install (the chart's pods run) + two models, one on real vLLM + a streamed answer through the gateway pod
	@$(PY) -m argosy_sandbox.demo

clean: sandbox-down ## stop the sandbox and remove its state (the binary cache is kept)
	rm -rf .argosy
