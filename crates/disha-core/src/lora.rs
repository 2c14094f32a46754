//! [`LoraAdapter`]: activation-space LoRA, the baseline every DiSHA method is compared with.

use burn::module::{Module, Param};
use burn::nn::Dropout;
use burn::tensor::{DType, Tensor};

use crate::shard::{flatten_rows, unflatten_rows};

/// A LoRA adapter in activation space: `y = base(x) + s · (dropout(x) Aᵀ) Bᵀ`.
///
/// Unlike Burn's built-in [`LoraAdapter`](burn::module::LoraAdapter) (a weight-space
/// reparameterization that forms `W + s·a·b` and a dense `∂W'` every step), this never builds an
/// `in x out` tensor: the extra cost is `2·M·r·(in + out)` FLOPs forward and the activations kept
/// for backward are `x` and `x Aᵀ` (method.md §9.1). Tensors are stored in PEFT's orientation.
#[derive(Module, Debug)]
pub struct LoraAdapter {
    /// `lora_A`, shape `[r, in]`.
    pub lora_a: Param<Tensor<2>>,
    /// `lora_B`, shape `[out, r]`.
    pub lora_b: Param<Tensor<2>>,
    /// The scaling `s` (`alpha / r`, or `alpha / √r` for rsLoRA).
    pub scale: f64,
    /// Dropout on the input (PEFT `lora_dropout`).
    pub dropout: Dropout,
}

impl LoraAdapter {
    /// Wraps the two factors (f32, PEFT orientation) as a trainable adapter.
    pub fn new(lora_a: Tensor<2>, lora_b: Tensor<2>, scale: f64, dropout: Dropout) -> Self {
        Self {
            lora_a: Param::from_tensor(lora_a),
            lora_b: Param::from_tensor(lora_b),
            scale,
            dropout,
        }
    }

    /// The rank `r`.
    pub fn r(&self) -> usize {
        self.lora_a.dims()[0]
    }

    /// Adds `s · (dropout(x) Aᵀ) Bᵀ` (computed in f32) to the running output `y`.
    ///
    /// # Shapes
    /// - `x`: `[..., in]`, `y`: `[..., out]`; output: `[..., out]`
    pub fn add_to_output<const D: usize>(&self, x: Tensor<D>, y: Tensor<D>) -> Tensor<D> {
        let dims = y.dims();
        let x = flatten_rows(x).cast(DType::F32);
        // The scale goes on the `[M, r]` intermediate, not on the `[M, out]` term as PEFT writes
        // it: the same product (up to f32 rounding), one `out`-wide pass fewer in each direction.
        let h = self
            .dropout
            .forward(x)
            .matmul(self.lora_a.val().transpose())
            .mul_scalar(self.scale);
        let term = h.matmul(self.lora_b.val().transpose());
        unflatten_rows(flatten_rows(y) + term, dims)
    }

    /// The dense `ΔW_B = s · Aᵀ Bᵀ`, shape `[in, out]`.
    pub fn delta_weight(&self) -> Tensor<2> {
        self.lora_a
            .val()
            .transpose()
            .matmul(self.lora_b.val().transpose())
            .mul_scalar(self.scale)
    }

    /// `W + sign · ΔW` in f32.
    ///
    /// # Shapes
    /// - `weight`: `[in, out]`; output: `[in, out]`
    pub fn apply_delta(&self, weight: Tensor<2>, sign: f64) -> Tensor<2> {
        weight + self.delta_weight().mul_scalar(sign)
    }
}
