use std::process::ExitCode;

fn main() -> ExitCode {
    use clap::Parser;
    // every subcommand: candle's spinning element-wise pool off, freed buffers kept for reuse
    // (before any tensor work; see their docs)
    ropo::train::single_threaded_elementwise();
    ropo::train::keep_freed_memory();
    let cli = ropo::cli::Cli::parse();
    match ropo::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ropo: {err:#}");
            ExitCode::from(2)
        }
    }
}
