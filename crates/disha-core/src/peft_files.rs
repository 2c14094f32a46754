//! Reading and writing PEFT adapter directories (`adapter_config.json` +
//! `adapter_model.safetensors`, method.md §11) without any model: the file-format layer.
//!
//! Model-aware loading and saving (key ↔ layer mapping, shape checks against each layer) is in
//! [`crate::peft_model`].

use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::{Path, PathBuf};

use safetensors::{Dtype, tensor::TensorView};

use crate::error::{DishaError, Result};
use crate::peft_config::{PeftConfig, PeftType};
use crate::safetensors_file::SafetensorsFile;

/// File name of the adapter config inside an adapter directory.
pub const CONFIG_FILE: &str = "adapter_config.json";
/// File name of the adapter tensors inside an adapter directory.
pub const WEIGHTS_FILE: &str = "adapter_model.safetensors";
/// Prefix PEFT puts before the HF module path in every tensor key.
pub const KEY_PREFIX: &str = "base_model.model.";

/// A tensor held on the host in f32.
#[derive(Clone, Debug, PartialEq)]
pub struct HostTensor {
    /// Dimensions.
    pub shape: Vec<usize>,
    /// Row-major values.
    pub values: Vec<f32>,
}

impl HostTensor {
    /// A tensor from its shape and values.
    ///
    /// # Panics
    /// When `values.len()` is not the product of `shape` (a programmer error).
    pub fn new(shape: Vec<usize>, values: Vec<f32>) -> Self {
        assert_eq!(
            shape.iter().product::<usize>(),
            values.len(),
            "HostTensor: {} values for shape {shape:?}",
            values.len()
        );
        Self { shape, values }
    }

    /// The first NaN or infinite value and its flat index, if any.
    pub fn first_non_finite(&self) -> Option<(usize, f32)> {
        self.values
            .iter()
            .position(|v| !v.is_finite())
            .map(|i| (i, self.values[i]))
    }

    /// `Ok` when every value is finite; else [`DishaError::NonFiniteTensor`] naming `path` and
    /// `key`.
    ///
    /// # Errors
    /// A NaN or infinite value.
    pub fn check_finite(&self, path: &Path, key: &str) -> Result<()> {
        match self.first_non_finite() {
            None => Ok(()),
            Some((index, value)) => Err(DishaError::NonFiniteTensor {
                path: path.to_path_buf(),
                key: key.to_string(),
                index,
                value,
            }),
        }
    }
}

/// The contents of a PEFT adapter directory.
#[derive(Clone, Debug)]
pub struct PeftAdapterFiles {
    /// The directory read.
    pub dir: PathBuf,
    /// The parsed config.
    pub config: PeftConfig,
    /// Every tensor, converted to f32, keyed as in the file except that legacy Bone keys
    /// (`….bone_block`) are renamed to `….miss_block` (PEFT's `convert-bone-to-miss.py`).
    pub tensors: BTreeMap<String, HostTensor>,
}

impl PeftAdapterFiles {
    /// Path of the tensor file.
    pub fn weights_path(&self) -> PathBuf {
        self.dir.join(WEIGHTS_FILE)
    }
}

/// Reads an adapter directory written by HF PEFT (≥ 0.14) or by `disha`.
///
/// # Errors
/// Missing files (a legacy `adapter_model.bin` is named as unsupported), an invalid config, a
/// malformed safetensors file, a tensor that is not F32 / F16 / BF16, or a NaN / infinite
/// value (an adapter saved from a diverged run).
pub fn read_adapter_dir(dir: &Path) -> Result<PeftAdapterFiles> {
    let config = PeftConfig::from_file(&dir.join(CONFIG_FILE))?;
    let weights = dir.join(WEIGHTS_FILE);
    if !weights.exists() && dir.join("adapter_model.bin").exists() {
        return Err(DishaError::Unsupported(format!(
            "{}: only a pickled adapter_model.bin is present; re-save it with \
             safe_serialization=True (PEFT's default)",
            dir.display()
        )));
    }
    let mut tensors = read_safetensors(&weights)?;
    for (key, tensor) in &tensors {
        tensor.check_finite(&weights, key)?;
    }
    if config.peft_type == PeftType::Bone {
        tensors = tensors
            .into_iter()
            .map(|(k, v)| (k.replace(".bone_", ".miss_"), v))
            .collect();
    }
    Ok(PeftAdapterFiles {
        dir: dir.to_path_buf(),
        config,
        tensors,
    })
}

/// Reads every tensor of a safetensors file as f32, one tensor at a time (see
/// [`SafetensorsFile`]).
///
/// # Errors
/// I/O, a malformed file, or a dtype other than F32 / F16 / BF16, naming the file and key.
pub fn read_safetensors(path: &Path) -> Result<BTreeMap<String, HostTensor>> {
    let file = SafetensorsFile::open(path)?;
    file.tensors()
        .keys()
        .map(|key| Ok((key.clone(), file.read_f32(key)?)))
        .collect()
}

