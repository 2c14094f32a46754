//! [`BatAdapter`]: BAT, the block-affine member of DiSHA, in both orientations.
//!
//! # The forward seam
//!
//! [`block_affine_linear`] is the one function through which every BAT forward goes:
//! - PEFT orientation, frozen weight, any [policy](crate::kernels::KernelPolicy) but `Reference`:
//!   [`crate::kernels::bat_linear`] (`W'` formed in bounded chunks or tile by tile, never kept);
//! - RWKV-PEFT orientation: the input prologue of method.md §9.3, `y = (x + z)·W + tile(Σ_b z_b)`
//!   with `z_b = x_b·D[b]ᵀ`, plain tensor ops that never form `W'` on any backend;
//! - otherwise (the reference policy, a trainable weight): `W'` materialized with tensor ops, as
//!   HF PEFT does.

use burn::module::{Module, Param};
use burn::tensor::{DType, Tensor, TensorData};

use crate::inverse::{SingularMatrix, invert_batch};
use crate::kernels::kernel_policy;
use crate::shard::{add_bias, flatten_rows, unflatten_rows};
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
        let weight = weight.cast(DType::F32);
        let dt = self.broadcast_over_blocks(self.blocks.val().swap_dims(1, 2));
        let blocks = block_view(weight, self.r());
        let transformed = blocks.clone() + dt.clone().matmul(blocks) + dt;
        from_block_view(transformed)
    }

    /// RWKV-PEFT orientation without forming `W'` (method.md §9.3, Burn layout):
    /// `y = (x + z)·W + tile_{out/r}(Σ_b z_b)` with `z_b = x_b·D[b]ᵀ` per input block `b`.
    /// Costs `O(M·in·r)` extra; autodiff keeps `x` (for `∂L/∂D`) and nothing weight-sized.
    ///
    /// # Shapes
    /// - `x`: `[M, in]` (f32); `weight`: `[in, out]`; output: `[M, out]`
    fn prologue_linear(&self, x: Tensor<2>, weight: Tensor<2>) -> Tensor<2> {
        let [m, d_input] = x.dims();
        let r = self.r();
        let nb = d_input / r;
        // z[t, b, :] = x[t, b, :]·D[b]ᵀ, as a batch over b: [nb, M, r]·[nb, r, r].
        let x_blocks = x.clone().reshape([m, nb, r]).swap_dims(0, 1);
        let z = x_blocks.matmul(self.blocks.val().swap_dims(1, 2));
        let z_sum = z.clone().sum_dim(0).reshape([m, r]);
        let z = z.swap_dims(0, 1).reshape([m, d_input]);
        let y = (x + z).matmul(weight.cast(DType::F32));
        crate::shard::add_tiled_cols(y, z_sum)
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
        let weight = weight.cast(DType::F32);
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
/// `weight` is the (running) base weight; `frozen` says it receives no gradient, which the fused
/// path requires. See the module docs for which formulation runs. All of them compute the same
/// function and gradients (tested against each other); like PEFT, the product runs in f32
/// whatever the input dtype.
///
/// # Shapes
/// - `x`: `[..., in]`; `weight`: `[in, out]`; `bias`: `[out]`
/// - output: `[..., out]` (f32)
pub fn block_affine_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    adapter: &BatAdapter,
    frozen: bool,
) -> Tensor<D> {
    let fused = frozen && kernel_policy().uses_ops();
    match adapter.orientation {
        BatOrientation::Peft if fused => {
            let dims = x.dims();
            let y = crate::kernels::bat_linear(
                flatten_rows(x).cast(DType::F32),
                weight,
                adapter.blocks.val(),
            );
            unflatten_rows(add_bias(y, bias), dims)
        }
        BatOrientation::RwkvPeft => {
            let dims = x.dims();
            let y = adapter.prologue_linear(flatten_rows(x).cast(DType::F32), weight);
            unflatten_rows(add_bias(y, bias), dims)
        }
        BatOrientation::Peft => reference_block_affine_linear(x, weight, bias, adapter),
    }
}

/// The materializing formulation of [`block_affine_linear`]: forms `W' = T_D(W)` (`in x out`,
/// f32) with tensor ops; autodiff then keeps `x` and computes the dense `G = Xᵀ·δY` in backward,
/// exactly PEFT's cost (method.md §9). The reference every other formulation is tested against.
///
/// # Shapes
/// - `x`: `[..., in]`; `weight`: `[in, out]`; `bias`: `[out]`
/// - output: `[..., out]` (f32)
pub fn reference_block_affine_linear<const D: usize>(
    x: Tensor<D>,
    weight: Tensor<2>,
    bias: Option<Tensor<1>>,
    adapter: &BatAdapter,
) -> Tensor<D> {
    let transformed = adapter.transform_weight(weight);
    burn::tensor::module::linear(
        x.cast(DType::F32),
        transformed,
        bias.map(|b| b.cast(DType::F32)),
    )
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{device, max_abs_diff, random};

    /// The RWKV-PEFT prologue (`W'` never formed) computes the materialized `x·T_D(W)` and the
    /// same gradients for `x` and `D`. Values are O(1) sums of ≤ 48 f32 products: 1e-5.
    #[test]
    fn rwkv_prologue_matches_the_materialized_transform() {
        let device = device().autodiff();
        let (m, d_input, d_output, r) = (7, 48, 40, 8);
        let x = random(1, [m, d_input], &device).require_grad();
        let weight = random(2, [d_input, d_output], &device);
        let d = random(3, [d_input / r, r, r], &device).require_grad();
        let cotangent = random(4, [m, d_output], &device);
        let adapter = BatAdapter::new(d.clone(), BatOrientation::RwkvPeft);

        let prologue = adapter.prologue_linear(x.clone(), weight.clone());
        let materialized = reference_block_affine_linear(x.clone(), weight, None, &adapter);
        let g1 = (prologue.clone() * cotangent.clone()).sum().backward();
        let g2 = (materialized.clone() * cotangent).sum().backward();

        assert!(max_abs_diff(prologue, materialized) < 1e-5);
        let dx = max_abs_diff(x.grad(&g1).unwrap(), x.grad(&g2).unwrap());
        let dd = max_abs_diff(d.grad(&g1).unwrap(), d.grad(&g2).unwrap());
        assert!(dx < 1e-5 && dd < 1e-5, "dL/dx diff {dx}, dL/dD diff {dd}");
    }
}
