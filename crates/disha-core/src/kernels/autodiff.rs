//! The hand-written backward pass of [`BlockAffineOps`] (method.md §8), so that training runs the
//! same fused products as inference on every backend.
//!
//! - Both ops are marked `compute_bound`: under gradient checkpointing their output is kept, never
//!   recomputed, because recomputing means another full GEMM.
//! - Bone keeps only `S(x̃)` (`[M, r]`) for `∂L/∂B`, and only when `B` is tracked; `∂L/∂x` needs
//!   nothing from the forward but the parameters.
//! - BAT keeps `x` only when `D` is tracked (for `∂L/∂D`); it never keeps `W'`: the input gradient
//!   recomputes the transform on the fly.
//! - The weight is a constant (the callers only pass frozen weights).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, TensorMetadata};

use super::BlockAffineOps;
use super::reference::{bone_linear_from_sums, shard_sum};

#[derive(Debug)]
struct BoneLinearBackward;

impl<B: BlockAffineOps> Backward<B, 2> for BoneLinearBackward {
    /// `(weight, block, S(x̃) when block is tracked, single_pass)`.
    type State = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>, bool);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (weight, block, shard_sums, single_pass) = ops.state;
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            |grad| B::bone_linear_grad_input(grad, weight, block, single_pass),
            |grad| {
                let shard_sums = shard_sums.expect("S(x̃) is kept whenever the block is tracked");
                B::float_matmul(B::float_transpose(shard_sums), grad)
            },
        );
    }
}

#[derive(Debug)]
struct BatLinearBackward;

impl<B: BlockAffineOps> Backward<B, 2> for BatLinearBackward {
    /// `(weight, D, x when D is tracked, single_pass)`.
    type State = (FloatTensor<B>, FloatTensor<B>, Option<FloatTensor<B>>, bool);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (weight, blocks, x, single_pass) = ops.state;
        let r = blocks.shape().dims::<3>()[1];
        let blocks_dtype = blocks.dtype();
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            {
                let weight = weight.clone();
                |grad| B::bat_linear_grad_input(grad, weight, blocks, single_pass)
            },
            |grad| {
                let x = x.expect("x is kept whenever D is tracked");
                let dd = B::bat_blocks_grad(x, grad, weight, r);
                if dd.dtype() == blocks_dtype {
                    dd
                } else {
                    B::float_cast(dd, blocks_dtype.into())
                }
            },
        );
    }
}

impl<B: BlockAffineOps, C: CheckpointStrategy> BlockAffineOps for Autodiff<B, C> {
    fn bone_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        block: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let r = block.primitive().shape().dims::<2>()[0];
        let block_tracked = block.is_tracked();
        let x_node = x.node();
        let block_node = block.node();
        let x = x.into_primitive();
        let weight = weight.into_primitive();
        let block = block.into_primitive();
        match BoneLinearBackward
            .prepare::<C>([x_node, block_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let shard_sums = block_tracked.then(|| shard_sum::<B>(x.clone(), r));
                // Not single-pass, the forward is the reference body: reuse `S(x̃)`.
                let output = match (&shard_sums, single_pass) {
                    (Some(sums), false) => {
                        bone_linear_from_sums::<B>(x, weight.clone(), block.clone(), sums.clone())
                    }
                    _ => B::bone_linear(x, weight.clone(), block.clone(), single_pass),
                };
                prep.finish((weight, block, shard_sums, single_pass), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bone_linear(x, weight, block, single_pass)),
        }
    }

    fn bone_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        block: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        constant::<B, C>(B::bone_linear_grad_input(
            grad.into_primitive(),
            weight.into_primitive(),
            block.into_primitive(),
            single_pass,
        ))
    }

    fn bat_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        blocks: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let blocks_tracked = blocks.is_tracked();
        let x_node = x.node();
        let blocks_node = blocks.node();
        let x = x.into_primitive();
        let weight = weight.into_primitive();
        let blocks = blocks.into_primitive();
        match BatLinearBackward
            .prepare::<C>([x_node, blocks_node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let kept_x = blocks_tracked.then(|| x.clone());
                let output = B::bat_linear(x, weight.clone(), blocks.clone(), single_pass);
                prep.finish((weight, blocks, kept_x, single_pass), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::bat_linear(x, weight, blocks, single_pass)),
        }
    }

    fn bat_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        blocks: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        constant::<B, C>(B::bat_linear_grad_input(
            grad.into_primitive(),
            weight.into_primitive(),
            blocks.into_primitive(),
            single_pass,
        ))
    }

    fn bat_blocks_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        r: usize,
    ) -> FloatTensor<Self> {
        constant::<B, C>(B::bat_blocks_grad(
            x.into_primitive(),
            grad.into_primitive(),
            weight.into_primitive(),
            r,
        ))
    }
}

/// The backward products are not themselves differentiated (no second-order gradients): their
/// results enter the graph as constants.
fn constant<B: BlockAffineOps, C: CheckpointStrategy>(
    t: FloatTensor<B>,
) -> FloatTensor<Autodiff<B, C>> {
    <Autodiff<B, C> as AutodiffBackend>::from_inner(t)
}
