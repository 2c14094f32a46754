//! [`FusedTrainingOps`]: the element-wise and row-wise work of a training step (softmax, SwiGLU,
//! cross-entropy, RMS norm, RoPE) as single ops with a hand-written backward, and the AdamW
//! update as one op.

use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::backend::{Backend, TensorMetadata, backend_extension, get_or_init_device_settings};
use burn::tensor::{FloatDType, IndexingUpdateOp, Shape, Slice};

use crate::quantized::{QUANT_BLOCK, QuantFormat, QuantLayout};

/// The label of positions that do not count in the loss (PEFT's and transformers' `-100`).
pub const IGNORE_INDEX: i64 = -100;

/// The element-wise and row-wise work of a training step, each op one autodiff node with a
/// hand-written backward instead of Burn's op-by-op derivation, and each backward itself an op
/// so that a backend can run it as one pass.
///
/// - [`softmax_last`](Self::softmax_last) keeps only its output; the backward
///   ([`softmax_last_backward`](Self::softmax_last_backward)) is `y ⊙ (δy − Σ δy ⊙ y)`.
/// - [`silu_mul`](Self::silu_mul) (SwiGLU's gate) keeps `gate` and `up`; the backward
///   ([`silu_mul_backward`](Self::silu_mul_backward)) forms both input gradients in one pass.
/// - [`cross_entropy_forward`](Self::cross_entropy_forward) keeps the logits and one
///   log-sum-exp per row; the backward forms `softmax(z) − onehot(t)` once, in place of the
///   log-softmax, gather and reduction chain whose every node holds a vocabulary-sized tensor.
/// - [`rms_norm`](Self::rms_norm) keeps its input and scale; the backward recomputes one
///   reciprocal RMS per row.
/// - [`rotary`](Self::rotary) (rotate-half RoPE) keeps `cos` and the inverse rotation's `sin`
///   table: its backward is the rotation by the opposite angle, the same op.
/// - [`adamw_step`](Self::adamw_step) is the optimizer's update of one parameter (not
///   differentiated).
/// - [`frozen_matmul`](Self::frozen_matmul) multiplies by a frozen weight stored in another
///   dtype (a bf16 / f16 base under f32 compute): it keeps the stored weight only, and the
///   backward (the same op with the weight transposed) casts it again, so no converted copy of
///   the weight outlives the op.
///
/// The default bodies are ordinary backend ops (every backend runs them; they are the
/// reference the tests hold the faster implementations to). Flex overrides each with one
/// multi-threaded pass over contiguous `f32` rows (the `flex` module of this directory). The
/// `Autodiff` implementation adds the backward pass.
///
/// # Shapes
/// - `softmax_last`: any rank, softmax over the last dimension
/// - `silu_mul`: `gate` and `up` of one shape; output of that shape
/// - `cross_entropy_*`: `logits` `[N, V]`, `targets` `[N]` (ids, or [`IGNORE_INDEX`]); loss
///   `[1]`, log-sum-exp `[N, 1]`
/// - `rms_norm`: `x` `[..., d]`, `gamma` `[d]`; output like `x`
/// - `rotary`: `x` `[batch, heads, seq, head_dim]`; `cos`, `sin` `[1 or batch, 1, seq,
///   head_dim]`; output like `x`
/// - `adamw_step`: `param`, `grad`, `moment_1`, `moment_2` of one shape; outputs of that shape
/// - `frozen_matmul`: `x` `[..., k]`, `weight` `[k, n]` (`[n, k]` when `transpose_weight`);
///   output `[..., n]` in `x`'s dtype
/// - `quantized_matmul`: `codes` `[rows, row_bytes]`, `scales` `[rows, blocks]` standing for
///   `M` `[rows, cols]`; `x` `[..., cols]` and output `[..., rows]` when `transpose_weight`
///   (`x · Mᵀ`), else `x` `[..., rows]` and output `[..., cols]` (`x · M`)
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
        reference::softmax_last::<Self>(x)
    }

    /// `∂L/∂x = y ⊙ (δy − Σ_last δy ⊙ y)` for `y = softmax_last(x)`.
    #[fusion(default)]
    fn softmax_last_backward(
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::softmax_last_backward::<Self>(output, grad)
    }

    /// `silu(gate) ⊙ up` (SwiGLU's gate), with `silu(g) = g · sigmoid(g)`.
    #[fusion(default)]
    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        reference::silu_mul::<Self>(gate, up)
    }

    /// `(∂L/∂gate, ∂L/∂up) = (δ ⊙ up ⊙ (σ + s − s ⊙ σ), δ ⊙ s)` with `σ = sigmoid(gate)` and
    /// `s = gate ⊙ σ`, from `d silu / dg = σ · (1 + g · (1 − σ)) = σ + s − s · σ`.
    #[fusion(default)]
    fn silu_mul_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::silu_mul_backward::<Self>(gate, up, grad)
    }

    /// `Σ_n [t_n ≠ IGNORE] · (logsumexp(z_n) − z_n[t_n])`, the summed token cross-entropy.
    #[fusion(default)]
    fn cross_entropy_sum(logits: FloatTensor<Self>, targets: IntTensor<Self>) -> FloatTensor<Self> {
        reference::cross_entropy_sum::<Self>(logits, targets)
    }

    /// The summed token cross-entropy and the log-sum-exp of every row (`[N, 1]`, what the
    /// backward needs besides the logits).
    #[fusion(default)]
    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        reference::cross_entropy_forward::<Self>(logits, targets)
    }

    /// `∂L/∂z = g · [t ≠ IGNORE] · (softmax(z) − onehot(t))`, `g` the loss's gradient (`[1]`).
    #[fusion(default)]
    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::cross_entropy_backward::<Self>(logits, targets, lse, grad)
    }

    /// `x / sqrt(mean(x²) + ε) ⊙ γ` over the last dimension (Burn's `RmsNorm` formula).
    #[fusion(default)]
    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        reference::rms_norm::<Self>(x, gamma, epsilon)
    }

    /// `∂L/∂x = r · δγ − x · r³ · mean(δγ ⊙ x)` per row, with `δγ = δ ⊙ γ` and
    /// `r = 1 / sqrt(mean(x²) + ε)`.
    #[fusion(default)]
    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        reference::rms_norm_backward::<Self>(x, gamma, grad, epsilon)
    }

    /// `∂L/∂γ = Σ_rows δ ⊙ x · r`.
    #[fusion(default)]
    fn rms_norm_gamma_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        reference::rms_norm_gamma_backward::<Self>(x, grad, epsilon)
    }

    /// Rotate-half RoPE, `x ⊙ cos + [−x₂, x₁] ⊙ sin` (`x₁`, `x₂` the two halves of the last
    /// dimension). With `sin` replaced by `−[sin₂, sin₁]` it is the inverse rotation — the
    /// backward.
    #[fusion(default)]
    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        reference::rotary::<Self>(x, cos, sin)
    }

    /// One AdamW step of one parameter — Burn's `AdamW` update (no AMSGrad, plain weight
    /// decay), the same `f32` operations in the same order, so the same bits:
    ///
    /// `m ← β₁m + (1−β₁)g`, `v ← β₂v + (1−β₂)g²`,
    /// `p ← p·(1 − lr·λ) − lr · (m / (1−β₁ᵗ)) / (sqrt(v / (1−β₂ᵗ)) + ε)`.
    ///
    /// At `step.time == 1` the moments start from zero (`m = (1−β₁)g`, `v = (1−β₂)g²`); the
    /// `moment_1` / `moment_2` passed in are then only buffers of the right shape.
    /// Returns `(param, moment_1, moment_2)`, updated.
    #[fusion(default)]
    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        reference::adamw_step::<Self>(param, grad, moment_1, moment_2, step)
    }

    /// `x · cast(W)` (or `x · cast(W)ᵀ` with `transpose_weight`), `W` cast to `x`'s dtype for
    /// this product only. Differentiable in `x`; the weight is frozen and gets no gradient.
    #[fusion(default)]
    fn frozen_matmul(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        transpose_weight: bool,
    ) -> FloatTensor<Self> {
        reference::frozen_matmul::<Self>(x, weight, transpose_weight)
    }

    /// `x · Mᵀ` (or `x · M` without `transpose_weight`) for a block-quantized frozen matrix `M`
    /// ([`QuantizedMatrix`](crate::QuantizedMatrix): `codes`, f16 `scales`, `layout`),
    /// dequantized for this product only. Differentiable in `x`; `M` gets no gradient.
    #[fusion(default)]
    fn quantized_matmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scales: FloatTensor<Self>,
        layout: QuantLayout,
        transpose_weight: bool,
    ) -> FloatTensor<Self> {
        reference::quantized_matmul::<Self>(x, codes, scales, layout, transpose_weight)
    }
}

