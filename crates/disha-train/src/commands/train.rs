//! `disha train`: fine-tune an adapter on a JSONL dataset.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use disha_core::{PeftModelExt, freeze_all_but_active_adapters, write_atomic};
use disha_models::{CausalLm, stop_tokens};
use disha_train::checkpoint::{self, ADAPTER_NAME};
use disha_train::data::{DataLoader, split_validation};
use disha_train::evaluate::{ExactMatch, mean_loss};
use disha_train::learner::{Learner, StepMetrics};
use disha_train::plot::{Series, loss_chart};
use disha_train::settings::{RunSettings, TrainSettings};

use super::{exact_match_all, load_with_adapter, progress_bar, tokenizer_arg};
use crate::cli::TrainArgs;
use crate::embedded_demo;
use crate::error::{CliError, CliResult};

/// Loads the saved adapter onto a fresh copy of the base model and compares its logits with
/// the trained model's on one training batch: the directory written must reproduce the run.
fn check_reload(
    base: &CausalLm,
    trained: &CausalLm,
    dir: &std::path::Path,
    data: &DataLoader,
) -> CliResult<f32> {
    let mut reloaded = base.clone();
    reloaded.load_adapter(dir, ADAPTER_NAME)?;
    let batch = data.clone().next_batch();
    let device = trained.device();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(batch.input_ids, batch.shape), &device);
    let host = |m: &CausalLm| {
        m.forward(ids.clone())
            .into_data()
            .try_to_vec_as::<f32>()
            .expect("float logits")
    };
    let (a, b) = (host(trained), host(&reloaded));
    let diff = a
        .iter()
        .zip(&b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0f32, f32::max);
    if diff.is_nan() || diff > 1e-5 {
        return Err(CliError::Usage(format!(
            "the adapter written to {} does not reproduce the trained model (logits differ by {diff:e})",
            dir.display()
        )));
    }
    Ok(diff)
}

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

/// Keeps the metrics lines of steps `<= step` (a resumed run replays the steps after its
/// checkpoint), rewriting the file atomically.
fn truncate_metrics(path: &std::path::Path, step: usize) -> CliResult {
    if !path.exists() {
        return Ok(());
    }
    let text = disha_core::limits::read_text_file(path)?;
    let kept: String = text
        .lines()
        .filter(|line| {
            serde_json::from_str::<serde_json::Value>(line)
                .ok()
                .and_then(|v| v["step"].as_u64())
                .is_some_and(|s| s as usize <= step)
        })
        .map(|line| format!("{line}\n"))
        .collect();
    write_atomic(path, kept.as_bytes())?;
    Ok(())
}

