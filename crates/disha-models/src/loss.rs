//! The causal-LM loss every model family trains with (transformers' `ForCausalLMLoss`).

use burn::tensor::{Int, Tensor};
use disha_core::fused::cross_entropy_sum;

/// The label PEFT uses for positions excluded from the loss.
pub const IGNORE_INDEX: i64 = disha_core::fused::IGNORE_INDEX;

/// transformers' causal-LM loss: logits at position `t` predict `labels[t + 1]`; positions
/// labelled [`IGNORE_INDEX`] are skipped; the mean is over the remaining targets.
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`, labels: `[batch, seq]` → `[1]`
pub fn causal_lm_loss(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let s = logits.dims()[1];
    let keep = labels
        .clone()
        .narrow(1, 1, s - 1)
        .not_equal_elem(IGNORE_INDEX)
        .float()
        .sum()
        .clamp_min(1.0);
    causal_lm_loss_sum(logits, labels) / keep
}

/// The *sum* of the per-token cross-entropies of [`causal_lm_loss`] (for normalizing over a
/// whole accumulated batch), as one fused op ([`disha_core::fused::cross_entropy_sum`]: the
/// backward forms `softmax − onehot` once instead of differentiating a log-softmax chain).
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`, labels: `[batch, seq]` → `[1]`
pub fn causal_lm_loss_sum(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let device = labels.device();
    // Position t predicts labels[t + 1]; the last position of each row predicts nothing. Shifting
    // the labels (not the logits) keeps the logits a free reshape instead of a sliced copy.
    let targets = match s {
        0 | 1 => Tensor::<1, Int>::full([b * s], IGNORE_INDEX, &device),
        _ => Tensor::cat(
            vec![
                labels.narrow(1, 1, s - 1),
                Tensor::<2, Int>::full([b, 1], IGNORE_INDEX, &device),
            ],
            1,
        )
        .reshape([b * s]),
    };
    cross_entropy_sum(logits.reshape([b * s, v]), targets)
}
