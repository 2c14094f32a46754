//! Exact conversions between adapter families.

use burn::tensor::{Tensor, TensorData};

use crate::adapter::Adapter;
use crate::error::{DishaError, Result};
use crate::lora::LoraAdapter;

/// The LoRA adapter that computes exactly what a Bone or mini adapter computes (PEFT
/// `_convert_miss_module_to_lora`, method.md §2.3): `lora_A[j, i] = [i mod r = j]` (`[r, in]`),
/// `lora_B = B_fullᵀ` (`[out, r]`) and scale 1. Dropout carries over (both act on the input).
/// A LoRA adapter converts to itself.
///
/// # Errors
/// BAT: its delta depends on the weight and has no exact rank-`r` LoRA form (PEFT's conversion
/// is an approximate truncated SVD).
pub fn miss_to_lora(adapter: &Adapter, d_input: usize, d_output: usize) -> Result<LoraAdapter> {
    let block = match adapter {
        Adapter::Bone(a) | Adapter::Mini(a) => a,
        Adapter::Lora(a) => return Ok(a.clone()),
        Adapter::Bat(_) => {
            return Err(DishaError::Unsupported(
                "BAT has no exact LoRA form (its delta depends on the frozen weight)".into(),
            ));
        }
    };
    let r = block.r();
    let values = block.block.val().detach();
    let device = values.device();
    let full = values.repeat_dim(1, d_output / block.block_width());
    let indicator: Vec<f32> = (0..r)
        .flat_map(|j| (0..d_input).map(move |i| if i % r == j { 1.0 } else { 0.0 }))
        .collect();
    let lora_a = Tensor::<2>::from_data(TensorData::new(indicator, [r, d_input]), &device);
    Ok(LoraAdapter::new(
        lora_a,
        full.transpose(),
        1.0,
        block.dropout.clone(),
    ))
}
