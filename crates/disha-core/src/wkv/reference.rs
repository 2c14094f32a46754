//! Reference bodies of [`Wkv7Ops`](super::Wkv7Ops), written with ordinary backend ops one token
//! at a time so that every backend runs them; the contract the kernels are tested against.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::{Shape, Slice};

/// The per-token vectors of one input at one position, as columns `[batch, H, N, 1]` or rows
/// `[batch, H, 1, N]`.
struct Sequence<B: Backend> {
    values: FloatTensor<B>,
}

impl<B: Backend> Sequence<B> {
    fn at(&self, t: usize, column: bool) -> FloatTensor<B> {
        let [b, _, h, n] = self.values.shape().dims::<4>();
        let slice = [
            Slice::full(),
            Slice::new(t as isize, Some(t as isize + 1), 1),
            Slice::full(),
            Slice::full(),
        ];
        let x = B::float_slice(self.values.clone(), &slice);
        let shape = if column { [b, h, n, 1] } else { [b, h, 1, n] };
        B::float_reshape(x, Shape::new(shape))
    }
}

/// Per-token results `[batch, H, N, 1]` (or `[batch, H, 1, N]`) stacked into `[batch, seq, H, N]`.
fn stack<B: Backend>(parts: Vec<FloatTensor<B>>) -> FloatTensor<B> {
    let parts = parts
        .into_iter()
        .map(|p| {
            let [b, h, x, y] = p.shape().dims::<4>();
            B::float_reshape(p, Shape::new([b, 1, h, x * y]))
        })
        .collect();
    B::float_cat(parts, 1)
}

/// `y` and the final state flattened per batch row and concatenated: `[batch, seq·H·N + H·N·N]`.
pub(crate) fn pack<B: Backend>(y: FloatTensor<B>, state: FloatTensor<B>) -> FloatTensor<B> {
    let [b, t, h, n] = y.shape().dims::<4>();
    let y = B::float_reshape(y, Shape::new([b, t * h * n]));
    let state = B::float_reshape(state, Shape::new([b, h * n * n]));
    B::float_cat(vec![y, state], 1)
}

/// Splits a packed gradient into `δy` `[batch, seq, H, N]` and `δstate` `[batch, H, N, N]`.
pub(crate) fn unpack<B: Backend>(
    packed: FloatTensor<B>,
    [b, t, h, n]: [usize; 4],
) -> (FloatTensor<B>, FloatTensor<B>) {
    let split = t * h * n;
    let part = |start: usize, end: usize| {
        B::float_slice(
            packed.clone(),
            &[
                Slice::full(),
                Slice::new(start as isize, Some(end as isize), 1),
            ],
        )
    };
    let y = B::float_reshape(part(0, split), Shape::new([b, t, h, n]));
    let state = B::float_reshape(part(split, split + h * n * n), Shape::new([b, h, n, n]));
    (y, state)
}

/// One step of the state from `sa_t` (a column): `S ⊙ w_tᵀ + sa_t · β_tᵀ + v_t · k_tᵀ`.
fn advance<B: Backend>(
    state: FloatTensor<B>,
    sa: FloatTensor<B>,
    [w, k, v, beta]: [&Sequence<B>; 4],
    t: usize,
) -> FloatTensor<B> {
    let decayed = B::float_mul(state, w.at(t, false));
    let update = B::float_add(
        B::float_mul(sa, beta.at(t, false)),
        B::float_mul(v.at(t, true), k.at(t, false)),
    );
    B::float_add(decayed, update)
}

/// The forward pass, keeping a checkpoint before every chunk and every `sa_t`.
#[allow(clippy::too_many_arguments)]
pub(crate) fn forward<B: Backend>(
    r: FloatTensor<B>,
    w: FloatTensor<B>,
    k: FloatTensor<B>,
    v: FloatTensor<B>,
    alpha: FloatTensor<B>,
    beta: FloatTensor<B>,
    state: FloatTensor<B>,
    chunk_len: usize,
) -> (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
) {
    let [b, t, h, n] = r.shape().dims::<4>();
    let [r, w, k, v, alpha, beta] =
        [r, w, k, v, alpha, beta].map(|values| Sequence::<B> { values });
    let mut s = state;
    let (mut ys, mut sas, mut checkpoints) = (Vec::new(), Vec::new(), Vec::new());
    for i in 0..t {
        if i % chunk_len == 0 {
            checkpoints.push(B::float_reshape(s.clone(), Shape::new([b, h, 1, n, n])));
        }
        let sa = B::float_matmul(s.clone(), alpha.at(i, true));
        sas.push(sa.clone());
        s = advance::<B>(s, sa, [&w, &k, &v, &beta], i);
        ys.push(B::float_matmul(s.clone(), r.at(i, true)));
    }
    (
        stack::<B>(ys),
        s,
        B::float_cat(checkpoints, 2),
        stack::<B>(sas),
    )
}

