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

/// The longest WKV chunk [`wkv7_chunked`] takes (its decay products stay inside f32).
pub const MAX_WKV_CHUNK_LEN: usize = 64;

/// The chunk length the model uses by default: 16 tokens.
pub const DEFAULT_WKV_CHUNK_LEN: usize = 16;

/// The same recurrence as [`wkv7`], a chunk of `chunk_len` tokens at a time: inside a chunk
/// every position is computed at once from the chunk's starting state, and only chunk-boundary
/// states are formed. Autodiff keeps `O(N + chunk_len)` values per token and head (the
/// chunk's vectors and pairwise products) instead of a whole `N × N` state per token. Exact in
/// real arithmetic; in f32 it differs from the per-token loop by rounding only.
///
/// Within a chunk starting from `S_0`, with `c_t = w_1 ⊙ … ⊙ w_t` (so `c_t / c_s`, `s ≤ t`,
/// is the decay from `s` to `t`, never above 1):
///
/// ```text
/// sa_t = S_0 (c_{t-1} ⊙ α_t) + Σ_{s<t} ⟨α_t, c_{t-1}/c_s ⊙ β_s⟩ sa_s + ⟨α_t, c_{t-1}/c_s ⊙ k_s⟩ v_s
/// y_t  = S_0 (c_t ⊙ r_t)     + Σ_{s≤t} ⟨r_t, c_t/c_s ⊙ β_s⟩ sa_s     + ⟨r_t, c_t/c_s ⊙ k_s⟩ v_s
/// S_L  = S_0 diag(c_L)       + Σ_s sa_s (c_L/c_s ⊙ β_s)ᵀ + v_s (c_L/c_s ⊙ k_s)ᵀ
/// ```
///
/// The first line is a unit lower-triangular system `(I − M) SA = X`, solved as
/// `(I + M)(I + M²)(I + M⁴)…` (`M` is nilpotent: `⌈log₂ L⌉` small matmuls).
///
/// # Shapes
/// As [`wkv7`]; `1 ≤ chunk_len ≤` [`MAX_WKV_CHUNK_LEN`] (the last chunk may be shorter; a
/// chunk of one token takes [`wkv7`]'s step).
#[allow(clippy::too_many_arguments)]
pub fn wkv7_chunked(
    r: Tensor<4>,
    w: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    alpha: Tensor<4>,
    beta: Tensor<4>,
    state: Tensor<4>,
    chunk_len: usize,
) -> (Tensor<4>, Tensor<4>) {
    assert!(
        (1..=MAX_WKV_CHUNK_LEN).contains(&chunk_len),
        "WKV chunk length {chunk_len} outside 1..={MAX_WKV_CHUNK_LEN}"
    );
    let t = r.dims()[1];
    let mut s = state;
    let mut ys = Vec::with_capacity(t.div_ceil(chunk_len));
    let mut start = 0;
    while start < t {
        let len = chunk_len.min(t - start);
        let [r, w, k, v, alpha, beta] =
            [&r, &w, &k, &v, &alpha, &beta].map(|x| x.clone().narrow(1, start, len));
        let (y, next) = if len == 1 {
            // One token (RNN decoding, or a last chunk of one): the plain step.
            wkv7(r, w, k, v, alpha, beta, s)
        } else {
            // [b, len, H, N] → [b, H, len, N] and back.
            let [r, w, k, v, alpha, beta] = [r, w, k, v, alpha, beta].map(|x| x.swap_dims(1, 2));
            let (y, next) = wkv7_chunk(r, w, k, v, alpha, beta, s);
            (y.swap_dims(1, 2), next)
        };
        ys.push(y);
        s = next;
        start += len;
    }
    (Tensor::cat(ys, 1), s)
}

