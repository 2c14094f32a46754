//! [`BoneAdapter`]: Bone (MiSS standard) and MiSS-mini, the column-shard members of DiSHA.

use burn::module::{Module, Param};
use burn::nn::Dropout;
use burn::tensor::{DType, Tensor};

use crate::shard::{
    add_bias, add_tiled_block, add_tiled_cols, flatten_rows, shard_sum, unflatten_rows,
};

/// A Bone or MiSS-mini adapter: one trainable block shared by every input shard.
///
/// The block has shape `[r, c]`: `c = out` for Bone (PEFT `miss_block` with `init_weights=true`)
/// and `c = mini_r` for mini (`init_weights="mini"`), where it is also tiled along the output
/// dimension. In both cases `ΔW_B[i, o] = block[i mod r, o mod c]` (Burn `[in, out]` layout), and
/// the forward never forms `ΔW`:
///
/// ```text
/// y = base(x) + tile_cols(S(dropout(x̃)) · block)        S = sum of the r-wide shards of x̃
/// ```
///
/// costing `O(M·(in + r·c + out))` extra and keeping only `S` (`[M, r]`) for backward. There is no
/// divisibility requirement on `in`: the last shard is zero-padded (method.md §2.2).
#[derive(Module, Debug)]
pub struct BoneAdapter {
    /// The shared block, `[r, c]`, stored exactly as PEFT stores `miss_block` (no transpose in
    /// either layout).
    pub block: Param<Tensor<2>>,
    /// Dropout on the (padded) input before the shard sum; identity unless training on an
    /// autodiff device (PEFT `miss_dropout`).
    pub dropout: Dropout,
}

impl BoneAdapter {
    /// Wraps a block tensor (`[r, c]`, f32) as a trainable adapter.
    pub fn new(block: Tensor<2>, dropout: Dropout) -> Self {
        Self {
            block: Param::from_tensor(block),
            dropout,
        }
    }

    /// The shard size `r`.
    pub fn r(&self) -> usize {
        self.block.dims()[0]
    }

    /// The block width `c` (`out` for Bone, `mini_r` for mini).
    pub fn block_width(&self) -> usize {
        self.block.dims()[1]
    }

    /// The adapter's additive term `tile_cols(S(dropout(x̃))·block)`, computed in f32 (like PEFT,
    /// which casts the input to the adapter's dtype).
    ///
    /// # Shapes
    /// - `x`: `[..., in]`
    /// - `y`: `[..., out]` — the running output the term is added to; returned with the term added.
    pub fn add_to_output<const D: usize>(&self, x: Tensor<D>, y: Tensor<D>) -> Tensor<D> {
        let dims = y.dims();
        let x = flatten_rows(x).cast(DType::F32);
        let x = self.dropout.forward(x);
        let term = shard_sum(x, self.r()).matmul(self.block.val());
        let y = flatten_rows(y);
        unflatten_rows(add_tiled_cols(y, term), dims)
    }

    /// Whether [`fused_linear`](Self::fused_linear) computes this adapter exactly: Bone proper
    /// (`c = out`, not mini) without dropout.
    pub fn is_fusable(&self, d_output: usize) -> bool {
        self.block_width() == d_output && self.dropout.prob == 0.0
    }

    /// The base layer and this adapter in one fused product,
    /// `x·W + S(x̃)·B + bias` ([`crate::kernels::bone_linear`]), in f32. `weight` must be frozen
    /// and the adapter [fusable](Self::is_fusable). [`AdaptedLinear`](crate::AdaptedLinear) uses
    /// it under [`KernelPolicy::SinglePass`](crate::kernels::KernelPolicy).
    ///
    /// # Shapes
    /// - `x`: `[..., in]`; `weight`: `[in, out]`; `bias`: `[out]`; output: `[..., out]`
    pub fn fused_linear<const D: usize>(
        &self,
        x: Tensor<D>,
        weight: Tensor<2>,
        bias: Option<Tensor<1>>,
    ) -> Tensor<D> {
        let dims = x.dims();
        let x = flatten_rows(x).cast(DType::F32);
        let y = crate::kernels::bone_linear(x, weight, self.block.val());
        unflatten_rows(add_bias(y, bias), dims)
    }

    /// `W + ΔW` (or `W − ΔW` with `sign = -1`), in f32. Dropout plays no role in merging.
    ///
    /// # Shapes
    /// - `weight`: `[in, out]` (Burn layout); output: `[in, out]`
    pub fn apply_delta(&self, weight: Tensor<2>, sign: f64) -> Tensor<2> {
        add_tiled_block(weight, self.block.val(), sign)
    }

    /// The dense `ΔW_B` (`[in, out]`), for inspection and export. Merging does not need it.
    pub fn delta_weight(&self, d_input: usize, d_output: usize) -> Tensor<2> {
        let zeros = Tensor::<2>::zeros([d_input, d_output], &self.block.device());
        self.apply_delta(zeros, 1.0)
    }
}
