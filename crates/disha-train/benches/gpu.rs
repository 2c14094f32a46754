//! `cargo xtask bench gpu`: the one-shot GPU benchmark. One process, one JSON on stdout
//! (progress on stderr), sized to finish within 8 minutes on one H200:
//!
//! - `kernels`: the plain frozen layer (`x·W` forward and `δY·Wᵀ`) against the fused Bone and
//!   BAT ops, forward + backward with `x` and the adapter tracked, on Llama-2-7B's shapes
//!   (4096 tokens; 4096 × 4096, 4096 × 11008, 11008 × 4096), both routes of each op (the
//!   backend's matmul on materialized chunks; single pass, CubeK's matmul reading `W'` through a
//!   view). Throughput counts the plain layer's nominal
//!   `4·M·in·out` FLOPs for every case, so it compares directly.
//! - `llama_3_2_1b`: one training step (forward, loss, backward, gradient norm, AdamW;
//!   [`Learner::train_step`]) of a Llama-3.2-1B-shaped model with random weights and a bf16
//!   frozen base, adapters on every projection: Bone r64, BAT r64, LoRA r32, and the frozen
//!   base's forward + loss alone as the floor; each in bf16 compute (mixed precision: adapters
//!   and optimizer state f32) and in f32 compute.
//! - `rwkv7_0_1b`: the same step for an RWKV-7 0.1B-shaped model (Bone r64, BAT r64 in
//!   RWKV-PEFT's orientation, LoRA r32 on its six projections), bf16 compute (the WKV
//!   recurrence in f32).
//! - `targets`: the issue's targets, computed from the rows above.
//!
//! Each timing is the median of 3 runs after one warm-up run, each ended by a device sync.
//! Device memory is the pool's reserved bytes after a case, the pool emptied before it (its
//! high-water mark; `null` on Flex, whose pools are not reported).
//!
//! ```sh
//! cargo xtask bench gpu                                   # builds the CUDA binary + script
//! DISHA_GPU_BENCH=smoke cargo bench -p disha-train --bench gpu   # small shapes, any device
//! ```
//!
//! `DISHA_GPU_BENCH`: `full` (default) or `smoke` (small shapes that run anywhere in seconds,
//! what CI-sized machines use to check the binary end to end). `DISHA_GPU_BENCH_PARTIAL`: a
//! file rewritten (temp file, then rename) with the rows measured so far after every row, so
//! that a run stopped by its time limit still leaves them (`run.sh` sets it).

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{DType, Device, Distribution, Int, Tensor, TensorData};
use disha_core::kernels::{bat_linear_with, bone_linear_with, single_pass_fallbacks};
use disha_core::{AdapterSpec, BatOrientation, PeftConfig, PeftModelExt, TargetModules};
use disha_models::llama::{Llama, LlamaConfig};
use disha_models::rwkv::{Rwkv7, RwkvConfig};
use disha_models::{
    BaseDtypeSource, CausalLm, ComputeDtype, ModelFamily, RandomWeights, causal_lm_loss,
};
use disha_train::learner::{Learner, mark_trainable};
use disha_train::settings::default_targets;
use serde_json::{Value, json};

mod common;

const RUNS: usize = 3;
/// Seed of the device's generator for the random activations and LoRA's initialization.
const SEED: u64 = 7;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Scale {
    Full,
    Smoke,
}

impl Scale {
    fn name(self) -> &'static str {
        match self {
            Self::Full => "full",
            Self::Smoke => "smoke",
        }
    }
}

/// The report's key for a family's train-step rows.
fn section(family: ModelFamily) -> &'static str {
    match family {
        ModelFamily::Llama => "llama_3_2_1b",
        ModelFamily::Rwkv7 => "rwkv7_0_1b",
    }
}

/// Median seconds of [`RUNS`] runs of `f` after one warm-up run, each ended by a device sync.
fn median_secs(device: &Device, mut f: impl FnMut()) -> f64 {
    let mut run = || {
        let start = Instant::now();
        f();
        device.sync().expect("device sync");
        start.elapsed().as_secs_f64()
    };
    run();
    let mut times: Vec<f64> = (0..RUNS).map(|_| run()).collect();
    times.sort_by(f64::total_cmp);
    times[RUNS / 2]
}

