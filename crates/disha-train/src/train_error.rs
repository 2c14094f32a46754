//! The error type of the training library.

use std::path::PathBuf;

/// Everything that can stop data preparation or a training run.
#[derive(Debug, thiserror::Error)]
pub enum TrainError {
    /// Model, tokenizer or chat-template errors.
    #[error(transparent)]
    Model(#[from] disha_models::ModelError),
    /// Adapter errors.
    #[error(transparent)]
    Adapter(#[from] disha_core::DishaError),
    /// A file could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// The file.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },
    /// A dataset line is unusable.
    #[error("{path}:{line}: {message}")]
    Data {
        /// The dataset file.
        path: PathBuf,
        /// 1-based line number.
        line: usize,
        /// What is wrong.
        message: String,
    },
    /// A file as a whole is unusable: a dataset with no usable record, a run config that does
    /// not parse, a checkpoint that does not belong to its run.
    #[error("{path}: {message}")]
    File {
        /// The file (or directory).
        path: PathBuf,
        /// What is wrong.
        message: String,
    },
    /// A hyperparameter is out of range.
    #[error("{name} = {value}: {message}")]
    Config {
        /// The setting.
        name: String,
        /// Its value.
        value: String,
        /// The allowed range.
        message: String,
    },
    /// The loss or the gradient norm became NaN or infinite.
    #[error(
        "step {step}: {what} is {value}; stopping (lower the learning rate or enable \
         gradient clipping)"
    )]
    NonFinite {
        /// Optimizer step (1-based).
        step: usize,
        /// `loss` or `gradient norm`.
        what: &'static str,
        /// The value seen.
        value: f64,
    },
}

impl TrainError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// An out-of-range setting.
    pub fn config(name: &str, value: impl ToString, message: impl Into<String>) -> Self {
        Self::Config {
            name: name.into(),
            value: value.to_string(),
            message: message.into(),
        }
    }
}
