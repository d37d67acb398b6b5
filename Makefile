# pyunionfs — developer entry points. Every target works from a fresh clone on Debian 12 as root:
# `deps` installs the system packages and the .venv it needs (scripts/install-deps.sh).
#
#   make deps    system packages (fuse3, libfuse3-dev, ...) + .venv with pip install -e '.[test]'
#   make demo    build a small layered "image", mount it, change it, show what lands in upper/
#   make test    ruff + the pytest suite (needs root and /dev/fuse for the mount tests)
#   make lint    ruff check, mypy, bash -n on the shell scripts
#   make test-long  every tier: test, test-containers, test-deep (stress long profile, seeded conformance)
#   make conformance  random stacks + ops vs kernel overlayfs (EXAMPLES=20000 STEPS=30 MINUTES=0 OPTIONS=)
#   make bench   pyunionfs vs kernel overlayfs vs fuse-overlayfs (BENCH_ARGS=--quick for a smoke run),
#                then layer tars: apply/export vs GNU tar (scripts/bench_layers.py, BENCH_LAYERS_ARGS=)
#   make test-containers  podman/buildah with pyunionfs as mount_program, root + rootless
#   make bench-podman  `podman run --rm IMG true`: kernel overlay vs fuse-overlayfs vs pyunionfs
#   make stress  the stress suite's long profile (STRESS_MINUTES=10): kills, fsx, concurrency, fio, faults
#   make fuzz    atheris on every parser of untrusted bytes (tests/fuzz/), FUZZ_SECONDS=30 per target
#   make soak    mixed load on one pyunionfs mount for DURATION=120 s: 0 errors, daemon RSS/fds flat, kernel replay (SOAK_ARGS=)
#   make clean   caches and build output; never unmounts anything
#   make man     pyunionfs(1) into build/man from the argparse definitions
#   make install the command and its man page under PREFIX=/usr/local (DESTDIR= to stage)

SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV        ?= .venv
PY          := $(VENV)/bin/python
RUFF        := $(VENV)/bin/ruff
# per-test limit (pytest-timeout) and a limit for the whole run, below CI's 90 minutes
PYTEST_TIMEOUT ?= 180
TEST_TIME_LIMIT ?= 80m
PYTEST_ARGS ?=
# pytest-xdist workers; tests that touch machine-wide state run on one of them, in order
# (tests/conftest.py, HOST_WIDE). TEST_JOBS=0 runs everything in this process.
TEST_JOBS ?= 2
BENCH_ARGS  ?=
BENCH_JSON  ?= bench-out/bench.json
SHELL_SCRIPTS := scripts/install-deps.sh scripts/demo.sh .ci/run scripts/containers/install-deps.sh

.PHONY: help deps demo test lint bench clean conformance man install

help:
	@sed -n 's/^#   make /  make /p' $(firstword $(MAKEFILE_LIST))

deps:
	@bash scripts/install-deps.sh

lint: deps
	$(RUFF) check unionfs tests scripts
	$(VENV)/bin/mypy
	@for f in $(SHELL_SCRIPTS); do bash -n "$$f" || exit 1; done
	@if command -v shellcheck >/dev/null 2>&1; then shellcheck $(SHELL_SCRIPTS); fi

# pytest exit status 5 means "no tests were collected": reported, not treated as a failure.
# Without a terminal (CI) the whole run is capped by timeout(1); at a terminal it is not, so
# that ^C reaches pytest (timeout puts its command in another process group).
test: deps lint
	@rc=0; if [ -t 0 ]; then cap=; else cap="timeout -k 60 $(TEST_TIME_LIMIT)"; fi; \
	$$cap $(PY) -m pytest tests -q -p no:cacheprovider --durations=30 \
		-n $(TEST_JOBS) --dist loadgroup --timeout=$(PYTEST_TIMEOUT) $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; rc=0; fi; \
	if [ $$rc -eq 124 ]; then echo "make test: error: test run exceeded $(TEST_TIME_LIMIT)" >&2; fi; \
	exit $$rc

