//! Fused training ops: softmax over the last dimension, SwiGLU's `silu(gate) ⊙ up`, the summed
//! token cross-entropy, RMS norm and rotate-half RoPE, each one autodiff node with a
//! hand-written backward ([`FusedTrainingOps`]), and each one multi-threaded pass on Flex. The
//! models use them in attention, in the MLP, in the norms and in the causal-LM loss; the
//! trainer's AdamW runs [`adamw_step`], one pass per parameter. The benchmarks chapter of the
//! docs has the profiles that motivated them.

mod autodiff;
#[cfg(feature = "flex")]
mod flex;
mod ops;

use burn::backend::Dispatch;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{DType, Int, Tensor};

use crate::quantized::QuantLayout;

type DispatchFloatTensor = FloatTensor<Dispatch>;
type DispatchIntTensor = IntTensor<Dispatch>;

pub use ops::{AdamWStep, FusedTrainingOps, IGNORE_INDEX};

/// Softmax over the last dimension, differentiable with a backward that needs only the output.
///
/// Same values as `burn::tensor::activation::softmax(x, D - 1)` (the backend's softmax).
///
/// # Shapes
/// - `x`: any; output: same
pub fn softmax_last<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    Tensor::from_dispatch(<Dispatch as FusedTrainingOps>::softmax_last(
        x.into_dispatch(),
    ))
}

/// `silu(gate) ⊙ up` (the gate of a SwiGLU MLP), differentiable in both, with a backward that
/// computes no sigmoid again.
///
/// # Shapes
/// - `gate`, `up`: the same shape; output: that shape
pub fn silu_mul<const D: usize>(gate: Tensor<D>, up: Tensor<D>) -> Tensor<D> {
    assert_eq!(
        gate.dims(),
        up.dims(),
        "silu_mul: gate and up differ in shape"
    );
    Tensor::from_dispatch(<Dispatch as FusedTrainingOps>::silu_mul(
        gate.into_dispatch(),
        up.into_dispatch(),
    ))
}

/// The summed token cross-entropy `Σ_n [t_n ≠ IGNORE_INDEX] · (logsumexp(z_n) − z_n[t_n])`,
/// differentiable in `logits` (one `softmax − onehot` pass in the backward).
///
/// # Shapes
/// - `logits`: `[N, V]`; `targets`: `[N]` (ids in `[0, V)`, or [`IGNORE_INDEX`]); output: `[1]`
pub fn cross_entropy_sum(logits: Tensor<2>, targets: Tensor<1, Int>) -> Tensor<1> {
    let [n, _] = logits.dims();
    assert_eq!(
        targets.dims()[0],
        n,
        "cross_entropy_sum: {n} rows of logits, {} targets",
        targets.dims()[0]
    );
    Tensor::from_dispatch(<Dispatch as FusedTrainingOps>::cross_entropy_sum(
        logits.into_dispatch(),
        targets.into_dispatch(),
    ))
}

/// RMS norm over the last dimension, `x / sqrt(mean(x²) + ε) ⊙ γ` (transformers' `LlamaRMSNorm`
/// and Burn's `RmsNorm`), differentiable in `x` and `gamma`.
///
/// # Shapes
/// - `x`: `[..., d]`; `gamma`: `[d]`; output: like `x`
pub fn rms_norm<const D: usize>(x: Tensor<D>, gamma: Tensor<1>, epsilon: f64) -> Tensor<D> {
    assert_eq!(
        x.dims()[D - 1],
        gamma.dims()[0],
        "rms_norm: input width and scale length differ"
    );
    Tensor::from_dispatch(<Dispatch as FusedTrainingOps>::rms_norm(
        x.into_dispatch(),
        gamma.into_dispatch(),
        epsilon,
    ))
}

