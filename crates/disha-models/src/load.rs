//! One entry point for `--model PATH`: it dispatches on what it is given (an HF directory's
//! `config.json`, a GGUF file, a llama2.c `.bin`) and returns a family-agnostic [`CausalLm`].

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device};
use serde_json::Value;

use crate::base_dtype::{BaseDtype, BaseDtypeSource, check_device_support};
use crate::causal_lm::CausalLm;
use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};
use crate::gguf_llama::{GgufWeights, config_from_gguf};
use crate::llama::{Llama, LlamaConfig};
use crate::llama2c::Llama2cWeights;
use crate::rwkv::{Rwkv7, RwkvConfig};
use crate::tokenizer::TextTokenizer;
use crate::weights::SafetensorsWeights;
use disha_core::QuantFormat;

/// Where a model was loaded from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ModelFormat {
    /// An HF directory with `config.json` and safetensors weights.
    HfSafetensors,
    /// A llama.cpp GGUF file (dequantized at load).
    Gguf,
    /// A llama2.c legacy `.bin` checkpoint.
    Llama2c,
    /// A BlinkDL RWKV checkpoint converted to safetensors (same keys as the `.pth`), as a file
    /// or as `model.safetensors` in a directory whose `config.json` says `"model_type": "rwkv7"`.
    RwkvSafetensors,
    /// A BlinkDL RWKV `.pth` checkpoint (`torch.save` of the state dict; f32, f16 or bf16).
    RwkvPth,
    /// An rwkv.cpp `.bin` file (FP32 or FP16).
    RwkvCpp,
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
    /// [`TextTokenizer::bytes`] for a byte-level RWKV model (vocabulary 256), else
    /// [`load_tokenizer`] on the model path.
    ///
    /// # Errors
    /// As [`TextTokenizer::from_gguf`] / [`load_tokenizer`].
    pub fn tokenizer(&self) -> Result<TextTokenizer> {
        // Byte-level RWKV models (vocabulary 256, id = byte) need no file.
        if let CausalLm::Rwkv7(model) = &self.model
            && model.config().vocab_size == 256
        {
            return Ok(TextTokenizer::bytes());
        }
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
            (None, CausalLm::Rwkv7(model)) => rwkv_config_json(model.config()),
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

/// The `config.json` disha writes next to an RWKV-7 export (BlinkDL files carry none; the
/// loader reads the dimensions from the tensors and only needs `model_type`).
fn rwkv_config_json(config: &RwkvConfig) -> Value {
    let mut json = serde_json::to_value(config).expect("the config serializes");
    json["model_type"] = Value::from("rwkv7");
    json
}

/// How [`load_model_with`] builds a model.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct LoadOptions {
    /// The dtype the frozen base's matrices are kept in ([`BaseDtype::Auto`]: the
    /// checkpoint's).
    pub base_dtype: BaseDtype,
    /// Block-quantizes the decoder blocks' adaptable linears (ggml Q8_0 / Q4_0 / Q4_1, QLoRA-style);
    /// `None` keeps them in `base_dtype`. Embeddings, output heads and norms are never
    /// quantized.
    pub base_quant: Option<QuantFormat>,
}

impl LoadOptions {
    /// Options with the frozen base kept in `base_dtype`.
    pub fn with_base_dtype(mut self, base_dtype: BaseDtype) -> Self {
        self.base_dtype = base_dtype;
        self
    }

    /// Options with the decoder blocks' linears block-quantized in `base_quant`.
    pub fn with_base_quant(mut self, base_quant: Option<QuantFormat>) -> Self {
        self.base_quant = base_quant;
        self
    }
}

/// The dtype RWKV checkpoint tensors are stored in: the embedding's (BlinkDL writes one dtype
/// for every matrix).
fn stored_dtype(dtype: Option<safetensors::Dtype>) -> DType {
    match dtype {
        Some(safetensors::Dtype::BF16) => DType::BF16,
        Some(safetensors::Dtype::F16) => DType::F16,
        _ => DType::F32,
    }
}

/// Loads an RWKV-7 model from a BlinkDL-keyed source whose tensor shapes are `shapes`; a
/// source with other keys is not a model disha reads.
fn load_rwkv(
    shapes: &BTreeMap<String, Vec<usize>>,
    weights: &mut dyn crate::weights::WeightSource,
    (path, format, hf_config): (&Path, ModelFormat, Option<Value>),
    (base_dtype, base_quant): (DType, Option<QuantFormat>),
    device: &Device,
) -> Result<LoadedModel> {
    if !RwkvConfig::is_rwkv7(shapes.keys()) {
        return Err(ModelError::NotAModel {
            path: path.to_path_buf(),
        });
    }
    let config = RwkvConfig::infer(shapes, weights.path())?;
    check_device_support(base_dtype, base_quant, device)?;
    let mut weights = BaseDtypeSource::new(weights, base_dtype).with_quant(base_quant);
    let model = Rwkv7::from_source(&config, &mut weights, device)?.into();
    Ok(LoadedModel {
        model,
        format,
        path: path.to_path_buf(),
        hf_config,
        gguf_metadata: None,
    })
}

