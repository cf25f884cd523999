# sluice: `make demo` runs the lab demo, `make test` runs every test.
# Both install what they need first (scripts/setup.sh; Debian-like host, root).

SHELL := /bin/bash
.SHELLFLAGS := -euo pipefail -c

# LLVM 22 (bpf-linker's build, clang) and cargo-installed tools (bpf-linker),
# for every target and everything it runs.
export PATH := /usr/lib/llvm-22/bin:$(or $(CARGO_HOME),$(HOME)/.cargo)/bin:$(PATH)

CARGO ?= cargo

.PHONY: all setup build demo test test-lts bench fmt-check clippy

all: build

## setup: install missing system packages, rust-src, bpf-linker; mount bpffs
setup:
	bash scripts/setup.sh

## build: build the `sluice` CLI (and its kernel programs) in release mode
build: setup
	$(CARGO) build --release

## demo: run the two-namespace lab demo against target/release/sluice (root)
demo: build
	bash scripts/demo.sh

## test: every test of the workspace (root), then sluice-common alone without
## the `user` feature. sluice-ebpf is excluded from the host test run: its
## binary is BPF-only (nightly, bpfel-unknown-none) and is built and exercised
## through the `sluice` crate. Runs everything, fails if anything failed.
## sluice's integration tests are one binary (sluice/tests/it: a module per
## capability), so one `test result` line covers them all.
## The Linux 6.1 tier (sluice/tests/it/lts.rs) runs with the rest: its tests
## pass after one "lts-6.1 tier: SKIPPED N tests: why" line when qemu or the
## kernel package is missing; those are counted as skipped, not passed.
test: setup
	rc=0; log=$$(mktemp); \
	$(CARGO) test --workspace --exclude sluice-ebpf --no-fail-fast --lib --bins --tests 2>&1 | tee -a "$$log" || rc=1; \
	$(CARGO) test -p sluice-common --no-fail-fast --lib 2>&1 | tee -a "$$log" || rc=1; \
	passed=$$({ grep '^test result' "$$log" || true; } | { grep -o '[0-9]* passed' || true; } | awk '{s+=$$1} END {print s+0}'); \
	failed=$$({ grep '^test result' "$$log" || true; } | { grep -o '[0-9]* failed' || true; } | awk '{s+=$$1} END {print s+0}'); \
	skipped=$$({ grep -o '^lts-6.1 tier: SKIPPED [0-9]* tests' "$$log" || true; } | awk '{s+=$$4} END {print s+0}'); \
	passed=$$((passed - skipped)); \
	grep '^lts-6.1 tier:' "$$log" >&2 || true; \
	rm -f "$$log"; \
	if [ "$$rc" -ne 0 ]; then echo "make test: some tests FAILED" >&2; fi; \
	echo "$$passed passed, $$failed failed, $$skipped skipped"; \
	exit "$$rc"

## test-lts: only the Linux 6.1 tier (qemu TCG; about 4 minutes): programs
## verified, packet tables, attach/re-adopt, generation flips, and the
## firewall, DDoS and LB end to end (suites: SUITES in sluice/tests/it/lts.rs,
## described in docs/dataplane.md). Builds what it needs;
## SLUICE_LTS_SUITES=compat,packets runs only those suites.
test-lts: setup
	$(CARGO) test -p sluice --test it -- lts::

## bench: sluice's benchmarks (root, ~10 min): prints a table per section,
## writes bench-results/results.json and docs/benchmarks.md. Benchmarks never
## decide pass/fail; `make test` runs a smoke version (bench/tests/smoke.rs).
bench: setup
	$(CARGO) build --release
	target/release/sluice-bench --out bench-results

## fmt-check: fail if any file is not rustfmt-formatted
fmt-check:
	$(CARGO) fmt --version >/dev/null 2>&1 || rustup component add rustfmt
	$(CARGO) fmt --all -- --check

## clippy: lint host crates (stable) and the kernel programs (nightly, BPF target)
clippy: setup
	$(CARGO) clippy --version >/dev/null 2>&1 || rustup component add clippy
	$(CARGO) clippy --workspace --exclude sluice-ebpf --all-targets -- -D warnings
	cd sluice-ebpf && $(CARGO) +nightly clippy --release -- -D warnings
