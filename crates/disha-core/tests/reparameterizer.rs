//! The weight-space [`DishaReparameterizer`] on an unmodified Burn model: attach, freeze,
//! gradients, records, valid/train, materialize — and equality with the activation-space
//! `AdaptedLinear` forward.

mod common;

use burn::module::{Module, ParamGroup};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Tensor};
use common::*;
use disha_core::{
    AdaptedLinear, AdapterInit, AdapterSpec, BatOrientation, DishaError, DishaReparam,
    DishaReparameterizer,
};

#[derive(Module, Debug)]
struct Net {
    fc1: Linear,
    fc2: Linear,
}

impl Net {
    fn new(device: &Device) -> Self {
        device.seed(3);
        Self {
            fc1: LinearConfig::new(12, 8).init(device),
            fc2: LinearConfig::new(8, 6).init(device),
        }
    }
}

fn weights() -> ParamGroup {
    ParamGroup::from_regex(r"^fc\d\.weight$").unwrap()
}

#[test]
fn lifecycle_attach_freeze_gradients_records_materialize() {
    let device = device().autodiff();
    let net = Net::new(&device);
    let reparam = DishaReparameterizer::new(AdapterSpec::bone(4)).with_param_group(weights());
    assert_eq!(
        reparam.targets(&net),
        vec![
            ("fc1.weight".to_string(), [12, 8]),
            ("fc2.weight".to_string(), [8, 6])
        ]
    );
    let model = reparam.apply_to(&net).unwrap();
    assert_eq!(model.num_params(), net.num_params() + 4 * 8 + 4 * 6);
    // Zero init: the effective weight is the base, exactly.
    assert_eq!(
        to_mat(model.fc1.weight.val().inner()),
        to_mat(model.fc1.weight.base().inner())
    );
    // Base frozen (weights and biases), adapter trainable.
    let x = to_tensor(&randn(5, 12, 1.0, 4)).autodiff();
    let y = model.fc2.forward(model.fc1.forward(x));
    let grads = y.sum().backward();
    assert!(model.fc1.weight.base().grad(&grads).is_none());
    assert!(
        model
            .fc1
            .bias
            .as_ref()
            .unwrap()
            .val()
            .grad(&grads)
            .is_none()
    );
    let adapter = &model
        .fc1
        .weight
        .reparameterization::<DishaReparam>()
        .unwrap()
        .adapter;
    let disha_core::Adapter::Bone(bone) = adapter else {
        panic!()
    };
    assert!(bone.block.val().grad(&grads).is_some());

    // Record round trip onto a fresh reparameterized model.
    let target = DishaReparameterizer::new(AdapterSpec::bone(4))
        .with_param_group(weights())
        .apply_to(&Net::new(&device))
        .unwrap();
    let loaded = target.load_record(model.clone().into_record());
    assert_eq!(
        to_mat(loaded.fc2.weight.val().inner()),
        to_mat(model.fc2.weight.val().inner())
    );

    // valid() keeps the adapters; materialize() folds them into plain weights.
    let inference = model.valid();
    assert!(
        inference
            .fc1
            .weight
            .reparameterization::<DishaReparam>()
            .is_some()
    );
    let merged = inference.clone().materialize();
    assert!(
        merged
            .fc1
            .weight
            .reparameterization::<DishaReparam>()
            .is_none()
    );
    assert_eq!(merged.num_params(), net.num_params());
    assert_eq!(
        to_mat(merged.fc1.weight.val()),
        to_mat(inference.fc1.weight.val())
    );
}

#[test]
fn weight_space_bone_equals_activation_space_bone() {
    let device = device();
    let net = Net::new(&device);
    // A non-zero (kaiming) block, so the adapter changes the output.
    let model = DishaReparameterizer::new(AdapterSpec::bone(4).with_init(AdapterInit::Random))
        .with_param_group(weights())
        .apply_to(&net)
        .unwrap();
    let x = to_tensor(&randn(7, 12, 1.0, 6));
    let weight_space = to_mat(model.fc1.forward(x.clone()));
    // The same adapter in an AdaptedLinear.
    let reparam = model
        .fc1
        .weight
        .reparameterization::<DishaReparam>()
        .unwrap();
    let mut layer = AdaptedLinear::from_linear(net.fc1.clone());
    layer
        .insert_adapter("b", AdapterSpec::bone(4), reparam.adapter.clone())
        .unwrap();
    let activation_space = to_mat(layer.forward(x));
    assert!(weight_space.max_abs_diff(&activation_space) < 1e-5);
    let base = to_mat(net.fc1.forward(to_tensor(&randn(7, 12, 1.0, 6))));
    assert!(
        weight_space.max_abs_diff(&base) > 1e-3,
        "the adapter is active"
    );
}

#[test]
fn invalid_targets_are_rejected_before_anything_changes() {
    let net = Net::new(&device());
    // fc2 is [8 -> 6]: 6 % 4 != 0, so BAT cannot apply; the error names the parameter path.
    let e = DishaReparameterizer::new(AdapterSpec::bat(4, BatOrientation::Peft))
        .with_param_group(weights())
        .apply_to(&net)
        .unwrap_err();
    assert!(
        matches!(&e, DishaError::BatNotDivisible { layer, .. } if layer == "fc2.weight"),
        "{e}"
    );
    let e = DishaReparameterizer::new(AdapterSpec::bone(16))
        .apply_to(&net)
        .unwrap_err();
    assert!(matches!(e, DishaError::RankExceedsInput { .. }), "{e}");
    // The caller's model is untouched either way.
    assert!(
        net.fc1
            .weight
            .reparameterization::<DishaReparam>()
            .is_none()
    );
    let _: Tensor<2> = net.fc1.weight.val();
}
