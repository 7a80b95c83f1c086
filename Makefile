# The project's commands. `make test` is what CI runs (.ci/run).
SWIFT ?= swift
BENCH_FLAGS ?=

.PHONY: test build deps bench example clean

## Install what is missing, build, and run every test.
test: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

build: deps
	$(SWIFT) build

deps:
	@scripts/install-deps

## DMIO against fio on /dev/shm (see BENCHMARKS.md). BENCH_FLAGS=--quick for a short run.
bench:
	@scripts/install-deps
	$(SWIFT) build -c release --product dmio-bench
	.build/release/dmio-bench $(BENCH_FLAGS)

## Copy a region to two files with one DMIO write.
example: deps
	$(SWIFT) run dmio-copy-example

clean:
	rm -rf .build
