//! [`BaseDtype`]: the dtype the frozen base weights are kept in, and [`BaseDtypeSource`], the
//! weight source that tells the model builders which one.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use burn::tensor::{DType, Device, TensorData};
use disha_core::{HostTensor, QuantFormat};

use crate::error::{ModelError, Result};
use crate::weights::WeightSource;

/// The dtype of the frozen base's matrices (every adaptable linear's weight and the token
/// embedding). Norms, biases and RWKV's small per-channel tensors stay f32, and so do adapters,
/// their gradients and optimizer state; activations are f32 unless a [`ComputeDtype`] says
/// otherwise (each frozen product casts its weight for that product only — Memory chapter of
/// the docs).
///
/// `Auto` keeps the checkpoint's own dtype: bf16 / f16 for an HF directory whose `config.json`
/// says so or a half-precision RWKV checkpoint, f32 otherwise (GGUF blocks are dequantized to
/// f32).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BaseDtype {
    /// The checkpoint's dtype.
    #[default]
    Auto,
    /// 32-bit float.
    F32,
    /// IEEE half precision (range ±65504: a larger weight is an error naming it).
    F16,
    /// bfloat16 (f32's range, 8 bits of mantissa).
    Bf16,
}

impl BaseDtype {
    /// The dtype to keep the base in for a checkpoint stored as `checkpoint` (F32, F16, BF16;
    /// anything else counts as f32).
    pub fn resolve(self, checkpoint: DType) -> DType {
        match self {
            Self::Auto => match checkpoint {
                DType::F16 | DType::BF16 => checkpoint,
                _ => DType::F32,
            },
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }

    /// The dtype a `config.json` `dtype` / `torch_dtype` string names (`None` for anything but
    /// `float32`, `float16`, `bfloat16`).
    pub fn from_config_name(name: &str) -> Option<DType> {
        match name {
            "float32" => Some(DType::F32),
            "float16" => Some(DType::F16),
            "bfloat16" => Some(DType::BF16),
            _ => None,
        }
    }

    /// The `config.json` name of `dtype` (`float32` for anything but F16 / BF16).
    pub fn config_name(dtype: DType) -> &'static str {
        match dtype {
            DType::F16 => "float16",
            DType::BF16 => "bfloat16",
            _ => "float32",
        }
    }
}

/// Refuses a frozen base `device` cannot hold, naming the setting: a half dtype it has no
/// tensors of (WGPU has no bf16) or quantized codes without 8-bit integer tensors (WGSL has
/// none), instead of computing with values the backend cannot represent.
pub(crate) fn check_device_support(
    dtype: DType,
    quant: Option<QuantFormat>,
    device: &Device,
) -> Result<()> {
    if !device.supports_dtype(dtype) {
        return Err(ModelError::InvalidArgument {
            name: "base dtype".into(),
            value: BaseDtype::config_name(dtype).into(),
            message: format!(
                "{device:?} has no {dtype:?} tensors; load the base as f32 \
                 (--base-dtype f32) on this device"
            ),
        });
    }
    if let Some(format) = quant {
        let codes = match format {
            QuantFormat::Q8 => DType::I8,
            QuantFormat::Q4 | QuantFormat::Q4_1 => DType::U8,
        };
        if !device.supports_dtype(codes) {
            return Err(ModelError::InvalidArgument {
                name: "base quantization".into(),
                value: format.to_string(),
                message: format!(
                    "{device:?} has no {codes:?} tensors (the quantized codes); use a dense \
                     base (--base-dtype) on this device"
                ),
            });
        }
    }
    Ok(())
}

/// The dtype a model computes its activations in
/// ([`Llama::with_compute_dtype`](crate::llama::Llama::with_compute_dtype)): f32 (the default),
/// or f16 / bf16 as transformers runs a half-precision model — for inference, and for
/// mixed-precision training (adapters and optimizer state stay f32; f16 scales its loss).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ComputeDtype {
    /// 32-bit float.
    #[default]
    F32,
    /// IEEE half precision.
    F16,
    /// bfloat16.
    Bf16,
}

impl ComputeDtype {
    /// The Burn dtype.
    pub fn dtype(self) -> DType {
        match self {
            Self::F32 => DType::F32,
            Self::F16 => DType::F16,
            Self::Bf16 => DType::BF16,
        }
    }
}

