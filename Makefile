# The two commands of the README. Both install what they need (scripts/setup).
.PHONY: run test setup

# Set up the machine, build, and run a local 3-node cluster (Ctrl-C stops it).
run:
	scripts/run-cluster

# The full test gate: fmt, FIXME check, dependency direction, clippy -D warnings, nextest, doc
# tests, docs.
test:
	scripts/test

setup:
	scripts/setup
