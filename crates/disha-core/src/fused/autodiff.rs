//! The hand-written backward pass of [`FusedTrainingOps`].
//!
//! - `softmax_last` keeps its output only; its backward needs nothing else.
//! - `silu_mul` keeps `up`, `sigmoid(gate)` and `silu(gate)`, and computes no sigmoid again.
//! - `cross_entropy_sum` keeps the logits (which the head's matmul keeps alive anyway), the
//!   clamped target ids, the row weights and one log-sum-exp per row (each `[N, 1]`, made once in
//!   the forward); the targets receive no gradient.

use burn::backend::Autodiff;
use burn::backend::TensorMetadata;
use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::FloatDType;

use super::FusedTrainingOps;
use super::ops::{
    cross_entropy_from_parts, cross_entropy_grad, log_sum_exp, silu_mul_grad_gate, softmax_grad,
    targets_and_weights,
};

#[derive(Debug)]
struct SoftmaxBackward;

impl<B: FusedTrainingOps> Backward<B, 1> for SoftmaxBackward {
    /// The softmax output.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let output = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            softmax_grad::<B>(output, grad)
        });
    }
}

#[derive(Debug)]
struct SiluMulBackward;

impl<B: FusedTrainingOps> Backward<B, 2> for SiluMulBackward {
    /// `(up, sigmoid(gate), silu(gate))`.
    type State = (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (up, sigmoid, silu) = ops.state;
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            {
                let silu = silu.clone();
                |grad| silu_mul_grad_gate::<B>(grad, up, sigmoid, silu)
            },
            |grad| B::float_mul(grad, silu),
        );
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: FusedTrainingOps> Backward<B, 1> for CrossEntropyBackward {
    /// `(logits, clamped target ids, row weights, log-sum-exp per row)`.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, ids, keep, lse) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            cross_entropy_grad::<B>(logits, ids, keep, lse, grad)
        });
    }
}

impl<B: FusedTrainingOps, C: CheckpointStrategy> FusedTrainingOps for Autodiff<B, C> {
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let node = x.node();
        let x = x.into_primitive();
        match SoftmaxBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::softmax_last(x);
                prep.finish(output.clone(), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::softmax_last(x)),
        }
    }

    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let nodes = [gate.node(), up.node()];
        let gate = gate.into_primitive();
        let up = up.into_primitive();
        match SiluMulBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let sigmoid = B::sigmoid(gate.clone());
                let silu = B::float_mul(gate, sigmoid.clone());
                let output = B::float_mul(silu.clone(), up.clone());
                prep.finish((up, sigmoid, silu), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::silu_mul(gate, up)),
        }
    }

    fn cross_entropy_sum(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let node = logits.node();
        let logits = logits.into_primitive();
        match CrossEntropyBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let dtype = FloatDType::from(logits.dtype());
                let (ids, keep) = targets_and_weights::<B>(targets, dtype);
                let lse = log_sum_exp::<B>(logits.clone());
                let loss = cross_entropy_from_parts::<B>(
                    logits.clone(),
                    ids.clone(),
                    keep.clone(),
                    lse.clone(),
                );
                prep.finish((logits, ids, keep, lse), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cross_entropy_sum(logits, targets)),
        }
    }
}