# podman/buildah with a containers-storage mount_program (tests/containers/). Installs podman,
# buildah, runc, busybox-static, uidmap, acl first. CONTAINER_DRIVERS=pyunionfs,fuse-overlayfs,native
# adds the references; CONTAINER_MODES=root or rootless for one of the two.
CONTAINER_DRIVERS    ?= pyunionfs
CONTAINER_MODES      ?= root,rootless
CONTAINER_TIME_LIMIT ?= 10m
BENCH_PODMAN_ARGS    ?=
.PHONY: test-containers bench-podman
test-containers: deps
	@bash scripts/containers/install-deps.sh
	@rc=0; if [ -t 0 ]; then cap=; else cap="timeout -k 60 $(CONTAINER_TIME_LIMIT)"; fi; \
	PYUNIONFS_CONTAINER_TESTS=1 PYUNIONFS_CONTAINER_DRIVERS=$(CONTAINER_DRIVERS) \
	PYUNIONFS_CONTAINER_MODES=$(CONTAINER_MODES) $$cap $(PY) -m pytest tests/containers -q \
		-p no:cacheprovider --timeout=300 $(PYTEST_ARGS) || rc=$$?; \
	if [ $$rc -eq 124 ]; then echo "make test-containers: error: exceeded $(CONTAINER_TIME_LIMIT)" >&2; fi; \
	exit $$rc

bench-podman: deps
	@bash scripts/containers/install-deps.sh
	$(PY) scripts/containers/bench_podman.py $(BENCH_PODMAN_ARGS)

demo: deps
	@if [ -t 0 ]; then bash scripts/demo.sh; else timeout -k 30 600 bash scripts/demo.sh; fi

# The stress suite (tests/stress/) runs bounded inside `make test`; here with its long profile,
# each test scaled to STRESS_MINUTES in all, its one-line summaries collected in STRESS_REPORT.
STRESS_MINUTES ?= 10
STRESS_REPORT  ?= bench-out/stress-report.txt
.PHONY: stress
stress: deps
	@mkdir -p $(dir $(STRESS_REPORT)) && : > $(STRESS_REPORT)
	@rc=0; if [ -t 0 ]; then cap=; else cap="timeout -k 60 $$(( $(STRESS_MINUTES) * 3 + 15 ))m"; fi; \
	PYUNIONFS_STRESS=long PYUNIONFS_STRESS_MINUTES=$(STRESS_MINUTES) \
	PYUNIONFS_STRESS_REPORT=$(abspath $(STRESS_REPORT)) $$cap $(PY) -m pytest tests/stress -q \
		-p no:cacheprovider -rfEs $(PYTEST_ARGS) || rc=$$?; \
	echo "--- stress summary ($(STRESS_REPORT)) ---"; cat $(STRESS_REPORT); \
	if [ $$rc -eq 124 ]; then echo "make stress: error: exceeded its time limit" >&2; fi; \
	exit $$rc

# Coverage-guided fuzzing of what parses untrusted bytes (tests/fuzz/, docs/development.md).
# atheris is installed here, not by `make deps`: it is a fuzzing tool, not a test dependency.
FUZZ_SECONDS ?= 30
FUZZ_ARGS    ?=
.PHONY: fuzz
fuzz: deps
	@$(PY) -c 'import atheris' 2>/dev/null || $(PY) -m pip install -q atheris
	@if [ -t 0 ]; then cap=; else cap="timeout -k 30 $$(( $(FUZZ_SECONDS) * 12 + 300 ))"; fi; \
	$$cap $(PY) scripts/fuzz.py --seconds $(FUZZ_SECONDS) $(FUZZ_ARGS)

# The soak (scripts/soak.py): generators, readers, big-file copy-ups, rename storms and mount
# cycles of a second overlay against one pyunionfs mount for DURATION seconds; the daemon's RSS
# and fds must stay flat, a seeded part replays identically on kernel overlayfs. timeout(1)
# sends SIGTERM first, so a capped run still writes its partial report (SOAK_JSON).
DURATION  ?= 120
SOAK_JSON ?= bench-out/soak.json
SOAK_ARGS ?=
.PHONY: soak
soak: deps
	@mkdir -p $(dir $(SOAK_JSON))
	@rc=0; if [ -t 0 ]; then cap=; else cap="timeout -k 60 $$(( $(DURATION) * 3 / 2 + 600 ))"; fi; \
	$$cap $(PY) scripts/soak.py --duration $(DURATION) --json $(SOAK_JSON) $(SOAK_ARGS) || rc=$$?; \
	if [ $$rc -eq 124 ]; then echo "make soak: error: exceeded its time limit" >&2; fi; \
	exit $$rc

