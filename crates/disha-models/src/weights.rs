//! Where model weights come from: HF safetensors (single file or sharded), GGUF, or a seeded
//! random initialization. Every source speaks HF tensor names and PyTorch `[out, in]` layout
//! with q/k rows in the rotate-half layout, so the model builder has one path.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use burn::tensor::{DType, Device, Tensor, TensorData};
use disha_core::limits::read_config_file;
use disha_core::{AdaptedLinear, QuantFormat, QuantizedMatrix};
use disha_core::{HostTensor, SafetensorsFile};
use half::{bf16, f16};
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

    /// Removes and returns tensor `name` converted to `dtype` (F32, F16 or BF16), `None` when
    /// absent. The default converts what [`take`](Self::take) returns; a source that can read
    /// straight into `dtype` (safetensors) overrides it, so a half-precision weight never
    /// exists as f32 on the host.
    ///
    /// # Errors
    /// The tensor exists but cannot be read or decoded.
    fn take_data(&mut self, name: &str, dtype: DType) -> Result<Option<TensorData>> {
        Ok(self
            .take(name)?
            .map(|t| TensorData::new(t.values, t.shape).convert_dtype(dtype)))
    }

    /// The dtype the model builders keep frozen matrices in: F32 unless the source is wrapped
    /// in a [`BaseDtypeSource`](crate::BaseDtypeSource).
    fn base_dtype(&self) -> DType {
        DType::F32
    }

    /// The block format the model builders quantize the adaptable linears' frozen weights in:
    /// none unless the source is wrapped in a [`BaseDtypeSource`](crate::BaseDtypeSource) with
    /// one.
    fn base_quant(&self) -> Option<QuantFormat> {
        None
    }

    /// Removes and returns tensor `name` as ggml blocks of `format` (each: the f16 scale, then
    /// the codes) with its PyTorch-order shape, when the source stores it in exactly that format
    /// (a GGUF `Q8_0` / `Q4_0` weight); `None` otherwise, the tensor left in place. The model
    /// builders then keep the blocks as they are instead of dequantizing and requantizing.
    ///
    /// # Errors
    /// The tensor exists but cannot be read.
    fn take_ggml_blocks(
        &mut self,
        _name: &str,
        _format: QuantFormat,
    ) -> Result<Option<(Vec<u8>, Vec<usize>)>> {
        Ok(None)
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
        .ok_or_else(|| missing_tensor(source, name))?;
    check_shape(source, name, &tensor.shape, shape)?;
    // A NaN or infinity in a weight is never meaningful: a corrupt file or a wrong read.
    tensor.check_finite(source.path(), &source.display_name(name))?;
    Ok(tensor)
}

/// The error for a tensor `source` does not have.
fn missing_tensor(source: &dyn WeightSource, name: &str) -> ModelError {
    ModelError::MissingTensor {
        path: source.path().to_path_buf(),
        name: source.display_name(name),
        needed_for: name.trim_end_matches(".weight").to_string(),
    }
}

/// `Ok` when tensor `name` has the `expected` shape, else the error naming both.
fn check_shape(
    source: &dyn WeightSource,
    name: &str,
    actual: &[usize],
    expected: &[usize],
) -> Result<()> {
    if actual == expected {
        return Ok(());
    }
    Err(ModelError::TensorShape {
        path: source.path().to_path_buf(),
        name: source.display_name(name),
        expected: expected.to_vec(),
        actual: actual.to_vec(),
    })
}

/// Takes `name` from `source` in `dtype`, checking its shape and that every value is finite in
/// that dtype (an f32 weight beyond f16's ±65504 is an error naming it, not an infinity).
pub(crate) fn take_data(
    source: &mut dyn WeightSource,
    name: &str,
    shape: &[usize],
    dtype: DType,
) -> Result<TensorData> {
    let data = source
        .take_data(name, dtype)?
        .ok_or_else(|| missing_tensor(source, name))?;
    check_shape(source, name, data.shape().as_slice(), shape)?;
    if let Some((index, value)) = first_non_finite(&data) {
        return Err(disha_core::DishaError::NonFiniteTensor {
            path: source.path().to_path_buf(),
            key: format!("{} (as {dtype:?})", source.display_name(name)),
            index,
            value,
        }
        .into());
    }
    Ok(data)
}

/// The first NaN or infinity of `data` (F32, F16 or BF16) and its flat index, read in place.
fn first_non_finite(data: &TensorData) -> Option<(usize, f32)> {
    fn find<T: burn::tensor::Element>(data: &TensorData, finite: fn(&T) -> bool) -> Option<usize> {
        slice::<T>(data).iter().position(|v| !finite(v))
    }
    let index = match data.dtype() {
        DType::F16 => find::<f16>(data, |v| v.is_finite()),
        DType::BF16 => find::<bf16>(data, |v| v.is_finite()),
        _ => find::<f32>(data, |v| v.is_finite()),
    }?;
    data.iter::<f32>().nth(index).map(|v| (index, v))
}