/// Writes an adapter directory: `adapter_config.json` (sorted keys, as PEFT) and
/// `adapter_model.safetensors` (F32, metadata `{"format": "pt"}`), each atomically (temporary
/// file in the same directory, fsync, rename). The directory is created if needed.
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_adapter_dir(
    dir: &Path,
    config: &PeftConfig,
    tensors: &BTreeMap<String, HostTensor>,
) -> Result<()> {
    std::fs::create_dir_all(dir).map_err(|e| DishaError::io(dir, e))?;
    let weights = serialize_f32(tensors).map_err(|message| DishaError::Safetensors {
        path: dir.join(WEIGHTS_FILE),
        message,
    })?;
    write_atomic(&dir.join(WEIGHTS_FILE), &weights)?;
    let mut json = config.to_json_string();
    json.push('\n');
    write_atomic(&dir.join(CONFIG_FILE), json.as_bytes())
}

fn serialize_f32(tensors: &BTreeMap<String, HostTensor>) -> std::result::Result<Vec<u8>, String> {
    let bytes: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(k, t)| {
            let data = t.values.iter().flat_map(|v| v.to_le_bytes()).collect();
            (k.clone(), t.shape.clone(), data)
        })
        .collect();
    let views = bytes
        .iter()
        .map(|(k, shape, data)| {
            TensorView::new(Dtype::F32, shape.clone(), data)
                .map(|v| (k.clone(), v))
                .map_err(|e| e.to_string())
        })
        .collect::<std::result::Result<Vec<_>, _>>()?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(views, Some(metadata)).map_err(|e| e.to_string())
}

/// Writes `bytes` to `path` atomically: a temporary file in the same directory is written,
/// flushed to disk and renamed over `path`, so a crash leaves either the old or the new file.
///
/// # Errors
/// I/O errors, naming the path.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    let mut file =
        tempfile::NamedTempFile::new_in(parent).map_err(|e| DishaError::io(parent, e))?;
    file.write_all(bytes)
        .and_then(|()| file.as_file().sync_all())
        .map_err(|e| DishaError::io(file.path(), e))?;
    file.persist(path)
        .map_err(|e| DishaError::io(path, e.error))?;
    // Make the rename itself durable; not every platform can open a directory, so best effort.
    if let Ok(dir) = std::fs::File::open(parent) {
        let _ = dir.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft_config::TargetModules;
    use half::{bf16, f16};

    #[test]
    fn writes_f32_with_pt_metadata_and_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let config = PeftConfig::miss(2, TargetModules::Names(vec!["q_proj".into()]));
        let key = "base_model.model.model.layers.0.self_attn.q_proj.miss_block".to_string();
        let tensors = BTreeMap::from([(
            key.clone(),
            HostTensor::new(vec![2, 3], vec![1., 2., 3., 4., 5., 6.]),
        )]);
        write_adapter_dir(dir.path(), &config, &tensors).unwrap();
        let bytes = std::fs::read(dir.path().join(WEIGHTS_FILE)).unwrap();
        let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
        assert_eq!(
            meta.metadata().as_ref().and_then(|m| m.get("format")),
            Some(&"pt".to_string())
        );
        let back = read_adapter_dir(dir.path()).unwrap();
        assert_eq!(back.tensors, tensors);
        assert_eq!(back.config, config.normalized());
    }

    #[test]
    fn atomic_writes_replace_whole_files_and_leave_no_temporaries() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("file.bin");
        write_atomic(&path, &[1u8; 1000]).unwrap();
        write_atomic(&path, b"short").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"short");
        let names: Vec<_> = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from("file.bin")]);
    }

    #[test]
    fn half_precision_tensors_load_as_f32() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("t.safetensors");
        let values = [1.5f32, -2.25, 0.0, 1024.0];
        let bf: Vec<u8> = values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect();
        let hf: Vec<u8> = values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect();
        let bytes = safetensors::serialize(
            [
                ("b", TensorView::new(Dtype::BF16, vec![2, 2], &bf).unwrap()),
                ("h", TensorView::new(Dtype::F16, vec![4], &hf).unwrap()),
            ],
            None,
        )
        .unwrap();
        std::fs::write(&path, bytes).unwrap();
        let tensors = read_safetensors(&path).unwrap();
        assert_eq!(tensors["b"], HostTensor::new(vec![2, 2], values.to_vec()));
        assert_eq!(tensors["h"], HostTensor::new(vec![4], values.to_vec()));
    }

    #[test]
    fn reports_missing_files_and_bad_dtypes() {
        let dir = tempfile::tempdir().unwrap();
        let e = read_adapter_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains(CONFIG_FILE), "{e}");
        std::fs::write(dir.path().join(CONFIG_FILE), r#"{"peft_type":"MISS"}"#).unwrap();
        std::fs::write(dir.path().join("adapter_model.bin"), b"pickle").unwrap();
        let e = read_adapter_dir(dir.path()).unwrap_err();
        assert!(e.to_string().contains("adapter_model.bin"), "{e}");
        let data = [0u8; 8];
        let view = TensorView::new(Dtype::I64, vec![1], &data).unwrap();
        let bytes = safetensors::serialize([("x", view)], None).unwrap();
        std::fs::write(dir.path().join(WEIGHTS_FILE), bytes).unwrap();
        let e = read_adapter_dir(dir.path()).unwrap_err();
        assert!(
            matches!(e, DishaError::TensorDtype { ref key, .. } if key == "x"),
            "{e}"
        );
        std::fs::write(dir.path().join(WEIGHTS_FILE), b"truncated").unwrap();
        let e = read_adapter_dir(dir.path()).unwrap_err();
        assert!(matches!(e, DishaError::Safetensors { .. }), "{e}");
    }
}
