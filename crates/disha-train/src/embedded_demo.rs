//! The embedded default run: what `disha train` does with no `--model`. The demo model and
//! data that `cargo xtask make-demo` wrote under `assets/demo/` are compiled into the binary,
//! so the run needs no file and no download; they are written out under the run's directory
//! (`base-model/`, `data/`) so that every other subcommand can use them afterwards.

use std::path::{Path, PathBuf};

use disha_core::AdapterKind;
use disha_core::write_atomic;
use disha_train::data::PromptTemplate;
use disha_train::settings::TrainSettings;

use crate::error::{CliError, CliResult};

/// `(path under the run directory, contents)` of every embedded file.
const FILES: [(&str, &[u8]); 4] = [
    (
        "base-model/config.json",
        include_bytes!("../../../assets/demo/model/config.json"),
    ),
    (
        "base-model/model.safetensors",
        include_bytes!("../../../assets/demo/model/model.safetensors"),
    ),
    (
        "data/train.jsonl",
        include_bytes!("../../../assets/demo/train.jsonl"),
    ),
    (
        "data/eval.jsonl",
        include_bytes!("../../../assets/demo/eval.jsonl"),
    ),
];

/// Where the demo's files are once written out.
#[derive(Clone, Debug)]
pub struct DemoPaths {
    /// The base model directory.
    pub model: PathBuf,
    /// The fine-tuning problems.
    pub train: PathBuf,
    /// The held-out problems scored by exact match before and after.
    pub eval: PathBuf,
}

impl DemoPaths {
    /// The paths under the run directory `out`.
    pub fn under(out: &Path) -> Self {
        Self {
            model: out.join("base-model"),
            train: out.join("data/train.jsonl"),
            eval: out.join("data/eval.jsonl"),
        }
    }
}

/// Writes the embedded model and data under `out` (each file atomically; existing files are
/// left alone, so a resumed run keeps what it started with).
pub fn write_out(out: &Path) -> CliResult<DemoPaths> {
    for (name, bytes) in FILES {
        let path = out.join(name);
        if !path.exists() {
            if let Some(dir) = path.parent() {
                std::fs::create_dir_all(dir).map_err(|e| CliError::File {
                    path: dir.to_path_buf(),
                    message: e.to_string(),
                })?;
            }
            write_atomic(&path, bytes)?;
        }
    }
    Ok(DemoPaths::under(out))
}

/// The first of `runs/demo`, `runs/demo-2`, `runs/demo-3`, … that does not exist.
pub fn fresh_out_dir() -> PathBuf {
    (1..)
        .map(|i| match i {
            1 => PathBuf::from("runs/demo"),
            i => PathBuf::from(format!("runs/demo-{i}")),
        })
        .find(|p| !p.exists())
        .expect("an unused name exists")
}

/// The demo's settings, below anything given as flags or in `--config`: Bone r16 on all seven
/// projections, taught `a~b` = |a − b| from the raw `12~47=` → `35` problems, exact match on
/// the held-out problems before and after.
pub fn defaults(paths: &DemoPaths) -> TrainSettings {
    TrainSettings {
        data: Some(paths.train.clone()),
        eval_data: Some(paths.eval.clone()),
        eval_max_new_tokens: Some(6),
        template: Some(PromptTemplate::Raw),
        method: Some(AdapterKind::Bone),
        r: Some(16),
        max_steps: Some(DEMO_STEPS),
        batch_size: Some(32),
        lr: Some(DEMO_LR),
        warmup_steps: Some(DEMO_STEPS / 20),
        max_len: Some(32),
        validation: Some(100),
        save_every: Some(100),
        ..TrainSettings::default()
    }
}

/// Optimizer steps of the demo fine-tune.
const DEMO_STEPS: usize = 1200;
/// Peak learning rate of the demo fine-tune (a 0.7 M-parameter model takes far larger steps
/// than the papers' 2e-5 for 7 B models).
const DEMO_LR: f64 = 2e-3;