/// A frozen matrix of the base (an embedding), kept in the source's base dtype.
pub(crate) fn base_matrix(
    source: &mut dyn WeightSource,
    name: &str,
    shape: [usize; 2],
    device: &Device,
) -> Result<Tensor<2>> {
    let dtype = source.base_dtype();
    let data = take_data(source, name, &shape, dtype)?;
    Ok(Tensor::from_data(data, (device, dtype)))
}

/// `[rows, cols]` row-major values transposed into `[cols, rows]`.
fn transposed<T: Copy + Default>(values: &[T], rows: usize, cols: usize) -> Vec<T> {
    let mut t = vec![T::default(); rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = values[r * cols + c];
        }
    }
    t
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

/// A frozen adaptable linear of a decoder block from a PyTorch `[out, in]` weight: block-quantized
/// when the source says so ([`WeightSource::base_quant`]), else as [`dense_linear`].
pub(crate) fn linear(
    source: &mut dyn WeightSource,
    name: &str,
    [out, inp]: [usize; 2],
    bias: bool,
    device: &Device,
) -> Result<AdaptedLinear> {
    let Some(format) = source.base_quant() else {
        return dense_linear(source, name, [out, inp], bias, device);
    };
    let weight_name = format!("{name}.weight");
    let display = source.display_name(&weight_name);
    let quantized = match source.take_ggml_blocks(&weight_name, format)? {
        Some((blocks, shape)) => {
            check_shape(source, &weight_name, &shape, &[out, inp])?;
            QuantizedMatrix::from_ggml_blocks(&blocks, [out, inp], format, &display, device)
        }
        None => {
            let w = take_data(source, &weight_name, &[out, inp], DType::F32)?;
            QuantizedMatrix::quantize(slice::<f32>(&w), [out, inp], format, &display, device)
        }
    }
    .map_err(|e| disha_core::DishaError::InFile {
        path: source.path().to_path_buf(),
        source: Box::new(e),
    })?;
    let bias = linear_bias(source, name, out, bias, device)?;
    Ok(AdaptedLinear::from_quantized(quantized, bias).with_label(name))
}

/// The bias `{name}.bias` `[out]` of a linear that has one.
fn linear_bias(
    source: &mut dyn WeightSource,
    name: &str,
    out: usize,
    bias: bool,
    device: &Device,
) -> Result<Option<Tensor<1>>> {
    Ok(match bias {
        true => Some(device_tensor::<1>(
            take(source, &format!("{name}.bias"), &[out])?,
            device,
        )),
        false => None,
    })
}

/// A frozen adaptable linear from a PyTorch `[out, in]` weight kept in the base dtype
/// (transposed on the host into Burn's `[in, out]`); output heads take this one whatever the
/// quantization (as QLoRA keeps `lm_head` unquantized).
pub(crate) fn dense_linear(
    source: &mut dyn WeightSource,
    name: &str,
    [out, inp]: [usize; 2],
    bias: bool,
    device: &Device,
) -> Result<AdaptedLinear> {
    let dtype = source.base_dtype();
    let w = take_data(source, &format!("{name}.weight"), &[out, inp], dtype)?;
    let data = match dtype {
        DType::F16 => TensorData::new(transposed(slice::<f16>(&w), out, inp), [inp, out]),
        DType::BF16 => TensorData::new(transposed(slice::<bf16>(&w), out, inp), [inp, out]),
        _ => TensorData::new(transposed(slice::<f32>(&w), out, inp), [inp, out]),
    };
    drop(w);
    let weight = Tensor::from_data(data, (device, dtype));
    let bias = linear_bias(source, name, out, bias, device)?;
    Ok(AdaptedLinear::from_weights(weight, bias).with_label(name))
}

/// The values of `data`, which [`take_data`] made in `T`'s dtype.
fn slice<T: burn::tensor::Element>(data: &TensorData) -> &[T] {
    data.as_slice::<T>()
        .expect("take_data returns the dtype it was asked for")
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

impl SafetensorsWeights {
    /// Removes `name` from the index and reads it with `read` from its shard (opened on first
    /// use, closed once every tensor it holds is taken).
    fn take_with<T>(
        &mut self,
        name: &str,
        read: impl FnOnce(&SafetensorsFile) -> Result<T>,
    ) -> Result<Option<T>> {
        let Some(shard) = self.shard_of.remove(name) else {
            return Ok(None);
        };
        if !self.open.contains_key(&shard) {
            let file = SafetensorsFile::open(&shard)?;
            self.open.insert(shard.clone(), file);
        }
        let file = &self.open[&shard];
        let tensor = if file.tensors().contains_key(name) {
            Some(read(file)?)
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
}

impl WeightSource for SafetensorsWeights {
    fn path(&self) -> &Path {
        &self.dir
    }

    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        self.take_with(name, |file| Ok(file.read_f32(name)?))
    }

    fn remaining(&self) -> Vec<String> {
        self.shard_of.keys().cloned().collect()
    }

    fn take_data(&mut self, name: &str, dtype: DType) -> Result<Option<TensorData>> {
        self.take_with(name, |file| Ok(file.read_data(name, dtype)?))
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
