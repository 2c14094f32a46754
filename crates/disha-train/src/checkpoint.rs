//! Training checkpoints: `OUT/checkpoints/step-NNNNNN/` with the adapter (a PEFT directory),
//! the optimizer state, `state.json` (step, data position, trainable-parameter ids) and, when
//! base tensors are trained too (`--train-parts`), `base-tensors.pth` with their values.
//!
//! A checkpoint is assembled in a temporary directory beside the others and renamed into place,
//! so a crash (even `kill -9`) leaves either the previous checkpoints or a complete new one;
//! temporary leftovers are ignored and cleaned. Only the newest `keep` checkpoints are kept.

use std::path::{Path, PathBuf};

use disha_core::{PeftConfig, PeftModelExt, write_atomic};
use disha_models::{CausalLm, PthWeights, write_pth};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::data::{DataLoader, DataPosition};
use crate::learner::{Learner, mark_trainable, trainable_param_ids};
use crate::loss_scale::LossScaler;
use crate::settings::RunSettings;

/// The adapter name training uses.
pub const ADAPTER_NAME: &str = "default";
const PREFIX: &str = "step-";
const TEMP_PREFIX: &str = ".tmp-checkpoint-";

/// What besides tensors a run needs to continue exactly.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Where the data loader is.
    pub position: DataPosition,
    /// Ids of the trainable parameters (the optimizer state is keyed by them).
    pub param_ids: Vec<u64>,
    /// The dynamic loss scale of a run computing in f16 (absent otherwise).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub loss_scaler: Option<LossScaler>,
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Step, data position, parameter ids.
    pub state: CheckpointState,
}

impl Checkpoint {
    /// The PEFT adapter directory inside the checkpoint.
    pub fn adapter_dir(&self) -> PathBuf {
        self.dir.join("adapter")
    }

    /// The optimizer state file (read and checked by [`Learner::resume`]).
    pub fn optimizer_path(&self) -> PathBuf {
        self.dir.join(OPTIMIZER_FILE)
    }
}

/// The optimizer state inside a checkpoint (Burn's burnpack format).
const OPTIMIZER_FILE: &str = "optimizer.bpk";

/// Base tensors trained with the adapter (`--train-parts`), by checkpoint name, when there are.
const BASE_TENSORS_FILE: &str = "base-tensors.pth";

fn checkpoints_root(out: &Path) -> PathBuf {
    out.join("checkpoints")
}

/// Writes a checkpoint of `learner` after its current step and prunes all but the newest
/// `keep`. Returns the checkpoint directory.
///
/// # Errors
/// I/O (naming the path) or serialization failures; earlier checkpoints are untouched.
pub fn save(
    out: &Path,
    learner: &Learner,
    peft: &PeftConfig,
    position: DataPosition,
    keep: usize,
) -> Result<PathBuf, TrainError> {
    let root = checkpoints_root(out);
    std::fs::create_dir_all(&root).map_err(|e| TrainError::io(&root, e))?;
    let staging = tempfile::Builder::new()
        .prefix(TEMP_PREFIX)
        .tempdir_in(&root)
        .map_err(|e| TrainError::io(&root, e))?;
    let model = learner.model();
    model.save_adapter(ADAPTER_NAME, peft, &staging.path().join("adapter"))?;
    let base = model.trainable_base_tensors();
    if !base.is_empty() {
        write_pth(&staging.path().join(BASE_TENSORS_FILE), &base)?;
    }
    write_atomic(
        &staging.path().join(OPTIMIZER_FILE),
        &learner.optimizer_state()?,
    )?;
    let state = CheckpointState {
        step: learner.step(),
        position,
        param_ids: trainable_param_ids(model),
        loss_scaler: learner.loss_scaler(),
    };
    let json = serde_json::to_string_pretty(&state).expect("state serializes");
    write_atomic(&staging.path().join("state.json"), json.as_bytes())?;
    let dir = root.join(format!("{PREFIX}{:06}", learner.step()));
    if dir.exists() {
        std::fs::remove_dir_all(&dir).map_err(|e| TrainError::io(&dir, e))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, &dir).map_err(|e| TrainError::io(&dir, e))?;
    prune(&root, keep)?;
    Ok(dir)
}