/// The hyper-parameters of one [`FusedTrainingOps::adamw_step`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct AdamWStep {
    /// The learning rate.
    pub lr: f64,
    /// `β₁`, the first moment's decay.
    pub beta_1: f32,
    /// `β₂`, the second moment's decay.
    pub beta_2: f32,
    /// `ε`, added to the root of the second moment.
    pub epsilon: f32,
    /// `λ`, the decoupled weight decay (the parameter shrinks by `lr · λ`).
    pub weight_decay: f32,
    /// The step count after this step (`1` for the first): the bias corrections' exponent.
    pub time: usize,
}

/// [`AdamWStep`] as the `f32` factors Burn's `AdamW` applies, each rounded as Burn rounds it.
#[derive(Clone, Copy, Debug)]
pub(crate) struct AdamWFactors {
    pub(crate) first: bool,
    pub(crate) beta_1: f32,
    pub(crate) beta_2: f32,
    /// `1 − β₁`, `1 − β₂`.
    pub(crate) one_minus_beta_1: f32,
    pub(crate) one_minus_beta_2: f32,
    /// The bias corrections `1 − β₁ᵗ`, `1 − β₂ᵗ`.
    pub(crate) correction_1: f32,
    pub(crate) correction_2: f32,
    pub(crate) epsilon: f32,
    /// `1 − lr·λ` (computed in `f64`, as Burn does), or `None` when `lr·λ = 0`.
    pub(crate) decay: Option<f32>,
    pub(crate) lr: f32,
}