/// The pool's reserved MB (`None` where the backend does not report its pools).
fn reserved_mb(device: &Device) -> Option<f64> {
    device
        .memory_pool_usage()
        .map(|u| u.bytes_reserved as f64 / 1e6)
}

/// The report, built up section by section and printed at the end; after every change it is
/// also written to the file `DISHA_GPU_BENCH_PARTIAL` names (if any), so a run cut short by its
/// time limit keeps what it measured.
struct Report {
    partial: Option<PathBuf>,
    fields: serde_json::Map<String, Value>,
}

impl Report {
    fn new(device: &Device, scale: Scale) -> Self {
        let mut report = Self {
            partial: std::env::var_os("DISHA_GPU_BENCH_PARTIAL").map(PathBuf::from),
            fields: serde_json::Map::new(),
        };
        report.set("device", json!(format!("{device:?}")));
        report.set("scale", json!(scale.name()));
        report
    }

    /// Sets `key` and rewrites the partial file.
    fn set(&mut self, key: &str, value: Value) {
        self.fields.insert(key.into(), value);
        let Some(path) = &self.partial else { return };
        let tmp = path.with_extension("tmp");
        if let Err(e) =
            std::fs::write(&tmp, self.to_json()).and_then(|()| std::fs::rename(&tmp, path))
        {
            eprintln!("{}: {e} (the partial report is not kept)", path.display());
        }
    }

    fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.fields).expect("JSON")
    }
}

/// One case's forward: `y` from the shared tensors.
type Forward<'a> = Box<dyn Fn() -> Tensor<2> + 'a>;

