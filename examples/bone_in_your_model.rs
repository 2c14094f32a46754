//! Embed Bone in your own Burn model, fine-tune it on the CPU (Flex), merge it, and save it as
//! an HF PEFT adapter directory.
//!
//! The model is an ordinary Burn MLP whose linear layers are `AdaptedLinear` instead of
//! `burn::nn::Linear`. A "new task" is made by shifting the base model with a hidden Bone update;
//! fine-tuning a fresh Bone adapter (only `r·out` parameters per layer, the base frozen) must
//! discover it. Run with:
//!
//! ```sh
//! cargo run --release --example bone_in_your_model
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::module::Module;
use burn::nn::loss::{MseLoss, Reduction};
use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::activation::gelu;
use burn::tensor::{Device, Distribution, Tensor};
use disha_core::{
    AdaptableModel, AdaptedLinear, AdaptedLinearConfig, LinearSite, MissInit, PeftConfig,
    PeftModelExt, TargetModules, freeze_all_but_active_adapters,
};

const D_IN: usize = 32;
const HIDDEN: usize = 128;
const D_OUT: usize = 8;
const R: usize = 8;
const STEPS: usize = 1000;
const BATCH: usize = 64;

/// Your model: nothing disha-specific except the layer type.
#[derive(Module, Debug)]
struct Mlp {
    fc1: AdaptedLinear,
    fc2: AdaptedLinear,
    head: AdaptedLinear,
}

impl Mlp {
    fn new(device: &Device) -> Self {
        Self {
            fc1: AdaptedLinearConfig::new(D_IN, HIDDEN).init(device),
            fc2: AdaptedLinearConfig::new(HIDDEN, HIDDEN).init(device),
            head: AdaptedLinearConfig::new(HIDDEN, D_OUT).init(device),
        }
    }

    /// # Shapes
    /// - x: `[batch, D_IN]` → `[batch, D_OUT]`
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        let h = gelu(self.fc1.forward(x));
        let h = gelu(self.fc2.forward(h));
        self.head.forward(h)
    }
}

/// The one thing disha needs to know: which layers exist and what PEFT would call them.
impl AdaptableModel for Mlp {
    fn visit_linears(&self, f: &mut dyn FnMut(&LinearSite, &AdaptedLinear)) {
        f(&LinearSite::hidden("fc1", "fc1"), &self.fc1);
        f(&LinearSite::hidden("fc2", "fc2"), &self.fc2);
        f(&LinearSite::hidden("head", "head"), &self.head);
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&LinearSite, &mut AdaptedLinear)) {
        f(&LinearSite::hidden("fc1", "fc1"), &mut self.fc1);
        f(&LinearSite::hidden("fc2", "fc2"), &mut self.fc2);
        f(&LinearSite::hidden("head", "head"), &mut self.head);
    }
}

fn mse(a: Tensor<2>, b: Tensor<2>) -> Tensor<1> {
    MseLoss::new().forward(a, b, Reduction::Mean)
}

fn scalar(t: Tensor<1>) -> f64 {
    t.into_scalar::<f32>() as f64
}

fn main() -> Result<(), disha_core::DishaError> {
    let device = Device::default();
    device.seed(42);
    let train_device = device.clone().autodiff();

    // A "pretrained" base model, and the task: the base shifted by a hidden Bone update.
    let base = Mlp::new(&train_device);
    let mut teacher = base.valid();
    let shift = PeftConfig::miss_with(R, MissInit::Random, TargetModules::AllLinear);
    teacher.add_adapter("shift", &shift)?;
    teacher.merge_adapters()?;

    // Fine-tune a fresh Bone adapter on every linear layer; everything else frozen.
    let config = PeftConfig::miss(R, TargetModules::AllLinear);
    let mut student = base.clone();
    let adapted = student.add_adapter("default", &config)?;
    let student = freeze_all_but_active_adapters(student);
    println!("Bone r={R} on {adapted:?}");
    println!("{}", student.parameter_count());

    let held_out = Tensor::<2>::random([1024, D_IN], Distribution::Normal(0.0, 1.0), &device);
    let target = teacher.forward(held_out.clone());
    let eval = |m: &Mlp| scalar(mse(m.valid().forward(held_out.clone()), target.clone()));
    let before = eval(&student);
    println!("held-out MSE before fine-tuning: {before:.5}");

    let mut optim = AdamWConfig::new().with_weight_decay(0.0).init();
    let mut student = student;
    let start = Instant::now();
    for step in 1..=STEPS {
        let x = Tensor::<2>::random([BATCH, D_IN], Distribution::Normal(0.0, 1.0), &device);
        let y = teacher.forward(x.clone());
        let loss = mse(student.forward(x.autodiff()), y.autodiff());
        let value = if step % 100 == 0 || step == 1 {
            Some(scalar(loss.clone().inner()))
        } else {
            None
        };
        let grads = GradientsParams::from_grads(loss.backward(), &student);
        student = optim.step(3e-3, student, grads);
        if let Some(v) = value {
            println!("step {step:>4}  train MSE {v:.5}");
        }
    }
    let after = eval(&student);
    println!(
        "held-out MSE after {STEPS} steps: {after:.5} ({:.1}x lower) in {:.1?}",
        before / after,
        start.elapsed()
    );

    // Merge for inference: same function, no adapter overhead.
    let mut merged = student.valid();
    let adapted_out = merged.forward(held_out.clone());
    merged.merge_adapters()?;
    let diff = scalar(
        (merged.forward(held_out.clone()) - adapted_out)
            .abs()
            .max()
            .reshape([1]),
    );
    println!("merged vs adapted output: max |diff| = {diff:.2e}");

    // Save as an HF PEFT directory and load it back onto a fresh copy of the base.
    let dir = PathBuf::from("target/examples/bone_in_your_model/adapter");
    student.save_adapter("default", &config, &dir)?;
    let mut reloaded = base.valid();
    reloaded.load_adapter(&dir, "default")?;
    let reload_diff = scalar(
        (reloaded.forward(held_out.clone()) - student.valid().forward(held_out))
            .abs()
            .max()
            .reshape([1]),
    );
    println!(
        "saved PEFT adapter to {}; reloaded output max |diff| = {reload_diff:.2e}",
        dir.display()
    );
    assert!(
        after < before / 10.0,
        "fine-tuning should cut the loss at least tenfold"
    );
    Ok(())
}
