//! A whole fine-tuning run — what `disha train` does, as a library call for Burn apps: the
//! data split and encoded, the adapter added (or a run resumed from its newest checkpoint),
//! the learner stepped with `metrics.jsonl` appended and checkpoints written, exact match
//! scored before and after, and the adapter saved and checked by reloading it.
//!
//! ```rust,ignore
//! use disha_train::run::{RunData, RunOptions, run};
//!
//! let data = RunData::read(&settings)?;                      // data errors first, by line
//! let loaded = disha_models::load_model(path, &Device::default().autodiff())?;
//! let tokenizer = loaded.tokenizer()?;
//! let outcome = run(&settings, data, loaded.model, &tokenizer, RunOptions::default(), &mut ())?;
//! println!("validation loss {:?} -> {:?}", outcome.validation_before, outcome.validation_after);
//! ```

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::module::Module;
use burn::tensor::{Int, Tensor, TensorData};
use disha_core::{PeftModelExt, write_atomic};
use disha_models::{CausalLm, TextTokenizer, stop_tokens};

use crate::TrainError;
use crate::checkpoint::{self, ADAPTER_NAME};
use crate::data::{DataLoader, Record, split_validation};
use crate::evaluate::{ExactMatch, exact_match_all, mean_loss};
use crate::learner::{Learner, StepMetrics, mark_trainable};
use crate::settings::RunSettings;
use disha_core::AdapterKind;

/// One JSON object per optimizer step, under the run directory.
pub const METRICS_FILE: &str = "metrics.jsonl";
/// The resolved settings, under the run directory.
pub const RUN_FILE: &str = "run.json";
/// The PEFT adapter directory, under the run directory.
pub const ADAPTER_DIR: &str = "adapter";
/// The RWKV-PEFT checkpoint of a run on an RWKV-7 model (Bone / BAT), under the run directory.
pub const RWKV_PEFT_FILE: &str = "rwkv-peft-adapter.pth";
/// Exact-match outcomes before training, one JSON object per question.
pub const EVAL_BEFORE_FILE: &str = "eval-before.jsonl";
/// Exact-match outcomes after training.
pub const EVAL_AFTER_FILE: &str = "eval-after.jsonl";

/// A run's records, read before the model is loaded so that data errors (named by line)
/// come first.
#[derive(Clone, Debug)]
pub struct RunData {
    /// The training records.
    pub records: Vec<Record>,
    /// Malformed lines skipped (`skip_bad_lines`).
    pub skipped: usize,
    /// The exact-match records (`eval_data`), if any.
    pub eval_records: Option<Vec<Record>>,
}

impl RunData {
    /// Reads `settings.data` and `settings.eval_data`.
    ///
    /// # Errors
    /// The dataset errors of [`RunSettings::read_records`], naming file and line.
    pub fn read(settings: &RunSettings) -> Result<Self, TrainError> {
        let (records, skipped) = settings.read_records(&settings.data)?;
        let eval_records = match &settings.eval_data {
            Some(path) => Some(settings.read_records(path)?.0),
            None => None,
        };
        Ok(Self {
            records,
            skipped,
            eval_records,
        })
    }
}

/// How a run reports progress; every method has a no-op default (`()` observes nothing).
pub trait RunObserver {
    /// A line of human-readable progress: data counts, resuming, evaluation scores.
    fn note(&mut self, _line: &str) {}
    /// Training starts, or resumes, at `step` of `max_steps`.
    fn training(&mut self, _step: usize, _max_steps: usize) {}
    /// An optimizer step finished; its metrics are already in `metrics.jsonl`.
    fn step(&mut self, _metrics: &StepMetrics) {}
    /// The last step of this session finished.
    fn training_done(&mut self) {}
    /// An exact-match evaluation of `total` questions starts (`label`: "before training" or
    /// "after training").
    fn evaluation(&mut self, _label: &str, _total: usize) {}
    /// One more question scored: `correct` of `done` so far.
    fn evaluated(&mut self, _correct: usize, _done: usize) {}
    /// The evaluation finished.
    fn evaluation_done(&mut self) {}
}

impl RunObserver for () {}

/// What a run does that is not a setting (and is not recorded in `run.json`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RunOptions {
    /// Continue the run in `settings.out` from its newest checkpoint.
    pub resume: bool,
    /// Stop (after checkpointing) once this many steps ran in this session.
    pub stop_after_steps: Option<usize>,
}