impl AdamWStep {
    pub(crate) fn factors(&self) -> AdamWFactors {
        let time = i32::try_from(self.time).unwrap_or(i32::MAX);
        let decay_rate = self.lr * f64::from(self.weight_decay);
        AdamWFactors {
            first: self.time <= 1,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            one_minus_beta_1: 1.0 - self.beta_1,
            one_minus_beta_2: 1.0 - self.beta_2,
            correction_1: 1.0 - self.beta_1.powi(time),
            correction_2: 1.0 - self.beta_2.powi(time),
            epsilon: self.epsilon,
            decay: (decay_rate != 0.0).then_some((1.0 - decay_rate) as f32),
            lr: self.lr as f32,
        }
    }
}

/// The default bodies of [`FusedTrainingOps`] in ordinary backend ops: what every backend
/// runs unless it overrides an op, and the fallback of the faster implementations.
pub(crate) mod reference {
    use super::*;

    pub(crate) fn softmax_last<B: Backend>(x: FloatTensor<B>) -> FloatTensor<B> {
        let last = x.shape().num_dims() - 1;
        B::softmax(x, last)
    }

    pub(crate) fn softmax_last_backward<B: Backend>(
        output: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let shape = output.shape();
        let last = shape.num_dims() - 1;
        let dot = B::float_sum_dim(B::float_mul(grad.clone(), output.clone()), last);
        B::float_mul(output, B::float_sub(grad, B::float_expand(dot, shape)))
    }

    pub(crate) fn silu_mul<B: Backend>(gate: FloatTensor<B>, up: FloatTensor<B>) -> FloatTensor<B> {
        let silu = B::float_mul(gate.clone(), B::sigmoid(gate));
        B::float_mul(silu, up)
    }

