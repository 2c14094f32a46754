//! Writing a merged model as a plain HF directory (`config.json` + `model.safetensors`) that
//! transformers loads with no PEFT installed.

use std::path::Path;

use burn::tensor::Tensor;
use disha_core::SafetensorsWriter;
use half::{bf16, f16};
use safetensors::Dtype;
use serde_json::Value;

use crate::causal_lm::CausalLm;
use crate::error::{ModelError, Result};
use crate::llama::Llama;
use disha_core::AdaptableModel;

fn encode(values: &[f32], dtype: Dtype) -> Vec<u8> {
    match dtype {
        Dtype::BF16 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        Dtype::F16 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        _ => values.iter().flat_map(|v| v.to_le_bytes()).collect(),
    }
}

/// Whether `v` is finite in `dtype` (f16 overflows past ±65504; bf16 has f32's range).
fn fits(v: f32, dtype: Dtype) -> bool {
    match dtype {
        Dtype::F16 => f16::from_f32(v).is_finite(),
        Dtype::BF16 => bf16::from_f32(v).is_finite(),
        _ => v.is_finite(),
    }
}

/// A tensor's values on the host, as f32.
pub(crate) fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data()
        .try_to_vec_as::<f32>()
        .expect("float tensors convert to f32")
}

/// Writes `model` with every active adapter merged (PEFT `merge_and_unload` then
/// `save_pretrained`) into the new directory `out`: `config.json` (the given one, its `dtype`
/// — and `torch_dtype`, where present — set to the written dtype on Llama), `model.safetensors`
/// in the base dtype (Llama: the config's `dtype`, which loading sets to the base's; RWKV-7:
/// the embedding's; `float32`, `bfloat16` or `float16`; metadata `format=pt`), and a copy of
/// each of `extra_files` (generation config, tokenizer files).
///
/// The model itself is not changed (the merged weights are computed on the side, one tensor at
/// a time, each streamed to disk as it is made). The directory is assembled in a temporary
/// sibling and renamed into place, so `out` either does not exist or is complete.
///
/// # Errors
/// `out` exists and is not an empty directory; a weight that is not finite in the export dtype
/// once merged ([`ModelError::NonFiniteExport`]: nothing is written); or I/O errors (naming the
/// path).
pub fn export_merged(
    model: &CausalLm,
    config_json: &Value,
    extra_files: &[std::path::PathBuf],
    out: &Path,
) -> Result<()> {
    if out.exists() {
        let empty = out.is_dir()
            && std::fs::read_dir(out)
                .map_err(|e| ModelError::io(out, e))?
                .next()
                .is_none();
        if !empty {
            return Err(ModelError::io(
                out,
                std::io::Error::new(
                    std::io::ErrorKind::AlreadyExists,
                    "output exists and is not empty; choose a new --out directory",
                ),
            ));
        }
    }
    let dtype = match model {
        CausalLm::Llama(llama) => match llama.config().dtype.as_str() {
            "bfloat16" => Dtype::BF16,
            "float16" => Dtype::F16,
            _ => Dtype::F32,
        },
        // The base's dtype (the embedding's: every frozen matrix shares it).
        CausalLm::Rwkv7(rwkv) => match rwkv.emb.weight.val().dtype() {
            burn::tensor::DType::BF16 => Dtype::BF16,
            burn::tensor::DType::F16 => Dtype::F16,
            _ => Dtype::F32,
        },
    };
    // The config says the dtype the weights are written in (a base loaded in another dtype
    // than its checkpoint's exports in the base's).
    let mut config_json = config_json.clone();
    if let (CausalLm::Llama(llama), Some(fields)) = (model, config_json.as_object_mut()) {
        let name = Value::from(llama.config().dtype.as_str());
        if fields.contains_key("torch_dtype") {
            fields.insert("torch_dtype".into(), name.clone());
        }
        fields.insert("dtype".into(), name);
    }
    let parent = match out.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    std::fs::create_dir_all(parent).map_err(|e| ModelError::io(parent, e))?;
    let staging = tempfile::Builder::new()
        .prefix(".disha-export-")
        .tempdir_in(parent)
        .map_err(|e| ModelError::io(parent, e))?;
    let write = |name: &str, bytes: &[u8]| -> Result<()> {
        let path = staging.path().join(name);
        std::fs::write(&path, bytes).map_err(|e| ModelError::io(&path, e))
    };
    // Each merged tensor is encoded and streamed to the staging directory as it is made (one
    // tensor in memory at a time). The first weight that is not finite in the export dtype (an
    // adapter that drives a weight out of range, or past f16's ±65504) stops the export; the
    // staging directory is removed and nothing appears at `out`.
    let mut writer = SafetensorsWriter::create(staging.path().join("model.safetensors"))?;
    let mut failure: Option<ModelError> = None;
    let mut push = |name: String, shape: Vec<usize>, values: Vec<f32>| {
        if failure.is_some() {
            return;
        }
        if let Some(index) = values.iter().position(|&v| !fits(v, dtype)) {
            failure = Some(ModelError::NonFiniteExport {
                name,
                index,
                value: values[index],
                dtype: format!("{dtype:?}"),
            });
            return;
        }
        let bytes = encode(&values, dtype);
        drop(values);
        if let Err(e) = writer.write(&name, dtype, &shape, &bytes) {
            failure = Some(e.into());
        }
    };
    match model {
        CausalLm::Llama(llama) => llama_merged_tensors(llama, &mut push),
        CausalLm::Rwkv7(rwkv) => {
            rwkv.merged_tensors(&mut |name, shape, t| push(name, shape, host(t)));
        }
    }
    if let Some(e) = failure {
        return Err(e);
    }
    writer.finish(&[("format", "pt")])?;
    let mut config = serde_json::to_string_pretty(&config_json).expect("JSON values serialize");
    config.push('\n');
    write("config.json", config.as_bytes())?;
    for file in extra_files {
        let name = file
            .file_name()
            .ok_or_else(|| ModelError::io(file, std::io::Error::other("not a file name")))?;
        let dest = staging.path().join(name);
        std::fs::copy(file, &dest).map_err(|e| ModelError::io(file, e))?;
    }
    // Sync the files, then move the directory into place in one rename.
    for entry in std::fs::read_dir(staging.path()).map_err(|e| ModelError::io(staging.path(), e))? {
        let path = entry.map_err(|e| ModelError::io(staging.path(), e))?.path();
        std::fs::File::open(&path)
            .and_then(|f| f.sync_all())
            .map_err(|e| ModelError::io(&path, e))?;
    }
    let staged = staging.keep();
    std::fs::rename(&staged, out).map_err(|e| {
        let _ = std::fs::remove_dir_all(&staged);
        ModelError::io(out, e)
    })
}

