//! The backward pass of [`Wkv7Ops`] on `Autodiff`: one graph node for the whole recurrence,
//! keeping the six input sequences, every `sa_t` and one state per chunk (checkpoints) instead
//! of a state per token.

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind};
use burn::backend::tensor::FloatTensor;
use burn::backend::{Autodiff, AutodiffBackend, TensorMetadata};

use super::Wkv7Ops;
use super::reference::{pack, unpack};

#[derive(Debug)]
struct Wkv7Backward;

/// What the backward needs: the six input sequences (`r, w, k, v, α, β`), the checkpoints,
/// `sa` and the chunk length.
type Kept<B> = ([FloatTensor<B>; 6], FloatTensor<B>, FloatTensor<B>, usize);

impl<B: Wkv7Ops> Backward<B, 7> for Wkv7Backward {
    type State = Kept<B>;

    fn backward(self, ops: Ops<Self::State, 7>, grads: &mut Gradients, _: &mut Checkpointer) {
        let ([r, w, k, v, alpha, beta], checkpoints, sa, chunk_len) = ops.state;
        let dims = r.shape().dims::<4>();
        let packed = grads.consume::<B>(&ops.node);
        let (grad_y, grad_state) = unpack::<B>(packed, dims);
        let (dr, dw, dk, dv, dalpha, dbeta, dstate) = B::wkv7_backward(
            r,
            w,
            k,
            v,
            alpha,
            beta,
            checkpoints,
            sa,
            grad_y,
            grad_state,
            chunk_len,
        );
        for (parent, grad) in ops
            .parents
            .into_iter()
            .zip([dr, dw, dk, dv, dalpha, dbeta, dstate])
        {
            if let Some(parent) = parent {
                grads.register::<B>(parent.id, grad);
            }
        }
    }
}

impl<B: Wkv7Ops, C: CheckpointStrategy> Wkv7Ops for Autodiff<B, C> {
    fn wkv7(
        r: FloatTensor<Self>,
        w: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        state: FloatTensor<Self>,
        chunk_len: usize,
    ) -> FloatTensor<Self> {
        let nodes = [&r, &w, &k, &v, &alpha, &beta, &state].map(|t| t.node());
        let [r, w, k, v, alpha, beta, state] =
            [r, w, k, v, alpha, beta, state].map(|t| t.into_primitive());
        match Wkv7Backward.prepare::<C>(nodes).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let (y, last, checkpoints, sa) = B::wkv7_forward_saving(
                    r.clone(),
                    w.clone(),
                    k.clone(),
                    v.clone(),
                    alpha.clone(),
                    beta.clone(),
                    state,
                    chunk_len,
                );
                let kept = ([r, w, k, v, alpha, beta], checkpoints, sa, chunk_len);
                prep.finish(kept, pack::<B>(y, last))
            }
            OpsKind::UnTracked(prep) => {
                prep.finish(B::wkv7(r, w, k, v, alpha, beta, state, chunk_len))
            }
        }
    }

    fn wkv7_forward_saving(
        r: FloatTensor<Self>,
        w: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        state: FloatTensor<Self>,
        chunk_len: usize,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let [r, w, k, v, alpha, beta, state] =
            [r, w, k, v, alpha, beta, state].map(|t| t.into_primitive());
        let (y, last, checkpoints, sa) =
            B::wkv7_forward_saving(r, w, k, v, alpha, beta, state, chunk_len);
        (
            constant::<B, C>(y),
            constant::<B, C>(last),
            constant::<B, C>(checkpoints),
            constant::<B, C>(sa),
        )
    }

    fn wkv7_backward(
        r: FloatTensor<Self>,
        w: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        checkpoints: FloatTensor<Self>,
        sa: FloatTensor<Self>,
        grad_y: FloatTensor<Self>,
        grad_state: FloatTensor<Self>,
        chunk_len: usize,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let [r, w, k, v, alpha, beta, checkpoints, sa, grad_y, grad_state] =
            [r, w, k, v, alpha, beta, checkpoints, sa, grad_y, grad_state]
                .map(|t| t.into_primitive());
        let (a, b, c, d, e, f, g) = B::wkv7_backward(
            r,
            w,
            k,
            v,
            alpha,
            beta,
            checkpoints,
            sa,
            grad_y,
            grad_state,
            chunk_len,
        );
        (
            constant::<B, C>(a),
            constant::<B, C>(b),
            constant::<B, C>(c),
            constant::<B, C>(d),
            constant::<B, C>(e),
            constant::<B, C>(f),
            constant::<B, C>(g),
        )
    }
}

/// The forward and backward passes are not themselves differentiated (no second-order
/// gradients): their results enter the graph as constants.
fn constant<B: Wkv7Ops, C: CheckpointStrategy>(t: FloatTensor<B>) -> FloatTensor<Autodiff<B, C>> {
    <Autodiff<B, C> as AutodiffBackend>::from_inner(t)
}
