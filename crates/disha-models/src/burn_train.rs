//! Burn's training traits for [`CausalLm`] (feature `burn-train`): `SupervisedTraining` and any
//! other `burn-train` driver can fine-tune the adapters (or, with the base unfrozen, the whole
//! model) as they train their own models. `disha train` runs its own loop (checkpoints with
//! data position, packing, exact resume) on the same forward and loss.

use burn::tensor::{Int, Tensor};
use burn_train::{InferenceStep, SequenceOutput, TrainOutput, TrainStep};

use crate::causal_lm::CausalLm;
use crate::loss::{IGNORE_INDEX, causal_lm_loss};

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
    /// Packed rows: sequence lengths per row (see [`CausalLm::forward_packed`]).
    pub segments: Option<Vec<Vec<usize>>>,
    /// The id reported as the target of ignored positions in [`SequenceOutput::targets`], so
    /// that burn-train's metrics skip them (`AccuracyMetric::with_pad_token(pad_id)`).
    pub pad_id: usize,
}

impl CausalLm {
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

impl TrainStep for CausalLm {
    type Input = CausalLmBatch;
    type Output = SequenceOutput;

    fn step(&self, batch: CausalLmBatch) -> TrainOutput<SequenceOutput> {
        let output = self.causal_lm_output(batch);
        let grads = output.loss.backward();
        TrainOutput::new(self, grads, output)
    }
}

impl InferenceStep for CausalLm {
    type Input = CausalLmBatch;
    type Output = SequenceOutput;

    fn step(&self, batch: CausalLmBatch) -> SequenceOutput {
        self.causal_lm_output(batch)
    }
}
