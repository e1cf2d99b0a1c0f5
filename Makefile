# Stagehand: the two commands a newcomer needs are `make demo` and `make test`.
# Cargo's target directory lives outside the clone so CI and later runs reuse builds.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/stagehand/target
# One cargo profile (release) for tests, demo and benches: dependencies build once.
CARGO_PROFILE := --release
BIN := $(CARGO_TARGET_DIR)/release
# cargo with the system RocksDB when installed (see scripts/cargo.sh).
CARGO := bash scripts/cargo.sh

.PHONY: deps build test test-coord-etcd demo demo-nbd bench bench-migrate bench-fence bench-geo bench-failover bench-control fmt clippy lint fuzz-build fuzz clean

deps:
	@bash scripts/deps.sh

build: deps
	$(CARGO) build $(CARGO_PROFILE) --workspace --bins

test: deps
	$(CARGO) build $(CARGO_PROFILE) --workspace --bins
	STAGEHAND_BIN_DIR=$(BIN) $(CARGO) test $(CARGO_PROFILE) --workspace --no-fail-fast
	@$(MAKE) --no-print-directory test-coord-etcd
	@bash scripts/fuzz-build.sh
	STAGEHAND_BIN_DIR=$(BIN) bash scripts/check-units.sh

# The coordinator suites a second time, on etcd (a three-member etcd on loopback per
# cluster, started by the test fixture) instead of RocksDB. Binaries built by `test`.
COORD_SUITES := --test coord_cli --test coord_disk --test coord_migrate --test coord_recovery
test-coord-etcd:
	@if command -v etcd >/dev/null 2>&1; then \
		STAGEHAND_TEST_STORE=etcd STAGEHAND_BIN_DIR=$(BIN) $(CARGO) test $(CARGO_PROFILE) -p stagehand-tests $(COORD_SUITES) --no-fail-fast; \
	else echo "SKIPPED: test-coord-etcd: etcd missing (run make deps)"; fi

demo: build
	$(CARGO) build $(CARGO_PROFILE) -p stagehand-tests --example check_disk_writer
	STAGEHAND_BIN_DIR=$(BIN) bash scripts/demo.sh

demo-nbd: build
	STAGEHAND_BIN_DIR=$(BIN) bash scripts/demo-nbd.sh

bench: build
	STAGEHAND_BIN_DIR=$(BIN) bash benches/nbd-peers.sh

bench-migrate: build
	STAGEHAND_BIN_DIR=$(BIN) bash benches/migrate-peers.sh

bench-fence: build
	STAGEHAND_BIN_DIR=$(BIN) bash benches/fence.sh

# Two sites in network namespaces (root): mirror throughput over a shaped link
# (RATE_MBIT=1000 RTT_MS=20 ROUNDS=3 by default) against nbdcopy over the same link.
bench-geo: build
	$(CARGO) build $(CARGO_PROFILE) -p stagehand-tests --example bench_geo
	STAGEHAND_BIN_DIR=$(BIN) $(BIN)/examples/bench_geo

bench-failover: build
	STAGEHAND_BIN_DIR=$(BIN) bash benches/failover.sh

# 10,000 VMs on fake agents: `coord vm list` latency and concurrent migration starts
# per second, on RocksDB and on etcd (BENCH_VMS, BENCH_STARTS, BENCH_STORES).
bench-control: build
	$(CARGO) build $(CARGO_PROFILE) -p coordinator --example bench_control
	STAGEHAND_BIN_DIR=$(BIN) $(BIN)/examples/bench_control

fmt:
	$(CARGO) fmt --all

clippy:
	$(CARGO) clippy $(CARGO_PROFILE) --workspace --all-targets -- -D warnings

lint: clippy
	$(CARGO) fmt --all -- --check

fuzz-build:
	@bash scripts/fuzz-build.sh

fuzz:
	@bash scripts/fuzz-run.sh