    pub(crate) fn silu_mul_backward<B: Backend>(
        gate: FloatTensor<B>,
        up: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let sigmoid = B::sigmoid(gate.clone());
        let silu = B::float_mul(gate, sigmoid.clone());
        let slope = B::float_sub(
            B::float_add(sigmoid.clone(), silu.clone()),
            B::float_mul(silu.clone(), sigmoid),
        );
        let grad_gate = B::float_mul(B::float_mul(grad.clone(), up), slope);
        (grad_gate, B::float_mul(grad, silu))
    }

    pub(crate) fn cross_entropy_sum<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
    ) -> FloatTensor<B> {
        cross_entropy_forward::<B>(logits, targets).0
    }

    pub(crate) fn cross_entropy_forward<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
    ) -> (FloatTensor<B>, FloatTensor<B>) {
        let (ids, keep) = targets_and_weights::<B>(targets, FloatDType::from(logits.dtype()));
        let lse = log_sum_exp::<B>(logits.clone());
        let picked = B::float_gather(1, logits, ids);
        let loss = B::float_sum(B::float_mul(B::float_sub(lse.clone(), picked), keep));
        (loss, lse)
    }

    pub(crate) fn cross_entropy_backward<B: Backend>(
        logits: FloatTensor<B>,
        targets: IntTensor<B>,
        lse: FloatTensor<B>,
        grad: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let (ids, keep) = targets_and_weights::<B>(targets, FloatDType::from(logits.dtype()));
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

    pub(crate) fn rms_norm<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        epsilon: f64,
    ) -> FloatTensor<B> {
        let shape = x.shape();
        let (rows, d) = rows_and_width(&shape);
        let x2 = B::float_reshape(x, Shape::new([rows, d]));
        let r = reciprocal_rms::<B>(x2.clone(), epsilon);
        let normed = B::float_mul(x2, B::float_expand(r, Shape::new([rows, d])));
        B::float_reshape(B::float_mul(normed, gamma_rows::<B>(gamma, rows, d)), shape)
    }

    pub(crate) fn rms_norm_backward<B: Backend>(
        x: FloatTensor<B>,
        gamma: FloatTensor<B>,
        grad: FloatTensor<B>,
        epsilon: f64,
    ) -> FloatTensor<B> {
        let shape = x.shape();
        let (rows, d) = rows_and_width(&shape);
        let wide = Shape::new([rows, d]);
        let x = B::float_reshape(x, wide.clone());
        let dg = B::float_mul(
            B::float_reshape(grad, wide.clone()),
            gamma_rows::<B>(gamma, rows, d),
        );
        let r = reciprocal_rms::<B>(x.clone(), epsilon);
        let dot = B::float_mean_dim(B::float_mul(dg.clone(), x.clone()), 1);
        let r3 = B::float_mul(B::float_mul(r.clone(), r.clone()), r.clone());
        let coef = B::float_expand(B::float_mul(dot, r3), wide.clone());
        let dx = B::float_sub(
            B::float_mul(dg, B::float_expand(r, wide)),
            B::float_mul(x, coef),
        );
        B::float_reshape(dx, shape)
    }

    pub(crate) fn rms_norm_gamma_backward<B: Backend>(
        x: FloatTensor<B>,
        grad: FloatTensor<B>,
        epsilon: f64,
    ) -> FloatTensor<B> {
        let (rows, d) = rows_and_width(&x.shape());
        let wide = Shape::new([rows, d]);
        let x = B::float_reshape(x, wide.clone());
        let r = B::float_expand(reciprocal_rms::<B>(x.clone(), epsilon), wide.clone());
        let terms = B::float_mul(B::float_mul(B::float_reshape(grad, wide), x), r);
        B::float_reshape(B::float_sum_dim(terms, 0), Shape::new([d]))
    }

    pub(crate) fn adamw_step<B: Backend>(
        param: FloatTensor<B>,
        grad: FloatTensor<B>,
        moment_1: FloatTensor<B>,
        moment_2: FloatTensor<B>,
        step: AdamWStep,
    ) -> (FloatTensor<B>, FloatTensor<B>, FloatTensor<B>) {
        let f = step.factors();
        let scaled = |t, s: f32| B::float_mul_scalar(t, s.into());
        let grad_sq = B::float_mul(grad.clone(), grad.clone());
        let (moment_1, moment_2) = if f.first {
            (
                scaled(grad, f.one_minus_beta_1),
                scaled(grad_sq, f.one_minus_beta_2),
            )
        } else {
            (
                B::float_add(scaled(moment_1, f.beta_1), scaled(grad, f.one_minus_beta_1)),
                B::float_add(
                    scaled(moment_2, f.beta_2),
                    scaled(grad_sq, f.one_minus_beta_2),
                ),
            )
        };
        let m = B::float_div_scalar(moment_1.clone(), f.correction_1.into());
        let v = B::float_div_scalar(moment_2.clone(), f.correction_2.into());
        let delta = B::float_div(m, B::float_add_scalar(B::float_sqrt(v), f.epsilon.into()));
        let decayed = match f.decay {
            Some(decay) => scaled(param, decay),
            None => param,
        };
        let param = B::float_sub(decayed, scaled(delta, f.lr));
        (param, moment_1, moment_2)
    }

    /// Burn's own `linear` (or its input-gradient product) on the weight cast to `x`'s dtype:
    /// the product an f32 weight gets, so an exactly upcast weight gives the same bits.
    pub(crate) fn frozen_matmul<B: Backend>(
        x: FloatTensor<B>,
        weight: FloatTensor<B>,
        transpose_weight: bool,
    ) -> FloatTensor<B> {
        let weight = match weight.dtype() == x.dtype() {
            true => weight,
            false => B::float_cast(weight, FloatDType::from(x.dtype())),
        };
        match transpose_weight {
            true => B::linear_x_backward(weight, x),
            false => B::linear(x, weight, None),
        }
    }

    /// The dense `[rows, cols]` matrix of `codes` and `scales`, in `f32`: the codes as floats
    /// (the 4-bit formats' two nibbles split with a floor division by 16), minus Q4's offset 8,
    /// times each block's scale, plus Q4_1's offset — the same f32 operations as ggml's
    /// dequantizers.
    pub(crate) fn dequantize<B: Backend>(
        codes: IntTensor<B>,
        scales: FloatTensor<B>,
        layout: QuantLayout,
    ) -> FloatTensor<B> {
        let rows = codes.shape()[0];
        let blocks = layout.blocks();
        let codes = B::int_into_float(codes, FloatDType::F32);
        let nibbles = |codes: FloatTensor<B>| {
            let packed = B::float_reshape(codes, Shape::new([rows, blocks, QUANT_BLOCK / 2]));
            let high = B::float_floor(B::float_div_scalar(packed.clone(), 16.0.into()));
            let low = B::float_sub(packed, B::float_mul_scalar(high.clone(), 16.0.into()));
            B::float_cat(vec![low, high], 2)
        };
        let q = match layout.format {
            QuantFormat::Q8 => B::float_reshape(codes, Shape::new([rows, blocks, QUANT_BLOCK])),
            QuantFormat::Q4 => B::float_sub_scalar(nibbles(codes), 8.0.into()),
            QuantFormat::Q4_1 => nibbles(codes),
        };
        let params = layout.format.block_params();
        let scales = B::float_reshape(
            B::float_cast(scales, FloatDType::F32),
            Shape::new([rows, blocks, params]),
        );
        let param = |p: usize| {
            let end = Some((p + 1) as isize);
            B::float_slice(
                scales.clone(),
                &[Slice::full(), Slice::full(), Slice::new(p as isize, end, 1)],
            )
        };
        let mut dense = B::float_mul(q, param(0));
        if layout.format == QuantFormat::Q4_1 {
            dense = B::float_add(dense, param(1));
        }
        let dense = B::float_reshape(dense, Shape::new([rows, blocks * QUANT_BLOCK]));
        match blocks * QUANT_BLOCK == layout.cols {
            true => dense,
            false => B::float_slice(
                dense,
                &[Slice::full(), Slice::new(0, Some(layout.cols as isize), 1)],
            ),
        }
    }

    /// [`dequantize`] for this product, then Burn's own `linear` (or its input-gradient
    /// product) in `x`'s dtype, as [`frozen_matmul`] does for a half-precision weight.
    pub(crate) fn quantized_matmul<B: Backend>(
        x: FloatTensor<B>,
        codes: IntTensor<B>,
        scales: FloatTensor<B>,
        layout: QuantLayout,
        transpose_weight: bool,
    ) -> FloatTensor<B> {
        frozen_matmul::<B>(x, dequantize::<B>(codes, scales, layout), transpose_weight)
    }

    pub(crate) fn rotary<B: Backend>(
        x: FloatTensor<B>,
        cos: FloatTensor<B>,
        sin: FloatTensor<B>,
    ) -> FloatTensor<B> {
        let shape = x.shape();
        let last = shape.num_dims() - 1;
        let (x1, x2) = halves::<B>(x.clone());
        let rotated = B::float_cat(vec![B::float_neg(x2), x1], last);
        B::float_add(
            B::float_mul(x, B::float_expand(cos, shape.clone())),
            B::float_mul(rotated, B::float_expand(sin, shape)),
        )
    }
}

