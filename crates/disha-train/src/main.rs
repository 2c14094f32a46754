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
    // Allocator settings for the per-step buffers (returns at once when already applied).
    disha_train::allocator::tune_and_reexec();
    let cli = cli::Cli::parse();
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("DISHA_LOG")
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_writer(std::io::stderr)
        .init();
    // Raised input limits (DISHA_LIMITS) apply to the whole process; a malformed override is
    // refused rather than ignored.
    match disha_core::limits::Limits::from_env() {
        Ok(limits) => disha_core::limits::set_limits(limits),
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    match commands::run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // One line, naming what is wrong; details with DISHA_LOG=debug. Messages quote
            // input (names, values), which a hostile file can make megabytes long.
            let message = e.to_string();
            eprintln!("error: {}", shorten(&message));
            ExitCode::FAILURE
        }
    }
}

/// `message`, with its middle cut out when it is longer than 4 KiB.
fn shorten(message: &str) -> std::borrow::Cow<'_, str> {
    const MAX: usize = 4096;
    if message.len() <= MAX {
        return message.into();
    }
    let boundary = |mut i: usize| {
        while !message.is_char_boundary(i) {
            i -= 1;
        }
        i
    };
    let head = boundary(MAX / 2);
    let tail = boundary(message.len() - MAX / 2);
    format!(
        "{} … [{} bytes omitted] … {}",
        &message[..head],
        tail - head,
        &message[tail..]
    )
    .into()
}
