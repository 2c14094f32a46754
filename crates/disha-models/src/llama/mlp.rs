//! The SwiGLU feed-forward block.

use burn::module::Module;
use burn::tensor::activation::silu;
use burn::tensor::{DType, Tensor};
use disha_core::AdaptedLinear;
use disha_core::fused::silu_mul;

/// `down(silu(gate(x)) ⊙ up(x))`, every projection an adaptable linear.
///
/// # Shapes
/// - input / output: `[..., hidden]`
#[derive(Module, Debug)]
pub struct LlamaMlp {
    /// Gate projection `[hidden, intermediate]`.
    pub gate_proj: AdaptedLinear,
    /// Up projection `[hidden, intermediate]`.
    pub up_proj: AdaptedLinear,
    /// Down projection `[intermediate, hidden]`.
    pub down_proj: AdaptedLinear,
}

impl LlamaMlp {
    /// Applies the block.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        let gate = self.gate_proj.forward(x.clone());
        let up = self.up_proj.forward(x);
        let hidden = match gate.dtype() {
            DType::F32 => silu_mul(gate, up),
            // transformers in half precision: SiLU computed in f32 and rounded once, then the
            // product rounded.
            dtype => silu(gate.cast(DType::F32)).cast(dtype) * up,
        };
        self.down_proj.forward(hidden)
    }
}