impl FromStr for ComputeDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown compute dtype `{other}`: use f32, f16 or bf16"
            )),
        }
    }
}

impl fmt::Display for ComputeDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

impl FromStr for BaseDtype {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Self::Auto),
            "f32" | "float32" => Ok(Self::F32),
            "f16" | "float16" => Ok(Self::F16),
            "bf16" | "bfloat16" => Ok(Self::Bf16),
            other => Err(format!(
                "unknown base dtype `{other}`: use auto, f32, f16 or bf16"
            )),
        }
    }
}

impl fmt::Display for BaseDtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Auto => "auto",
            Self::F32 => "f32",
            Self::F16 => "f16",
            Self::Bf16 => "bf16",
        })
    }
}

/// A [`WeightSource`] whose frozen matrices the model builders keep in `dtype`: everything is
/// read through `inner`, and [`base_dtype`](WeightSource::base_dtype) answers `dtype`.
pub struct BaseDtypeSource<'a> {
    inner: &'a mut dyn WeightSource,
    dtype: DType,
    quant: Option<QuantFormat>,
}

impl fmt::Debug for BaseDtypeSource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BaseDtypeSource")
            .field("path", &self.inner.path())
            .field("dtype", &self.dtype)
            .field("quant", &self.quant)
            .finish()
    }
}

impl<'a> BaseDtypeSource<'a> {
    /// `inner`, its frozen matrices kept in `dtype` (F32, F16 or BF16).
    ///
    /// # Panics
    /// Another dtype (a programmer error: [`BaseDtype::resolve`] gives only these three).
    pub fn new(inner: &'a mut dyn WeightSource, dtype: DType) -> Self {
        assert!(
            matches!(dtype, DType::F32 | DType::F16 | DType::BF16),
            "BaseDtypeSource: {dtype:?} is not a float dtype a base is kept in"
        );
        Self {
            inner,
            dtype,
            quant: None,
        }
    }

    /// Also block-quantizes the adaptable linears' weights in `quant` (`None`: kept in the
    /// base dtype).
    pub fn with_quant(mut self, quant: Option<QuantFormat>) -> Self {
        self.quant = quant;
        self
    }
}

impl WeightSource for BaseDtypeSource<'_> {
    fn path(&self) -> &Path {
        self.inner.path()
    }

    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        self.inner.take(name)
    }

    fn take_data(&mut self, name: &str, dtype: DType) -> Result<Option<TensorData>> {
        self.inner.take_data(name, dtype)
    }

    fn remaining(&self) -> Vec<String> {
        self.inner.remaining()
    }

    fn display_name(&self, name: &str) -> String {
        self.inner.display_name(name)
    }

    fn base_dtype(&self) -> DType {
        self.dtype
    }

    fn base_quant(&self) -> Option<QuantFormat> {
        self.quant
    }

    fn take_ggml_blocks(
        &mut self,
        name: &str,
        format: QuantFormat,
    ) -> Result<Option<(Vec<u8>, Vec<usize>)>> {
        self.inner.take_ggml_blocks(name, format)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn auto_keeps_half_checkpoints_and_explicit_choices_win() {
        assert_eq!(BaseDtype::Auto.resolve(DType::BF16), DType::BF16);
        assert_eq!(BaseDtype::Auto.resolve(DType::F16), DType::F16);
        assert_eq!(BaseDtype::Auto.resolve(DType::F32), DType::F32);
        assert_eq!(BaseDtype::F32.resolve(DType::BF16), DType::F32);
        assert_eq!(BaseDtype::Bf16.resolve(DType::F32), DType::BF16);
        assert_eq!("BF16".parse::<BaseDtype>(), Ok(BaseDtype::Bf16));
        assert_eq!("float16".parse::<BaseDtype>(), Ok(BaseDtype::F16));
        assert!(
            "int8"
                .parse::<BaseDtype>()
                .unwrap_err()
                .contains("auto, f32")
        );
        for d in [DType::F32, DType::F16, DType::BF16] {
            assert_eq!(
                BaseDtype::from_config_name(BaseDtype::config_name(d)),
                Some(d)
            );
        }
    }
}
