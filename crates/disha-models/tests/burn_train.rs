//! Burn's training traits on [`CausalLm`] (feature `burn-train`; CI runs this with the WGPU
//! kernel suite, where the default device is WGPU on lavapipe).

mod common;

use burn::module::Module;
use burn::optim::{AdamWConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Tensor, TensorData};
use burn_train::{InferenceStep, TrainStep};
use common::bundled_tiny;
use disha_core::{PeftConfig, PeftModelExt, TargetModules, freeze_all_but_active_adapters};
use disha_models::{CausalLmBatch, causal_lm_loss, load_model};

#[test]
fn burn_train_steps_drive_the_same_loss_and_train_only_the_adapter() {
    let device = Device::default().autodiff();
    let mut m = load_model(&bundled_tiny().join("base"), &device)
        .unwrap()
        .model;
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
    // The same graph evaluated twice: only a backend's nondeterministic reduction order could
    // move it, and by f32 rounding of a loss of magnitude ~5 at most.
    assert!((out.item.loss.clone().into_scalar::<f64>() - direct).abs() < 1e-5);
    // Metrics view: next-token targets, ignored positions reported as the pad id.
    let targets = out
        .item
        .targets
        .clone()
        .into_data()
        .try_to_vec_as::<i64>()
        .unwrap();
    assert_eq!(targets, vec![31, 9, 2, 7, 31, 4, 6, 31]);
    assert_eq!(out.item.logits.dims(), [2, 4, m.vocab_size()]);
    // Gradients exist for exactly the adapter tensors: one Bone block per projection.
    let reference = GradientsParams::from_grads(
        causal_lm_loss(m.forward(batch.input_ids.clone()), batch.labels.clone()).backward(),
        &m,
    );
    let layers = m.as_llama().unwrap().config().num_hidden_layers;
    assert_eq!(out.grads.len(), reference.len());
    assert_eq!(out.grads.len(), 7 * layers);
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