/// One chunk of [`wkv7_chunked`].
///
/// `c_t / c_s` is split as `c_t · (1 / c_s)`, so every pairwise term is a plain `[L, N] × [N, L]`
/// matmul (no `[L, L, N]` tensor is formed). With `w ≥ e^{−e^{−1/2}} ≈ 0.545`,
/// `1 / c_s ≤ 0.545^{−64} ≈ 7·10¹⁶` for chunks of at most [`MAX_WKV_CHUNK_LEN`] tokens, well
/// inside f32; each product stays an exact product of positive factors (no cancellation).
///
/// # Shapes
/// - r, w, k, v, alpha, beta: `[batch, H, L, N]`; state `[batch, H, N, N]`
/// - → (`[batch, H, L, N]`, `[batch, H, N, N]`)
fn wkv7_chunk(
    r: Tensor<4>,
    w: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    alpha: Tensor<4>,
    beta: Tensor<4>,
    state: Tensor<4>,
) -> (Tensor<4>, Tensor<4>) {
    let l = r.dims()[2];
    // log c_t (inclusive) and log c_{t-1} (exclusive), per key index.
    let log_w = w.log();
    let lc = log_w.clone().cumsum(2);
    let lc_prev = lc.clone() - log_w;
    let alpha_dec = alpha * lc_prev.exp(); // α_t ⊙ c_{t-1}
    let r_dec = r * lc.clone().exp(); // r_t ⊙ c_t
    let inv = lc.clone().neg().exp(); // 1 / c_s
    let beta_inv = beta.clone() * inv.clone();
    let k_inv = k.clone() * inv;
    // ⟨a_t, b_s⟩ for every (t, s), kept on the causal side (strict: s < t): [b, H, L, L].
    let pairs = |a: &Tensor<4>, b: &Tensor<4>, strict: bool| {
        a.clone()
            .matmul(b.clone().swap_dims(2, 3))
            .tril(if strict { -1 } else { 0 })
    };
    // S_0 applied to each row vector of x (rows are key-indexed): [b, H, L, N_v].
    let from_state = |x: Tensor<4>| state.clone().matmul(x.swap_dims(2, 3)).swap_dims(2, 3);

    let m = pairs(&alpha_dec, &beta_inv, true);
    let x = from_state(alpha_dec.clone()) + pairs(&alpha_dec, &k_inv, true).matmul(v.clone());
    // (I − M)⁻¹ X with M strictly lower triangular: Π (I + M^(2^i)) while 2^i < L.
    let mut sa = x;
    let mut power = m;
    let mut reach = 1;
    while reach < l {
        sa = sa.clone() + power.clone().matmul(sa);
        reach *= 2;
        if reach < l {
            power = power.clone().matmul(power);
        }
    }
    let y = from_state(r_dec.clone())
        + pairs(&r_dec, &beta_inv, false).matmul(sa.clone())
        + pairs(&r_dec, &k_inv, false).matmul(v.clone());
    // Decay from each position to the chunk's end, c_L / c_s ≤ 1: [b, H, L, N].
    let last = lc.clone().narrow(2, l - 1, 1);
    let to_end = (last.clone() - lc).exp();
    let next = state * last.exp() // [b, H, 1, N]: scales key columns
        + sa.swap_dims(2, 3).matmul(to_end.clone() * beta)
        + v.swap_dims(2, 3).matmul(to_end * k);
    (y, next)
}

#[cfg(test)]
mod tests {
    use burn::tensor::{Device, TensorData};

    use super::*;
    use crate::SplitMix64;

    const B: usize = 2;
    const H: usize = 2;
    const N: usize = 8;

    /// Host values of `WKV` inputs in the model's ranges, `[B, t, H, N]` each, and a state:
    /// r, k, v ~ N(0, 1); decay `w = exp(−e^{−1/2} σ(z))`; `α = −κ̂`, `β = κ̂ ⊙ a` with `κ̂` a
    /// unit vector per head and `a ∈ (0, 1)`.
    fn inputs(t: usize, seed: u64) -> Vec<(Vec<f32>, [usize; 4])> {
        let mut rng = SplitMix64::new(seed);
        let shape = [B, t, H, N];
        let count = B * t * H * N;
        let mut normal =
            |scale: f32| -> Vec<f32> { (0..count).map(|_| rng.normal() * scale).collect() };
        let r = normal(1.0);
        let k = normal(1.0);
        let v = normal(1.0);
        let w: Vec<f32> = normal(2.0)
            .into_iter()
            .map(|z| (-(-0.5f32).exp() / (1.0 + (-z).exp())).exp())
            .collect();
        let kappa_raw = normal(1.0);
        let a: Vec<f32> = normal(2.0)
            .into_iter()
            .map(|z| 1.0 / (1.0 + (-z).exp()))
            .collect();
        let mut alpha = vec![0.0; count];
        let mut beta = vec![0.0; count];
        for (head, chunk) in kappa_raw.chunks(N).enumerate() {
            let norm = chunk.iter().map(|x| x * x).sum::<f32>().sqrt().max(1e-12);
            for (j, x) in chunk.iter().enumerate() {
                let i = head * N + j;
                alpha[i] = -x / norm;
                beta[i] = x / norm * a[i];
            }
        }
        let state: Vec<f32> = (0..B * H * N * N).map(|_| 0.3 * rng.normal()).collect();
        vec![
            (r, shape),
            (w, shape),
            (k, shape),
            (v, shape),
            (alpha, shape),
            (beta, shape),
            (state, [B, H, N, N]),
        ]
    }

