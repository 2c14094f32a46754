//! [`FusedAdamW`]: Burn's AdamW with each parameter's update as one op
//! ([`disha_core::fused::adamw_step`]) instead of fifteen element-wise ones.
//!
//! Burn's `AdamW` runs its update as a chain of tensor ops — the two moment updates, the bias
//! corrections, the root, the division, the decay and the subtraction — each a separate pass
//! over the parameter's elements (single-threaded on Flex). Over every weight of a model (full
//! fine-tuning) that chain was a tenth of the step; the fused op reads the parameter, its
//! gradient and both moments once, writes them once (in place where it holds their only
//! reference), on every thread.
//!
//! It computes the same `f32` operations in the same order as Burn's `AdamW` (the same bits on
//! Flex, which the tests check step by step) and keeps the same state type ([`AdamWState`]), so
//! an optimizer record written by either loads into the other.

use burn::optim::{AdamWState, AdaptiveMomentumState, LearningRate, ModuleOptimizer, Optimizer};
use burn::tensor::{Device, Tensor};
use disha_core::fused::{AdamWStep, adamw_step};

/// AdamW with decoupled weight decay (Loshchilov & Hutter; Burn's `AdamW` without AMSGrad),
/// one fused op per parameter.
///
/// # Example
/// ```
/// use disha_train::adamw::FusedAdamW;
///
/// let optimizer = FusedAdamW::new(0.9, 0.999, 1e-8, 0.0).init();
/// # let _ = optimizer;
/// ```
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct FusedAdamW {
    beta_1: f32,
    beta_2: f32,
    epsilon: f32,
    weight_decay: f32,
}

impl FusedAdamW {
    /// AdamW with moment decays `beta_1` / `beta_2`, `epsilon` added to the second moment's
    /// root, and decoupled weight decay `weight_decay` (scaled by the learning rate).
    pub fn new(beta_1: f32, beta_2: f32, epsilon: f32, weight_decay: f32) -> Self {
        Self {
            beta_1,
            beta_2,
            epsilon,
            weight_decay,
        }
    }

    /// A whole-module optimizer (one state per parameter, keyed by parameter id).
    pub fn init(self) -> ModuleOptimizer {
        self.into()
    }
}

impl Optimizer for FusedAdamW {
    type State<const D: usize> = AdamWState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (time, moment_1, moment_2) = match state {
            Some(AdamWState { momentum }) => {
                // Only Burn's AMSGrad variant records a running maximum; the learner's resume
                // check refuses any state tensor besides the two moments.
                assert!(
                    momentum.max_moment_2.is_none(),
                    "FusedAdamW continues plain AdamW states, not AMSGrad ones"
                );
                (momentum.time + 1, momentum.moment_1, momentum.moment_2)
            }
            // The moments start from zero; the op writes them into these buffers.
            None => (1, grad.zeros_like(), grad.zeros_like()),
        };
        let step = AdamWStep {
            lr,
            beta_1: self.beta_1,
            beta_2: self.beta_2,
            epsilon: self.epsilon,
            weight_decay: self.weight_decay,
            time,
        };
        let (tensor, moment_1, moment_2) = adamw_step(tensor, grad, moment_1, moment_2, step);
        let momentum = AdaptiveMomentumState::new(time, moment_1, moment_2);
        (tensor, Some(AdamWState::new(momentum)))
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        AdamWState::new(state.momentum.to_device(device))
    }
}

#[cfg(test)]
mod tests {
    use burn::module::{Module, Param};
    use burn::optim::{AdamWConfig, GradientsParams};
    use burn::tensor::{Device, Distribution, Tensor};

    use super::*;

    /// Two parameters of different ranks (a matrix larger than one task of the kernel's
    /// threads, so the multi-threaded path runs, and a vector), as in a model.
    #[derive(Module, Debug)]
    struct Weights {
        matrix: Param<Tensor<2>>,
        vector: Param<Tensor<1>>,
    }

    fn weights(device: &Device) -> Weights {
        let init = |shape: Vec<usize>| {
            Tensor::<1>::random(
                [shape.iter().product::<usize>()],
                Distribution::Default,
                device,
            )
        };
        Weights {
            matrix: Param::from_tensor(init(vec![96, 384]).reshape([96, 384])),
            vector: Param::from_tensor(init(vec![33])),
        }
    }

    /// Gradients of a loss that differs per step and has elements of both signs and of very
    /// different magnitudes (so the moments, the root and the decay all matter).
    fn step(model: Weights, optim: &mut ModuleOptimizer, lr: f64, k: f32) -> Weights {
        let loss = (model.matrix.val().mul_scalar(k).sin().sum()
            + model
                .vector
                .val()
                .powf_scalar(3.0)
                .mul_scalar(k * 1e-3)
                .sum())
        .sum();
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        optim.step(lr, model, grads)
    }

    fn bits<const D: usize>(t: Tensor<D>) -> Vec<u32> {
        t.into_data()
            .try_to_vec::<f32>()
            .expect("f32 parameters")
            .into_iter()
            .map(f32::to_bits)
            .collect()
    }

    fn assert_same_bits(a: &Weights, b: &Weights, what: &str) {
        assert!(
            bits(a.matrix.val().inner()) == bits(b.matrix.val().inner()),
            "{what}: matrix differs"
        );
        assert!(
            bits(a.vector.val().inner()) == bits(b.vector.val().inner()),
            "{what}: vector differs"
        );
    }

    #[test]
    fn same_bits_as_burn_adamw_with_and_without_weight_decay() {
        let device = Device::default().autodiff();
        for weight_decay in [0.0, 0.05] {
            let start = weights(&device);
            let (mut ours, mut theirs) = (start.clone(), start);
            let mut fused = FusedAdamW::new(0.9, 0.95, 1e-8, weight_decay).init();
            let mut burn = AdamWConfig::new()
                .with_beta_1(0.9)
                .with_beta_2(0.95)
                .with_epsilon(1e-8)
                .with_weight_decay(weight_decay)
                .init();
            for (i, lr) in [3e-3, 1e-3, 2e-3, 5e-4].into_iter().enumerate() {
                let k = 1.0 + i as f32;
                ours = step(ours, &mut fused, lr, k);
                theirs = step(theirs, &mut burn, lr, k);
                assert_same_bits(
                    &ours,
                    &theirs,
                    &format!("wd {weight_decay}, step {}", i + 1),
                );
            }
        }
    }

    #[test]
    fn records_move_between_burn_adamw_and_the_fused_one() {
        let device = Device::default().autodiff();
        let model = weights(&device);
        let mut burn = AdamWConfig::new().with_weight_decay(0.01).init();
        let model = step(model, &mut burn, 1e-3, 1.0);
        let model = step(model, &mut burn, 1e-3, 2.0);
        // Burn's state continued by the fused optimizer, and the fused one's back into Burn's.
        let mut fused = FusedAdamW::new(0.9, 0.999, 1e-5, 0.01)
            .init()
            .load_record(burn.to_record());
        let (ours, theirs) = (
            step(model.clone(), &mut fused, 1e-3, 3.0),
            step(model, &mut burn, 1e-3, 3.0),
        );
        assert_same_bits(&ours, &theirs, "step 3 after a Burn record");
        let mut burn_again = AdamWConfig::new()
            .with_weight_decay(0.01)
            .init()
            .load_record(fused.to_record());
        let (ours, theirs) = (
            step(ours, &mut fused, 1e-3, 4.0),
            step(theirs, &mut burn_again, 1e-3, 4.0),
        );
        assert_same_bits(&ours, &theirs, "step 4 after a fused record");
    }
}