/// Complete checkpoints under `OUT/checkpoints`, oldest first.
pub fn list(out: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(checkpoints_root(out)) else {
        return Vec::new();
    };
    let mut dirs: Vec<PathBuf> = entries
        .flatten()
        .map(|e| e.path())
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with(PREFIX))
                && p.join("state.json").is_file()
        })
        .collect();
    dirs.sort();
    dirs
}

fn prune(root: &Path, keep: usize) -> Result<(), TrainError> {
    let out = root.parent().unwrap_or(root);
    let dirs = list(out);
    for dir in &dirs[..dirs.len().saturating_sub(keep.max(1))] {
        std::fs::remove_dir_all(dir).map_err(|e| TrainError::io(dir, e))?;
    }
    // Leftovers of interrupted writes.
    if let Ok(entries) = std::fs::read_dir(root) {
        for entry in entries.flatten() {
            if entry.file_name().to_string_lossy().starts_with(TEMP_PREFIX) {
                let _ = std::fs::remove_dir_all(entry.path());
            }
        }
    }
    Ok(())
}

/// Reads the newest checkpoint of run directory `out`.
///
/// # Errors
/// No checkpoint (the message says why a run can have none), or an unreadable `state.json`
/// (naming the file). What the state says is checked against the run by
/// [`Checkpoint::validate`]; the optimizer state by [`Learner::resume`].
pub fn load_latest(out: &Path) -> Result<Checkpoint, TrainError> {
    let dir = list(out).pop().ok_or_else(|| TrainError::File {
        path: checkpoints_root(out),
        message: "no checkpoint to resume from: the run stopped before writing one (checkpoints \
                  are written every --save-every N steps and at the end); start it again with \
                  a new --out, or delete this directory"
            .into(),
    })?;
    let state_path = dir.join("state.json");
    let text = disha_core::limits::read_config_file(&state_path)?;
    let state = serde_json::from_str(&text).map_err(|e| TrainError::File {
        path: state_path.clone(),
        message: format!("invalid checkpoint state: {e}"),
    })?;
    Ok(Checkpoint { dir, state })
}

impl Checkpoint {
    /// Checks that the checkpoint belongs to `settings`' run over `train_examples` examples:
    /// the step matches the directory's name and lies in `1..=max_steps`; the data position
    /// lies inside the data and is reachable in that many steps (each micro-batch consumes at
    /// least one example and at most `batch_size` — packed: `batch_size · max_len`); the
    /// parameter ids are distinct.
    ///
    /// # Errors
    /// [`TrainError::File`] naming `state.json` and what disagrees.
    pub fn validate(
        &self,
        settings: &RunSettings,
        train_examples: usize,
    ) -> Result<(), TrainError> {
        let path = self.dir.join("state.json");
        let bad = |message: String| {
            Err(TrainError::File {
                path: path.clone(),
                message: format!("{message}; the checkpoint does not belong to this run"),
            })
        };
        let step = self.state.step;
        let named = self
            .dir
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_prefix(PREFIX))
            .and_then(|n| n.parse::<usize>().ok());
        if named != Some(step) {
            return bad(format!(
                "step {step} disagrees with the directory name {}",
                self.dir.display()
            ));
        }
        let max_steps = settings.learner.max_steps;
        if step == 0 || step > max_steps {
            return bad(format!(
                "step {step} is outside 1..={max_steps} (max_steps)"
            ));
        }
        let DataPosition { epoch, cursor } = self.state.position;
        if cursor > train_examples {
            return bad(format!(
                "data position {cursor} is past the {train_examples} training examples"
            ));
        }
        let consumed = epoch as u128 * train_examples as u128 + cursor as u128;
        let micro_batches = step as u128 * settings.learner.grad_accum as u128;
        let per_batch = settings.batch_size as u128
            * if settings.packing {
                settings.max_len as u128
            } else {
                1
            };
        if consumed < micro_batches || consumed > micro_batches * per_batch {
            return bad(format!(
                "{consumed} examples consumed (epoch {epoch}, position {cursor}) cannot happen \
                 in {step} steps of {} micro-batches of at most {per_batch} examples",
                settings.learner.grad_accum
            ));
        }
        let mut ids = self.state.param_ids.clone();
        ids.sort_unstable();
        if ids.windows(2).any(|w| w[0] == w[1]) {
            return bad("parameter ids repeat".into());
        }
        Ok(())
    }
}

