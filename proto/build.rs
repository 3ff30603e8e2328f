//! Compiles the `.proto` files with protox (pure Rust, no protoc) and generates prost types, and
//! with the `grpc` feature the tonic client and server stubs. The encoded descriptor set is
//! written to `OUT_DIR/courier_descriptor.bin` for gRPC server reflection.

use std::path::PathBuf;

use prost::Message as _;

const PROTOS: [&str; 4] = [
    "courier/events.proto",
    "courier/store.proto",
    "courier/client.proto",
    "courier/peer.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    let fds = protox::compile(PROTOS, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    std::fs::write(out_dir.join("courier_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .build_client(grpc)
        .build_server(grpc)
        // Unimplemented RPCs answer UNIMPLEMENTED, never a fake success.
        .generate_default_stubs(grpc)
        .compile_fds(fds)?;
    Ok(())
}
