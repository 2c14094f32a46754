//! The subcommands, one file each.

mod eval;
mod export_adapter;
mod generate;
mod inspect;
mod logits;
mod merge;
mod plot;
mod train;

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use disha_core::{PeftConfig, PeftModelExt};
use disha_models::{CausalLm, LoadedModel, TextTokenizer, load_model};
use disha_train::data::{PromptTemplate, Record};
use disha_train::evaluate::{ExactMatch, exact_match};
use indicatif::{ProgressBar, ProgressStyle};

use crate::cli::{Cli, Command, ModelArgs};
use crate::error::{CliError, CliResult};

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
        Command::Plot(args) => plot::run(args),
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

/// A progress bar over `len` items with elapsed time and ETA.
pub fn progress_bar(len: usize) -> ProgressBar {
    let bar = ProgressBar::new(len as u64);
    bar.set_style(
        ProgressStyle::with_template(
            "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
        )
        .expect("valid template"),
    );
    bar
}

/// [`exact_match`] on every record, with a progress bar showing the running score; each
/// outcome is appended to `out` (one JSON object per line) as soon as it is known, so an
/// interrupted evaluation keeps what it did.
pub fn exact_match_all(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    records: &[Record],
    template: PromptTemplate,
    max_new_tokens: usize,
    stop: &[u32],
    out: Option<&Path>,
) -> CliResult<Vec<ExactMatch>> {
    use std::io::Write;
    let file_error = |path: &Path, e: std::io::Error| CliError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    };
    let mut file = match out {
        Some(path) => Some((
            std::fs::File::create(path).map_err(|e| file_error(path, e))?,
            path,
        )),
        None => None,
    };
    let bar = progress_bar(records.len());
    let mut outcomes = Vec::with_capacity(records.len());
    let mut correct = 0;
    for record in records {
        let outcome = exact_match(model, tokenizer, record, template, max_new_tokens, stop)?;
        correct += usize::from(outcome.correct);
        if let Some((file, path)) = file.as_mut() {
            let line = serde_json::to_string(&outcome).expect("outcomes serialize");
            writeln!(file, "{line}").map_err(|e| file_error(path, e))?;
        }
        outcomes.push(outcome);
        bar.inc(1);
        bar.set_message(format!("exact match {correct}/{}", outcomes.len()));
    }
    bar.finish_and_clear();
    Ok(outcomes)
}
