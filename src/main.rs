use clap::Parser;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    let cli = allowance::cli::Cli::parse();
    allowance::cli::init_tracing(cli.log_format);
    match allowance::cli::run(cli).await {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
