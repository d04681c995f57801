//! Compiles the .proto files beside this crate with protox (pure Rust, no system protoc) and
//! generates prost messages for every package plus, with the `grpc` feature, the tonic client and
//! server of husk.v1. The encoded descriptor set is kept for gRPC server reflection.

use std::path::PathBuf;

const PROTOS: &[&str] = &[
    "husk/v1/husk.proto",
    "husk/agent/v1/agent.proto",
    "husk/vmm/v1/vmm.proto",
];

fn main() -> Result<(), Box<dyn std::error::Error>> {
    for proto in PROTOS {
        println!("cargo:rerun-if-changed={proto}");
    }
    let descriptors = protox::compile(PROTOS, ["."])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let encoded = prost::Message::encode_to_vec(&descriptors);
    std::fs::write(out_dir.join("husk_descriptor.bin"), encoded)?;

    let grpc = std::env::var_os("CARGO_FEATURE_GRPC").is_some();
    tonic_prost_build::configure()
        .build_server(grpc)
        .build_client(grpc)
        .compile_fds(descriptors)?;
    Ok(())
}