/// [`load_rwkv`] on one safetensors file.
fn load_rwkv_safetensors(
    file: &Path,
    path: &Path,
    hf_config: Option<Value>,
    options: &LoadOptions,
    device: &Device,
) -> Result<LoadedModel> {
    let file = disha_core::SafetensorsFile::open(file)?;
    let stored = stored_dtype(file.tensors().get("emb.weight").map(|slot| slot.dtype));
    let base_dtype = options.base_dtype.resolve(stored);
    let shapes: BTreeMap<String, Vec<usize>> = file
        .tensors()
        .iter()
        .map(|(name, slot)| (name.clone(), slot.shape.clone()))
        .collect();
    let mut weights = SafetensorsWeights::from_file(file);
    let what = (path, ModelFormat::RwkvSafetensors, hf_config);
    let base = (base_dtype, options.base_quant);
    load_rwkv(&shapes, &mut weights, what, base, device)
}

/// Loads a model: a Llama-family model from an HF directory (`config.json` + `model.safetensors` or a
/// sharded index; f32, f16 or bf16 weights, computed in f32), a GGUF file, or a llama2.c
/// `.bin` checkpoint; an RWKV-7 model from a BlinkDL-keyed `.safetensors` file (or a directory
/// holding one as `model.safetensors` with `"model_type": "rwkv7"` in `config.json`, as
/// [`export_merged`](crate::export_merged) writes it).
///
/// # Errors
/// The path is neither; config or tensor errors naming the field or tensor.
pub fn load_model(path: &Path, device: &Device) -> Result<LoadedModel> {
    load_model_with(path, device, &LoadOptions::default())
}

/// [`load_model`] with [`LoadOptions`] (the frozen base's dtype).
///
/// # Errors
/// As [`load_model`]; with a half-precision base, also a weight that is not finite in that
/// dtype (an f32 weight beyond f16's ±65504), naming the file and tensor.
pub fn load_model_with(path: &Path, device: &Device, options: &LoadOptions) -> Result<LoadedModel> {
    // A Llama built from `source` with its base in `dtype` (GGUF, llama2.c and HF files);
    // the config's dtype becomes the base's, the dtype a merged export writes.
    let build_llama = |mut config: LlamaConfig, source: &mut dyn crate::weights::WeightSource| {
        let checkpoint = BaseDtype::from_config_name(&config.dtype).unwrap_or(DType::F32);
        let dtype = options.base_dtype.resolve(checkpoint);
        config.dtype = BaseDtype::config_name(dtype).to_string();
        check_device_support(dtype, options.base_quant, device)?;
        let mut source = BaseDtypeSource::new(source, dtype).with_quant(options.base_quant);
        Llama::from_source(&config, &mut source, device).map(CausalLm::from)
    };
    if is_gguf(path) {
        let file = GgufFile::open(path)?;
        let config = config_from_gguf(&file)?;
        let gguf_metadata = Some(file.metadata.clone());
        let mut weights = GgufWeights::new(file, &config);
        let model = build_llama(config, &mut weights)?;
        return Ok(LoadedModel {
            model,
            format: ModelFormat::Gguf,
            path: path.to_path_buf(),
            hf_config: None,
            gguf_metadata,
        });
    }
    if path.is_file() && crate::rwkv::is_rwkv_cpp(path) {
        let mut weights = crate::rwkv::RwkvCppWeights::open(path)?;
        let what = (path, ModelFormat::RwkvCpp, None);
        let base = (options.base_dtype.resolve(DType::F32), options.base_quant);
        return load_rwkv(&weights.shapes(), &mut weights, what, base, device);
    }
    if path.is_file()
        && path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("bin"))
    {
        let (config, mut weights) = Llama2cWeights::open(path)?;
        let model = build_llama(config, &mut weights)?;
        return Ok(LoadedModel {
            model,
            format: ModelFormat::Llama2c,
            path: path.to_path_buf(),
            hf_config: None,
            gguf_metadata: None,
        });
    }
    let extension =
        |e: &str| path.is_file() && path.extension().is_some_and(|x| x.eq_ignore_ascii_case(e));
    if extension("safetensors") {
        return load_rwkv_safetensors(path, path, None, options, device);
    }
    if extension("pth") || extension("pt") {
        let mut weights = crate::pth::PthWeights::open(path)?;
        let what = (path, ModelFormat::RwkvPth, None);
        let stored = weights.dtype_of("emb.weight").unwrap_or(DType::F32);
        let base = (options.base_dtype.resolve(stored), options.base_quant);
        return load_rwkv(&weights.shapes(), &mut weights, what, base, device);
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
    if json.get("model_type").and_then(Value::as_str) == Some("rwkv7") {
        let file = path.join("model.safetensors");
        return load_rwkv_safetensors(&file, path, Some(json), options, device);
    }
    let config = LlamaConfig::from_hf_json(&json, &config_path)?;
    let mut weights = SafetensorsWeights::open(path)?;
    let model = build_llama(config, &mut weights)?;
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
