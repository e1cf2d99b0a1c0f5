# Stagehand: the two commands a newcomer needs are `make demo` and `make test`.
# Cargo's target directory lives outside the clone so CI and later runs reuse builds.
export CARGO_TARGET_DIR ?= $(HOME)/.cache/stagehand/target
# One cargo profile (release) for tests, demo and benches: dependencies build once.
CARGO_PROFILE := --release
BIN := $(CARGO_TARGET_DIR)/release
# cargo with the system RocksDB when installed (see scripts/cargo.sh).
CARGO := bash scripts/cargo.sh

.PHONY: deps build test demo demo-nbd bench bench-migrate bench-fence bench-geo bench-failover fmt clippy lint fuzz-build fuzz clean

deps:
	@bash scripts/deps.sh

build: deps
	$(CARGO) build $(CARGO_PROFILE) --workspace --bins

test: deps
	$(CARGO) build $(CARGO_PROFILE) --workspace --bins
	STAGEHAND_BIN_DIR=$(BIN) $(CARGO) test $(CARGO_PROFILE) --workspace --no-fail-fast
	@bash scripts/fuzz-build.sh
	STAGEHAND_BIN_DIR=$(BIN) bash scripts/check-units.sh

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
