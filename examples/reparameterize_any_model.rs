//! Add Bone to a Burn model you cannot (or do not want to) change, with no code change, through
//! Burn's parameter reparameterization — then fold it into plain weights for export.
//!
//! This path works in weight space: each forward forms `W + ΔW` and backward computes a dense
//! `∂W'`, so training is slower than with `AdaptedLinear` (see the `disha-core` benchmark).
//!
//! ```sh
//! cargo run --release --example reparameterize_any_model
//! ```

use burn::module::{Module, ParamGroup};
use burn::nn::loss::{MseLoss, Reduction};
use burn::nn::{Linear, LinearConfig};
use burn::optim::{AdamConfig, GradientsParams};
use burn::tensor::activation::relu;
use burn::tensor::{Device, Distribution, Tensor};
use disha_core::{AdapterInit, AdapterSpec, DishaReparameterizer};

/// A model written without disha in mind.
#[derive(Module, Debug)]
struct Net {
    fc1: Linear,
    fc2: Linear,
}

impl Net {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        self.fc2.forward(relu(self.fc1.forward(x)))
    }
}

fn main() -> Result<(), disha_core::DishaError> {
    let device = Device::default();
    device.seed(7);
    let train = device.clone().autodiff();
    let net = Net {
        fc1: LinearConfig::new(16, 64).init(&train),
        fc2: LinearConfig::new(64, 4).init(&train),
    };
    // Bone r=4 on both weights (paths `fc1.weight`, `fc2.weight`); biases stay frozen.
    let group = ParamGroup::from_regex(r"^fc\d\.weight$").expect("valid regex");
    // The task: the base network shifted by a hidden, randomly initialized Bone update.
    let teacher = DishaReparameterizer::new(AdapterSpec::bone(4).with_init(AdapterInit::Random))
        .with_param_group(group.clone())
        .apply_to(&net.valid())?
        .materialize();
    let reparam = DishaReparameterizer::new(AdapterSpec::bone(4)).with_param_group(group);
    println!("adapting {:?}", reparam.targets(&net));
    let mut model = reparam.apply_to(&net)?;
    println!(
        "parameters: {} (base {}), adapter share {:.2}%",
        model.num_params(),
        net.num_params(),
        100.0 * (model.num_params() - net.num_params()) as f64 / model.num_params() as f64
    );

    let mut optim = AdamConfig::new().init();
    for step in 1..=400 {
        let x = Tensor::<2>::random([64, 16], Distribution::Normal(0.0, 1.0), &device);
        let y = teacher.forward(x.clone());
        let loss =
            MseLoss::new().forward(model.forward(x.autodiff()), y.autodiff(), Reduction::Mean);
        if step % 100 == 0 || step == 1 {
            println!(
                "step {step:>3}  MSE {:.5}",
                loss.clone().into_scalar::<f32>()
            );
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        model = optim.step(1e-2, model, grads);
    }

    // Fold the adapters into dense weights: a plain `Net` again, ready to save.
    let x = Tensor::<2>::random([8, 16], Distribution::Normal(0.0, 1.0), &device);
    let adapted = model.valid().forward(x.clone());
    let plain = model.valid().materialize();
    let diff = (plain.forward(x) - adapted)
        .abs()
        .max()
        .into_scalar::<f32>();
    println!(
        "materialized: {} parameters, max |diff| vs adapted = {diff:.2e}",
        plain.num_params()
    );
    Ok(())
}
