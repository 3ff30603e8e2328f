# Sourced by every script that runs cargo. Keeps one warm target directory outside the clone and
# links a prebuilt librocksdb.a so that `cargo build` and `cargo clippy` never compile RocksDB's
# C++ twice (BUILD.md: check mode would otherwise compile it a second time, ~12 min).
#
# The library is built once per librocksdb-sys version by scripts/rocksdb-lib and cached under
# $COURIER_CACHE. These variables must be identical on every cargo command, or cargo reruns the
# librocksdb-sys build script.
export COURIER_CACHE="${COURIER_CACHE:-$HOME/.cache/courier}"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$COURIER_CACHE/target}"
_courier_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
_rocksdb_version="$(grep -A1 '^name = "librocksdb-sys"' "$_courier_root/Cargo.lock" | sed -n 's/^version = "\(.*\)"/\1/p')"
export COURIER_ROCKSDB_LIB="$COURIER_CACHE/rocksdb-lib/$_rocksdb_version"
if [ -f "$COURIER_ROCKSDB_LIB/librocksdb.a" ]; then
  export ROCKSDB_LIB_DIR="$COURIER_ROCKSDB_LIB"
  export ROCKSDB_STATIC=1
fi
unset _courier_root _rocksdb_version
