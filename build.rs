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
    // Messages and servers: the servers decode requests with our codec, which answers INVALID_ARGUMENT
    // (not tonic's INTERNAL) for a request that is not valid protobuf, e.g. a string that is not UTF-8.
    tonic_prost_build::configure()
        .build_client(false)
        .codec_path("crate::grpc::codec::RequestCodec")
        .compile_fds(fds.clone())?;
    // Clients, apart (into `client/`), with tonic's codec: a response that cannot be decoded is INTERNAL, as
    // gRPC's status table says. The messages are those generated above.
    let client_dir = out_dir.join("client");
    std::fs::create_dir_all(&client_dir)?;
    tonic_prost_build::configure()
        .build_server(false)
        .extern_path(".allowance.v1", "crate::grpc::pb")
        .out_dir(&client_dir)
        .compile_fds(fds)?;
    Ok(())
}
