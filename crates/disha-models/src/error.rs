//! The error type of `disha-models`.
//!
//! Every variant names the file, tensor, field or token the user has to look at.

use std::path::PathBuf;

/// Convenience alias used throughout `disha-models`.
pub type Result<T, E = ModelError> = std::result::Result<T, E>;

/// Everything that can go wrong loading a model, a tokenizer or a chat template, or generating.
#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    /// An adapter-level error from `disha-core` (adapter files, merge, shapes).
    #[error(transparent)]
    Core(#[from] disha_core::DishaError),

    /// Reading or writing a file failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The underlying error.
        source: std::io::Error,
    },

    /// A `config.json` (or GGUF metadata) field is missing, malformed or unsupported.
    #[error("{path}: field `{field}`: {message}")]
    Config {
        /// The file the field was read from.
        path: PathBuf,
        /// The field (dotted for nested fields).
        field: String,
        /// What is wrong and what would be accepted.
        message: String,
    },

    /// A weight the architecture needs is not in the checkpoint.
    #[error("{path}: missing tensor `{name}` (needed for {needed_for})")]
    MissingTensor {
        /// The checkpoint (file or directory).
        path: PathBuf,
        /// The tensor name in the checkpoint's own naming.
        name: String,
        /// The module that needs it.
        needed_for: String,
    },

    /// A weight has a shape the config does not allow.
    #[error("{path}: tensor `{name}` has shape {actual:?}, expected {expected:?} from the config")]
    TensorShape {
        /// The checkpoint.
        path: PathBuf,
        /// The tensor name.
        name: String,
        /// The shape the config implies.
        expected: Vec<usize>,
        /// The shape in the file.
        actual: Vec<usize>,
    },

    /// A checkpoint holds tensors that map to no module (a different architecture, or a typo).
    #[error("{path}: {} tensor(s) map to no module of this model: {}", names.len(), names.join(", "))]
    UnusedTensors {
        /// The checkpoint.
        path: PathBuf,
        /// The tensors left over.
        names: Vec<String>,
    },

    /// A GGUF file is malformed or truncated.
    #[error("{path}: invalid GGUF at byte {offset}: {message}")]
    Gguf {
        /// The GGUF file.
        path: PathBuf,
        /// Byte offset where parsing failed.
        offset: u64,
        /// What was expected.
        message: String,
    },

    /// A GGUF tensor type (quantization) this loader cannot dequantize.
    #[error(
        "{path}: tensor `{name}` uses GGUF type {type_name} (id {type_id}), which disha cannot \
         dequantize; supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q2_K–Q6_K, Q8_K (re-quantize with llama.cpp's \
         `llama-quantize --allow-requantize … Q8_0`)"
    )]
    UnsupportedQuantization {
        /// The GGUF file.
        path: PathBuf,
        /// The tensor.
        name: String,
        /// GGML type name.
        type_name: String,
        /// GGML type id.
        type_id: u32,
    },

    /// A PyTorch `.pth` checkpoint could not be read (container, pickle, or a tensor's
    /// storage), or holds a tensor of a type disha does not load.
    #[error("{path}: PyTorch checkpoint: {message}")]
    Pytorch {
        /// The file.
        path: PathBuf,
        /// What went wrong, naming the tensor where there is one.
        message: String,
    },

    /// The safetensors container could not be parsed.
    #[error("{path}: {message}")]
    Safetensors {
        /// The file.
        path: PathBuf,
        /// The parser's message.
        message: String,
    },

    /// A path is none of the model formats disha reads.
    #[error(
        "{path}: not a model: expected an HF directory (config.json + model.safetensors or \
         model.safetensors.index.json), a .gguf file, a llama2.c .bin file, a BlinkDL \
         RWKV-7 .pth or .safetensors file or an rwkv.cpp .bin file"
    )]
    NotAModel {
        /// The path given.
        path: PathBuf,
    },

    /// Tokenizer loading, encoding or decoding failed.
    #[error("tokenizer ({source_name}): {message}")]
    Tokenizer {
        /// Where the tokenizer came from (file or GGUF).
        source_name: String,
        /// The tokenizers crate's message.
        message: String,
    },

    /// A tokenizer that can produce ids the model has no embedding for.
    #[error(
        "tokenizer ({source_name}) produces id {id} (`{token}`), but the model has {vocab_size} \
         tokens (ids 0..{vocab_size}); use the model's own tokenizer"
    )]
    TokenizerVocabulary {
        /// Where the tokenizer came from.
        source_name: String,
        /// The largest id it can produce.
        id: u32,
        /// That id's token.
        token: String,
        /// The model's vocabulary size.
        vocab_size: usize,
    },

    /// The chat template failed to parse or render.
    #[error("chat template ({source_name}): {message}")]
    ChatTemplate {
        /// Where the template came from.
        source_name: String,
        /// The template engine's message.
        message: String,
    },

    /// A token id outside the vocabulary.
    #[error("token id {id} at position {position} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange {
        /// The id.
        id: i64,
        /// Its position in the flattened input.
        position: usize,
        /// The model's vocabulary size.
        vocab_size: usize,
    },

    /// A merged export would write a weight that is not finite in the export dtype.
    #[error(
        "merged weight `{name}` is {value} at flat index {index} (export dtype {dtype}); the \
         adapter drives it out of range, so nothing was written"
    )]
    NonFiniteExport {
        /// The tensor.
        name: String,
        /// The first bad element.
        index: usize,
        /// Its value in f32 before conversion.
        value: f32,
        /// The export dtype.
        dtype: String,
    },

    /// A generation or input parameter is out of range.
    #[error("{name} = {value}: {message}")]
    InvalidArgument {
        /// The parameter.
        name: String,
        /// The value given.
        value: String,
        /// The allowed range.
        message: String,
    },
}

impl ModelError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        Self::Io {
            path: path.into(),
            source,
        }
    }

    /// A config field error.
    pub fn config(
        path: impl Into<PathBuf>,
        field: impl Into<String>,
        message: impl Into<String>,
    ) -> Self {
        Self::Config {
            path: path.into(),
            field: field.into(),
            message: message.into(),
        }
    }

    /// An out-of-range argument.
    pub fn invalid(
        name: impl Into<String>,
        value: impl ToString,
        message: impl Into<String>,
    ) -> Self {
        Self::InvalidArgument {
            name: name.into(),
            value: value.to_string(),
            message: message.into(),
        }
    }
}