    fn max_abs(t: Tensor<4>) -> f32 {
        t.abs().max().into_scalar::<f32>()
    }

    /// Output and final state of the per-token loop vs the chunked form, and the gradients of a
    /// random linear function of both with respect to every input.
    fn compare(t: usize, chunk_len: usize, form: Form) -> (f32, f32) {
        let device = Device::default().autodiff();
        let leaves: Vec<Tensor<4>> = inputs(t, 7 + t as u64)
            .into_iter()
            .map(|(values, shape)| {
                Tensor::<4>::from_data(TensorData::new(values, shape), &device).require_grad()
            })
            .collect();
        let mut rng = SplitMix64::new(99);
        let mut cotangent = |shape: [usize; 4]| {
            let values: Vec<f32> = (0..shape.iter().product()).map(|_| rng.normal()).collect();
            Tensor::<4>::from_data(TensorData::new(values, shape), &device)
        };
        let (cy, cs) = (cotangent([B, t, H, N]), cotangent([B, H, N, N]));
        let run = |form: Form| {
            let [r, w, k, v, a, b, s] = leaves.clone().try_into().unwrap();
            let (y, s) = match form {
                Form::PerToken => wkv7(r, w, k, v, a, b, s),
                Form::Chunked => wkv7_chunked(r, w, k, v, a, b, s, chunk_len),
                Form::Fused => disha_core::wkv::wkv7(r, w, k, v, a, b, s, chunk_len),
            };
            let loss = (y.clone() * cy.clone()).sum() + (s.clone() * cs.clone()).sum();
            (y, s, loss.backward())
        };
        let (y0, s0, g0) = run(Form::PerToken);
        let (y1, s1, g1) = run(form);
        let value = max_abs(y0 - y1).max(max_abs(s0 - s1));
        let mut gradient = 0f32;
        for leaf in &leaves {
            let (a, b) = (leaf.grad(&g0).unwrap(), leaf.grad(&g1).unwrap());
            let scale = max_abs(a.clone()).max(1e-6);
            gradient = gradient.max(max_abs(a - b) / scale);
        }
        (value, gradient)
    }

    /// How [`compare`] computes the recurrence it holds to the per-token loop.
    #[derive(Clone, Copy, Debug)]
    enum Form {
        PerToken,
        Chunked,
        /// `disha_core::wkv::wkv7`: the fused op with its own backward (the Flex kernel here).
        Fused,
    }

    /// Chunk lengths 1 (the plain step), 3 (a partial last chunk), 16, and the whole
    /// sequence, for the chunked form and the fused op (whose checkpoints are these chunks):
    /// outputs and states agree to f32 rounding of O(1) sums over ≤ 40 steps (1e-4),
    /// gradients to 1e-4 relative to each gradient's largest entry.
    #[test]
    fn chunked_wkv_equals_the_per_token_recurrence_with_gradients() {
        let t = 40;
        for chunk_len in [1, 3, 16, MAX_WKV_CHUNK_LEN.min(t)] {
            for form in [Form::Chunked, Form::Fused] {
                let (value, gradient) = compare(t, chunk_len, form);
                eprintln!(
                    "{form:?}, chunk {chunk_len}: values {value:e}, gradients {gradient:e} (relative)"
                );
                assert!(
                    value <= 1e-4 && gradient <= 1e-4,
                    "{form:?}, chunk {chunk_len}: values differ by {value:e}, gradients by {gradient:e} (relative)"
                );
            }
        }
    }
}
