//! `disha train`: fine-tune an adapter on a JSONL dataset.

use std::path::{Path, PathBuf};

use disha_train::checkpoint;
use disha_train::evaluate::ExactMatch;
use disha_train::learner::StepMetrics;
use disha_train::plot::{Series, loss_chart};
use disha_train::run::{METRICS_FILE, RunData, RunObserver, RunOptions, RunOutcome};
use disha_train::settings::{RunSettings, TrainSettings};
use indicatif::ProgressBar;

use super::{load_with_adapter, progress_bar, tokenizer_arg};
use crate::cli::TrainArgs;
use crate::embedded_demo;
use crate::error::{CliError, CliResult};

/// What a run trains: its settings, the base model and the tokenizer spec; for a new run, the
/// guard that removes what the run created if it fails before its first step.
struct RunInputs {
    settings: RunSettings,
    model: PathBuf,
    tokenizer: Option<String>,
    guard: Option<RunDirGuard>,
}

/// Removes what a new run created in its directory — the directory itself when the run created
/// it, else only the entries that were not there before — unless [`Self::disarm`]ed. Armed
/// until the first step completes, so a run that fails (or panics) before that leaves nothing
/// half-written behind; after it, the directory holds the metrics of what ran, and
/// `--resume` continues from its newest checkpoint (or says why there is none).
struct RunDirGuard {
    dir: PathBuf,
    /// The entries of `dir` before the run, `None` when it did not exist.
    before: Option<std::collections::BTreeSet<std::ffi::OsString>>,
    armed: bool,
}

impl RunDirGuard {
    fn new(dir: &Path) -> Self {
        // Anything already at `dir` (even a file) is never removed: only what the run adds.
        let before = dir.exists().then(|| {
            std::fs::read_dir(dir)
                .map(|entries| entries.flatten().map(|e| e.file_name()).collect())
                .unwrap_or_default()
        });
        Self {
            dir: dir.to_path_buf(),
            before,
            armed: true,
        }
    }

    fn disarm(&mut self) {
        self.armed = false;
    }
}

impl Drop for RunDirGuard {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        // Best effort: an error here must not hide the one that stopped the run.
        match &self.before {
            None => {
                let _ = std::fs::remove_dir_all(&self.dir);
            }
            Some(before) => {
                for entry in std::fs::read_dir(&self.dir).into_iter().flatten().flatten() {
                    if !before.contains(&entry.file_name()) {
                        let path = entry.path();
                        let _ = if path.is_dir() {
                            std::fs::remove_dir_all(&path)
                        } else {
                            std::fs::remove_file(&path)
                        };
                    }
                }
            }
        }
    }
}

/// The inputs of a new run (flags over `--config` over defaults — the embedded demo's when no
/// `--model` is given), or of the run being resumed (its `run.json`).
fn inputs_for(args: &TrainArgs) -> CliResult<RunInputs> {
    let demo = args.model.is_none();
    // The demo's model is byte-level; an explicit --tokenizer still wins.
    let tokenizer = args
        .tokenizer
        .clone()
        .or_else(|| demo.then(|| "byte-level".to_string()));
    if args.resume {
        let out = args
            .settings
            .out
            .as_ref()
            .expect("clap requires --out with --resume");
        let mut settings = RunSettings::read(&out.join("run.json"))?;
        settings.out = out.clone();
        let model = match &args.model {
            Some(model) => model.clone(),
            None => {
                let demo_model = embedded_demo::DemoPaths::under(out).model;
                if !demo_model.is_dir() {
                    return Err(CliError::Usage(format!(
                        "--resume: {} is not an embedded-demo run; pass the --model it was \
                         started with",
                        out.display()
                    )));
                }
                demo_model
            }
        };
        return Ok(RunInputs {
            settings,
            model,
            tokenizer,
            guard: None,
        });
    }
    let file = match &args.config {
        Some(path) => TrainSettings::from_file(path)?,
        None => TrainSettings::default(),
    };
    let mut merged = args.settings.clone().or(file);
    let mut guard = None;
    let model = match &args.model {
        Some(model) => model.clone(),
        None => {
            if let Some(data) = &merged.data {
                return Err(CliError::Usage(format!(
                    "--data {} needs --model (with neither, disha train runs the embedded demo)",
                    data.display()
                )));
            }
            let out = merged
                .out
                .clone()
                .unwrap_or_else(embedded_demo::fresh_out_dir);
            refuse_earlier_run(&out)?;
            guard = Some(RunDirGuard::new(&out));
            let paths = embedded_demo::write_out(&out)?;
            merged = merged.or(embedded_demo::defaults(&paths));
            merged.out = Some(out);
            eprintln!(
                "no --model: the embedded demo. A 0.7 M-parameter byte-level Llama pre-trained on \
                 a+b and a-b learns the new operation a~b = |a-b| with a Bone adapter; \
                 its model and data are written under {}",
                paths.model.parent().unwrap_or(Path::new(".")).display()
            );
            paths.model
        }
    };
    let settings = merged.resolve()?;
    if guard.is_none() {
        refuse_earlier_run(&settings.out)?;
        guard = Some(RunDirGuard::new(&settings.out));
    }
    Ok(RunInputs {
        settings,
        model,
        tokenizer,
        guard,
    })
}