/// Rotate-half RoPE (the HF layout: dimension `i` pairs with `i + head_dim / 2`),
/// `x ⊙ cos + [−x₂, x₁] ⊙ sin`, differentiable in `x` (the backward rotates back).
///
/// # Shapes
/// - `x`: `[batch, heads, seq, head_dim]` (any strides, e.g. heads swapped out of
///   `[batch, seq, heads, head_dim]`); `cos`, `sin`: `[1 or batch, 1, seq, head_dim]`;
///   output: like `x`, contiguous
pub fn rotary(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
    let [b, _, s, d] = x.dims();
    for (name, t) in [("cos", &cos), ("sin", &sin)] {
        let [tb, one, ts, td] = t.dims();
        assert!(
            (tb == 1 || tb == b) && one == 1 && ts == s && td == d,
            "rotary: {name} of shape {:?} for x of shape {:?}",
            t.dims(),
            x.dims()
        );
    }
    Tensor::from_dispatch(<Dispatch as FusedTrainingOps>::rotary(
        x.into_dispatch(),
        cos.into_dispatch(),
        sin.into_dispatch(),
    ))
}

/// One AdamW step of one parameter (Burn's `AdamW` update, the same bits; see
/// [`FusedTrainingOps::adamw_step`]), one pass over the four tensors on Flex, updating the
/// parameter and the moments in place where it holds their only reference. Not differentiated
/// (an optimizer works on the inner tensors).
///
/// # Shapes
/// - `param`, `grad`, `moment_1`, `moment_2`: one shape; outputs `(param, moment_1,
///   moment_2)` of that shape
pub fn adamw_step<const D: usize>(
    param: Tensor<D>,
    grad: Tensor<D>,
    moment_1: Tensor<D>,
    moment_2: Tensor<D>,
    step: AdamWStep,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    for (name, t) in [
        ("grad", &grad),
        ("moment_1", &moment_1),
        ("moment_2", &moment_2),
    ] {
        assert_eq!(
            t.dims(),
            param.dims(),
            "adamw_step: {name} and the parameter differ in shape"
        );
    }
    let (param, moment_1, moment_2) = <Dispatch as FusedTrainingOps>::adamw_step(
        param.into_dispatch(),
        grad.into_dispatch(),
        moment_1.into_dispatch(),
        moment_2.into_dispatch(),
        step,
    );
    (
        Tensor::from_dispatch(param),
        Tensor::from_dispatch(moment_1),
        Tensor::from_dispatch(moment_2),
    )
}

/// Whether a product of an `x` in `x_dtype` with a frozen weight stored in `weight_dtype` goes
/// through [`frozen_matmul`] rather than a plain matmul: when the weight needs a cast, and when
/// both are half precision (on Flex the op sums in `f32` and rounds once, where Flex's own f16
/// matmul sums a one-row product in f16; other backends run their own matmul either way).
pub fn takes_frozen_matmul(x_dtype: DType, weight_dtype: DType) -> bool {
    x_dtype != weight_dtype || matches!(x_dtype, DType::BF16 | DType::F16)
}

/// `x · W` for a frozen weight `W` stored in any float dtype, computed in `x`'s dtype: `W` is
/// cast for this product only, and again (transposed) for the input gradient in the backward,
/// so a bf16 base under f32 compute costs its bf16 bytes plus one layer's converted copy at a
/// time — never a second, converted model kept for the backward. `W` gets no gradient (detach
/// it, or keep it frozen: its autodiff graph is not followed).
///
/// # Shapes
/// - `x`: `[..., k]`; `weight`: `[k, n]`; output: `[..., n]`, in `x`'s dtype
pub fn frozen_matmul<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    assert_eq!(
        x.dims()[D - 1],
        weight.dims()[0],
        "frozen_matmul: input width and weight rows differ"
    );
    Tensor::from_dispatch(<Dispatch as FusedTrainingOps>::frozen_matmul(
        x.into_dispatch(),
        weight.into_dispatch(),
        false,
    ))
}

