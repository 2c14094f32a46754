//! Burn's training traits for [`Llama`] (feature `burn-train`): `SupervisedTraining` and any
//! other `burn-train` driver can fine-tune the adapters (or, with the base unfrozen, the whole
//! model) as they train their own models. `disha train` runs its own loop (checkpoints with
//! data position, packing, exact resume) on the same forward and loss.

use burn::tensor::{Int, Tensor};
use burn_train::{InferenceStep, SequenceOutput, TrainOutput, TrainStep};

use crate::llama::{IGNORE_INDEX, Llama, causal_lm_loss};

/// One causal-LM batch.
///
/// # Shapes
/// - input_ids, labels: `[batch, seq]`; labels are [`IGNORE_INDEX`] where nothing is learned
///   (prompt, padding)
#[derive(Clone, Debug)]
pub struct CausalLmBatch {
    /// Token ids.
    pub input_ids: Tensor<2, Int>,
    /// Labels (unshifted, as in transformers: position `t` is predicted from `t - 1`).
    pub labels: Tensor<2, Int>,
    /// Packed rows: sequence lengths per row (see [`Llama::forward_packed`]).
    pub segments: Option<Vec<Vec<usize>>>,
    /// The id reported as the target of ignored positions in [`SequenceOutput::targets`], so
    /// that burn-train's metrics skip them (`AccuracyMetric::with_pad_token(pad_id)`).
    pub pad_id: usize,
}

impl Llama {
    /// The loss (mean over the targets, as [`causal_lm_loss`]) and the metrics view of a batch:
    /// logits of positions `0..seq-1` against the labels of `1..seq`.
    pub fn causal_lm_output(&self, batch: CausalLmBatch) -> SequenceOutput {
        let logits = match &batch.segments {
            Some(segments) => self.forward_packed(batch.input_ids, segments),
            None => self.forward(batch.input_ids),
        };
        let loss = causal_lm_loss(logits.clone(), batch.labels.clone());
        let [b, s, v] = logits.dims();
        let shifted_logits = logits.narrow(1, 0, s - 1);
        let next = batch.labels.narrow(1, 1, s - 1);
        let ignored = next.clone().equal_elem(IGNORE_INDEX);
        let targets = next.mask_fill(ignored, batch.pad_id as i64);
        debug_assert_eq!(shifted_logits.dims(), [b, s - 1, v]);
        SequenceOutput {
            loss,
            logits: shifted_logits,
            predictions: None,
            targets,
        }
    }
}

impl TrainStep for Llama {
    type Input = CausalLmBatch;
    type Output = SequenceOutput;

    fn step(&self, batch: CausalLmBatch) -> TrainOutput<SequenceOutput> {
        let output = self.causal_lm_output(batch);
        let grads = output.loss.backward();
        TrainOutput::new(self, grads, output)
    }
}

impl InferenceStep for Llama {
    type Input = CausalLmBatch;
    type Output = SequenceOutput;

    fn step(&self, batch: CausalLmBatch) -> SequenceOutput {
        self.causal_lm_output(batch)
    }
}

#[cfg(test)]
mod tests {
    use burn::module::Module;
    use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
    use burn::tensor::{Device, TensorData};
    use burn_train::{InferenceStep, TrainStep};
    use disha_core::{PeftConfig, PeftModelExt, TargetModules, freeze_all_but_active_adapters};

    use super::*;
    use crate::llama::tests_support::tiny_config;
    use crate::weights::RandomWeights;

    #[test]
    fn burn_train_steps_drive_the_same_loss_and_train_only_the_adapter() {
        let device = Device::default().autodiff();
        let c = tiny_config();
        let mut m = Llama::from_source(&c, &mut RandomWeights::new(&c, 0.3, 5), &device).unwrap();
        m.add_adapter("default", &PeftConfig::miss(4, TargetModules::AllLinear))
            .unwrap();
        let m = freeze_all_but_active_adapters(m);
        // Two rows; the first two labels of each are a masked prompt, the last of row 1 padding.
        let ids = vec![1i64, 5, 9, 2, 7, 3, 8, 4, 6, 0];
        let labels = vec![-100i64, -100, 9, 2, 7, -100, -100, 4, 6, -100];
        let batch = CausalLmBatch {
            input_ids: Tensor::from_data(TensorData::new(ids, [2, 5]), &device),
            labels: Tensor::from_data(TensorData::new(labels, [2, 5]), &device),
            segments: None,
            pad_id: 31,
        };
        let direct = causal_lm_loss(m.forward(batch.input_ids.clone()), batch.labels.clone())
            .into_scalar::<f64>();
        let out = TrainStep::step(&m, batch.clone());
        assert!((out.item.loss.clone().into_scalar::<f64>() - direct).abs() < 1e-6);
        // Metrics view: next-token targets, ignored positions reported as the pad id.
        let targets = out
            .item
            .targets
            .clone()
            .into_data()
            .try_to_vec_as::<i64>()
            .unwrap();
        assert_eq!(targets, vec![31, 9, 2, 7, 31, 4, 6, 31]);
        assert_eq!(out.item.logits.dims(), [2, 4, c.vocab_size]);
        // Gradients exist for exactly the adapter tensors: one Bone block per projection.
        let reference = GradientsParams::from_grads(
            causal_lm_loss(m.forward(batch.input_ids.clone()), batch.labels.clone()).backward(),
            &m,
        );
        assert_eq!(out.grads.len(), reference.len());
        assert_eq!(out.grads.len(), 7 * c.num_hidden_layers);
        // One optimizer step through the trait lowers the loss on this batch.
        let mut optim: ModuleOptimizer = AdamWConfig::new().init();
        let stepped = TrainStep::optimize(m, &mut optim, 1e-2.into(), out.grads);
        let after = InferenceStep::step(
            &stepped.valid(),
            CausalLmBatch {
                input_ids: batch.input_ids.inner(),
                labels: batch.labels.inner(),
                segments: None,
                pad_id: 31,
            },
        )
        .loss
        .into_scalar::<f64>();
        assert!(after < direct - 1e-3, "{direct} -> {after}");
    }
}