/// A directory with a `run.json` or `metrics.jsonl` holds an earlier run: only `--resume` may
/// continue it, and only from a checkpoint.
fn refuse_earlier_run(out: &Path) -> CliResult {
    let marker = ["run.json", "metrics.jsonl"]
        .map(|name| out.join(name))
        .into_iter()
        .find(|p| p.exists());
    if let Some(marker) = marker {
        let next = if checkpoint::list(out).is_empty() {
            "it stopped before its first checkpoint, so there is nothing to resume; delete it or \
             choose a new --out"
        } else {
            "continue it with --resume or choose a new --out"
        };
        return Err(CliError::Usage(format!(
            "{} exists: {} holds an earlier run; {next}",
            marker.display(),
            out.display()
        )));
    }
    Ok(())
}

/// The CLI's view of a run: a progress bar over the steps (and over each exact-match
/// evaluation), notes on stderr, and the run-directory guard disarmed at the first step.
struct Progress {
    bar: Option<ProgressBar>,
    guard: Option<RunDirGuard>,
}

impl RunObserver for Progress {
    fn note(&mut self, line: &str) {
        eprintln!("{line}");
    }

    fn training(&mut self, step: usize, max_steps: usize) {
        let bar = progress_bar(max_steps);
        bar.set_position(step as u64);
        self.bar = Some(bar);
    }

    fn step(&mut self, metrics: &StepMetrics) {
        if let Some(bar) = &self.bar {
            bar.set_message(format!(
                "loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s",
                metrics.loss, metrics.lr, metrics.grad_norm, metrics.tokens_per_sec
            ));
            bar.inc(1);
        }
        // From the first completed step on, the directory records a run (see RunDirGuard).
        if let Some(guard) = self.guard.as_mut() {
            guard.disarm();
        }
    }

    fn training_done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish();
        }
    }

    fn evaluation(&mut self, label: &str, total: usize) {
        eprintln!("exact match {label} ({total} questions):");
        self.bar = Some(progress_bar(total));
    }

    fn evaluated(&mut self, correct: usize, done: usize) {
        if let Some(bar) = &self.bar {
            bar.inc(1);
            bar.set_message(format!("exact match {correct}/{done}"));
        }
    }

    fn evaluation_done(&mut self) {
        if let Some(bar) = self.bar.take() {
            bar.finish_and_clear();
        }
    }
}

pub fn run(args: TrainArgs) -> CliResult {
    let RunInputs {
        settings,
        model: model_path,
        tokenizer: tokenizer_spec,
        guard,
    } = inputs_for(&args)?;
    // Data errors (named by line) come before the model is loaded.
    let data = RunData::read(&settings)?;
    let mut device = args.device.device()?.autodiff();
    if settings.gradient_checkpointing {
        device = device.gradient_checkpointing();
    }
    let (loaded, _) = load_with_adapter(&model_path, None, &settings.load_options(), &device)?;
    let tokenizer = tokenizer_arg(tokenizer_spec.as_deref(), &loaded)?;
    let options = RunOptions {
        resume: args.resume,
        stop_after_steps: args.stop_after_steps,
    };
    let mut progress = Progress { bar: None, guard };
    let outcome = disha_train::run::run(
        &settings,
        data,
        loaded.model,
        &tokenizer,
        options,
        &mut progress,
    )?;
    print_summary(&settings, &outcome);
    match write_loss_chart(&settings) {
        Ok(chart) => println!("loss curve          {}", chart.display()),
        // The run itself succeeded; a chart that cannot be drawn is only a warning.
        Err(e) => eprintln!("warning: no loss chart: {e}"),
    }
    Ok(())
}

