use std::process::ExitCode;

fn main() -> ExitCode {
    use clap::Parser;
    // every subcommand: candle's spinning element-wise pool off, freed buffers kept for reuse
    // (before any tensor work; see their docs)
    ropo::process::single_threaded_elementwise();
    ropo::process::keep_freed_memory();
    // log records (warnings by default; RUST_LOG=ropo=debug for the debug ones) to stderr
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_ansi(ansi).with_target(false).init();
    let cli = ropo::cli::Cli::parse();
    match ropo::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // an HF token never reaches the terminal, whatever echoed it
            eprintln!("ropo: {}", ropo::model::hub::redact_token(&format!("{err:#}")));
            ExitCode::from(2)
        }
    }
}