/// `x · Wᵀ` for a frozen weight `W` stored in any float dtype (a tied output head's half-precision
/// embedding), computed like [`frozen_matmul`].
///
/// # Shapes
/// - `x`: `[..., k]`; `weight`: `[n, k]`; output: `[..., n]`, in `x`'s dtype
pub fn frozen_matmul_transposed<const D: usize>(x: Tensor<D>, weight: Tensor<2>) -> Tensor<D> {
    assert_eq!(
        x.dims()[D - 1],
        weight.dims()[1],
        "frozen_matmul_transposed: input width and weight columns differ"
    );
    Tensor::from_dispatch(<Dispatch as FusedTrainingOps>::frozen_matmul(
        x.into_dispatch(),
        weight.into_dispatch(),
        true,
    ))
}

/// `x · Mᵀ` for a block-quantized frozen matrix `M` `[rows, cols]` held as `codes` and `scales`
/// (see [`QuantizedMatrix::matmul_transposed`](crate::QuantizedMatrix::matmul_transposed)).
///
/// # Shapes
/// - `x`: `[..., cols]`; output: `[..., rows]`, in `x`'s dtype
pub(crate) fn quantized_matmul<const D: usize>(
    x: Tensor<D>,
    codes: Tensor<2, Int>,
    scales: Tensor<2>,
    layout: QuantLayout,
) -> Tensor<D> {
    assert_eq!(
        x.dims()[D - 1],
        layout.cols,
        "quantized_matmul: input width and matrix columns differ"
    );
    Tensor::from_dispatch(<Dispatch as FusedTrainingOps>::quantized_matmul(
        x.into_dispatch(),
        codes.into_dispatch(),
        scales.into_dispatch(),
        layout,
        true,
    ))
}

/// The dense f32 matrix of `codes` and `scales` (the reference's tensor ops, on any backend).
pub(crate) fn dequantize(
    codes: DispatchIntTensor,
    scales: DispatchFloatTensor,
    layout: QuantLayout,
) -> DispatchFloatTensor {
    ops::reference::dequantize::<Dispatch>(codes, scales, layout)
}

#[cfg(test)]
mod tests {
    use burn::tensor::activation::{log_softmax, softmax};
    use burn::tensor::{Device, Int, Tensor, TensorData};

    use super::*;
    use crate::test_util::{max_abs_diff, random};

    /// Values within a few f32 ulps of O(1) numbers: both sides compute the same formula in
    /// f32, only the order of the additions in the row sums differs.
    const VALUE_TOL: f32 = 1e-6;

    fn upstream_t(device: &Device) -> Tensor<3> {
        random(24, [2, 3, 40], device)
    }

    #[test]
    fn frozen_matmul_casts_the_weight_in_both_passes() {
        use burn::tensor::DType;
        let device = Device::default().autodiff();
        for dtype in [DType::BF16, DType::F16] {
            let weight = random(21, [24, 40], &device).cast(dtype);
            let x = random(22, [2, 3, 24], &device).require_grad();
            let upstream = random(23, [2, 3, 40], &device);
            let ours = frozen_matmul(x.clone(), weight.clone());
            assert_eq!(ours.dtype(), DType::F32, "output in the input's dtype");
            // The same product on the upcast weight (exact: bf16 / f16 → f32 loses nothing),
            // so the same bits in value and gradient.
            let upcast = weight.clone().cast(DType::F32);
            let theirs = x.clone().matmul(upcast.clone().unsqueeze());
            assert_eq!(
                max_abs_diff(ours.clone().inner(), theirs.clone().inner()),
                0.0
            );
            let g_ours = (ours * upstream.clone()).sum().backward();
            let g_theirs = (theirs * upstream).sum().backward();
            let (a, b) = (x.grad(&g_ours).unwrap(), x.grad(&g_theirs).unwrap());
            assert_eq!(max_abs_diff(a, b), 0.0, "{dtype:?}: input gradient");
            // The transposed form, from the transposed storage.
            let stored_t = weight.clone().transpose();
            let ours_t = frozen_matmul_transposed(x.clone(), stored_t);
            let g_t = (ours_t.clone() * upstream_t(&device)).sum().backward();
            let theirs_t = x.clone().matmul(upcast.unsqueeze());
            let g_theirs_t = (theirs_t.clone() * upstream_t(&device)).sum().backward();
            // The product now reads a transposed operand, which the matmul may accumulate in
            // another order: sums of 24 (40) O(1) products, a few ulps.
            let d = max_abs_diff(ours_t.inner(), theirs_t.inner());
            assert!(d <= 1e-5, "{dtype:?}: transposed value {d}");
            let (a, b) = (x.grad(&g_t).unwrap(), x.grad(&g_theirs_t).unwrap());
            let d = max_abs_diff(a, b);
            assert!(d <= 1e-5, "{dtype:?}: transposed input gradient {d}");
            // The weight stays in its dtype.
            assert_eq!(weight.dtype(), dtype);
        }
    }

