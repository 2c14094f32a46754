//! [`Wkv7Ops`]: the backend extension behind the fused WKV-7 recurrence.

// The recurrence has seven inputs and the backward seven outputs; the extension macro reads
// the output tuples from the signatures, so they cannot hide behind type aliases.
#![allow(clippy::too_many_arguments, clippy::type_complexity)]

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};

use super::reference;

/// The WKV-7 recurrence as three ops: the differentiable one ([`wkv7`](Self::wkv7)), and the
/// forward and backward passes training runs under it
/// ([`wkv7_forward_saving`](Self::wkv7_forward_saving), [`wkv7_backward`](Self::wkv7_backward)).
///
/// Per batch row and head (`S[i, j]`: `i` the value index, `j` the key index):
///
/// ```text
/// sa_t = S_{t-1} · α_t
/// S_t  = S_{t-1} ⊙ w_tᵀ + sa_t · β_tᵀ + v_t · k_tᵀ
/// y_t  = S_t · r_t
/// ```
///
/// Training keeps the inputs, every `sa_t` and one state per chunk of `chunk_len` tokens (the
/// state *before* the chunk's first token); the backward walks the chunks in reverse, recomputes
/// each chunk's states from its checkpoint (with the kept `sa_t`, no reduction), and runs the
/// reverse recurrence over them. Nothing is divided by `w`: exact for any decay.
///
/// The default bodies are ordinary backend ops, one token at a time (every backend runs them;
/// they are the reference the kernels are tested against). Flex overrides them with one
/// multi-threaded pass per batch row and head, Cube backends (CUDA, ROCm, WGPU) with CubeCL
/// kernels (one cube per batch row and head, one unit per state row). The `Autodiff`
/// implementation wires the backward. Call the tensor-level [`wkv7`](super::wkv7) rather than
/// these primitives.
///
/// # Shapes
/// - `r`, `w`, `k`, `v`, `alpha`, `beta`: `[batch, seq, H, N]`; `state`: `[batch, H, N, N]`
/// - `wkv7` → `[batch, seq·H·N + H·N·N]`: `y` (`[batch, seq, H, N]`) and the final state
///   (`[batch, H, N, N]`), flattened and concatenated (one autodiff output)
/// - `wkv7_forward_saving` → (`y`, final state, checkpoints `[batch, H, ⌈seq/chunk_len⌉, N, N]`,
///   `sa` `[batch, seq, H, N]`)
/// - `wkv7_backward` → the gradients of `r`, `w`, `k`, `v`, `alpha`, `beta` and `state`, shaped
///   like them
#[backend_extension(
    Cube: cfg(any(feature = "wgpu", feature = "cuda")),
    Flex: cfg(feature = "flex"),
    Fusion: cfg(feature = "fusion"),
    Autodiff
)]
pub trait Wkv7Ops: Backend {
    /// `y` and the final state, packed as `[batch, seq·H·N + H·N·N]`.
    #[fusion(meta = meta::packed)]
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
        let (y, last, _, _) = Self::wkv7_forward_saving(r, w, k, v, alpha, beta, state, chunk_len);
        reference::pack::<Self>(y, last)
    }

    /// `(y, final state, checkpoints, sa)`: the forward pass with what the backward needs.
    #[fusion(meta = meta::saving)]
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
        reference::forward::<Self>(r, w, k, v, alpha, beta, state, chunk_len)
    }

    /// `(δr, δw, δk, δv, δα, δβ, δstate)` from the output gradient `grad_y`, the final state's
    /// gradient `grad_state` and what [`wkv7_forward_saving`](Self::wkv7_forward_saving) kept.
    #[fusion(meta = meta::gradients)]
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
        reference::backward::<Self>(
            [r, w, k, v, alpha, beta],
            checkpoints,
            sa,
            grad_y,
            grad_state,
            chunk_len,
        )
    }
}

/// Output metadata for the `Fusion` implementation (shapes only depend on the input shapes).
#[cfg(feature = "fusion")]
mod meta {
    use burn::backend::fusion::custom::TensorSpec;
    use burn::tensor::Shape;

    type Spec = TensorSpec;

    /// `[batch, seq·H·N + H·N·N]`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn packed(
        r: &Spec,
        _: &Spec,
        _: &Spec,
        _: &Spec,
        _: &Spec,
        _: &Spec,
        _: &Spec,
        _: &usize,
    ) -> Spec {
        let [b, t, h, n] = r.shape.dims::<4>();
        Spec::new(Shape::new([b, t * h * n + h * n * n]), r.dtype)
    }

    /// `(y, final state, checkpoints, sa)`.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn saving(
        r: &Spec,
        _: &Spec,
        _: &Spec,
        _: &Spec,
        _: &Spec,
        _: &Spec,
        state: &Spec,
        chunk_len: &usize,
    ) -> (Spec, Spec, Spec, Spec) {
        let [b, t, h, n] = r.shape.dims::<4>();
        let checkpoints = Shape::new([b, h, t.div_ceil(*chunk_len), n, n]);
        (
            r.clone(),
            state.clone(),
            Spec::new(checkpoints, r.dtype),
            r.clone(),
        )
    }

    /// The seven gradients, shaped like their inputs.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn gradients(
        r: &Spec,
        w: &Spec,
        k: &Spec,
        v: &Spec,
        alpha: &Spec,
        beta: &Spec,
        _: &Spec,
        _: &Spec,
        _: &Spec,
        grad_state: &Spec,
        _: &usize,
    ) -> (Spec, Spec, Spec, Spec, Spec, Spec, Spec) {
        (
            r.clone(),
            w.clone(),
            k.clone(),
            v.clone(),
            alpha.clone(),
            beta.clone(),
            grad_state.clone(),
        )
    }
}
