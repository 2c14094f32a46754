//! PyTorch `.pth` checkpoints (`torch.save(state_dict)`: a zip archive, or the legacy pickle
//! container) as a [`WeightSource`]: the pickle is parsed at open, each tensor read from its
//! storage when taken.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use disha_core::HostTensor;
use disha_core::limits::limits;
use half::{bf16, f16};
use pytorch_reader::{DType, PytorchReader, Tensor};

use crate::error::{ModelError, Result};
use crate::weights::WeightSource;

/// The tensors of a `.pth` checkpoint (a flat `dict[str, Tensor]`), read one at a time.
pub struct PthWeights {
    path: PathBuf,
    tensors: BTreeMap<String, Tensor>,
}

impl std::fmt::Debug for PthWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PthWeights")
            .field("path", &self.path)
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl PthWeights {
    /// Parses the checkpoint's pickle (no tensor data is read yet) and checks every tensor's
    /// count, rank, extents and type against [`disha_core::limits`].
    ///
    /// # Errors
    /// Every reader failure and every tensor outside the limits or of a non-float type, as
    /// [`ModelError::Pytorch`] naming the file (and the tensor where there is one).
    pub fn open(path: &Path) -> Result<Self> {
        let error = |message: String| ModelError::Pytorch {
            path: path.to_path_buf(),
            message,
        };
        let reader = PytorchReader::new(path).map_err(|e| error(e.to_string()))?;
        let l = limits();
        if reader.len() as u64 > l.max_tensor_count {
            return Err(error(format!(
                "{} tensors, more than the limit of {}",
                reader.len(),
                l.max_tensor_count
            )));
        }
        let tensors: BTreeMap<String, Tensor> = reader.into_tensors().into_iter().collect();
        for (name, t) in &tensors {
            if t.shape().len() > l.max_tensor_rank
                || t.shape().iter().any(|&d| d == 0 || d > l.max_dim)
            {
                return Err(error(format!(
                    "tensor `{name}` has shape {:?} (rank at most {}, extents 1..={})",
                    t.shape(),
                    l.max_tensor_rank,
                    l.max_dim
                )));
            }
            if !matches!(t.dtype(), DType::F32 | DType::F16 | DType::BF16) {
                return Err(error(format!(
                    "tensor `{name}` is {:?}; weights must be float32, float16 or bfloat16",
                    t.dtype()
                )));
            }
        }
        Ok(Self {
            path: path.to_path_buf(),
            tensors,
        })
    }

    /// Every tensor not taken yet, by name, each read and checked finite (small checkpoints:
    /// adapters, trained base tensors).
    ///
    /// # Errors
    /// A tensor that cannot be read, or a NaN / infinity in one (naming file and tensor).
    pub fn take_all(&mut self) -> Result<BTreeMap<String, HostTensor>> {
        let mut out = BTreeMap::new();
        for name in self.remaining() {
            let tensor = self.take(&name)?.expect("listed by remaining()");
            tensor.check_finite(&self.path, &name)?;
            out.insert(name, tensor);
        }
        Ok(out)
    }

    /// The stored dtype of tensor `name` (F16, BF16, or F32 for anything else), `None` when
    /// absent.
    pub fn dtype_of(&self, name: &str) -> Option<burn::tensor::DType> {
        self.tensors.get(name).map(|t| match t.dtype() {
            DType::F16 => burn::tensor::DType::F16,
            DType::BF16 => burn::tensor::DType::BF16,
            _ => burn::tensor::DType::F32,
        })
    }

    /// Every tensor's shape, by name.
    pub fn shapes(&self) -> BTreeMap<String, Vec<usize>> {
        self.tensors
            .iter()
            .map(|(name, t)| (name.clone(), t.shape().to_vec()))
            .collect()
    }
}

impl WeightSource for PthWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some(tensor) = self.tensors.remove(name) else {
            return Ok(None);
        };
        let bytes = tensor.read().map_err(|e| ModelError::Pytorch {
            path: self.path.clone(),
            message: e.to_string(),
        })?;
        // The reader returns contiguous native-endian elements of exactly `byte_len` bytes.
        let values: Vec<f32> = match tensor.dtype() {
            DType::F32 => bytes
                .chunks_exact(4)
                .map(|b| f32::from_ne_bytes([b[0], b[1], b[2], b[3]]))
                .collect(),
            DType::F16 => bytes
                .chunks_exact(2)
                .map(|b| f16::from_ne_bytes([b[0], b[1]]).to_f32())
                .collect(),
            DType::BF16 => bytes
                .chunks_exact(2)
                .map(|b| bf16::from_ne_bytes([b[0], b[1]]).to_f32())
                .collect(),
            other => unreachable!("types are checked at open, not {other:?}"),
        };
        if values.len() != tensor.num_elements() {
            return Err(ModelError::Pytorch {
                path: self.path.clone(),
                message: format!(
                    "tensor `{name}`: {} bytes for {} elements",
                    bytes.len(),
                    tensor.num_elements()
                ),
            });
        }
        Ok(Some(HostTensor::new(tensor.shape().to_vec(), values)))
    }

    fn remaining(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}