/// The end-of-run report on stdout.
fn print_summary(settings: &RunSettings, outcome: &RunOutcome) {
    let history = &outcome.history;
    let mean = |m: &[StepMetrics]| m.iter().map(|x| x.loss).sum::<f64>() / m.len().max(1) as f64;
    let k = history.len().clamp(1, 5);
    let tokens: usize = history.iter().map(|m| m.tokens).sum();
    println!(
        "steps               {} (this session: {})",
        outcome.steps,
        history.len()
    );
    if !history.is_empty() {
        println!("loss (first {k} steps) {:.4}", mean(&history[..k]));
        println!(
            "loss (last {k} steps)  {:.4}",
            mean(&history[history.len() - k..])
        );
    }
    match (outcome.validation_before, outcome.validation_after) {
        (Some(before), Some(after)) => println!(
            "validation loss     {before:.4} -> {after:.4} (perplexity {:.2} -> {:.2})",
            before.exp(),
            after.exp()
        ),
        (None, Some(after)) => println!(
            "validation loss     {after:.4} (perplexity {:.2})",
            after.exp()
        ),
        _ => {}
    }
    if let Some(after) = &outcome.exact_match_after {
        println!(
            "exact match         {} -> {}",
            outcome
                .exact_match_before
                .as_deref()
                .map_or_else(|| "?".to_string(), score),
            score(after)
        );
        for o in after.iter().take(5) {
            println!(
                "  {:<24} {:<12} {}",
                o.prompt.trim(),
                o.generated.trim(),
                if o.correct {
                    "correct".to_string()
                } else {
                    format!("expected {}", o.reference.as_deref().unwrap_or("?"))
                }
            );
        }
    }
    println!(
        "time                {:.1} s, {:.0} tokens/s",
        outcome.elapsed_secs,
        tokens as f64 / outcome.elapsed_secs.max(1e-9)
    );
    if let Some(mb) = history.last().and_then(|m| m.peak_memory_mb) {
        println!("peak memory         {mb:.0} MB");
    }
    if let Some(mb) = history.last().and_then(|m| m.device_memory_mb) {
        println!("device memory pool  {mb:.0} MB reserved");
    }
    println!(
        "adapter             {} (reloaded: logits max |diff| {:e})",
        outcome.adapter_dir.display(),
        outcome.reload_diff
    );
    if let Some(path) = &outcome.rwkv_peft {
        println!("RWKV-PEFT checkpoint {}", path.display());
        if !settings.train_parts.is_empty() {
            println!(
                "                    (with the trained base tensors; {} holds the adapter only)",
                outcome.adapter_dir.display()
            );
        }
    }
    println!(
        "metrics             {}",
        settings.out.join(METRICS_FILE).display()
    );
}

/// `OUT/loss.png`: every step's loss in `metrics.jsonl` (all sessions of a resumed run) and
/// its running mean. Returns the chart's path.
fn write_loss_chart(settings: &RunSettings) -> CliResult<PathBuf> {
    let losses = super::plot::read_losses(&settings.out)?;
    let window = (losses.len() / 20).max(1);
    let title = format!(
        "{} r{} on {}",
        settings.method.name(),
        settings.r,
        settings
            .data
            .file_name()
            .unwrap_or_default()
            .to_string_lossy()
    );
    let chart = settings.out.join("loss.png");
    loss_chart(
        &chart,
        &title,
        &[
            Series::smoothed("loss", &losses, 1),
            Series::smoothed(format!("mean of {window} steps"), &losses, window),
        ],
    )?;
    Ok(chart)
}

/// `correct/total = percent`.
fn score(outcomes: &[ExactMatch]) -> String {
    let correct = outcomes.iter().filter(|o| o.correct).count();
    format!(
        "{correct}/{} = {:.1}%",
        outcomes.len(),
        100.0 * correct as f64 / outcomes.len().max(1) as f64
    )
}
