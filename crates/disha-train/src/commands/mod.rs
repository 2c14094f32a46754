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
use disha_models::rwkv::RwkvPeftCheckpoint;
use disha_models::{CausalLm, LoadOptions, LoadedModel, TextTokenizer, load_model_with};
use disha_train::data::{PromptTemplate, Record};
use disha_train::evaluate::ExactMatch;
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

/// Loads `--model` on `device` and, if given, the adapter as [`ADAPTER_NAME`]: a PEFT adapter
/// directory, or (RWKV-7 only) an RWKV-PEFT `.pth` checkpoint, whose replaced base tensors
/// (trained LayerNorms) are applied too. Returns the adapter's PEFT config.
pub fn load_with_adapter(
    model: &Path,
    adapter: Option<&Path>,
    options: &LoadOptions,
    device: &Device,
) -> CliResult<(LoadedModel, Option<PeftConfig>)> {
    let start = Instant::now();
    let mut loaded = load_model_with(model, device, options)?;
    tracing::info!(
        path = %model.display(),
        secs = start.elapsed().as_secs_f64(),
        base_dtype = %loaded.model.base_dtype_name(),
        base_quant = %options.base_quant.map_or("none".to_string(), |q| q.to_string()),
        "model loaded"
    );
    let config = match adapter {
        Some(file) if file.is_file() => {
            let Some(rwkv) = loaded.model.as_rwkv7_mut() else {
                return Err(CliError::Usage(format!(
                    "--adapter {}: a file is read as an RWKV-PEFT checkpoint, which only an \
                     RWKV-7 model takes; {} is a {} model, whose adapters are PEFT directories \
                     (adapter_config.json + adapter_model.safetensors)",
                    file.display(),
                    model.display(),
                    loaded.model.family()
                )));
            };
            let checkpoint = RwkvPeftCheckpoint::read(file)?;
            let applied = rwkv.apply_rwkv_peft(&checkpoint, ADAPTER_NAME)?;
            tracing::info!(
                path = %file.display(),
                method = applied.spec.method_name(),
                r = applied.spec.r,
                layers = applied.layers.len(),
                replaced = applied.replaced.len(),
                "RWKV-PEFT adapter loaded"
            );
            Some(checkpoint.peft_config())
        }
        Some(dir) => Some(loaded.model.load_adapter(dir, ADAPTER_NAME)?),
        None => None,
    };
    Ok((loaded, config))
}

/// [`load_with_adapter`] for the shared `--model/--adapter/--device` arguments.
pub fn load_model_args(args: &ModelArgs) -> CliResult<(LoadedModel, Option<PeftConfig>, Device)> {
    let device = args.device.device()?;
    let (mut loaded, config) = load_with_adapter(
        &args.model,
        args.adapter.as_deref(),
        &args.load_options(),
        &device,
    )?;
    loaded.model = loaded.model.with_compute_dtype(args.compute_dtype)?;
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

/// [`disha_train::evaluate::exact_match_all`] with a progress bar showing the running score.
pub fn exact_match_all(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    records: &[Record],
    template: PromptTemplate,
    max_new_tokens: usize,
    stop: &[u32],
    out: Option<&Path>,
) -> CliResult<Vec<ExactMatch>> {
    let bar = progress_bar(records.len());
    let outcomes = disha_train::evaluate::exact_match_all(
        model,
        tokenizer,
        records,
        template,
        max_new_tokens,
        stop,
        out,
        &mut |correct, done| {
            bar.inc(1);
            bar.set_message(format!("exact match {correct}/{done}"));
        },
    );
    bar.finish_and_clear();
    Ok(outcomes?)
}