/// Every tensor of the merged Llama under its HF name, in PyTorch `[out, in]` layout.
fn llama_merged_tensors(model: &Llama, push: &mut dyn FnMut(String, Vec<usize>, Vec<f32>)) {
    let embed = model.embed_tokens.weight.val();
    push(
        "model.embed_tokens.weight".into(),
        embed.dims().to_vec(),
        host(embed),
    );
    for (i, layer) in model.layers.iter().enumerate() {
        for (norm, module) in [
            ("input_layernorm", &layer.input_layernorm),
            ("post_attention_layernorm", &layer.post_attention_layernorm),
        ] {
            let g = module.gamma.val();
            push(
                format!("model.layers.{i}.{norm}.weight"),
                g.dims().to_vec(),
                host(g),
            );
        }
    }
    let g = model.norm.gamma.val();
    push("model.norm.weight".into(), g.dims().to_vec(), host(g));
    model.visit_linears(&mut |site, linear| {
        // Burn stores [in, out]; HF wants [out, in].
        let w = linear.merged_weight().transpose();
        push(format!("{}.weight", site.name), w.dims().to_vec(), host(w));
        if let Some(b) = &linear.bias {
            let b = b.val();
            push(format!("{}.bias", site.name), b.dims().to_vec(), host(b));
        }
    });
}

/// Writes the merged RWKV-7 as a BlinkDL `.pth` (f32; the keys and shapes of the source
/// checkpoint, adapters merged; what RWKV-PEFT's `merge_disha.py` writes), atomically.
/// `torch.load`, BlinkDL's `rwkv` package and [`load_model`](crate::load_model) read it.
///
/// # Errors
/// `path` exists (an export never overwrites); a weight that is not finite once merged
/// ([`ModelError::NonFiniteExport`]: nothing is written); I/O errors naming the path.
pub fn export_merged_pth(model: &crate::rwkv::Rwkv7, path: &Path) -> Result<()> {
    if path.exists() {
        return Err(ModelError::io(
            path,
            std::io::Error::new(
                std::io::ErrorKind::AlreadyExists,
                "output exists; choose a new --out file",
            ),
        ));
    }
    let mut tensors = Vec::new();
    let mut broken: Option<(String, usize, f32)> = None;
    model.merged_tensors(&mut |name, shape, t| {
        let values = host(t);
        if broken.is_none()
            && let Some(index) = values.iter().position(|v| !v.is_finite())
        {
            broken = Some((name.clone(), index, values[index]));
        }
        tensors.push((name, shape, values));
    });
    if let Some((name, index, value)) = broken {
        return Err(ModelError::NonFiniteExport {
            name,
            index,
            value,
            dtype: "F32".into(),
        });
    }
    crate::pth_writer::write_pth(path, &tensors)
}
