//! The hand-written backward pass of [`FusedTrainingOps`]; each backward is itself an op of the
//! trait, so a backend runs it as one pass.
//!
//! - `softmax_last` keeps its output only.
//! - `silu_mul` keeps `gate` and `up` (the backward recomputes the sigmoid inside its one pass).
//! - `cross_entropy_sum` keeps the logits (which the head's matmul keeps alive anyway), the
//!   targets and one log-sum-exp per row; the targets receive no gradient.
//! - `rms_norm` keeps `x` and `gamma`; the backward recomputes one reciprocal RMS per row.
//! - `rotary` keeps `cos` and `−[sin₂, sin₁]` (`[.., seq, head_dim]`, small): its backward is the
//!   rotation by the opposite angle (for RoPE's tables, whose halves are equal, `−sin`). `cos`
//!   and `sin` receive no gradient.
//! - `adamw_step` is not differentiated: the inner backend's op on the inner tensors.
//! - `frozen_matmul` keeps the stored weight (a handle, no copy): `δx = δy · cast(W)ᵀ`, the
//!   same op with the weight transposed; the weight receives no gradient.
//! - `quantized_matmul` keeps the codes and scales (handles): `δx = δy · M` (or `δy · Mᵀ`), the
//!   same op the other way round, dequantizing again; the matrix receives no gradient.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, binary, unary};
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Autodiff, AutodiffBackend};

use super::FusedTrainingOps;
use super::ops::AdamWStep;
use super::ops::inverse_rotation_sin;
use crate::quantized::QuantLayout;

#[derive(Debug)]
struct SoftmaxBackward;

impl<B: FusedTrainingOps> Backward<B, 1> for SoftmaxBackward {
    /// The softmax output.
    type State = FloatTensor<B>;

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let output = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::softmax_last_backward(output, grad)
        });
    }
}

#[derive(Debug)]
struct SiluMulBackward;

impl<B: FusedTrainingOps> Backward<B, 2> for SiluMulBackward {
    /// `(gate, up)`.
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (gate, up) = ops.state;
        let [grad_gate, grad_up] = {
            let grad = grads.consume::<B>(&ops.node);
            let (a, b) = B::silu_mul_backward(gate, up, grad);
            [a, b]
        };
        let [gate_parent, up_parent] = ops.parents;
        if let Some(node) = gate_parent {
            grads.register::<B>(node.id, grad_gate);
        }
        if let Some(node) = up_parent {
            grads.register::<B>(node.id, grad_up);
        }
    }
}

#[derive(Debug)]
struct CrossEntropyBackward;

impl<B: FusedTrainingOps> Backward<B, 1> for CrossEntropyBackward {
    /// `(logits, targets, log-sum-exp per row)`.
    type State = (FloatTensor<B>, IntTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (logits, targets, lse) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::cross_entropy_backward(logits, targets, lse, grad)
        });
    }
}

#[derive(Debug)]
struct RmsNormBackward;

impl<B: FusedTrainingOps> Backward<B, 2> for RmsNormBackward {
    /// `(x, gamma, epsilon)`.
    type State = (FloatTensor<B>, FloatTensor<B>, f64);

    fn backward(self, ops: Ops<Self::State, 2>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (x, gamma, epsilon) = ops.state;
        binary::<B, _, _>(
            ops.parents,
            ops.node,
            grads,
            {
                let x = x.clone();
                |grad| B::rms_norm_backward(x, gamma, grad, epsilon)
            },
            |grad| B::rms_norm_gamma_backward(x, grad, epsilon),
        );
    }
}

#[derive(Debug)]
struct RotaryBackward;

impl<B: FusedTrainingOps> Backward<B, 1> for RotaryBackward {
    /// `(cos, −[sin₂, sin₁])` (the inverse rotation's table).
    type State = (FloatTensor<B>, FloatTensor<B>);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (cos, neg_sin) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::rotary(grad, cos, neg_sin)
        });
    }
}

#[derive(Debug)]
struct FrozenMatmulBackward;