# The second tier: the stress suite's long profile and a conformance run of DEEP_MINUTES with
# a fixed seed (DEEP_SEED; the same examples on every run, so CI stays reproducible).
# `make test-long` runs every tier; .ci/run runs make test, test-containers and test-deep.
DEEP_STRESS_MINUTES ?= 4
DEEP_MINUTES        ?= 5
DEEP_SEED           ?= 20261206
DEEP_WB_MINUTES     ?= 2
.PHONY: test-deep test-long
test-deep: deps
	@$(MAKE) --no-print-directory stress STRESS_MINUTES=$(DEEP_STRESS_MINUTES) \
		STRESS_REPORT=bench-out/stress-deep.txt
	@if [ -t 0 ]; then cap=; else cap="timeout -k 60 $$(( $(DEEP_MINUTES) * 2 + 10 ))m"; fi; \
	$$cap $(PY) scripts/conformance.py --examples 100000 --steps 30 \
		--minutes $(DEEP_MINUTES) --seed $(DEEP_SEED)
	@# the same model with pyunionfs under -o writeback (docs/differences.md), the kernel as is
	@if [ -t 0 ]; then cap=; else cap="timeout -k 60 $$(( $(DEEP_WB_MINUTES) * 2 + 10 ))m"; fi; \
	UNIONFS_OUR_OPTIONS=writeback $$cap $(PY) scripts/conformance.py --examples 100000 \
		--steps 30 --minutes $(DEEP_WB_MINUTES) --seed $(DEEP_SEED)

test-long: test test-containers test-deep

# Long conformance profile (tests/conformance.py): prints "N examples, M operations, K divergences".
EXAMPLES ?= 20000
STEPS    ?= 30
MINUTES  ?= 0
conformance: deps
	$(PY) scripts/conformance.py --examples $(EXAMPLES) --steps $(STEPS) --minutes $(MINUTES)

# The comparison needs fuse-overlayfs: installed here if missing (not with PYUNIONFS_NO_APT=1;
# without it the fuse-overlayfs column is n/a).
bench: deps
	@if ! command -v fuse-overlayfs >/dev/null 2>&1 && [ "$${PYUNIONFS_NO_APT:-0}" != 1 ]; then \
		if [ "$$(id -u)" = 0 ]; then sudo=; else sudo=sudo; fi; \
		export DEBIAN_FRONTEND=noninteractive; \
		$$sudo apt-get install -y -qq fuse-overlayfs >/dev/null \
		|| { $$sudo apt-get update -qq && $$sudo apt-get install -y -qq fuse-overlayfs >/dev/null; } \
		|| echo "make bench: could not install fuse-overlayfs; its column will be n/a" >&2; \
	fi
	@mkdir -p $(dir $(BENCH_JSON))
	$(PY) scripts/bench.py --json $(BENCH_JSON) $(BENCH_ARGS)
	$(PY) scripts/bench_layers.py $(BENCH_LAYERS_ARGS)

# pyunionfs(1) from the argparse definitions (scripts/manpage.py), and an install of the
# command and the man page under PREFIX (DESTDIR for staging): the command is a link to the
# venv's entry point, whose pyfuse3 is the patched one.
PREFIX  ?= /usr/local
MANPAGE := build/man/pyunionfs.1
man: deps
	$(PY) scripts/manpage.py $(MANPAGE)

install: man
	install -D -m 644 $(MANPAGE) $(DESTDIR)$(PREFIX)/share/man/man1/pyunionfs.1
	install -d $(DESTDIR)$(PREFIX)/bin
	ln -sfn $(abspath $(VENV))/bin/pyunionfs $(DESTDIR)$(PREFIX)/bin/pyunionfs

# Only files this repo creates. demo.sh and bench.py unmount their own mounts in traps/finally;
# if one of their output dirs still holds a mount (a killed run), clean leaves it alone.
clean:
	@for d in demo-out bench-out; do \
		if [ -d "$$d" ] && awk -v p="$$(cd "$$d" && pwd -P)" \
			'index($$2, p "/") == 1 || $$2 == p { found=1 } END { exit !found }' /proc/mounts; then \
			echo "make clean: $$d still has a mount below it; unmount it yourself, skipping" >&2; \
		else rm -rf "$$d"; fi; \
	done
	rm -rf build .ruff_cache .pytest_cache .hypothesis *.egg-info
	find . -path ./.venv -prune -o -name __pycache__ -type d -prune -exec rm -rf {} +
