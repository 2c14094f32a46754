//! Fused training ops: softmax over the last dimension, SwiGLU's `silu(gate) ⊙ up` and the summed
//! token cross-entropy, each one autodiff node with a hand-written backward
//! ([`FusedTrainingOps`]). The models use them in attention, in the MLP and in the causal-LM
//! loss; the benchmarks chapter of the docs has the profile that motivated them.

mod autodiff;
mod ops;

use burn::backend::Dispatch;
use burn::tensor::{Int, Tensor};

pub use ops::{FusedTrainingOps, IGNORE_INDEX};

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

#[cfg(test)]
mod tests {
    use burn::tensor::activation::{log_softmax, softmax};
    use burn::tensor::{Device, Int, Tensor, TensorData};

    use super::*;
    use crate::test_util::{max_abs_diff, random};

    /// Values within a few f32 ulps of O(1) numbers: both sides compute the same formula in
    /// f32, only the order of the additions in the row sums differs.
    const VALUE_TOL: f32 = 1e-6;

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
