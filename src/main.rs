use std::process::ExitCode;

fn main() -> ExitCode {
    use clap::Parser;
    let cli = ropo::cli::Cli::parse();
    match ropo::cli::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("ropo: {err:#}");
            ExitCode::from(2)
        }
    }
}
