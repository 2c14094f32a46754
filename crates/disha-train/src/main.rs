//! `disha`: one binary for the whole project — inspect models and adapters, compute logits,
//! generate, merge adapters into a plain HF model, convert adapter files.

use std::process::ExitCode;

use clap::Parser;

mod cli;
mod commands;
mod device;
mod embedded_demo;
mod error;

fn main() -> ExitCode {
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISHA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, naming what is wrong; details with DISHA_LOG=debug.
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}
