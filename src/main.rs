/// mimalloc rather than the system allocator: a gRPC server allocates and frees many small buffers per call,
/// and glibc's malloc spent about a sixth of the server's CPU on it (docs/performance.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    allowance::cli::main().await
}