/// Continues the run in `out` from its newest checkpoint, checking everything read before it
/// is used: the checkpoint against `settings` and `data` ([`Checkpoint::validate`]), its
/// adapter against `model` (loaded with PEFT's shape checks), its optimizer state against the
/// adapter ([`Learner::resume`]). `model` is the base model on an autodiff device, without
/// adapters; `data` is the run's training data, moved to the saved position.
///
/// # Errors
/// No checkpoint, or any part of it that does not belong to this run, named by file.
pub fn resume(
    out: &Path,
    settings: &RunSettings,
    mut model: CausalLm,
    data: &mut DataLoader,
) -> Result<(Learner, Checkpoint), TrainError> {
    let ckpt = load_latest(out)?;
    ckpt.validate(settings, data.len())?;
    model.load_adapter(&ckpt.adapter_dir(), ADAPTER_NAME)?;
    let base = ckpt.dir.join(BASE_TENSORS_FILE);
    match (
        base.is_file(),
        settings.train_parts.is_empty(),
        model.as_rwkv7_mut(),
    ) {
        (false, true, _) => {}
        (true, false, Some(rwkv)) => {
            let tensors = PthWeights::open(&base)?.take_all()?;
            rwkv.replace_base_tensors(&base, &tensors)?;
        }
        (present, _, _) => {
            return Err(TrainError::File {
                path: ckpt.dir.clone(),
                message: format!(
                    "{} {BASE_TENSORS_FILE} but the run trains {}; the checkpoint does not \
                     belong to this run",
                    if present { "has" } else { "has no" },
                    if settings.train_parts.is_empty() {
                        "no base tensors".to_string()
                    } else {
                        format!("{:?} on this model", settings.train_parts)
                    }
                ),
            });
        }
    }
    let model = mark_trainable(model, &settings.train_parts)?;
    let trainable = trainable_param_ids(&model).len();
    if trainable != ckpt.state.param_ids.len() {
        return Err(TrainError::File {
            path: ckpt.dir.join("state.json"),
            message: format!(
                "lists {} trainable tensors, the checkpoint's adapter has {trainable}; the \
                 checkpoint does not belong to this run",
                ckpt.state.param_ids.len()
            ),
        });
    }
    let mut learner = Learner::resume(
        model,
        settings.learner.clone(),
        ckpt.state.step,
        &ckpt.state.param_ids,
        &ckpt.optimizer_path(),
    )?;
    let state_file = || ckpt.dir.join("state.json");
    match (ckpt.state.loss_scaler, learner.loss_scaler().is_some()) {
        (Some(scaler), true) => {
            scaler.validate().map_err(|message| TrainError::File {
                path: state_file(),
                message,
            })?;
            learner.set_loss_scaler(scaler)?;
        }
        (None, false) => {}
        (saved, _) => {
            return Err(TrainError::File {
                path: state_file(),
                message: format!(
                    "{} a loss scale, but the run computes in {:?}; the checkpoint does not \
                     belong to this run",
                    if saved.is_some() { "has" } else { "has no" },
                    learner.model().compute_dtype()
                ),
            });
        }
    }
    data.seek(ckpt.state.position);
    Ok((learner, ckpt))
}
