//! The error type of `disha-core`.
//!
//! Every variant names what the user has to look at: the layer (by its module path or label),
//! the adapter, the file, the tensor key, and the dimensions involved. Programmer errors (a
//! tensor of the wrong rank passed to an internal helper) are `assert!`s, not variants.

use std::path::PathBuf;

/// Convenience alias used throughout `disha-core`.
pub type Result<T, E = DishaError> = std::result::Result<T, E>;

/// Everything that can go wrong when creating, merging, saving or loading adapters.
#[derive(Debug, thiserror::Error)]
pub enum DishaError {
    /// `r` (the shard / block size, PEFT's "rank") must be at least 1.
    #[error("layer `{layer}`: r must be >= 1, got {r}")]
    InvalidRank {
        /// Layer label or module path.
        layer: String,
        /// The rejected value.
        r: i64,
    },

    /// Bone / mini with `r > in_features`: PEFT's forward pads silently but its merge crashed
    /// (huggingface/peft#3701); since #3708 PEFT rejects it at creation, and so do we.
    #[error(
        "layer `{layer}` [in={d_input}, out={d_output}]: r = {r} exceeds in_features; \
         every input shard would be mostly padding (PEFT >= #3708 rejects this too). Use r <= {d_input}"
    )]
    RankExceedsInput {
        /// Layer label or module path.
        layer: String,
        /// Input features of the layer.
        d_input: usize,
        /// Output features of the layer.
        d_output: usize,
        /// The rejected shard size.
        r: usize,
    },

    /// BAT needs the weight to split exactly into `r x r` blocks.
    #[error(
        "layer `{layer}` [in={d_input}, out={d_output}]: BAT needs in_features and out_features \
         divisible by r = {r} (in % r = {}, out % r = {}); exclude this layer or pick another r",
        d_input % r,
        d_output % r
    )]
    BatNotDivisible {
        /// Layer label or module path.
        layer: String,
        /// Input features of the layer.
        d_input: usize,
        /// Output features of the layer.
        d_output: usize,
        /// The block size.
        r: usize,
    },

    /// MiSS-mini tiles an `r x mini_r` block along the output dimension.
    #[error(
        "layer `{layer}` [in={d_input}, out={d_output}]: mini needs out_features divisible by \
         mini_r = {mini_r} (out % mini_r = {})",
        if *mini_r == 0 { 0 } else { d_output % mini_r }
    )]
    MiniNotDivisible {
        /// Layer label or module path.
        layer: String,
        /// Input features of the layer.
        d_input: usize,
        /// Output features of the layer.
        d_output: usize,
        /// The rejected tile width.
        mini_r: usize,
    },

    /// A hyperparameter outside its domain (dropout probability, LoRA alpha, ...).
    #[error("{what}: {message}")]
    InvalidHyperparameter {
        /// Which parameter (and where).
        what: String,
        /// Why it is rejected.
        message: String,
    },

    /// A matrix that cannot be block-quantized (a non-finite value, a wrong length, a corrupt
    /// ggml block).
    #[error("tensor `{tensor}`: {message}")]
    Quantize {
        /// The tensor's name.
        tensor: String,
        /// What is wrong.
        message: String,
    },

    /// BAT unmerge needs every `I + D[k]` to be invertible.
    #[error(
        "layer `{layer}`, adapter `{adapter}`: I + D[{block}] is singular (smallest pivot {pivot:.3e}), \
         so the BAT merge cannot be undone; the weights were left unchanged"
    )]
    SingularBlock {
        /// Layer label or module path.
        layer: String,
        /// Adapter name.
        adapter: String,
        /// Index of the offending `r x r` block.
        block: usize,
        /// The pivot magnitude that fell below the threshold.
        pivot: f64,
    },

    /// Merging produced NaN or infinite weights (only checked by the safe merge).
    #[error(
        "layer `{layer}`, adapter `{adapter}`: merging produces non-finite weights; the adapter seems broken \
         and the layer was left unmerged"
    )]
    NonFiniteMerge {
        /// Layer label or module path.
        layer: String,
        /// Adapter name.
        adapter: String,
    },

    /// An adapter with this name already exists on the layer.
    #[error("layer `{layer}`: an adapter named `{adapter}` already exists")]
    AdapterExists {
        /// Layer label or module path.
        layer: String,
        /// Adapter name.
        adapter: String,
    },

    /// No adapter with this name exists on the layer.
    #[error("layer `{layer}`: no adapter named `{adapter}` (available: {available:?})")]
    AdapterNotFound {
        /// Layer label or module path.
        layer: String,
        /// Requested adapter name.
        adapter: String,
        /// The adapters the layer does have.
        available: Vec<String>,
    },

    /// A state transition that is not allowed (merge twice, unmerge an unmerged layer, delete or
    /// re-activate while merged, ...).
    #[error("layer `{layer}`: {message}")]
    InvalidState {
        /// Layer label or module path.
        layer: String,
        /// What was attempted and why it is refused.
        message: String,
    },

    /// An adapter configuration that targets nothing.
    #[error(
        "adapter config matches no module: target_modules = {targets}{}; the model's adaptable modules are:\n  {}",
        exclude.as_ref().map(|e| format!(", exclude_modules = {e}")).unwrap_or_default(),
        modules.join("\n  ")
    )]
    NoTargetMatched {
        /// The `target_modules` setting, rendered.
        targets: String,
        /// The `exclude_modules` setting, rendered.
        exclude: Option<String>,
        /// Every module name the model offers.
        modules: Vec<String>,
    },

    /// An invalid or unsupported field in an adapter config.
    #[error("{}field `{field}`: {message}", source_path.as_ref().map(|p| format!("{}: ", p.display())).unwrap_or_default())]
    Config {
        /// The file the config came from, if any.
        source_path: Option<PathBuf>,
        /// The offending field.
        field: String,
        /// What is wrong with it.
        message: String,
    },

    /// A regular expression from a config that does not compile.
    #[error("field `{field}`: invalid regular expression `{pattern}`: {source}")]
    Regex {
        /// The config field.
        field: String,
        /// The pattern as written.
        pattern: String,
        /// The regex engine's explanation.
        source: regex::Error,
    },

    /// A file-system error.
    #[error("{}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// Malformed JSON.
    #[error("{}: invalid JSON: {source}", path.display())]
    Json {
        /// The file.
        path: PathBuf,
        /// The parser's explanation.
        source: serde_json::Error,
    },

    /// A malformed safetensors file.
    #[error("{}: invalid safetensors file: {message}", path.display())]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        message: String,
    },

    /// A tensor whose shape does not match what the config and the layer imply.
    #[error("{}: tensor `{key}` has shape {actual:?}, expected {expected:?} ({reason})", path.display())]
    TensorShape {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape found in the file.
        actual: Vec<usize>,
        /// Which layer / setting implies the expected shape.
        reason: String,
    },

    /// A tensor stored in a dtype that adapters cannot be loaded from.
    #[error("{}: tensor `{key}` has dtype {dtype}; adapters load from F32, F16 or BF16", path.display())]
    TensorDtype {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The dtype found.
        dtype: String,
    },

    /// A tensor the config requires is absent from the file.
    #[error("{}: missing tensor `{key}` (needed by layer `{layer}`)", path.display())]
    MissingTensor {
        /// The file.
        path: PathBuf,
        /// The expected key.
        key: String,
        /// The layer that needs it.
        layer: String,
    },

    /// The file holds tensors that map to no adapted layer of the model.
    #[error(
        "{}: {} tensor(s) map to no adapted module of this model, e.g. `{}`; \
         is the adapter for another model?",
        path.display(), keys.len(), keys.first().map(String::as_str).unwrap_or("")
    )]
    UnexpectedTensors {
        /// The file.
        path: PathBuf,
        /// The unused keys.
        keys: Vec<String>,
    },

    /// A file larger than the limit for its kind (see [`crate::limits`]).
    #[error(
        "{}: {size} bytes exceeds the limit {limit_name} = {limit} bytes (raise it with \
         DISHA_LIMITS={limit_name}=N if the file is genuine)",
        path.display()
    )]
    FileTooLarge {
        /// The file.
        path: PathBuf,
        /// Its size (or the bytes read before stopping).
        size: u64,
        /// The limit in force.
        limit: u64,
        /// The [`crate::limits::Limits`] field.
        limit_name: &'static str,
    },

    /// A text file that is not UTF-8.
    #[error("{}: not UTF-8 text (invalid byte sequence at byte {offset})", path.display())]
    NotText {
        /// The file.
        path: PathBuf,
        /// Where the first invalid sequence starts.
        offset: u64,
    },

    /// A tensor value that is NaN or infinite where only finite numbers make sense (weights,
    /// adapter tensors).
    #[error("{}: tensor `{key}` holds {value} at flat index {index}; the file is corrupt or the run that wrote it diverged", path.display())]
    NonFiniteTensor {
        /// The file.
        path: PathBuf,
        /// The tensor key.
        key: String,
        /// The first non-finite element.
        index: usize,
        /// Its value.
        value: f32,
    },

    /// An error caused by what a file says (an adapter config that does not fit the model):
    /// the file, then the error.
    #[error("{}: {source}", path.display())]
    InFile {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        source: Box<DishaError>,
    },

    /// An operation this version does not support (named precisely).
    #[error("unsupported: {0}")]
    Unsupported(String),
}

impl DishaError {
    /// Helper for [`DishaError::Io`].
    pub(crate) fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// Helper for [`DishaError::Config`] without a file.
    pub(crate) fn config(field: impl Into<String>, message: impl Into<String>) -> Self {
        Self::Config {
            source_path: None,
            field: field.into(),
            message: message.into(),
        }
    }

    /// Attach a file path to a [`DishaError::Config`] that has none.
    pub(crate) fn in_file(self, path: &std::path::Path) -> Self {
        match self {
            Self::Config {
                source_path: None,
                field,
                message,
            } => Self::Config {
                source_path: Some(path.to_path_buf()),
                field,
                message,
            },
            other => other,
        }
    }
}
