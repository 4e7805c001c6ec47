#[tokio::main]
async fn main() -> std::process::ExitCode {
    allowance::cli::main().await
}
