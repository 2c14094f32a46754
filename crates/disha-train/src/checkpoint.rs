//! Training checkpoints: `OUT/checkpoints/step-NNNNNN/` with the adapter (a PEFT directory),
//! the optimizer state and `state.json` (step, data position, trainable-parameter ids).
//!
//! A checkpoint is assembled in a temporary directory beside the others and renamed into place,
//! so a crash (even `kill -9`) leaves either the previous checkpoints or a complete new one;
//! temporary leftovers are ignored and cleaned. Only the newest `keep` checkpoints are kept.

use std::path::{Path, PathBuf};

use disha_core::{PeftConfig, PeftModelExt, write_atomic};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::data::DataPosition;
use crate::learner::{Learner, trainable_param_ids};

/// The adapter name training uses.
pub const ADAPTER_NAME: &str = "default";
const PREFIX: &str = "step-";
const TEMP_PREFIX: &str = ".tmp-checkpoint-";

/// What besides tensors a run needs to continue exactly.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CheckpointState {
    /// Optimizer steps completed.
    pub step: usize,
    /// Where the data loader is.
    pub position: DataPosition,
    /// Ids of the trainable parameters (the optimizer state is keyed by them).
    pub param_ids: Vec<u64>,
}

/// A checkpoint read back.
#[derive(Debug)]
pub struct Checkpoint {
    /// Its directory.
    pub dir: PathBuf,
    /// Step, data position, parameter ids.
    pub state: CheckpointState,
    /// The optimizer state bytes.
    pub optimizer: Vec<u8>,
}

impl Checkpoint {
    /// The PEFT adapter directory inside the checkpoint.
    pub fn adapter_dir(&self) -> PathBuf {
        self.dir.join("adapter")
    }
}

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
    write_atomic(
        &staging.path().join("optimizer.bpk"),
        &learner.optimizer_state()?,
    )?;
    let state = CheckpointState {
        step: learner.step(),
        position,
        param_ids: trainable_param_ids(model),
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
/// No checkpoint, or an unreadable `state.json` / optimizer state (naming the file).
pub fn load_latest(out: &Path) -> Result<Checkpoint, TrainError> {
    let dir = list(out).pop().ok_or_else(|| TrainError::Data {
        path: checkpoints_root(out),
        line: 0,
        message: "no checkpoint to resume from (train with --save-every N)".into(),
    })?;
    let state_path = dir.join("state.json");
    let text = std::fs::read_to_string(&state_path).map_err(|e| TrainError::io(&state_path, e))?;
    let state = serde_json::from_str(&text).map_err(|e| TrainError::Data {
        path: state_path.clone(),
        line: e.line(),
        message: e.to_string(),
    })?;
    let optimizer_path = dir.join("optimizer.bpk");
    let optimizer =
        std::fs::read(&optimizer_path).map_err(|e| TrainError::io(&optimizer_path, e))?;
    Ok(Checkpoint {
        dir,
        state,
        optimizer,
    })
}
