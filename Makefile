# The two commands of the README. Both install what they need (scripts/setup).
.PHONY: run test setup jepsen

# Set up the machine, build, and run a local 3-node cluster (Ctrl-C stops it).
run:
	scripts/run-cluster

# The full test gate: fmt, FIXME check, dependency direction, clippy -D warnings, nextest, the
# jepsen short suite, the simulation's seed budget, doc tests, docs, the benchmark smoke run.
test:
	scripts/test

setup:
	scripts/setup

# One longer courier-jepsen run against real processes under faults (needs root), e.g.
# `make jepsen SCENARIO=mixed SECONDS=300`. Scenarios: none kill pause partition kill-partition
# pause-kill mixed.
SCENARIO ?= kill-partition
SECONDS ?= 60
jepsen:
	scripts/jepsen $(SCENARIO) $(SECONDS)

# Seeds of the deterministic simulation (sim/, docs/SIMULATION.md), e.g. `make sim SEEDS=1000
# SIM_SECONDS=30` (raft layer) or `make sim SIM_LAYER=node`; one seed with its report:
# `scripts/sim --seed 17`.
SEEDS ?= 200
SIM_SECONDS ?= 20
.PHONY: sim
sim:
	SIM_LAYER=$(or $(SIM_LAYER),raft) scripts/sim $(SEEDS) $(SIM_SECONDS)

# courier side by side with etcd and NATS JetStream, then idle-stream scale (~30 min): writes the
# generated section of docs/BENCHMARKS.md and docs/bench/*.svg. `scripts/bench --smoke` is the
# one-minute version that `make test` runs.
.PHONY: bench
bench:
	scripts/bench

# Storage over time (docs/BENCHMARKS.md, "Storage over time"): a steady conversation workload
# with short retention windows; records per user per projection, the archive's size, then timed
# verifies and an inspect of old indexes (30 minutes by default, e.g. `SOAK_MINUTES=10 make soak`).
.PHONY: soak
soak:
	scripts/bench --soak