/// The two halves of the last dimension.
fn halves<B: Backend>(x: FloatTensor<B>) -> (FloatTensor<B>, FloatTensor<B>) {
    let shape = x.shape();
    let last = shape.num_dims() - 1;
    let half = shape[last] / 2;
    let slices = |start: usize| -> Vec<Slice> {
        (0..=last)
            .map(|dim| match dim == last {
                true => Slice::new(start as isize, Some((start + half) as isize), 1),
                false => Slice::full(),
            })
            .collect()
    };
    (
        B::float_slice(x.clone(), &slices(0)),
        B::float_slice(x, &slices(half)),
    )
}

/// The `sin` table of the inverse rotation: `rotary(δ, cos, −[sin₂, sin₁])` is the gradient of
/// `rotary(x, cos, sin)` (for RoPE's tables, whose halves are equal, simply `−sin`).
pub(crate) fn inverse_rotation_sin<B: Backend>(sin: FloatTensor<B>) -> FloatTensor<B> {
    let last = sin.shape().num_dims() - 1;
    let (s1, s2) = halves::<B>(sin);
    B::float_neg(B::float_cat(vec![s2, s1], last))
}

/// The scale `[d]` broadcast to every row of `[rows, d]`.
fn gamma_rows<B: Backend>(gamma: FloatTensor<B>, rows: usize, d: usize) -> FloatTensor<B> {
    B::float_expand(
        B::float_reshape(gamma, Shape::new([1, d])),
        Shape::new([rows, d]),
    )
}

