//! Compiles the minimal etcd proto (`proto/etcdserverpb/rpc.proto`) with protox (pure Rust, no
//! protoc) into a tonic client, the same way `proto/build.rs` compiles courier's protos.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(["etcdserverpb/rpc.proto"], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}