/// Plain vs fused Bone / BAT, forward + backward, one row per shape and case.
fn kernels(device: &Device, scale: Scale, report: &mut Report) -> Vec<Value> {
    let (tokens, shapes, r) = match scale {
        Scale::Full => (4096, vec![(4096, 4096), (4096, 11008), (11008, 4096)], 64),
        Scale::Smoke => (128, vec![(256, 256), (256, 384)], 16),
    };
    let device = device.clone().autodiff();
    device.seed(SEED);
    let dtype = DType::BF16;
    let mut rows = Vec::new();
    for (d_input, d_output) in shapes {
        let random = |shape: [usize; 2], scale: f64| {
            Tensor::<2>::random(shape, Distribution::Normal(0.0, scale), &device).cast(dtype)
        };
        let x = random([tokens, d_input], 1.0).require_grad();
        let weight = random([d_input, d_output], 0.02);
        let block = random([r, d_output], 0.02).require_grad();
        let blocks = Tensor::<3>::random(
            [d_output / r, r, r],
            Distribution::Normal(0.0, 0.02),
            &device,
        )
        .cast(dtype)
        .require_grad();
        let cotangent = random([tokens, d_output], 1.0);
        let cases: [(&str, Forward<'_>); 5] = [
            ("plain", Box::new(|| x.clone().matmul(weight.clone()))),
            (
                "bone (backend matmul)",
                Box::new(|| bone_linear_with(x.clone(), weight.clone(), block.clone(), false)),
            ),
            (
                "bone (single pass)",
                Box::new(|| bone_linear_with(x.clone(), weight.clone(), block.clone(), true)),
            ),
            (
                "bat (backend matmul)",
                Box::new(|| bat_linear_with(x.clone(), weight.clone(), blocks.clone(), false)),
            ),
            (
                "bat (single pass)",
                Box::new(|| bat_linear_with(x.clone(), weight.clone(), blocks.clone(), true)),
            ),
        ];
        let flops = 4.0 * (tokens * d_input * d_output) as f64;
        let mut plain = None;
        for (case, forward) in cases {
            eprintln!("kernels: {tokens} × {d_input} × {d_output}, {case}");
            let fallbacks_before = single_pass_fallbacks();
            let secs = median_secs(&device, || {
                let grads = (forward() * cotangent.clone()).sum().backward();
                assert!(x.grad(&grads).is_some());
            });
            let plain_secs = *plain.get_or_insert(secs);
            rows.push(json!({
                "tokens": tokens, "in": d_input, "out": d_output, "r": r, "case": case,
                "dtype": "bf16", "ms": secs * 1e3, "tflops": flops / secs / 1e12,
                "vs_plain": secs / plain_secs,
                // Single-pass products CubeK declined (run in the op body instead): 0 expected.
                "fallbacks": single_pass_fallbacks() - fallbacks_before,
            }));
            report.set("kernels", json!(rows));
        }
    }
    rows
}

/// A model of `family`'s benchmark shape with random weights and a bf16 frozen base.
fn model(family: ModelFamily, scale: Scale, device: &Device) -> CausalLm {
    match family {
        ModelFamily::Llama => {
            let config = match scale {
                Scale::Full => LlamaConfig::llama_3_2_1b_shape(),
                Scale::Smoke => LlamaConfig::benchmark_shape(1024, 128, 256, 2, 4, 2, true),
            };
            let mut weights = RandomWeights::new(&config, 0.02, 7);
            let mut bf16 = BaseDtypeSource::new(&mut weights, DType::BF16);
            Llama::from_source(&config, &mut bf16, device)
                .expect("random weights fit their own config")
                .into()
        }
        ModelFamily::Rwkv7 => {
            let config = match scale {
                Scale::Full => RwkvConfig::rwkv7_0_1b_shape(),
                Scale::Smoke => RwkvConfig {
                    vocab_size: 1024,
                    hidden_size: 128,
                    num_layers: 2,
                    num_heads: 2,
                    head_size: 64,
                    ffn_size: 512,
                    decay_rank: 16,
                    iclr_rank: 16,
                    value_rank: 8,
                    gate_rank: 32,
                    layer0_value_residual: false,
                },
            };
            let mut weights = RandomWeights::from_shapes(config.tensor_shapes(), 0.02, 7);
            let mut bf16 = BaseDtypeSource::new(&mut weights, DType::BF16);
            Rwkv7::from_source(&config, &mut bf16, device)
                .expect("random weights fit their own config")
                .into()
        }
    }
}

/// One training step per method (and the frozen forward + loss) for `family`.
fn train_steps(
    device: &Device,
    family: ModelFamily,
    scale: Scale,
    report: &mut Report,
) -> Vec<Value> {
    let (batch, seq) = match (scale, family) {
        (Scale::Smoke, _) => (1, 64),
        (Scale::Full, ModelFamily::Llama) => (2, 1024),
        (Scale::Full, ModelFamily::Rwkv7) => (1, 2048),
    };
    let bat = match family {
        ModelFamily::Llama => BatOrientation::Peft,
        ModelFamily::Rwkv7 => BatOrientation::RwkvPeft,
    };
    let methods = [
        ("frozen base (forward + loss)", None),
        ("bone r64", Some(AdapterSpec::bone(64))),
        ("bat r64", Some(AdapterSpec::bat(64, bat))),
        ("lora r32", Some(AdapterSpec::lora(32, 64.0))),
    ];
    // Llama in bf16 and, for the comparison, f32; RWKV-7 in bf16 only (its WKV recurrence
    // computes in f32 in both), which keeps the whole run inside its time budget.
    let computes: &[ComputeDtype] = match family {
        ModelFamily::Llama => &[ComputeDtype::Bf16, ComputeDtype::F32],
        ModelFamily::Rwkv7 => &[ComputeDtype::Bf16],
    };
    let device = device.clone().autodiff();
    let mut rows = Vec::new();
    for (&compute, (name, spec)) in computes
        .iter()
        .flat_map(|c| methods.iter().map(move |m| (c, m)))
    {
        eprintln!("{family:?} train step: {name}, {compute} compute, {batch} × {seq} tokens");
        device.memory_cleanup();
        // LoRA's `A` is drawn from the device's generator: seeded per row, every run (and every
        // order of rows) starts from the same adapter.
        device.seed(SEED);
        let mut model = model(family, scale, &device)
            .with_compute_dtype(compute)
            .expect("the device computes in this dtype");
        let vocab = model.vocab_size();
        let mut data = common::random_token_loader(vocab, batch, seq, 11);
        let tokens = batch * seq;
        let (secs, loss) = match spec.clone() {
            None => {
                let batch = data.next_batch();
                let ids = Tensor::<2, Int>::from_data(
                    TensorData::new(batch.input_ids, batch.shape),
                    &device,
                );
                let mut loss = 0.0;
                let secs = median_secs(&device, || {
                    let l = causal_lm_loss(model.forward(ids.clone()), ids.clone());
                    loss = l.into_scalar::<f64>();
                });
                (secs, loss)
            }
            Some(spec) => {
                let targets = TargetModules::Names(default_targets(family));
                model
                    .add_adapter("default", &PeftConfig::from_spec(&spec, targets))
                    .expect("every projection takes every adapter");
                let model = mark_trainable(model, &[]).expect("the adapter is trainable");
                let mut learner =
                    Learner::new(model, common::constant_lr_config(usize::MAX)).expect("a learner");
                let mut loss = 0.0;
                let secs = median_secs(&device, || {
                    loss = learner.train_step(&mut data).expect("a training step").loss;
                });
                (secs, loss)
            }
        };
        rows.push(json!({
            "method": name, "compute": compute.to_string(), "batch": batch, "seq": seq,
            "step_ms": secs * 1e3,
            "tokens_per_s": tokens as f64 / secs, "device_reserved_mb": reserved_mb(&device),
            "loss": loss,
        }));
        report.set(section(family), json!(rows));
    }
    rows
}

/// `value` against `target` (`at_most`: the value must not exceed it, else not fall below it).
fn target(value: Option<f64>, target: f64, at_most: bool) -> Value {
    let met = value.map(|v| if at_most { v <= target } else { v >= target });
    json!({ "value": value, "target": target, "met": met })
}

/// The largest (`max`) or smallest value of `field` over the kernel rows whose case starts
/// with `prefix`.
fn extreme(rows: &[Value], prefix: &str, field: &str, max: bool) -> Option<f64> {
    rows.iter()
        .filter(|r| r["case"].as_str().is_some_and(|c| c.starts_with(prefix)))
        .filter_map(|r| r[field].as_f64())
        .reduce(|a, b| if max == (b > a) { b } else { a })
}

/// The issue's targets, from the rows: the best route of each op per shape is what counts,
/// so the worst shape's best route is reported.
fn targets(kernels: &[Value], llama: &[Value]) -> Value {
    let best_per_shape = |prefix: &str| -> Option<f64> {
        let mut worst: Option<f64> = None;
        for shape in kernels.chunks(5) {
            let best = extreme(shape, prefix, "vs_plain", false)?;
            worst = Some(worst.map_or(best, |w: f64| w.max(best)));
        }
        worst
    };
    // Memory is compared in bf16 compute, the way a real run trains on a GPU.
    let memory = |method: &str| {
        llama
            .iter()
            .find(|r| r["method"] == method && r["compute"] == "bf16")
            .and_then(|r| r["device_reserved_mb"].as_f64())
    };
    let bone = best_per_shape("bone");
    json!({
        "bone_fwd_bwd_vs_plain": target(bone, 1.05, true),
        "bat_fwd_bwd_vs_plain": target(best_per_shape("bat"), 1.6, true),
        "bone_throughput_vs_plain": target(bone.map(|b| 1.0 / b), 0.85, false),
        "bat_memory_vs_bone": target(
            memory("bat r64").zip(memory("bone r64")).map(|(a, b)| a / b),
            1.05,
            true,
        ),
    })
}

fn main() {
    let scale = match std::env::var("DISHA_GPU_BENCH").as_deref() {
        Ok("smoke") => Scale::Smoke,
        Err(_) | Ok("full") => Scale::Full,
        Ok(other) => {
            eprintln!("DISHA_GPU_BENCH={other}: use `full` or `smoke`");
            std::process::exit(2);
        }
    };
    let device = Device::default();
    let start = Instant::now();
    let mut report = Report::new(&device, scale);
    let kernels = kernels(&device, scale, &mut report);
    let llama = train_steps(&device, ModelFamily::Llama, scale, &mut report);
    train_steps(&device, ModelFamily::Rwkv7, scale, &mut report);
    report.set("targets", targets(&kernels, &llama));
    report.set("seconds", json!(start.elapsed().as_secs_f64()));
    println!("{}", report.to_json());
}
