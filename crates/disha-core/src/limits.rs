//! Bounds on what an input file may make disha allocate or do.
//!
//! Every count, size and shape read from a file (a tensor header, a model config, a GGUF
//! metadata array, a JSONL line) is checked against the real file size and against these
//! limits *before* anything is allocated from it, so a corrupt or hostile file gets an error
//! naming the file and field instead of an abort. The defaults are far above every real model
//! and dataset; the "Limits and errors" page of the book lists them with the reasoning.
//!
//! Raise a limit for one process with the environment variable `DISHA_LIMITS`
//! (`DISHA_LIMITS="max_layers=4096,max_dim=8388608"`), or from code with [`set_limits`].
//!
//! ```
//! use disha_core::limits::{Limits, limits, set_limits};
//!
//! let mut raised = limits();
//! raised.max_layers = 4096;
//! set_limits(raised.clone());
//! assert_eq!(limits().max_layers, 4096);
//! # set_limits(Limits::default());
//! ```

use std::io::Read;
use std::path::Path;
use std::sync::{OnceLock, RwLock};

use crate::error::{DishaError, Result};

/// The environment variable that overrides [`Limits`] fields (`name=value,name=value`).
pub const LIMITS_ENV: &str = "DISHA_LIMITS";

/// Upper bounds applied to everything read from files.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest data-like text file read whole: `tokenizer.json`, a run's `metrics.jsonl`
    /// (default 256 MiB; the largest real `tokenizer.json` files are about 35 MB).
    pub max_text_file_bytes: u64,
    /// Largest configuration file read whole: `config.json`, `adapter_config.json`,
    /// `tokenizer_config.json`, chat templates, a sharded checkpoint's index, run configs,
    /// `run.json`, a checkpoint's `state.json` (default 16 MiB; the largest real index files
    /// are about 9 MB, the rest a few KB). Parsers need up to ~50× a file's size in memory.
    pub max_config_bytes: u64,
    /// Largest safetensors JSON header and GGUF metadata + tensor table (default 64 MiB; a
    /// 100-billion-parameter checkpoint's header is well under 1 MiB).
    pub max_header_bytes: u64,
    /// Most tensors in one weight file (default 1,048,576).
    pub max_tensor_count: u64,
    /// Most dimensions of one tensor (default 8).
    pub max_tensor_rank: usize,
    /// Most decoder layers a model config may declare (default 1,024; the largest public
    /// models have 126).
    pub max_layers: usize,
    /// Largest single model dimension: vocabulary, hidden and MLP width, head count, head
    /// width, context length (default 16,777,216 = 2^24).
    pub max_dim: usize,
    /// Most elements of one GGUF metadata array (default 16,777,216; a 256k-token vocabulary
    /// with its merges is about 520k).
    pub max_array_len: u64,
    /// Longest GGUF metadata string (default 16 MiB; chat templates are a few KB).
    pub max_string_bytes: u64,
    /// Longest JSONL line of a dataset (default 1 MiB ≈ 250k tokens of text); the default of
    /// `disha train --max-line-bytes`.
    pub max_line_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_text_file_bytes: 256 << 20,
            max_config_bytes: 16 << 20,
            max_header_bytes: 64 << 20,
            max_tensor_count: 1 << 20,
            max_tensor_rank: 8,
            max_layers: 1024,
            max_dim: 1 << 24,
            max_array_len: 1 << 24,
            max_string_bytes: 16 << 20,
            max_line_bytes: 1 << 20,
        }
    }
}

impl Limits {
    /// The defaults with the overrides of [`LIMITS_ENV`] applied.
    ///
    /// # Errors
    /// A malformed override: an unknown name, or a value that is not a positive integer.
    pub fn from_env() -> Result<Self> {
        let mut limits = Self::default();
        if let Ok(spec) = std::env::var(LIMITS_ENV) {
            limits.apply(&spec)?;
        }
        Ok(limits)
    }

    /// Applies `name=value` overrides separated by commas (sizes in bytes).
    ///
    /// # Errors
    /// An unknown name, or a value that is not a positive integer.
    pub fn apply(&mut self, spec: &str) -> Result<()> {
        for item in spec.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let bad = |message: String| DishaError::InvalidHyperparameter {
                what: format!("{LIMITS_ENV} `{item}`"),
                message,
            };
            let (name, value) = item
                .split_once('=')
                .ok_or_else(|| bad("expected name=value".into()))?;
            let value: u64 = value
                .trim()
                .parse()
                .ok()
                .filter(|&v| v > 0)
                .ok_or_else(|| bad("the value must be a positive integer".into()))?;
            let as_usize = usize::try_from(value).map_err(|_| bad("too large".into()))?;
            match name.trim() {
                "max_text_file_bytes" => self.max_text_file_bytes = value,
                "max_config_bytes" => self.max_config_bytes = value,
                "max_header_bytes" => self.max_header_bytes = value,
                "max_tensor_count" => self.max_tensor_count = value,
                "max_tensor_rank" => self.max_tensor_rank = as_usize,
                "max_layers" => self.max_layers = as_usize,
                "max_dim" => self.max_dim = as_usize,
                "max_array_len" => self.max_array_len = value,
                "max_string_bytes" => self.max_string_bytes = value,
                "max_line_bytes" => self.max_line_bytes = as_usize,
                other => {
                    return Err(bad(format!(
                        "unknown limit `{other}` (known: max_text_file_bytes, max_config_bytes, \
                         max_header_bytes, \
                         max_tensor_count, max_tensor_rank, max_layers, max_dim, max_array_len, \
                         max_string_bytes, max_line_bytes)"
                    )));
                }
            }
        }
        Ok(())
    }
}