pub fn run(args: TrainArgs) -> CliResult {
    let RunInputs {
        settings,
        model: model_path,
        tokenizer: tokenizer_spec,
        mut guard,
    } = inputs_for(&args)?;
    let metrics_path = settings.out.join("metrics.jsonl");
    // Data errors (named by line) come before the model is loaded.
    let (records, skipped) = settings.read_records(&settings.data)?;
    let eval_records = match &settings.eval_data {
        Some(path) => Some(settings.read_records(path)?.0),
        None => None,
    };
    let mut device = args.device.device()?.autodiff();
    if settings.gradient_checkpointing {
        device = device.gradient_checkpointing();
    }
    let (loaded, _) = load_with_adapter(&model_path, None, &device)?;
    let tokenizer = tokenizer_arg(tokenizer_spec.as_deref(), &loaded)?;
    // Every id the tokenizer can produce must index the model's embedding: checked once here,
    // before any example is encoded (and again per batch by the learner).
    tokenizer.check_fits(loaded.model.vocab_size())?;
    let pad = tokenizer
        .token_to_id("<|pad|>")
        .or(tokenizer.eos_id())
        .unwrap_or(0);
    let (examples, dropped) = settings.encode(&records, &tokenizer)?;
    let (train, validation) = split_validation(examples, settings.validation, settings.seed);
    eprintln!(
        "data: {} examples for training, {} for validation ({} malformed lines skipped, {} prompts too long)",
        train.len(),
        validation.len(),
        skipped,
        dropped
    );
    let mut data = DataLoader::new(train, settings.batch_size, settings.seed, pad);
    if settings.packing {
        data = data.with_packing(settings.max_len);
    }

    // Adapter and learner: fresh, or from the newest checkpoint.
    let stop = stop_tokens(&loaded.model, &tokenizer);
    let base = loaded.model.valid();
    let mut model = loaded.model;
    device.seed(settings.seed);
    let peft = settings.peft_config();
    let mut val_before = None;
    let mut learner = if args.resume {
        let (learner, ckpt) = checkpoint::resume(&settings.out, &settings, model, &mut data)?;
        truncate_metrics(&metrics_path, ckpt.state.step)?;
        eprintln!(
            "resuming from {} (step {})",
            ckpt.dir.display(),
            ckpt.state.step
        );
        learner
    } else {
        model.add_adapter(ADAPTER_NAME, &peft)?;
        let model = freeze_all_but_active_adapters(model);
        val_before = if validation.is_empty() {
            None
        } else {
            Some(mean_loss(
                &model.valid(),
                &validation,
                settings.batch_size,
                pad,
            )?)
        };
        std::fs::create_dir_all(&settings.out).map_err(|e| file_error(&settings.out, e))?;
        if let Some(records) = &eval_records {
            eprintln!("exact match before training ({} questions):", records.len());
            let before = exact_match_all(
                &base,
                &tokenizer,
                records,
                settings.prompt_template(),
                settings.eval_max_new_tokens,
                &stop,
                Some(&settings.out.join(EVAL_BEFORE)),
            )?;
            eprintln!("  {}", score(&before));
        }
        let run_json = serde_json::to_string_pretty(&settings).expect("settings serialize");
        write_atomic(&settings.out.join("run.json"), run_json.as_bytes())?;
        Learner::new(model, settings.learner.clone())?
    };
    eprintln!("{}", learner.model().parameter_count());

    // Train.
    let steps = settings.learner.max_steps;
    let bar = progress_bar(steps);
    bar.set_position(learner.step() as u64);
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| file_error(&metrics_path, e))?;
    let start = Instant::now();
    let mut history: Vec<StepMetrics> = Vec::new();
    while learner.step() < steps {
        let metrics = learner.train_step(&mut data)?;
        let line = serde_json::to_string(&metrics).expect("metrics serialize");
        writeln!(metrics_file, "{line}")
            .and_then(|()| metrics_file.flush())
            .map_err(|e| file_error(&metrics_path, e))?;
        bar.set_message(format!(
            "loss {:.4} lr {:.2e} |g| {:.3} {:.0} tok/s",
            metrics.loss, metrics.lr, metrics.grad_norm, metrics.tokens_per_sec
        ));
        bar.inc(1);
        history.push(metrics);
        // From the first completed step on, the directory records a run (see RunDirGuard).
        if let Some(guard) = guard.as_mut() {
            guard.disarm();
        }
        let step = learner.step();
        let stopping = args.stop_after_steps == Some(history.len());
        if step == steps
            || stopping
            || (settings.save_every > 0 && step.is_multiple_of(settings.save_every))
        {
            checkpoint::save(
                &settings.out,
                &learner,
                &peft,
                data.position(),
                settings.keep_checkpoints,
            )?;
        }
        if stopping {
            eprintln!(
                "stopping after {} steps as asked; continue with --resume",
                history.len()
            );
            break;
        }
    }
    bar.finish();
    let elapsed = start.elapsed().as_secs_f64();
    let model = learner.into_model();

    // Save the adapter (each file atomically) and summarize.
    let adapter_dir = settings.out.join("adapter");
    model.save_adapter(ADAPTER_NAME, &peft, &adapter_dir)?;
    let trained = model.valid();
    let reload_diff = check_reload(&base, &trained, &adapter_dir, &data)?;
    let val_loss = if validation.is_empty() {
        None
    } else {
        Some(mean_loss(&trained, &validation, settings.batch_size, pad)?)
    };
    let eval_after = match &eval_records {
        Some(records) => {
            eprintln!("exact match after training ({} questions):", records.len());
            Some(exact_match_all(
                &trained,
                &tokenizer,
                records,
                settings.prompt_template(),
                settings.eval_max_new_tokens,
                &stop,
                Some(&settings.out.join(EVAL_AFTER)),
            )?)
        }
        None => None,
    };
    let mean = |m: &[StepMetrics]| m.iter().map(|x| x.loss).sum::<f64>() / m.len().max(1) as f64;
    let k = history.len().clamp(1, 5);
    let tokens: usize = history.iter().map(|m| m.tokens).sum();
    println!(
        "steps               {} (this session: {})",
        steps,
        history.len()
    );
    if !history.is_empty() {
        println!("loss (first {k} steps) {:.4}", mean(&history[..k]));
        println!(
            "loss (last {k} steps)  {:.4}",
            mean(&history[history.len() - k..])
        );
    }
    match (val_before, val_loss) {
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
    if let Some(after) = &eval_after {
        let before = read_outcomes(&settings.out.join(EVAL_BEFORE));
        println!(
            "exact match         {} -> {}",
            before.as_deref().map_or_else(|| "?".to_string(), score),
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
        "time                {elapsed:.1} s, {:.0} tokens/s",
        tokens as f64 / elapsed.max(1e-9)
    );
    if let Some(mb) = history.last().and_then(|m| m.peak_memory_mb) {
        println!("peak memory         {mb:.0} MB");
    }
    println!(
        "adapter             {} (reloaded: logits max |diff| {reload_diff:e})",
        adapter_dir.display()
    );
    println!("metrics             {}", metrics_path.display());
    match write_loss_chart(&settings) {
        Ok(chart) => println!("loss curve          {}", chart.display()),
        // The run itself succeeded; a chart that cannot be drawn is only a warning.
        Err(e) => eprintln!("warning: no loss chart: {e}"),
    }
    Ok(())
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

/// Exact-match outcomes before / after training, under the run directory.
const EVAL_BEFORE: &str = "eval-before.jsonl";
const EVAL_AFTER: &str = "eval-after.jsonl";

/// `correct/total = percent`.
fn score(outcomes: &[ExactMatch]) -> String {
    let correct = outcomes.iter().filter(|o| o.correct).count();
    format!(
        "{correct}/{} = {:.1}%",
        outcomes.len(),
        100.0 * correct as f64 / outcomes.len().max(1) as f64
    )
}

/// The outcomes an earlier session wrote (a resumed run scored its base model then).
fn read_outcomes(path: &Path) -> Option<Vec<ExactMatch>> {
    let text = std::fs::read_to_string(path).ok()?;
    text.lines()
        .map(|line| serde_json::from_str(line).ok())
        .collect()
}

fn file_error(path: &std::path::Path, e: std::io::Error) -> CliError {
    CliError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    }
}