/// What a finished run did.
#[derive(Debug)]
pub struct RunOutcome {
    /// The trained model, on the inference device (adapter active, unmerged).
    pub model: CausalLm,
    /// Optimizer steps done in all sessions.
    pub steps: usize,
    /// The metrics of this session's steps.
    pub history: Vec<StepMetrics>,
    /// Wall time of this session's steps.
    pub elapsed_secs: f64,
    /// Mean validation loss before training (new runs with a validation split).
    pub validation_before: Option<f64>,
    /// Mean validation loss after training.
    pub validation_after: Option<f64>,
    /// Exact match before training (`eval_data`; read back from the run directory on resume).
    pub exact_match_before: Option<Vec<ExactMatch>>,
    /// Exact match after training.
    pub exact_match_after: Option<Vec<ExactMatch>>,
    /// The PEFT adapter directory written.
    pub adapter_dir: PathBuf,
    /// The RWKV-PEFT checkpoint written (RWKV-7, Bone / BAT), with any trained base tensors.
    pub rwkv_peft: Option<PathBuf>,
    /// Largest logit difference between the trained model and the saved adapter reloaded onto
    /// the base (0 when the files reproduce it).
    pub reload_diff: f32,
    /// The run stopped at `stop_after_steps` before `max_steps`.
    pub stopped_early: bool,
}

/// Runs `settings` on `model` (a base model without adapters, on an autodiff device) with its
/// `tokenizer`: see the [module docs](self). Writes `run.json`, `metrics.jsonl`, checkpoints,
/// the adapter and (with `eval_data`) the exact-match outcomes under `settings.out`.
///
/// # Errors
/// Tokenizer ids that do not fit the model, encoding errors, a checkpoint that does not belong
/// to the run, a non-finite loss or gradient, I/O errors (each naming its file), or saved
/// adapter files that do not reproduce the trained model.
pub fn run(
    settings: &RunSettings,
    data: RunData,
    model: CausalLm,
    tokenizer: &TextTokenizer,
    options: RunOptions,
    observer: &mut dyn RunObserver,
) -> Result<RunOutcome, TrainError> {
    let metrics_path = settings.out.join(METRICS_FILE);
    // Mixed precision: activations in the compute dtype, adapters and their state in f32.
    let model = model.with_compute_dtype(settings.compute_dtype)?;
    // Every id the tokenizer can produce must index the model's embedding: checked once here,
    // before any example is encoded (and again per batch by the learner).
    tokenizer.check_fits(model.vocab_size())?;
    let pad = tokenizer
        .token_to_id("<|pad|>")
        .or(tokenizer.eos_id())
        .unwrap_or(0);
    let (examples, dropped) = settings.encode(&data.records, tokenizer)?;
    let (train, validation) = split_validation(examples, settings.validation, settings.seed);
    observer.note(&format!(
        "data: {} examples for training, {} for validation ({} malformed lines skipped, {} prompts too long)",
        train.len(),
        validation.len(),
        data.skipped,
        dropped
    ));
    let mut loader = DataLoader::new(train, settings.batch_size, settings.seed, pad);
    if settings.packing {
        loader = loader.with_packing(settings.max_len);
    }

    // Adapter and learner: fresh, or from the newest checkpoint.
    let stop = stop_tokens(&model, tokenizer);
    let base = model.valid();
    let mut model = model;
    model.device().seed(settings.seed);
    let peft = settings.peft_config(model.family());
    let mut validation_before = None;
    let eval = |model: &CausalLm,
                file: &str,
                label: &str,
                observer: &mut dyn RunObserver|
     -> Result<Option<Vec<ExactMatch>>, TrainError> {
        let Some(records) = &data.eval_records else {
            return Ok(None);
        };
        observer.evaluation(label, records.len());
        let outcomes = exact_match_all(
            model,
            tokenizer,
            records,
            settings.prompt_template(),
            settings.eval_max_new_tokens,
            &stop,
            Some(&settings.out.join(file)),
            &mut |correct, done| observer.evaluated(correct, done),
        );
        observer.evaluation_done();
        let outcomes = outcomes?;
        let correct = outcomes.iter().filter(|o| o.correct).count();
        observer.note(&format!(
            "exact match {label}: {correct}/{}",
            outcomes.len()
        ));
        Ok(Some(outcomes))
    };
    let (mut learner, exact_match_before) = if options.resume {
        let (learner, ckpt) = checkpoint::resume(&settings.out, settings, model, &mut loader)?;
        truncate_metrics(&metrics_path, ckpt.state.step)?;
        observer.note(&format!(
            "resuming from {} (step {})",
            ckpt.dir.display(),
            ckpt.state.step
        ));
        // A resumed run scored its base model in its first session.
        let before = read_outcomes(&settings.out.join(EVAL_BEFORE_FILE));
        (learner, before)
    } else {
        model.add_adapter(ADAPTER_NAME, &peft)?;
        let model = mark_trainable(model, &settings.train_parts)?;
        if !validation.is_empty() {
            validation_before = Some(mean_loss(
                &model.valid(),
                &validation,
                settings.batch_size,
                pad,
            )?);
        }
        std::fs::create_dir_all(&settings.out).map_err(|e| TrainError::io(&settings.out, e))?;
        let before = eval(&base, EVAL_BEFORE_FILE, "before training", observer)?;
        let run_json = serde_json::to_string_pretty(settings).expect("settings serialize");
        write_atomic(&settings.out.join(RUN_FILE), run_json.as_bytes())?;
        (Learner::new(model, settings.learner.clone())?, before)
    };
    observer.note(&learner.model().parameter_count().to_string());

    // Train.
    let steps = settings.learner.max_steps;
    observer.training(learner.step(), steps);
    let mut metrics_file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&metrics_path)
        .map_err(|e| TrainError::io(&metrics_path, e))?;
    let start = Instant::now();
    let mut history: Vec<StepMetrics> = Vec::new();
    let mut stopped_early = false;
    while learner.step() < steps {
        let metrics = learner.train_step(&mut loader)?;
        let line = serde_json::to_string(&metrics).expect("metrics serialize");
        writeln!(metrics_file, "{line}")
            .and_then(|()| metrics_file.flush())
            .map_err(|e| TrainError::io(&metrics_path, e))?;
        observer.step(&metrics);
        history.push(metrics);
        let step = learner.step();
        stopped_early = options.stop_after_steps == Some(history.len()) && step < steps;
        if step == steps
            || stopped_early
            || (settings.save_every > 0 && step.is_multiple_of(settings.save_every))
        {
            checkpoint::save(
                &settings.out,
                &learner,
                &peft,
                loader.position(),
                settings.keep_checkpoints,
            )?;
        }
        if stopped_early {
            observer.note(&format!(
                "stopping after {} steps as asked; continue with --resume",
                history.len()
            ));
            break;
        }
    }
    observer.training_done();
    let elapsed_secs = start.elapsed().as_secs_f64();
    let steps_done = learner.step();
    let model = learner.into_model();

    // Save the adapter (each file atomically) and check that it reproduces the run.
    let adapter_dir = settings.out.join(ADAPTER_DIR);
    model.save_adapter(ADAPTER_NAME, &peft, &adapter_dir)?;
    // On RWKV-7, Bone and BAT also go out as an RWKV-PEFT checkpoint (RWKV-PEFT's tools merge it).
    let rwkv_peft = match model.as_rwkv7() {
        Some(rwkv) if matches!(settings.method, AdapterKind::Bone | AdapterKind::Bat) => {
            let path = settings.out.join(RWKV_PEFT_FILE);
            rwkv.save_rwkv_peft(ADAPTER_NAME, &path)?;
            Some(path)
        }
        _ => None,
    };
    let trained = model.valid();
    // The RWKV-PEFT checkpoint holds everything trained (adapter and base tensors); the PEFT
    // directory only the adapter, so it is checked when nothing else was trained.
    let reload_diff = match &rwkv_peft {
        Some(path) => check_reload(&base, &trained, path, &loader)?,
        None => check_reload(&base, &trained, &adapter_dir, &loader)?,
    };
    if rwkv_peft.is_some() && settings.train_parts.is_empty() {
        check_reload(&base, &trained, &adapter_dir, &loader)?;
    }
    let validation_after = if validation.is_empty() {
        None
    } else {
        Some(mean_loss(&trained, &validation, settings.batch_size, pad)?)
    };
    let exact_match_after = eval(&trained, EVAL_AFTER_FILE, "after training", observer)?;
    Ok(RunOutcome {
        model: trained,
        steps: steps_done,
        history,
        elapsed_secs,
        validation_before,
        validation_after,
        exact_match_before,
        exact_match_after,
        adapter_dir,
        rwkv_peft,
        reload_diff,
        stopped_early,
    })
}