fn cell() -> &'static RwLock<Limits> {
    static LIMITS: OnceLock<RwLock<Limits>> = OnceLock::new();
    LIMITS.get_or_init(|| {
        RwLock::new(Limits::from_env().unwrap_or_else(|e| {
            tracing::warn!("{e}; using the default limits");
            Limits::default()
        }))
    })
}

/// The limits in force: [`set_limits`]'s, else the defaults with [`LIMITS_ENV`] applied (a
/// malformed variable is logged and ignored here; the `disha` binary refuses it instead).
pub fn limits() -> Limits {
    cell()
        .read()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone()
}

/// The message for a value read from a file that exceeds limit `name` (`limit` its value):
/// says which limit and how to raise it.
pub fn exceeds(value: impl std::fmt::Display, name: &str, limit: impl std::fmt::Display) -> String {
    format!("{value} exceeds the limit {name} = {limit} (raise it with {LIMITS_ENV}={name}=N)")
}

/// `value` as quoted in an error message: its display, cut to 120 bytes (at a character
/// boundary) with the full length appended when longer. Input files can hold megabyte-long
/// strings; an error quoting one should stay one readable line.
pub fn excerpt(value: impl std::fmt::Display) -> String {
    const MAX: usize = 120;
    let text = value.to_string();
    if text.len() <= MAX {
        return text;
    }
    let cut = (0..=MAX)
        .rev()
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(0);
    format!("{}… ({} bytes)", &text[..cut], text.len())
}

/// Replaces the limits for the whole process.
pub fn set_limits(limits: Limits) {
    *cell()
        .write()
        .unwrap_or_else(std::sync::PoisonError::into_inner) = limits;
}

/// Reads a UTF-8 data-like text file whole (`tokenizer.json`, metrics), refusing files larger
/// than [`Limits::max_text_file_bytes`] (checked while reading, so pipes and devices are
/// bounded too).
///
/// # Errors
/// I/O, a file over the limit ([`DishaError::FileTooLarge`]), or bytes that are not UTF-8.
pub fn read_text_file(path: &Path) -> Result<String> {
    let limit = limits().max_text_file_bytes;
    let bytes = read_bounded(path, limit, "max_text_file_bytes")?;
    String::from_utf8(bytes).map_err(|e| DishaError::NotText {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to() as u64,
    })
}

/// Reads a UTF-8 configuration file whole (see [`Limits::max_config_bytes`]).
///
/// # Errors
/// As [`read_text_file`], against the configuration-file limit.
pub fn read_config_file(path: &Path) -> Result<String> {
    let limit = limits().max_config_bytes;
    let bytes = read_bounded(path, limit, "max_config_bytes")?;
    String::from_utf8(bytes).map_err(|e| DishaError::NotText {
        path: path.to_path_buf(),
        offset: e.utf8_error().valid_up_to() as u64,
    })
}

/// Reads a file whole if it holds at most `limit` bytes; `limit_name` is the [`Limits`] field
/// the error tells the user to raise.
///
/// # Errors
/// I/O, or more than `limit` bytes ([`DishaError::FileTooLarge`]).
pub fn read_bounded(path: &Path, limit: u64, limit_name: &'static str) -> Result<Vec<u8>> {
    let file = std::fs::File::open(path).map_err(|e| DishaError::io(path, e))?;
    let declared = file.metadata().map(|m| m.len()).unwrap_or(0);
    let too_large = |size: u64| DishaError::FileTooLarge {
        path: path.to_path_buf(),
        size,
        limit,
        limit_name,
    };
    if declared > limit {
        return Err(too_large(declared));
    }
    let mut bytes = Vec::with_capacity(declared as usize);
    file.take(limit.saturating_add(1))
        .read_to_end(&mut bytes)
        .map_err(|e| DishaError::io(path, e))?;
    if bytes.len() as u64 > limit {
        return Err(too_large(bytes.len() as u64));
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn overrides_parse_and_bad_ones_are_named() {
        let mut l = Limits::default();
        l.apply("max_layers=4096, max_line_bytes=10").unwrap();
        assert_eq!((l.max_layers, l.max_line_bytes), (4096, 10));
        let e = l.apply("max_layer=1").unwrap_err().to_string();
        assert!(e.contains("unknown limit `max_layer`"), "{e}");
        let e = l.apply("max_dim=0").unwrap_err().to_string();
        assert!(e.contains("positive integer"), "{e}");
        let e = l.apply("max_dim").unwrap_err().to_string();
        assert!(e.contains("name=value"), "{e}");
    }

    #[test]
    fn excerpts_cut_long_values_at_a_character_boundary() {
        assert_eq!(excerpt("short"), "short");
        let long = "é".repeat(100);
        let e = excerpt(&long);
        assert!(e.starts_with("éé") && e.ends_with("… (200 bytes)"), "{e}");
        assert!(e.len() < 140, "{e}");
    }

    #[test]
    fn text_files_over_the_limit_are_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("big.json");
        std::fs::write(&path, vec![b' '; 100]).unwrap();
        assert_eq!(read_bounded(&path, 100, "max_x").unwrap().len(), 100);
        let e = read_bounded(&path, 99, "max_x").unwrap_err();
        assert!(
            matches!(
                e,
                DishaError::FileTooLarge {
                    size: 100,
                    limit: 99,
                    ..
                }
            ),
            "{e}"
        );
        assert!(
            e.to_string().contains("big.json") && e.to_string().contains("max_x="),
            "{e}"
        );
        std::fs::write(&path, [b'{', 0xFF, b'}']).unwrap();
        let e = read_text_file(&path).unwrap_err().to_string();
        assert!(e.contains("big.json") && e.contains("byte 1"), "{e}");
    }
}
