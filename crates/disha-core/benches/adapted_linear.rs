//! Forward + backward of one adapted linear layer (in = out = 2048, 512 tokens, f32) on the
//! default device (Flex on a CPU build), for every adapter family, against the frozen base.
//!
//! Each iteration runs `y = layer(x)` and `y.sum().backward()` with `x` requiring a gradient, as
//! inside a network: the frozen base costs its forward GEMM plus the `dX` GEMM. After the
//! criterion group, a table prints each median and its ratio to the frozen base.
//!
//! ```sh
//! cargo bench -p disha-core --bench adapted_linear
//! ```

use std::hint::black_box;
use std::path::PathBuf;
use std::time::Duration;

use burn::module::{Lora, Module, ParamGroup};
use burn::nn::{Linear, LinearConfig};
use burn::tensor::{Device, Distribution, Tensor};
use criterion::{Criterion, criterion_group};
use disha_core::{AdaptedLinear, AdapterSpec, BatOrientation, DishaReparameterizer};

const D: usize = 2048;
const TOKENS: usize = 512;
const GROUP: &str = "adapted_linear_fwd_bwd_2048x2048_512tok_f32";

/// One benchmarked layer: either disha's activation-space layer or a weight-space Burn `Linear`.
enum Layer {
    Adapted(Box<AdaptedLinear>),
    Plain(Linear),
}

impl Layer {
    fn forward(&self, x: Tensor<2>) -> Tensor<2> {
        match self {
            Layer::Adapted(l) => l.forward(x),
            Layer::Plain(l) => l.forward(x),
        }
    }
}

/// The benchmarked cases, in table order; the first is the baseline of the ratios.
const CASES: [&str; 7] = [
    "frozen base",
    "Bone r64",
    "BAT r64",
    "mini r64 mini_r64",
    "LoRA r32",
    "Bone r64 weight-space (DishaReparameterizer)",
    "LoRA r32 weight-space (Burn apply_lora)",
];

fn layer(case: &str, device: &Device) -> Layer {
    let base = LinearConfig::new(D, D).with_bias(false).init(device);
    let adapted = |spec: Option<AdapterSpec>| {
        let mut layer = AdaptedLinear::from_linear(base.clone());
        if let Some(spec) = spec {
            layer.add_adapter("default", &spec).expect("valid spec");
        }
        Layer::Adapted(Box::new(layer))
    };
    let weights = ParamGroup::from_regex("^weight$").expect("valid regex");
    match CASES.iter().position(|c| *c == case).expect("known case") {
        0 => adapted(None),
        1 => adapted(Some(AdapterSpec::bone(64))),
        2 => adapted(Some(AdapterSpec::bat(64, BatOrientation::Peft))),
        3 => adapted(Some(AdapterSpec::mini(64, 64))),
        4 => adapted(Some(AdapterSpec::lora(32, 64.0))),
        5 => Layer::Plain(
            DishaReparameterizer::new(AdapterSpec::bone(64))
                .with_param_group(weights)
                .apply_to(&base)
                .expect("valid spec"),
        ),
        _ => Layer::Plain(base.apply_lora(Lora::new(32, 64.0).set_param_group(weights))),
    }
}

fn output_dir() -> PathBuf {
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../target"));
    target.join("criterion")
}

fn bench(c: &mut Criterion) {
    let device = Device::default().autodiff();
    let x =
        Tensor::<2>::random([TOKENS, D], Distribution::Normal(0.0, 1.0), &device).require_grad();
    let mut group = c.benchmark_group(GROUP);
    group
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(6));
    device.seed(0);
    for name in CASES {
        let layer = layer(name, &device);
        group.bench_function(name, |b| {
            b.iter(|| {
                let y = layer.forward(x.clone());
                black_box(y.sum().backward())
            })
        });
    }
    group.finish();
}

/// Prints each case's median and its ratio to the frozen base, from criterion's estimates.
fn summary() {
    let dir = output_dir().join(GROUP);
    // Criterion sanitizes benchmark ids into directory names; match them on alphanumerics.
    let key = |s: &str| s.replace(|c: char| !c.is_alphanumeric(), "");
    let median = |name: &str| -> Option<f64> {
        let entry = std::fs::read_dir(&dir)
            .ok()?
            .filter_map(|e| e.ok())
            .find(|e| key(&e.file_name().to_string_lossy()) == key(name))?;
        let text = std::fs::read_to_string(entry.path().join("new/estimates.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        json["median"]["point_estimate"].as_f64()
    };
    let Some(base) = median(CASES[0]) else {
        eprintln!("no criterion estimates found under {}", dir.display());
        return;
    };
    println!("\n{GROUP} (median of criterion samples)");
    println!("| case | ms / step | × frozen base |");
    println!("|---|---:|---:|");
    for name in CASES {
        if let Some(ns) = median(name) {
            println!("| {name} | {:.1} | {:.3} |", ns / 1e6, ns / base);
        }
    }
}

criterion_group! {
    name = benches;
    config = Criterion::default().output_directory(&output_dir());
    targets = bench
}

fn main() {
    benches();
    Criterion::default().final_summary();
    summary();
}