    #[test]
    fn softmax_matches_burn_in_value_and_gradient() {
        let device = Device::default().autodiff();
        // Scores of the magnitude attention produces, plus a masked (-1e9) column.
        let x = random(1, [2, 3, 5, 7], &device).mul_scalar(8.0);
        let mask = Tensor::<4>::zeros([1, 1, 1, 7], &device).slice_assign(
            [0..1, 0..1, 0..1, 6..7],
            Tensor::full([1, 1, 1, 1], -1e9, &device),
        );
        let x = (x + mask).require_grad();
        let weights = random(2, [2, 3, 5, 7], &device);
        let ours = softmax_last(x.clone());
        let theirs = softmax(x.clone(), 3);
        assert!(max_abs_diff(ours.clone().inner(), theirs.clone().inner()) <= VALUE_TOL);
        let g_ours = (ours * weights.clone()).sum().backward();
        let g_theirs = (theirs * weights).sum().backward();
        let (a, b) = (x.grad(&g_ours).unwrap(), x.grad(&g_theirs).unwrap());
        assert!(max_abs_diff(a, b) <= VALUE_TOL);
    }

    #[test]
    fn silu_mul_matches_burn_in_value_and_gradients() {
        let device = Device::default().autodiff();
        // Gates of either sign and beyond the sigmoid's linear range.
        let gate = random(4, [3, 4, 9], &device)
            .mul_scalar(12.0)
            .require_grad();
        let up = random(5, [3, 4, 9], &device).require_grad();
        let weights = random(6, [3, 4, 9], &device);
        let ours = silu_mul(gate.clone(), up.clone());
        let theirs = burn::tensor::activation::silu(gate.clone()) * up.clone();
        assert!(max_abs_diff(ours.clone().inner(), theirs.clone().inner()) <= VALUE_TOL * 6.0);
        let g_ours = (ours * weights.clone()).sum().backward();
        let g_theirs = (theirs * weights).sum().backward();
        for (name, param) in [("gate", &gate), ("up", &up)] {
            let d = max_abs_diff(param.grad(&g_ours).unwrap(), param.grad(&g_theirs).unwrap());
            // Gradients of O(1)-O(6) magnitude, computed by different but exact formulas:
            // a few ulps of 6.
            assert!(d <= VALUE_TOL * 6.0, "{name}: {d}");
        }
    }