impl<B: FusedTrainingOps> Backward<B, 1> for FrozenMatmulBackward {
    /// `(weight as stored, whether the forward transposed it)`.
    type State = (FloatTensor<B>, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (weight, transposed) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::frozen_matmul(grad, weight, !transposed)
        });
    }
}

#[derive(Debug)]
struct QuantizedMatmulBackward;

impl<B: FusedTrainingOps> Backward<B, 1> for QuantizedMatmulBackward {
    /// `(codes, scales, layout, whether the forward transposed the matrix)`.
    type State = (IntTensor<B>, FloatTensor<B>, QuantLayout, bool);

    fn backward(self, ops: Ops<Self::State, 1>, grads: &mut Gradients, _: &mut Checkpointer) {
        let (codes, scales, layout, transposed) = ops.state;
        unary::<B, _>(ops.parents, ops.node, grads, |grad| {
            B::quantized_matmul(grad, codes, scales, layout, !transposed)
        });
    }
}

impl<B: FusedTrainingOps, C: CheckpointStrategy> FusedTrainingOps for Autodiff<B, C> {
    /// An optimizer step is not differentiated: the inner backend's op on the inner tensors.
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let (param, moment_1, moment_2) = B::adamw_step(
            <Self as AutodiffBackend>::inner(param),
            <Self as AutodiffBackend>::inner(grad),
            <Self as AutodiffBackend>::inner(moment_1),
            <Self as AutodiffBackend>::inner(moment_2),
            step,
        );
        (
            <Self as AutodiffBackend>::from_inner(param),
            <Self as AutodiffBackend>::from_inner(moment_1),
            <Self as AutodiffBackend>::from_inner(moment_2),
        )
    }

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
                let output = B::silu_mul(gate.clone(), up.clone());
                prep.finish((gate, up), output)
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
                let (loss, lse) = B::cross_entropy_forward(logits.clone(), targets.clone());
                prep.finish((logits, targets, lse), loss)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::cross_entropy_sum(logits, targets)),
        }
    }

    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        let nodes = [x.node(), gamma.node()];
        let x = x.into_primitive();
        let gamma = gamma.into_primitive();
        match RmsNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::rms_norm(x.clone(), gamma.clone(), epsilon);
                prep.finish((x, gamma, epsilon), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rms_norm(x, gamma, epsilon)),
        }
    }

    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let node = x.node();
        let x = x.into_primitive();
        let (cos, sin) = (cos.into_primitive(), sin.into_primitive());
        match RotaryBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::rotary(x, cos.clone(), sin.clone());
                prep.finish((cos, inverse_rotation_sin::<B>(sin)), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::rotary(x, cos, sin)),
        }
    }

    fn frozen_matmul(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        transpose_weight: bool,
    ) -> FloatTensor<Self> {
        let node = x.node();
        let x = x.into_primitive();
        // A frozen weight: its autodiff node, if any, is not followed.
        let weight = <Self as AutodiffBackend>::inner(weight);
        match FrozenMatmulBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output = B::frozen_matmul(x, weight.clone(), transpose_weight);
                prep.finish((weight, transpose_weight), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::frozen_matmul(x, weight, transpose_weight)),
        }
    }

    fn quantized_matmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scales: FloatTensor<Self>,
        layout: QuantLayout,
        transpose_weight: bool,
    ) -> FloatTensor<Self> {
        let node = x.node();
        let x = x.into_primitive();
        // Frozen: the scales' autodiff node, if any, is not followed.
        let scales = <Self as AutodiffBackend>::inner(scales);
        match QuantizedMatmulBackward
            .prepare::<C>([node])
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let output =
                    B::quantized_matmul(x, codes.clone(), scales.clone(), layout, transpose_weight);
                prep.finish((codes, scales, layout, transpose_weight), output)
            }
            OpsKind::UnTracked(prep) => prep.finish(B::quantized_matmul(
                x,
                codes,
                scales,
                layout,
                transpose_weight,
            )),
        }
    }
}
