//! The courier server binary; see `courier_node::cli`.

/// jemalloc instead of the system allocator: the node allocates small buffers on every thread for
/// every message (protobuf, HTTP/2 frames, RocksDB keys), where glibc's malloc spent ≈ 7 % of the
/// nodes' CPU (docs/BENCHMARKS.md).
#[cfg(feature = "jemalloc")]
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

fn main() -> anyhow::Result<()> {
    courier_node::cli::main()
}
