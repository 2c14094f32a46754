//! [`FusedTrainingOps`]: softmax and the causal-LM cross-entropy as single ops with a
//! hand-written backward.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata, backend_extension, get_or_init_device_settings};
use burn::tensor::{FloatDType, IndexingUpdateOp, Shape};

/// The label of positions that do not count in the loss (PEFT's and transformers' `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// Three ops every training step runs over large tensors, each one op (one autodiff node) with
/// a hand-written backward instead of Burn's op-by-op derivation.
///
/// - [`softmax_last`](Self::softmax_last) runs the backend's own softmax (Flex: one fused,
///   row-parallel SIMD pass) and keeps only its output; the backward is
///   `y ⊙ (δy − Σ δy ⊙ y)`, with no exponential recomputed.
/// - [`cross_entropy_sum`](Self::cross_entropy_sum) keeps the logits and one log-sum-exp per row;
///   the backward forms `softmax(z) − onehot(t)` once, in place of the log-softmax, gather and
///   reduction chain whose every node holds a vocabulary-sized tensor.
/// - [`silu_mul`](Self::silu_mul) keeps `up`, `sigmoid(gate)` and `silu(gate)`; the backward
///   computes no sigmoid again (Burn's derivation of `gate · sigmoid(gate) · up` recomputes it
///   and keeps one more tensor).
///
/// The bodies are ordinary backend ops, so every backend runs them; the `Autodiff`
/// implementation adds the backward pass.
///
/// # Shapes
/// - `softmax_last`: any rank, softmax over the last dimension
/// - `silu_mul`: `gate` and `up` of one shape; output of that shape
/// - `cross_entropy_sum`: `logits` `[N, V]`, `targets` `[N]` (ids, or [`IGNORE_INDEX`]) → `[1]`
#[backend_extension(
    Cube: cfg(any(feature = "wgpu", feature = "cuda")),
    Flex: cfg(feature = "flex"),
    Fusion: cfg(feature = "fusion"),
    Autodiff
)]
pub trait FusedTrainingOps: Backend {
    /// Softmax over the last dimension.
    #[fusion(default)]
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let last = x.shape().num_dims() - 1;
        Self::softmax(x, last)
    }

    /// `silu(gate) ⊙ up` (SwiGLU's gate), with `silu(g) = g · sigmoid(g)`.
    #[fusion(default)]
    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let silu = Self::float_mul(gate.clone(), Self::sigmoid(gate));
        Self::float_mul(silu, up)
    }

    /// `Σ_n [t_n ≠ IGNORE] · (logsumexp(z_n) − z_n[t_n])`, the summed token cross-entropy.
    #[fusion(default)]
    fn cross_entropy_sum(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        let (ids, keep) = targets_and_weights::<Self>(targets, FloatDType::from(logits.dtype()));
        let lse = log_sum_exp::<Self>(logits.clone());
        cross_entropy_from_parts::<Self>(logits, ids, keep, lse)
    }
}

/// `log Σ_v exp(z[n, v])` per row, stable (the row maximum is subtracted first).
///
/// # Shapes
/// - `logits`: `[N, V]`; output: `[N, 1]`
pub(crate) fn log_sum_exp<B: Backend>(logits: FloatTensor<B>) -> FloatTensor<B> {
    let shape = logits.shape();
    let max = B::float_max_dim(logits.clone(), 1);
    let shifted = B::float_sub(logits, B::float_expand(max.clone(), shape));
    let sums = B::float_sum_dim(B::float_exp(shifted), 1);
    B::float_add(B::float_log(sums), max)
}

/// Targets clamped to valid ids (`[N, 1]`, for gather / scatter) and the row weights
/// `[t ≠ IGNORE]` (`[N, 1]`, in `dtype`).
pub(crate) fn targets_and_weights<B: Backend>(
    targets: IntTensor<B>,
    dtype: FloatDType,
) -> (IntTensor<B>, FloatTensor<B>) {
    let n = targets.shape().num_elements();
    let bool_dtype = get_or_init_device_settings::<B>(&targets.device()).bool_dtype;
    let keep = B::int_not_equal_elem(targets.clone(), IGNORE_INDEX.into(), bool_dtype);
    let keep = B::float_reshape(B::bool_into_float(keep, dtype), Shape::new([n, 1]));
    let ids = B::int_reshape(B::int_clamp_min(targets, 0.into()), Shape::new([n, 1]));
    (ids, keep)
}

/// The loss from the clamped ids and row weights of [`targets_and_weights`] and the per-row
/// log-sum-exp.
pub(crate) fn cross_entropy_from_parts<B: Backend>(
    logits: FloatTensor<B>,
    ids: IntTensor<B>,
    keep: FloatTensor<B>,
    lse: FloatTensor<B>,
) -> FloatTensor<B> {
    let picked = B::float_gather(1, logits, ids);
    B::float_sum(B::float_mul(B::float_sub(lse, picked), keep))
}

/// `∂L/∂z = g · [t ≠ IGNORE] · (softmax(z) − onehot(t))`.
pub(crate) fn cross_entropy_grad<B: Backend>(
    logits: FloatTensor<B>,
    ids: IntTensor<B>,
    keep: FloatTensor<B>,
    lse: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let shape = logits.shape();
    let n = shape[0];
    let row_grad = B::float_mul(keep, B::float_expand(grad, Shape::new([n, 1])));
    let probs = B::float_exp(B::float_sub(logits, B::float_expand(lse, shape.clone())));
    let scaled = B::float_mul(probs, B::float_expand(row_grad.clone(), shape));
    B::float_scatter(
        1,
        scaled,
        ids,
        B::float_neg(row_grad),
        IndexingUpdateOp::Add,
    )
}

/// `∂L/∂x = y ⊙ (δy − Σ_last δy ⊙ y)` for `y = softmax(x)`.
pub(crate) fn softmax_grad<B: Backend>(
    output: FloatTensor<B>,
    grad: FloatTensor<B>,
) -> FloatTensor<B> {
    let shape = output.shape();
    let last = shape.num_dims() - 1;
    let dot = B::float_sum_dim(B::float_mul(grad.clone(), output.clone()), last);
    B::float_mul(output, B::float_sub(grad, B::float_expand(dot, shape)))
}

/// `∂L/∂gate = δ ⊙ up ⊙ (σ + s − s ⊙ σ)` with `σ = sigmoid(gate)` and `s = gate ⊙ σ`, from
/// `d silu / dg = σ · (1 + g · (1 − σ)) = σ + s − s · σ`. (`∂L/∂up = δ ⊙ s`.)
pub(crate) fn silu_mul_grad_gate<B: Backend>(
    grad: FloatTensor<B>,
    up: FloatTensor<B>,
    sigmoid: FloatTensor<B>,
    silu: FloatTensor<B>,
) -> FloatTensor<B> {
    let slope = B::float_sub(
        B::float_add(sigmoid.clone(), silu.clone()),
        B::float_mul(silu, sigmoid),
    );
    B::float_mul(B::float_mul(grad, up), slope)
}

#[cfg(feature = "flex")]
impl FusedTrainingOps for burn::backend::Flex {}

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl FusedTrainingOps for burn_cubecl::CubeBackend {}