/// The seven gradients of [`backward`]: `r, w, k, v, α, β` and the initial state.
type Gradients<B> = (
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
    FloatTensor<B>,
);

/// `Σ_i x[.., i, j]` over the value index: `[batch, H, N, N]` → `[batch, H, 1, N]`.
fn column_sums<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
    B::float_sum_dim(x, 2)
}

/// The backward pass: per chunk, from the last, the chunk's states recomputed from its
/// checkpoint, then the reverse recurrence over them (method in [`Wkv7Ops`](super::Wkv7Ops)).
///
/// With `δS` the gradient of the state after token `t` (everything later included):
///
/// ```text
/// δS   += δy_t · r_tᵀ            δr_t = S_tᵀ · δy_t
/// δw_t  = Σ_i δS ⊙ S_{t-1}       δk_t = δSᵀ · v_t        δβ_t = δSᵀ · sa_t
/// δv_t  = δS · k_t               δsa  = δS · β_t         δα_t = S_{t-1}ᵀ · δsa
/// δS    ← δS ⊙ w_tᵀ + δsa · α_tᵀ
/// ```
pub(crate) fn backward<B: Backend>(
    inputs: [FloatTensor<B>; 6],
    checkpoints: FloatTensor<B>,
    sa: FloatTensor<B>,
    grad_y: FloatTensor<B>,
    grad_state: FloatTensor<B>,
    chunk_len: usize,
) -> Gradients<B> {
    let [b, t, h, n] = inputs[0].shape().dims::<4>();
    let [r, w, k, v, alpha, beta] = inputs.map(|values| Sequence::<B> { values });
    let sa = Sequence::<B> { values: sa };
    let grad_y = Sequence::<B> { values: grad_y };
    let transpose = |x: FloatTensor<B>| B::float_swap_dims(x, 2, 3);
    let mut ds = grad_state;
    // Per-token gradients, filled from the last token back.
    let mut grads: [Vec<FloatTensor<B>>; 6] = Default::default();
    for chunk in (0..t.div_ceil(chunk_len)).rev() {
        let start = chunk * chunk_len;
        let end = (start + chunk_len).min(t);
        let first = B::float_slice(
            checkpoints.clone(),
            &[
                Slice::full(),
                Slice::full(),
                Slice::new(chunk as isize, Some(chunk as isize + 1), 1),
                Slice::full(),
                Slice::full(),
            ],
        );
        let mut states = vec![B::float_reshape(first, Shape::new([b, h, n, n]))];
        for i in start..end {
            let next = advance::<B>(
                states[i - start].clone(),
                sa.at(i, true),
                [&w, &k, &v, &beta],
                i,
            );
            states.push(next);
        }
        for i in (start..end).rev() {
            let (before, after) = (states[i - start].clone(), states[i - start + 1].clone());
            let dy = grad_y.at(i, true);
            ds = B::float_add(ds, B::float_mul(dy.clone(), r.at(i, false)));
            let dr = B::float_matmul(transpose(after), dy);
            let dw = column_sums::<B>(B::float_mul(ds.clone(), before.clone()));
            let dk = column_sums::<B>(B::float_mul(ds.clone(), v.at(i, true)));
            let dbeta = column_sums::<B>(B::float_mul(ds.clone(), sa.at(i, true)));
            let dv = B::float_matmul(ds.clone(), k.at(i, true));
            let dsa = B::float_matmul(ds.clone(), beta.at(i, true));
            let dalpha = B::float_matmul(transpose(before), dsa.clone());
            ds = B::float_add(
                B::float_mul(ds, w.at(i, false)),
                B::float_mul(dsa, alpha.at(i, false)),
            );
            for (list, g) in grads.iter_mut().zip([dr, dw, dk, dv, dalpha, dbeta]) {
                list.push(g);
            }
        }
    }
    let [dr, dw, dk, dv, dalpha, dbeta] = grads.map(|mut list| {
        list.reverse();
        stack::<B>(list)
    });
    (dr, dw, dk, dv, dalpha, dbeta, ds)
}