/// `(rows, d)` of a tensor whose last dimension is the feature dimension.
pub(crate) fn rows_and_width(shape: &Shape) -> (usize, usize) {
    let d = shape[shape.num_dims() - 1];
    (shape.num_elements() / d.max(1), d)
}

/// `1 / sqrt(mean(x²) + ε)` per row of `[rows, d]` → `[rows, 1]`.
fn reciprocal_rms<B: Backend>(x: FloatTensor<B>, epsilon: f64) -> FloatTensor<B> {
    let mean = B::float_mean_dim(B::float_mul(x.clone(), x), 1);
    B::float_recip(B::float_sqrt(B::float_add_scalar(mean, epsilon.into())))
}

/// `log Σ_v exp(z[n, v])` per row, stable (the row maximum is subtracted first).
///
/// # Shapes
/// - `logits`: `[N, V]`; output: `[N, 1]`
fn log_sum_exp<B: Backend>(logits: FloatTensor<B>) -> FloatTensor<B> {
    let shape = logits.shape();
    let max = B::float_max_dim(logits.clone(), 1);
    let shifted = B::float_sub(logits, B::float_expand(max.clone(), shape));
    let sums = B::float_sum_dim(B::float_exp(shifted), 1);
    B::float_add(B::float_log(sums), max)
}

/// Targets clamped to valid ids (`[N, 1]`, for gather / scatter) and the row weights
/// `[t ≠ IGNORE]` (`[N, 1]`, in `dtype`).
fn targets_and_weights<B: Backend>(
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

#[cfg(any(feature = "wgpu", feature = "cuda"))]
impl FusedTrainingOps for burn_cubecl::CubeBackend {}
