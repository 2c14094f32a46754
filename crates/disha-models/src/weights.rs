//! Where model weights come from: HF safetensors (single file or sharded), GGUF, or a seeded
//! random initialization. Every source speaks HF tensor names and PyTorch `[out, in]` layout
//! with q/k rows in the rotate-half layout, so the model builder has one path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use disha_core::AdaptedLinear;
use disha_core::limits::read_config_file;
use disha_core::{HostTensor, SafetensorsFile};
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

// Builder helpers shared by every family: tensors taken by name with their shape and
// finiteness checked, moved to the device, linears transposed into Burn's layout.

/// Takes `name` from `source`, checking its shape.
pub(crate) fn take(
    source: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
) -> Result<HostTensor> {
    let tensor = source
        .take(name)?
        .ok_or_else(|| ModelError::MissingTensor {
            path: source.path().to_path_buf(),
            name: source.display_name(name),
            needed_for: name.trim_end_matches(".weight").to_string(),
        })?;
    if tensor.shape != shape {
        return Err(ModelError::TensorShape {
            path: source.path().to_path_buf(),
            name: source.display_name(name),
            expected: shape.to_vec(),
            actual: tensor.shape,
        });
    }
    // A NaN or infinity in a weight is never meaningful: a corrupt file or a wrong read.
    tensor.check_finite(source.path(), &source.display_name(name))?;
    Ok(tensor)
}

pub(crate) fn device_tensor<const D: usize>(t: HostTensor, device: &Device) -> Tensor<D> {
    let shape: [usize; D] = t.shape.try_into().expect("rank checked by `take`");
    Tensor::from_data(TensorData::new(t.values, shape), device)
}

/// Checks that the model builder took every tensor of `source`.
///
/// # Errors
/// [`ModelError::UnusedTensors`] listing what is left (a different architecture, or a typo).
pub(crate) fn check_all_taken(source: &dyn WeightSource) -> Result<()> {
    let rest = source.remaining();
    if rest.is_empty() {
        return Ok(());
    }
    Err(ModelError::UnusedTensors {
        path: source.path().to_path_buf(),
        names: rest,
    })
}

/// A frozen adaptable linear from a PyTorch `[out, in]` weight (transposed on the host into Burn's
/// `[in, out]`).
pub(crate) fn linear(
    source: &mut dyn WeightSource,
    name: &str,
    [out, inp]: [usize; 2],
    bias: bool,
    device: &Device,
) -> Result<AdaptedLinear> {
    let w = take(source, &format!("{name}.weight"), &[out, inp])?;
    let mut t = vec![0.0f32; out * inp];
    for o in 0..out {
        for i in 0..inp {
            t[i * out + o] = w.values[o * inp + i];
        }
    }
    let weight = Tensor::from_data(TensorData::new(t, [inp, out]), device);
    let bias = if bias {
        Some(device_tensor::<1>(
            take(source, &format!("{name}.bias"), &[out])?,
            device,
        ))
    } else {
        None
    };
    Ok(AdaptedLinear::from_weights(weight, bias).with_label(name))
}

/// HF safetensors weights: `model.safetensors`, or the shards listed in
/// `model.safetensors.index.json`. Each shard's header is read when the shard is first needed
/// and each tensor when it is taken, so peak host memory is one tensor (as f32), never a whole
/// shard.
#[derive(Debug)]
pub struct SafetensorsWeights {
    dir: PathBuf,
    /// Tensor name → shard file.
    shard_of: BTreeMap<String, PathBuf>,
    /// Shards opened and not yet emptied.
    open: BTreeMap<PathBuf, SafetensorsFile>,
}

impl SafetensorsWeights {
    /// Indexes the weights of HF model directory `dir`.
    ///
    /// # Errors
    /// Neither `model.safetensors` nor a valid `model.safetensors.index.json` exists, a listed
    /// shard is missing or not a plain file name inside `dir`, or a header is malformed.
    pub fn open(dir: &Path) -> Result<Self> {
        let index = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let mut shard_of = BTreeMap::new();
        if index.is_file() {
            let text = read_config_file(&index)?;
            let json: Value = serde_json::from_str(&text)
                .map_err(|e| ModelError::config(&index, "<json>", e.to_string()))?;
            let map = json
                .get("weight_map")
                .and_then(Value::as_object)
                .ok_or_else(|| {
                    ModelError::config(&index, "weight_map", "missing or not an object")
                })?;
            for (name, file) in map {
                let field = || format!("weight_map.{name}");
                let file = file
                    .as_str()
                    .ok_or_else(|| ModelError::config(&index, field(), "expected a file name"))?;
                let plain = Path::new(file)
                    .components()
                    .all(|c| matches!(c, std::path::Component::Normal(_)));
                if !plain || file.is_empty() {
                    return Err(ModelError::config(
                        &index,
                        field(),
                        format!("`{file}` is not a file name inside the model directory"),
                    ));
                }
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
            Ok(Self {
                dir: dir.to_path_buf(),
                shard_of,
                open: BTreeMap::new(),
            })
        } else if single.is_file() {
            let file = SafetensorsFile::open(&single)?;
            for name in file.tensors().keys() {
                shard_of.insert(name.clone(), single.clone());
            }
            Ok(Self {
                dir: dir.to_path_buf(),
                shard_of,
                open: BTreeMap::from([(single, file)]),
            })
        } else {
            Err(ModelError::NotAModel {
                path: dir.to_path_buf(),
            })
        }
    }
}

impl SafetensorsWeights {
    /// The weights of one safetensors file already opened (a BlinkDL RWKV checkpoint).
    pub fn from_file(file: SafetensorsFile) -> Self {
        let path = file.path().to_path_buf();
        Self {
            dir: path.clone(),
            shard_of: file
                .tensors()
                .keys()
                .map(|name| (name.clone(), path.clone()))
                .collect(),
            open: BTreeMap::from([(path, file)]),
        }
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
        if !self.open.contains_key(&shard) {
            let file = SafetensorsFile::open(&shard)?;
            self.open.insert(shard.clone(), file);
        }
        let file = &self.open[&shard];
        let tensor = if file.tensors().contains_key(name) {
            Some(file.read_f32(name)?)
        } else {
            None
        };
        if !self.shard_of.values().any(|s| s == &shard) {
            self.open.remove(&shard);
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

    /// Random weights for the tensors `shapes` lists (any family's names, e.g.
    /// [`RwkvConfig::tensor_shapes`](crate::rwkv::RwkvConfig::tensor_shapes)).
    pub fn from_shapes(shapes: Vec<(String, Vec<usize>)>, std: f32, seed: u64) -> Self {
        Self {
            std,
            rng: crate::rng::SplitMix64::new(seed),
            shapes: shapes.into_iter().collect(),
        }
    }
}

/// A norm's scale: Llama's `*norm.weight`, RWKV's LayerNorms (`ln0`, `ln1`, `ln2`, `ln_x`,
/// `ln_out`).
fn is_norm_weight(name: &str) -> bool {
    name.ends_with("norm.weight")
        || name
            .strip_suffix(".weight")
            .and_then(|module| module.rsplit('.').next())
            .is_some_and(|last| last.starts_with("ln"))
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
        let values = if is_norm_weight(name) {
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
