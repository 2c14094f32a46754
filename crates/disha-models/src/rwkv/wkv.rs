//! The WKV-7 recurrence in plain tensor ops (every backend, differentiable through Burn's
//! autodiff).

use burn::tensor::Tensor;

/// Runs the WKV-7 state update over a sequence, per head (`S[i, j]`: `i` the value index,
/// `j` the key index):
///
/// ```text
/// sa   = S_{t-1} · α_t                                  (from the old state)
/// S_t  = S_{t-1} ⊙ w_tᵀ  +  sa · β_tᵀ  +  v_t · k_tᵀ     (the decay scales key columns)
/// y_t  = S_t · r_t                                      (the output reads the new state)
/// ```
///
/// Returns every `y_t` and the final state. One step per token: autodiff keeps one state per
/// token for the backward, which bounds the sequence length a training step can afford.
///
/// # Shapes
/// - r, w, k, v, alpha, beta: `[batch, seq, H, N]`
/// - state: `[batch, H, N, N]`
/// - → (`[batch, seq, H, N]`, `[batch, H, N, N]`)
#[allow(clippy::too_many_arguments)]
pub fn wkv7(
    r: Tensor<4>,
    w: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    alpha: Tensor<4>,
    beta: Tensor<4>,
    state: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let [b, t, h, n] = r.dims();
    let at = |x: &Tensor<4>, i: usize, column: bool| {
        let x = x.clone().narrow(1, i, 1);
        if column {
            x.reshape([b, h, n, 1])
        } else {
            x.reshape([b, h, 1, n])
        }
    };
    let mut s = state;
    let mut ys = Vec::with_capacity(t);
    for i in 0..t {
        let sa = s.clone().matmul(at(&alpha, i, true));
        s = s * at(&w, i, false) + sa * at(&beta, i, false) + at(&v, i, true) * at(&k, i, false);
        ys.push(s.clone().matmul(at(&r, i, true)).reshape([b, 1, h, n]));
    }
    (Tensor::cat(ys, 1), s)
}
