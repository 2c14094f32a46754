//! One entry point for `--model PATH`: it dispatches on what it is given (an HF directory's
//! `config.json`, a GGUF file, a llama2.c `.bin`) and returns a family-agnostic [`CausalLm`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::Device;
use serde_json::Value;

use crate::causal_lm::CausalLm;
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};
use crate::gguf_llama::{GgufWeights, config_from_gguf};
use crate::llama::{Llama, LlamaConfig};
use crate::llama2c::Llama2cWeights;
use crate::tokenizer::TextTokenizer;
use crate::weights::SafetensorsWeights;

/// Where a model was loaded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// An HF directory with `config.json` and safetensors weights.
    HfSafetensors,
    /// A llama.cpp GGUF file (dequantized at load).
    Gguf,
    /// A llama2.c legacy `.bin` checkpoint.
    Llama2c,
}

/// A loaded model and what is needed to write it back out.
#[derive(Debug)]
pub struct LoadedModel {
    /// The model (base weights frozen, no adapters yet).
    pub model: CausalLm,
    /// What was read.
    pub format: ModelFormat,
    /// The path given.
    pub path: PathBuf,
    /// The original `config.json` (HF sources), kept verbatim for merged exports.
    pub hf_config: Option<Value>,
    /// GGUF metadata (tokenizer included), kept so the tokenizer needs no second read of the
    /// file.
    gguf_metadata: Option<BTreeMap<String, GgufValue>>,
}

impl LoadedModel {
    /// The model's own tokenizer: the one embedded in a GGUF (from the metadata already read),
    /// else [`load_tokenizer`] on the model path.
    ///
    /// # Errors
    /// As [`TextTokenizer::from_gguf`] / [`load_tokenizer`].
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        match &self.gguf_metadata {
            Some(metadata) => TextTokenizer::from_gguf_metadata(metadata, &self.path),
            None => load_tokenizer(&self.path),
        }
    }

    /// The `config.json` a merged export should carry: the original one for HF sources, one
    /// generated from the metadata for GGUF.
    pub fn export_config(&self) -> Value {
        match (&self.hf_config, &self.model) {
            (Some(json), _) => json.clone(),
            (None, CausalLm::Llama(model)) => model.config().to_hf_json(),
        }
    }
}

fn is_gguf(path: &Path) -> bool {
    path.is_file()
        && (path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("gguf"))
            || std::fs::File::open(path)
                .and_then(|mut f| {
                    let mut magic = [0u8; 4];
                    std::io::Read::read_exact(&mut f, &mut magic).map(|()| magic)
                })
                .is_ok_and(|m| &m == b"GGUF"))
}

/// Loads a Llama-family model from an HF directory (`config.json` + `model.safetensors` or a
/// sharded index; f32, f16 or bf16 weights, computed in f32), a GGUF file, or a llama2.c
/// `.bin` checkpoint.
///
/// # Errors
/// The path is neither; config or tensor errors naming the field or tensor.
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    if is_gguf(path) {
        let file = GgufFile::open(path)?;
        let config = config_from_gguf(&file)?;
        let gguf_metadata = Some(file.metadata.clone());
        let mut weights = GgufWeights::new(file, &config);
        let model = Llama::from_source(&config, &mut weights, device)?.into();
        return Ok(LoadedModel {
            model,
            format: ModelFormat::Gguf,
            path: path.to_path_buf(),
            hf_config: None,
            gguf_metadata,
        });
    }
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("bin"))
    {
        let (config, mut weights) = Llama2cWeights::open(path)?;
        let model = Llama::from_source(&config, &mut weights, device)?.into();
        return Ok(LoadedModel {
            model,
            format: ModelFormat::Llama2c,
            path: path.to_path_buf(),
            hf_config: None,
            gguf_metadata: None,
        });
    }
    let config_path = path.join("config.json");
    if !path.is_dir() || !config_path.is_file() {
        return Err(ModelError::NotAModel {
            path: path.to_path_buf(),
        });
    }
    let text = disha_core::limits::read_config_file(&config_path)?;
    let json: Value = serde_json::from_str(&text)
        .map_err(|e| ModelError::config(&config_path, "<json>", e.to_string()))?;
    let config = LlamaConfig::from_hf_json(&json, &config_path)?;
    let mut weights = SafetensorsWeights::open(path)?;
    let model = Llama::from_source(&config, &mut weights, device)?.into();
    Ok(LoadedModel {
        model,
        format: ModelFormat::HfSafetensors,
        path: path.to_path_buf(),
        hf_config: Some(json),
        gguf_metadata: None,
    })
}

/// The tokenizer that belongs to `--model PATH`: `tokenizer.json` in an HF directory (with
/// `tokenizer_config.json` / `chat_template.jinja`), or the one embedded in a GGUF file.
///
/// # Errors
/// No tokenizer found (the message says where it looked), or it fails to load.
pub fn load_tokenizer(path: &Path) -> Result<TextTokenizer> {
    if is_gguf(path) {
        return TextTokenizer::from_gguf(&GgufFile::open(path)?);
    }
    let file = path.join("tokenizer.json");
    if file.is_file() {
        return TextTokenizer::from_file(&file);
    }
    Err(ModelError::Tokenizer {
        source_name: path.display().to_string(),
        message: format!(
            "no tokenizer: {} does not exist (pass a tokenizer.json explicitly)",
            file.display()
        ),
    })
}
