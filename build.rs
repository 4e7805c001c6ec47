//! Compiles `proto/` with protox (a pure-Rust protobuf compiler), so building needs no `protoc` on the machine.

use std::path::{Path, PathBuf};
use std::process::Command;

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
    envoy_rls_descriptor(&out_dir)?;
    Ok(())
}

/// Encoded descriptors of Envoy's `envoy.service.ratelimit.v3` and everything it imports, for server
/// reflection only: the types and the server come from the envoy-types crate, and so do these files — the
/// `.proto` files it ships and generated them from, found through `cargo metadata`, not copies of our own.
fn envoy_rls_descriptor(out_dir: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let cargo = std::env::var("CARGO")?;
    let metadata = |extra: &[&str]| {
        Command::new(&cargo)
            .args(["metadata", "--format-version", "1"])
            .args(extra)
            .current_dir(std::env::var("CARGO_MANIFEST_DIR")?)
            .output()
            .map_err(Box::<dyn std::error::Error>::from)
    };
    // Offline first: the build has fetched what it compiles. `cargo metadata` also wants the manifests of
    // dependencies for other platforms, which a fresh machine may not have fetched yet: then online.
    let mut output = metadata(&["--offline"])?;
    if !output.status.success() {
        output = metadata(&[])?;
    }
    if !output.status.success() {
        return Err(format!("cargo metadata: {}", String::from_utf8_lossy(&output.stderr)).into());
    }
    let metadata: serde_json::Value = serde_json::from_slice(&output.stdout)?;
    let manifest = metadata["packages"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|p| p["name"] == "envoy-types")
        .and_then(|p| p["manifest_path"].as_str())
        .ok_or("envoy-types is not among the dependencies")?;
    let protos = Path::new(manifest).parent().ok_or("envoy-types has no directory")?.join("proto");
    let includes: Vec<PathBuf> =
        std::fs::read_dir(&protos)?.filter_map(|e| e.ok()).map(|e| e.path()).filter(|p| p.is_dir()).collect();
    let fds = protox::compile(["envoy/service/ratelimit/v3/rls.proto"], includes)?;
    std::fs::write(out_dir.join("envoy_rls_descriptor.bin"), fds.encode_to_vec())?;
    Ok(())
}
