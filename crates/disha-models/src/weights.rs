//! Where model weights come from: HF safetensors (single file or sharded), GGUF, or a seeded
//! random initialization. Every source speaks HF tensor names and PyTorch `[out, in]` layout
//! with q/k rows in the rotate-half layout, so the model builder has one path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use disha_core::{HostTensor, read_safetensors};
use serde_json::Value;

use crate::error::{ModelError, Result};

/// A set of named tensors a model is built from.
pub trait WeightSource {
    /// The file or directory, for errors.
    fn path(&self) -> &Path;

    /// Removes and returns tensor `name` (HF naming), `None` when absent.
    ///
    /// # Errors
    /// The tensor exists but cannot be read or decoded.
    fn take(&mut self, name: &str) -> Result<Option<HostTensor>>;

    /// Names not taken yet, in the source's own naming.
    fn remaining(&self) -> Vec<String>;

    /// How `name` (HF naming) is called in the source, for error messages.
    fn display_name(&self, name: &str) -> String {
        name.to_string()
    }
}

/// HF safetensors weights: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`. Shards are read when first needed and dropped when emptied,
/// so peak host memory is about one shard (as f32) when tensors are taken in file order.
#[derive(Debug)]
pub struct SafetensorsWeights {
    dir: PathBuf,
    /// Tensor name → shard file.
    shard_of: BTreeMap<String, PathBuf>,
    /// Shards read and not yet emptied.
    loaded: BTreeMap<PathBuf, BTreeMap<String, HostTensor>>,
}

impl SafetensorsWeights {
    /// Indexes the weights of HF model directory `dir`.
    ///
    /// # Errors
    /// Neither `model.safetensors` nor a valid `model.safetensors.index.json` exists, or a
    /// listed shard is missing.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut shard_of = BTreeMap::new();
        if index.is_file() {
            let text = std::fs::read_to_string(&index).map_err(|e| ModelError::io(&index, e))?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::config(&index, "<json>", e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    ModelError::config(&index, "weight_map", "missing or not an object")
                })?;
            for (name, file) in map {
                let file = file.as_str().ok_or_else(|| {
                    ModelError::config(&index, format!("weight_map.{name}"), "expected a file name")
                })?;
                let shard = dir.join(file);
                if !shard.is_file() {
                    return Err(ModelError::io(
                        &shard,
                        std::io::Error::new(
                            std::io::ErrorKind::NotFound,
                            format!("shard listed in {} for `{name}`", index.display()),
                        ),
                    ));
                }
                shard_of.insert(name.clone(), shard);
            }
        } else if single.is_file() {
            let tensors = read_safetensors(&single)?;
            for name in tensors.keys() {
                shard_of.insert(name.clone(), single.clone());
            }
            return Ok(Self {
                dir: dir.to_path_buf(),
                shard_of,
                loaded: BTreeMap::from([(single, tensors)]),
            });
        } else {
            return Err(ModelError::NotAModel {
                path: dir.to_path_buf(),
            });
        }
        Ok(Self {
            dir: dir.to_path_buf(),
            shard_of,
            loaded: BTreeMap::new(),
        })
    }
}

impl WeightSource for SafetensorsWeights {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some(shard) = self.shard_of.remove(name) else {
            return Ok(None);
        };
        if !self.loaded.contains_key(&shard) {
            let tensors = read_safetensors(&shard)?;
            self.loaded.insert(shard.clone(), tensors);
        }
        let tensors = self.loaded.get_mut(&shard).expect("inserted above");
        let tensor = tensors.remove(name);
        if !self.shard_of.values().any(|s| s == &shard) {
            self.loaded.remove(&shard);
        }
        tensor.map(Some).ok_or_else(|| ModelError::MissingTensor {
            path: shard,
            name: name.to_string(),
            needed_for: "the index lists it in this shard".into(),
        })
    }

    fn remaining(&self) -> Vec<String> {
        self.shard_of.keys().cloned().collect()
    }
}

/// Seeded `N(0, std²)` matrices, unit norm weights, zero biases: a fresh model of a given
/// config (tests, demos). Deterministic for a seed on every backend (values are made on the
/// host, in the model builder's order).
#[derive(Debug)]
pub struct RandomWeights {
    std: f32,
    rng: crate::rng::SplitMix64,
    shapes: BTreeMap<String, Vec<usize>>,
}

impl RandomWeights {
    /// Random weights for exactly the tensors of `config`, drawn from `N(0, std²)` with `seed`.
    pub fn new(config: &crate::llama::LlamaConfig, std: f32, seed: u64) -> Self {
        Self {
            std,
            rng: crate::rng::SplitMix64::new(seed),
            shapes: crate::llama::hf_tensor_shapes(config).into_iter().collect(),
        }
    }
}

impl WeightSource for RandomWeights {
    fn path(&self) -> &Path {
        Path::new("<random init>")
    }

    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some(shape) = self.shapes.remove(name) else {
            return Ok(None);
        };
        let n = shape.iter().product();
        let values = if name.ends_with("norm.weight") {
            vec![1.0; n]
        } else if name.ends_with(".bias") {
            vec![0.0; n]
        } else {
            (0..n).map(|_| self.rng.normal() * self.std).collect()
        };
        Ok(Some(HostTensor::new(shape, values)))
    }

    fn remaining(&self) -> Vec<String> {
        self.shapes.keys().cloned().collect()
    }
}