/// Loads the saved adapter (a PEFT directory, or an RWKV-PEFT checkpoint file) onto a fresh
/// copy of the base model and compares its logits with the trained model's on one training
/// batch: the files written must reproduce the run.
fn check_reload(
    base: &CausalLm,
    trained: &CausalLm,
    path: &Path,
    data: &DataLoader,
) -> Result<f32, TrainError> {
    let mut reloaded = base.clone();
    match reloaded.as_rwkv7_mut() {
        Some(rwkv) if path.is_file() => {
            rwkv.load_rwkv_peft(path, ADAPTER_NAME)?;
        }
        _ => {
            reloaded.load_adapter(path, ADAPTER_NAME)?;
        }
    }
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
        return Err(TrainError::File {
            path: path.to_path_buf(),
            message: format!(
                "the adapter written here does not reproduce the trained model (logits differ \
                 by {diff:e})"
            ),
        });
    }
    Ok(diff)
}

/// Keeps the metrics lines of steps `<= step` (a resumed run replays the steps after its
/// checkpoint), rewriting the file atomically.
fn truncate_metrics(path: &Path, step: usize) -> Result<(), TrainError> {
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

/// Exact-match outcomes saved by an earlier session (`None` when absent or unreadable).
fn read_outcomes(path: &Path) -> Option<Vec<ExactMatch>> {
    let text = disha_core::limits::read_text_file(path).ok()?;
    text.lines()
        .map(|line| serde_json::from_str(line).ok())
        .collect()
}
