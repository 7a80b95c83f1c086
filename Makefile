# The project's commands. `make test` and `make e2e` are what CI runs (.ci/run).
SWIFT ?= swift
BENCH_FLAGS ?=

.PHONY: test e2e serve build install deps bench bench-nbd bench-linear bench-tls bench-metrics bench-reads bench-connections bench-behind bench-scrub count-arc fuzz soak soak-connections example clean
PREFIX ?= /usr/local

## Install what is missing, build, and run every test.
test: deps
	$(SWIFT) build --build-tests
	$(SWIFT) test --skip-build

## Serve the default mirror: two sparse 1 GiB legs in ~/.local/share/dmio-nbd (made on first use), on the default socket.
serve: deps
	$(SWIFT) build -c release --product dmio-nbd
	.build/release/dmio-nbd

## The real Linux nbd driver: ext4 on /dev/nbd0 served by dmio-nbd, in a VM (unix socket; a mirror
## with a failing leg; TCP with TLS).
e2e: deps
	$(SWIFT) build --product dmio-nbd
	scripts/e2e-mirror --dmio-nbd .build/debug/dmio-nbd
	scripts/e2e-tls --dmio-nbd .build/debug/dmio-nbd

build: deps
	$(SWIFT) build

## Install dmio-nbd as $(PREFIX)/bin/dmio-nbd (DESTDIR for a staging root).
install: deps
	$(SWIFT) build -c release --product dmio-nbd
	install -D -m 755 .build/release/dmio-nbd $(DESTDIR)$(PREFIX)/bin/dmio-nbd

deps:
	@scripts/install-deps

## DMIO against fio on /dev/shm (BENCHMARKS.md). BENCH_FLAGS=--quick for a short run.
bench: deps
	$(SWIFT) build -c release --product dmio-bench
	.build/release/dmio-bench $(BENCH_FLAGS)

## The mirror (two legs) against nbdkit file, qemu-nbd and qemu-storage-daemon's quorum, with
## pictures in bench/ (BENCHMARKS.md).
bench-nbd: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/bench-variants --suite peers --plot bench $(BENCH_FLAGS)

## The mirror over TLS beside nbdkit over TLS, on loopback TCP, and both without TLS (BENCHMARKS.md).
bench-tls: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/bench-variants --suite tls $(BENCH_FLAGS)

## The mirror with and without --metrics, beside nbdkit file (BENCHMARKS.md).
bench-metrics: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/bench-variants --suite metrics $(BENCH_FLAGS)

## Reads from a mirror with one slow remote leg, --read-policy first and balanced, beside nbdkit file (BENCHMARKS.md).
bench-reads: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/bench-variants --suite reads $(BENCH_FLAGS)

## A remote leg behind a delay on one connection and on four (NBD multi-conn), beside nbdkit file (BENCHMARKS.md).
bench-connections: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/bench-variants --suite connections $(BENCH_FLAGS)

## Writes to a mirror with a slow remote write-mostly leg: waited for, written behind, pulled ahead of (BENCHMARKS.md).
bench-behind: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/bench-variants --suite behind $(BENCH_FLAGS)

## The mirror under chaos for SOAK_SECONDS (default 600): fio verifying through it while legs fail, fill,
## are replaced, and their servers and dmio-nbd itself are killed and started again (README, "Soak under
## chaos"). A debug build: its assertions are on.
SOAK_SECONDS ?= 600
soak: deps
	$(SWIFT) build --product dmio-nbd
	scripts/soak --seconds $(SOAK_SECONDS) --dmio-nbd .build/debug/dmio-nbd

## 1000 clients that vanish with 40 reads of 1 MiB in flight each, then an idle minute: the server's
## memory goes back to its plateau (README, "Memory, server-wide").
soak-connections: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/soak-connections

## Each fuzz target for FUZZ_SECONDS (default 60): libFuzzer with the address sanitizer (README, "Fuzzing").
FUZZ_SECONDS ?= 60
fuzz: deps
	scripts/fuzz --seconds $(FUZZ_SECONDS)

## How fast `dmio-nbd check` compares the legs, beside `cmp` of the leg files (BENCHMARKS.md).
bench-scrub: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/bench-scrub $(BENCH_FLAGS)

## Retains, releases and allocations of the Swift runtime per 4k request, counted with uprobes (BENCHMARKS.md).
count-arc: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/count-arc $(BENCH_FLAGS)

## One device served as it is, against nbdkit file and qemu-nbd (BENCHMARKS.md).
bench-linear: deps
	$(SWIFT) build -c release --product dmio-nbd
	scripts/bench-variants --suite linear $(BENCH_FLAGS)

## Copy a region to two files with one DMIO write.
example: deps
	$(SWIFT) run dmio-copy-example

clean:
	rm -rf .build