    #[test]
    fn cross_entropy_matches_log_softmax_gather_with_ignored_rows() {
        let device = Device::default().autodiff();
        let (n, v) = (6, 11);
        let logits = random(3, [n, v], &device).mul_scalar(6.0).require_grad();
        let ids: Vec<i64> = vec![0, 10, IGNORE_INDEX, 4, IGNORE_INDEX, 7];
        let targets = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [n]), &device);
        let ours = cross_entropy_sum(logits.clone(), targets.clone());
        // The unfused formula, with Burn's own autodiff.
        let keep = targets
            .clone()
            .not_equal_elem(IGNORE_INDEX)
            .float()
            .reshape([n, 1]);
        let picked = log_softmax(logits.clone(), 1).gather(1, targets.clamp_min(0).reshape([n, 1]));
        let theirs = (picked * keep).sum().neg();
        let (a, b) = (
            ours.clone().into_scalar::<f32>(),
            theirs.clone().into_scalar::<f32>(),
        );
        // A sum of four O(1) terms: a few ulps of the total.
        assert!((a - b).abs() <= 4e-6 * b.abs().max(1.0), "{a} vs {b}");
        let (ga, gb) = (ours.backward(), theirs.backward());
        let (ga, gb) = (logits.grad(&ga).unwrap(), logits.grad(&gb).unwrap());
        assert!(max_abs_diff(ga.clone(), gb) <= VALUE_TOL);
        // Ignored rows get exactly zero gradient; the others sum to zero (softmax − onehot).
        assert_eq!(ignored_rows_max_abs(&ga, &ids), 0.0);
        for r in ga.sum_dim(1).into_data().try_to_vec::<f32>().unwrap() {
            assert!(r.abs() <= VALUE_TOL, "row gradient sums to {r}");
        }
    }

    #[test]
    fn rms_norm_matches_burn_in_value_and_gradients() {
        let device = Device::default().autodiff();
        // 150 rows: more than two of the kernel's fixed reduction blocks for the scale's gradient.
        let x = random(7, [3, 50, 16], &device)
            .mul_scalar(3.0)
            .require_grad();
        let gamma = random(8, [16], &device).require_grad();
        let weights = random(9, [3, 50, 16], &device);
        let mut module = burn::nn::RmsNormConfig::new(16)
            .with_epsilon(1e-5)
            .init(&device);
        module.gamma = burn::module::Param::from_tensor(gamma.clone());
        let ours = rms_norm(x.clone(), gamma.clone(), 1e-5);
        let theirs = module.forward(x.clone());
        // O(1) outputs; Burn divides by the RMS where the kernel multiplies by its reciprocal.
        assert!(max_abs_diff(ours.clone().inner(), theirs.clone().inner()) <= VALUE_TOL * 4.0);
        let g_ours = (ours * weights.clone()).sum().backward();
        let g_theirs = (theirs * weights).sum().backward();
        let dx = max_abs_diff(x.grad(&g_ours).unwrap(), x.grad(&g_theirs).unwrap());
        // O(1) per-element gradients from a 16-term row sum each.
        assert!(dx <= 1e-5, "x: {dx}");
        let (a, b) = (gamma.grad(&g_ours).unwrap(), gamma.grad(&g_theirs).unwrap());
        let scale = b.clone().abs().max().into_scalar::<f32>();
        // Sums over 150 rows of O(1) terms: relative to the largest.
        let dg = max_abs_diff(a.clone(), b);
        assert!(dg <= 1e-5 * scale.max(1.0), "gamma: {dg} of {scale}");
        // The cross-row sum is reduced in fixed blocks: the same bits on a second run.
        let again = rms_norm(x.clone(), gamma.clone(), 1e-5);
        let g_again = (again * random(9, [3, 50, 16], &device)).sum().backward();
        assert_eq!(
            gamma.grad(&g_again).unwrap().into_data(),
            a.into_data(),
            "the scale's gradient changed between two identical runs"
        );
    }

    /// The unfused rotate-half formula, in Burn's ops.
    fn rotary_reference(x: Tensor<4>, cos: Tensor<4>, sin: Tensor<4>) -> Tensor<4> {
        let half = x.dims()[3] / 2;
        let x1 = x.clone().narrow(3, 0, half);
        let x2 = x.clone().narrow(3, half, half);
        x * cos + Tensor::cat(vec![x2.neg(), x1], 3) * sin
    }

    #[test]
    fn rotary_matches_the_rotate_half_formula_for_strided_inputs_and_gradients() {
        let device = Device::default().autodiff();
        let (b, s, h, d) = (2, 5, 3, 8);
        for table_rows in [1, b] {
            // Heads swapped out of `[b, s, h, d]`, as attention produces them.
            // Each side its own graph (one backward per graph).
            let base = random(10, [b, s, h, d], &device).require_grad();
            let base_ref = random(10, [b, s, h, d], &device).require_grad();
            let angles = random(11, [table_rows, 1, s, d], &device).mul_scalar(3.0);
            let (cos, sin) = (angles.clone().cos(), angles.sin());
            // The upstream gradient arrives strided too (swapped back).
            let weights = random(12, [b, s, h, d], &device);
            let ours = rotary(base.clone().swap_dims(1, 2), cos.clone(), sin.clone());
            let theirs = rotary_reference(base_ref.clone().swap_dims(1, 2), cos, sin);
            // The same products and one addition per element: bit-for-bit up to the order of
            // one negation, which is exact.
            assert_eq!(
                max_abs_diff(ours.clone().inner(), theirs.clone().inner()),
                0.0
            );
            let g_ours = (ours.swap_dims(1, 2) * weights.clone()).sum().backward();
            let g_theirs = (theirs.swap_dims(1, 2) * weights).sum().backward();
            let dx = max_abs_diff(
                base.grad(&g_ours).unwrap(),
                base_ref.grad(&g_theirs).unwrap(),
            );
            // Two O(1) products per element, summed in possibly another order.
            assert!(dx <= VALUE_TOL * 2.0, "table rows {table_rows}: {dx}");
        }
    }

    /// The backend's ops (Flex's kernels in the default build) against the reference bodies
    /// every other backend runs, op by op, backward ops included.
    #[test]
    fn backend_ops_match_the_reference_bodies() {
        use super::ops::reference;
        type B = Dispatch;
        let device = Device::default();
        let t = |seed, shape: [usize; 3]| random(seed, shape, &device).into_dispatch();
        let close = |name: &str, a: Tensor<3>, b: Tensor<3>, tol: f32| {
            let d = max_abs_diff(a, b);
            assert!(d <= tol, "{name}: {d}");
        };
        let back = |p| Tensor::<3>::from_dispatch(p);
        let (x, g, w) = (t(20, [4, 6, 10]), t(21, [4, 6, 10]), t(22, [4, 6, 10]));
        let y = B::softmax_last(x.clone());
        close(
            "softmax_last_backward",
            back(B::softmax_last_backward(y.clone(), g.clone())),
            back(reference::softmax_last_backward::<B>(y, g.clone())),
            VALUE_TOL,
        );
        let (a, b) = B::silu_mul_backward(x.clone(), w.clone(), g.clone());
        let (ra, rb) = reference::silu_mul_backward::<B>(x.clone(), w.clone(), g.clone());
        close("silu_mul_backward gate", back(a), back(ra), VALUE_TOL * 4.0);
        close("silu_mul_backward up", back(b), back(rb), VALUE_TOL);
        let gamma = random(23, [10], &device).into_dispatch();
        // O(1) outputs; the reference multiplies by a reciprocal RMS as the kernel does.
        close(
            "rms_norm",
            back(B::rms_norm(x.clone(), gamma.clone(), 1e-6)),
            back(reference::rms_norm::<B>(x.clone(), gamma.clone(), 1e-6)),
            VALUE_TOL * 4.0,
        );
        // RoPE on one head of `[4, 1, 6, 10]` with a random `[1, 1, 6, 10]` table: the same
        // products and sums.
        let heads = |p| {
            Tensor::<3>::from_dispatch(p)
                .unsqueeze_dim::<4>(1)
                .into_dispatch()
        };
        let four = |p| Tensor::<4>::from_dispatch(p).squeeze_dim::<3>(1);
        let (cos, sin) = (heads(t(25, [1, 6, 10])), heads(t(26, [1, 6, 10])));
        close(
            "rotary",
            four(B::rotary(heads(x.clone()), cos.clone(), sin.clone())),
            four(reference::rotary::<B>(heads(x.clone()), cos, sin)),
            0.0,
        );
        // AdamW, first and a later step: the same operations in the same order, so the same
        // bits. The inputs are shared with the reference's, so an in-place write of a shared
        // buffer would show up as a difference too.
        for time in [1, 3] {
            let step = AdamWStep {
                lr: 1e-2,
                beta_1: 0.9,
                beta_2: 0.999,
                epsilon: 1e-8,
                weight_decay: 0.1,
                time,
            };
            let v = (back(w.clone()) * back(w.clone())).into_dispatch();
            let (p, m1, m2) = B::adamw_step(x.clone(), g.clone(), w.clone(), v.clone(), step);
            let (rp, rm1, rm2) =
                reference::adamw_step::<B>(x.clone(), g.clone(), w.clone(), v, step);
            close("adamw_step param", back(p), back(rp), 0.0);
            close("adamw_step moment_1", back(m1), back(rm1), 0.0);
            close("adamw_step moment_2", back(m2), back(rm2), 0.0);
        }
        close(
            "rms_norm_backward",
            back(B::rms_norm_backward(
                x.clone(),
                gamma.clone(),
                g.clone(),
                1e-6,
            )),
            back(reference::rms_norm_backward::<B>(
                x.clone(),
                gamma,
                g.clone(),
                1e-6,
            )),
            1e-5,
        );
        let gg = |p| Tensor::<1>::from_dispatch(p).unsqueeze::<3>();
        close(
            "rms_norm_gamma_backward",
            gg(B::rms_norm_gamma_backward(x.clone(), g.clone(), 1e-6)),
            gg(reference::rms_norm_gamma_backward::<B>(
                x.clone(),
                g.clone(),
                1e-6,
            )),
            1e-5,
        );
        let logits = random(24, [6, 10], &device).mul_scalar(5.0).into_dispatch();
        let ids = Tensor::<1, Int>::from_data(
            TensorData::new(vec![3i64, IGNORE_INDEX, 0, 9, 9, 1], [6]),
            &device,
        )
        .into_dispatch();
        let (loss, lse) = B::cross_entropy_forward(logits.clone(), ids.clone());
        let (rloss, rlse) = reference::cross_entropy_forward::<B>(logits.clone(), ids.clone());
        let scalar = |p| Tensor::<1>::from_dispatch(p).into_scalar::<f32>();
        let (l, r) = (scalar(loss), scalar(rloss));
        assert!(
            (l - r).abs() <= 4e-6 * r.abs(),
            "cross_entropy_forward: {l} vs {r}"
        );
        let two = |p| Tensor::<2>::from_dispatch(p).unsqueeze::<3>();
        close(
            "cross_entropy lse",
            two(lse.clone()),
            two(rlse),
            VALUE_TOL * 8.0,
        );
        let seed =
            Tensor::<1>::from_data(TensorData::new(vec![0.5f32], [1]), &device).into_dispatch();
        close(
            "cross_entropy_backward",
            two(B::cross_entropy_backward(
                logits.clone(),
                ids.clone(),
                lse.clone(),
                seed.clone(),
            )),
            two(reference::cross_entropy_backward::<B>(
                logits, ids, lse, seed,
            )),
            VALUE_TOL,
        );
    }

    /// The largest |gradient| over the rows whose target is ignored.
    fn ignored_rows_max_abs(grad: &Tensor<2>, ids: &[i64]) -> f32 {
        let [_, v] = grad.dims();
        let values = grad.clone().into_data().try_to_vec::<f32>().unwrap();
        ids.iter()
            .enumerate()
            .filter(|(_, id)| **id == IGNORE_INDEX)
            .flat_map(|(row, _)| values[row * v..(row + 1) * v].iter().map(|g| g.abs()))
            .fold(0.0, f32::max)
    }
}
