//! [`BatAdapter`]: BAT, the block-affine member of DiSHA, in both orientations.
//!
//! # The forward seam
//!
//! [`block_affine_linear`] is the one function through which every BAT forward goes. Today its
//! body materializes `W'` with ordinary tensor ops (as HF PEFT does); the fused CubeCL kernel of
//! the kernels issue replaces that body on Cube backends while this tensor-op version stays as the
//! reference for every backend. Nothing else in the crate forms `W'` for a forward pass.

use burn::module::{Module, Param};
use burn::tensor::{Tensor, TensorData};

use crate::dtype::to_f32;
use crate::inverse::{SingularMatrix, invert_batch};
use crate::spec::BatOrientation;

/// A BAT adapter: `W'_ab = W_ab (I + D_k) + D_k` on every `r x r` block `(a, b)` of the weight
/// (PyTorch `[out, in]` indexing), with `k = a` ([`BatOrientation::Peft`]) or `k = b`
/// ([`BatOrientation::RwkvPeft`]).
///
/// In Burn's `[in, out]` layout the same map reads `W'_B⟨b,a⟩ = (I + D_kᵀ) W_B⟨b,a⟩ + D_kᵀ`
/// (method.md §4.1–4.2). The adapter is linear in `D` for a fixed `W`, and a zero `D` is an exact
/// no-op. Both `in` and `out` must be multiples of `r`.
#[derive(Module, Debug)]
pub struct BatAdapter {
    /// `D`, shape `[out/r, r, r]` (PEFT orientation) or `[in/r, r, r]` (RWKV-PEFT orientation),
    /// stored exactly as PEFT / RWKV-PEFT store it.
    pub blocks: Param<Tensor<3>>,
    /// Which block index shares `D[k]`.
    #[module(skip)]
    pub orientation: BatOrientation,
}

impl BatAdapter {
    /// Wraps a `D` tensor (f32) as a trainable adapter.
    pub fn new(blocks: Tensor<3>, orientation: BatOrientation) -> Self {
        Self {
            blocks: Param::from_tensor(blocks),
            orientation,
        }
    }

    /// The block size `r`.
    pub fn r(&self) -> usize {
        self.blocks.dims()[1]
    }

    /// Shapes one `[k, r, r]` stack of per-block matrices to broadcast over the
    /// `[in/r, out/r, r, r]` block view of `W_B`: along the output-block axis (PEFT) or the
    /// input-block axis (RWKV-PEFT).
    fn broadcast_over_blocks(&self, per_block: Tensor<3>) -> Tensor<4> {
        let [k, r, _] = per_block.dims();
        match self.orientation {
            BatOrientation::Peft => per_block.reshape([1, k, r, r]),
            BatOrientation::RwkvPeft => per_block.reshape([k, 1, r, r]),
        }
    }

    /// `W'` from `W` (both Burn `[in, out]`), in f32, differentiable in `D`.
    ///
    /// # Shapes
    /// - `weight`: `[in, out]`, `in % r = out % r = 0`; output: `[in, out]`
    pub fn transform_weight(&self, weight: Tensor<2>) -> Tensor<2> {
        let weight = to_f32(weight);
        let dt = self.broadcast_over_blocks(self.blocks.val().swap_dims(1, 2));
        let blocks = block_view(weight, self.r());
        let transformed = blocks.clone() + dt.clone().matmul(blocks) + dt;
        from_block_view(transformed)
    }

    /// `W` from `W'`: `W_B⟨b,a⟩ = (I + D_kᵀ)⁻¹ (W'_B⟨b,a⟩ − D_kᵀ)`, with the inverses computed
    /// once on the host in f64 (see [`crate::inverse`]).
    ///
    /// # Errors
    /// The index and pivot of the first `I + D_k` that is singular.
    pub(crate) fn inverse_transform_weight(
        &self,
        weight: Tensor<2>,
    ) -> Result<Tensor<2>, SingularMatrix> {
        let weight = to_f32(weight);
        let d = self.blocks.val();
        let device = d.device();
        let [k, r, _] = d.dims();
        let values = d
            .to_data()
            .try_to_vec_as::<f32>()
            .expect("an f32 tensor converts to Vec<f32>");
        // I + Dᵀ for every block, row-major.
        let mut shifted = vec![0.0f32; k * r * r];
        for b in 0..k {
            for p in 0..r {
                for q in 0..r {
                    let delta = if p == q { 1.0 } else { 0.0 };
                    shifted[(b * r + p) * r + q] = delta + values[(b * r + q) * r + p];
                }
            }
        }
        let inverse = invert_batch(&shifted, r)?;
        let inverse = self.broadcast_over_blocks(Tensor::<3>::from_data(
            TensorData::new(inverse, [k, r, r]),
            &device,
        ));
        let dt = self.broadcast_over_blocks(d.swap_dims(1, 2));
        Ok(from_block_view(inverse.matmul(block_view(weight, r) - dt)))
    }
}

/// **The BAT forward seam**: `y = x · T_D(W) + bias`, with `T_D` the block-affine map of `adapter`.
///
/// This reference body materializes `W' = T_D(W)` (`in x out`, f32) with tensor ops; autodiff then
/// keeps `x` and computes the dense `G = Xᵀ·δY` in backward, exactly PEFT's cost (method.md §9).
/// The fused block-affine kernel replaces this body on Cube backends; its contract is this
/// function's output and gradients. Like PEFT, the product runs in f32 whatever the input dtype.
///
/// # Shapes
/// - `x`: `[..., in]`; `weight`: `[in, out]`; `bias`: `[out]`
/// - output: `[..., out]` (f32)
pub fn block_affine_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    adapter: &BatAdapter,
) -> Tensor<D> {
    let transformed = adapter.transform_weight(weight);
    burn::tensor::module::linear(to_f32(x), transformed, bias.map(to_f32))
}

/// `[in, out]` → `[in/r, out/r, r, r]` with element `(b, a, p, q) = W_B⟨b,a⟩[p, q]`.
fn block_view(weight: Tensor<2>, r: usize) -> Tensor<4> {
    let [d_input, d_output] = weight.dims();
    weight
        .reshape([d_input / r, r, d_output / r, r])
        .swap_dims(1, 2)
}

/// Inverse of `block_view`.
fn from_block_view(blocks: Tensor<4>) -> Tensor<2> {
    let [nb, na, r, _] = blocks.dims();
    blocks.swap_dims(1, 2).reshape([nb * r, na * r])
}
