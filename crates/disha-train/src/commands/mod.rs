//! The subcommands, one file each.

mod eval;
mod export_adapter;
mod generate;
mod inspect;
mod logits;
mod merge;
mod train;

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use disha_core::{PeftConfig, PeftModelExt};
use disha_models::{LoadedModel, load_model};

use crate::cli::{Cli, Command, ModelArgs};
use crate::error::CliResult;

/// The adapter name used for `--adapter` directories.
pub const ADAPTER_NAME: &str = "default";

/// Runs one parsed command line.
pub fn run(cli: Cli) -> CliResult {
    match cli.command {
        Command::Inspect(args) => inspect::run(args),
        Command::Logits(args) => logits::run(args),
        Command::Generate(args) => generate::run(args),
        Command::Merge(args) => merge::run(args),
        Command::ExportAdapter(args) => export_adapter::run(args),
        Command::Train(args) => train::run(*args),
        Command::Eval(args) => eval::run(args),
    }
}

/// Loads `--model` on `device` and, if given, the adapter directory as [`ADAPTER_NAME`].
pub fn load_with_adapter(
    model: &Path,
    adapter: Option<&Path>,
    device: &Device,
) -> CliResult<(LoadedModel, Option<PeftConfig>)> {
    let start = Instant::now();
    let mut loaded = load_model(model, device)?;
    tracing::info!(path = %model.display(), secs = start.elapsed().as_secs_f64(), "model loaded");
    let config = match adapter {
        Some(dir) => Some(loaded.model.load_adapter(dir, ADAPTER_NAME)?),
        None => None,
    };
    Ok((loaded, config))
}

/// [`load_with_adapter`] for the shared `--model/--adapter/--device` arguments.
pub fn load_model_args(args: &ModelArgs) -> CliResult<(LoadedModel, Option<PeftConfig>, Device)> {
    let device = args.device.device()?;
    let (loaded, config) = load_with_adapter(&args.model, args.adapter.as_deref(), &device)?;
    Ok((loaded, config, device))
}

/// Writes a report to stdout; a closed pipe (`disha inspect | head`) is not an error.
pub fn print_stdout(text: &str) {
    use std::io::Write;
    let mut stdout = std::io::stdout().lock();
    let _ = stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush());
}

/// The tokenizer a `--tokenizer` value names: `byte-level`, a tokenizer.json, or (unset) the
/// loaded model's own (a GGUF's from the metadata already read).
pub fn tokenizer_arg(
    spec: Option<&str>,
    model: &LoadedModel,
) -> CliResult<disha_models::TextTokenizer> {
    Ok(match spec {
        Some("byte-level") => disha_models::TextTokenizer::byte_level(),
        Some(path) => disha_models::TextTokenizer::from_file(Path::new(path))?,
        None => model.tokenizer()?,
    })
}
