//! Errors of the `disha` command line.

/// Everything a subcommand can fail with; printed as one line.
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// Model, tokenizer or generation errors.
    #[error(transparent)]
    Model(#[from] disha_models::ModelError),
    /// Adapter errors.
    #[error(transparent)]
    Adapter(#[from] disha_core::DishaError),
    /// Data or training errors.
    #[error(transparent)]
    Train(Box<disha_train::TrainError>),
    /// A bad combination or value of arguments.
    #[error("{0}")]
    Usage(String),
    /// A file could not be read or written.
    #[error("{path}: {message}")]
    File {
        /// The file.
        path: std::path::PathBuf,
        /// What went wrong.
        message: String,
    },
}

impl From<disha_train::TrainError> for CliError {
    fn from(e: disha_train::TrainError) -> Self {
        Self::Train(Box::new(e))
    }
}

/// Result alias for subcommands.
pub type CliResult<T = ()> = Result<T, CliError>;
