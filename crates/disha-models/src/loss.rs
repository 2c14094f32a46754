//! The causal-LM loss every model family trains with (transformers' `ForCausalLMLoss`).

use burn::tensor::activation::log_softmax;
use burn::tensor::{Int, Tensor};

/// The label PEFT uses for positions excluded from the loss.
pub const IGNORE_INDEX: i64 = -100;

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
/// whole accumulated batch).
///
/// # Shapes
/// - logits: `[batch, seq, vocab]`, labels: `[batch, seq]` → `[1]`
pub fn causal_lm_loss_sum(logits: Tensor<3>, labels: Tensor<2, Int>) -> Tensor<1> {
    let [b, s, v] = logits.dims();
    let logits = logits.narrow(1, 0, s - 1).reshape([b * (s - 1), v]);
    let targets = labels.narrow(1, 1, s - 1).reshape([b * (s - 1), 1]);
    let keep = targets.clone().not_equal_elem(IGNORE_INDEX).float();
    let picked = log_softmax(logits, 1).gather(1, targets.clamp_min(0));
    (picked * keep).sum().neg()
}
