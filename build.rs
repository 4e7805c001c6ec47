//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building needs no `protoc` on the machine.

use std::path::PathBuf;

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protos = [
        "proto/allowance/v1/allowance.proto",
        "proto/allowance/v1/admin.proto",
        "proto/allowance/v1/ratelimit.proto",
    ];
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile(protos, ["proto"])?;
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    // Encoded descriptors for server reflection.
    std::fs::write(out_dir.join("allowance_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure().compile_fds(fds)?;
    Ok(())
}
