//! `cargo xtask bench gpu`: the one-shot GPU benchmark. One process, one JSON on stdout
//! (progress on stderr), sized to finish within 8 minutes on one H200:
//!
//! - `kernels`: the plain frozen layer (`x·W` forward and `δY·Wᵀ`) against the fused Bone and
//!   BAT ops, forward + backward with `x` and the adapter tracked, on Llama-2-7B's shapes
//!   (4096 tokens; 4096 × 4096, 4096 × 11008, 11008 × 4096), both routes of each op (the
//!   backend's matmul on materialized chunks; single pass, CubeK's matmul reading `W'` through a
//!   view). Throughput counts the plain layer's nominal
//!   `4·M·in·out` FLOPs for every case, so it compares directly. Every fused case's `y`, `δx`
//!   and adapter gradient are also checked against the plain tensor-op reference computed in
//!   f32 on the same device (`parity`: relative deviations, `ok` within 0.02).
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
//! The sections run in the order kernels, Llama in bf16, RWKV-7, Llama in f32, so that a run
//! cut short loses the least telling rows. A case that panics (a kernel the device's compiler
//! rejects, say) becomes a row with an `error` field and the run goes on; progress lines on
//! stderr carry the seconds since the start.
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
//! `DISHA_GPU_BENCH_ONLY=kernels`: the kernel rows alone (seconds on an H200).

use std::panic::{AssertUnwindSafe, catch_unwind};
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Instant;

use burn::nn::DropoutConfig;
use burn::tensor::{DType, Device, Distribution, Gradients, Int, Tensor, TensorData};
use disha_core::kernels::{bat_linear_with, bone_linear_with, single_pass_fallbacks};
use disha_core::{
    AdapterSpec, BatAdapter, BatOrientation, BoneAdapter, PeftConfig, PeftModelExt, TargetModules,
    reference_block_affine_linear,
};
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

/// When the run started: progress lines carry the seconds since.
static START: OnceLock<Instant> = OnceLock::new();

/// Prints a progress line on stderr, stamped with the seconds since the start.
fn progress(line: std::fmt::Arguments<'_>) {
    let secs = START.get_or_init(Instant::now).elapsed().as_secs_f64();
    eprintln!("[{secs:7.1} s] {line}");
}

/// Runs one case; a panic inside it (reported by the hook on stderr as usual) becomes
/// `Err(message)`, so one failing case costs its row, not the run.
fn guarded<T>(f: impl FnOnce() -> T) -> Result<T, String> {
    catch_unwind(AssertUnwindSafe(f)).map_err(|payload| {
        payload
            .downcast_ref::<String>()
            .cloned()
            .or_else(|| payload.downcast_ref::<&str>().map(|s| (*s).to_string()))
            .unwrap_or_else(|| "panicked with a non-string payload".into())
    })
}

/// A report row: what was run (`case`, an object) and what was measured, or the error.
fn row(case: Value, measured: Result<Value, String>) -> Value {
    let mut row = case;
    let fields = match measured {
        Ok(Value::Object(fields)) => fields,
        Ok(other) => unreachable!("measurements are JSON objects, not {other}"),
        Err(error) => [("error".to_string(), json!(error))].into_iter().collect(),
    };
    row.as_object_mut()
        .expect("a case is a JSON object")
        .extend(fields);
    row
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

    /// The rows of section `key` so far (none if it is not set).
    fn rows(&self, key: &str) -> Vec<Value> {
        self.fields
            .get(key)
            .and_then(Value::as_array)
            .cloned()
            .unwrap_or_default()
    }

    fn to_json(&self) -> String {
        serde_json::to_string_pretty(&self.fields).expect("JSON")
    }
}

/// A fused op's f32 result on the same device (forward and the gradients of `x` and of the
/// adapter parameter, for one cotangent), computed by the plain tensor-op reference: what the
/// bf16 cases are checked against, on the GPU, before anything is trusted there.
struct Parity {
    y: Tensor<2>,
    dx: Tensor<2>,
    d_param: Tensor<1>,
}

/// The largest relative deviation a bf16 result may show against the f32 reference,
/// `max |a − b| / max |b|`: bf16 keeps 8 significant bits, so rounding the output and `W'`
/// each moves a value by up to 2⁻⁹ ≈ 0.002 of itself, and 0.02 leaves room for the
/// reassociated sums while catching any wrong block (an O(1) deviation).
const PARITY_TOLERANCE: f64 = 0.02;

impl Parity {
    /// One run of a case: `y`, and for the cotangent `c` the gradient of `x` and the adapter
    /// parameter's (`d_param` reads it from the gradients, flattened).
    fn of(
        y: Tensor<2>,
        cotangent: &Tensor<2>,
        x: &Tensor<2>,
        d_param: impl Fn(&Gradients) -> Tensor<1>,
    ) -> Self {
        let grads = (y.clone() * cotangent.clone()).sum().backward();
        Self {
            dx: x.grad(&grads).expect("x is tracked"),
            d_param: d_param(&grads),
            y: y.detach(),
        }
    }

    /// The Bone and BAT references for the bf16 operands, computed in f32.
    fn references(
        x: &Tensor<2>,
        weight: &Tensor<2>,
        block: &Tensor<2>,
        blocks: &Tensor<3>,
        cotangent: &Tensor<2>,
    ) -> [Self; 2] {
        // Cast off the graph, then tracked again: a fresh f32 leaf holding the bf16 values.
        fn f32_leaf<const D: usize>(t: &Tensor<D>) -> Tensor<D> {
            t.clone().inner().cast(DType::F32).autodiff().require_grad()
        }
        let weight = weight.clone().cast(DType::F32);
        let cotangent = &cotangent.clone().cast(DType::F32);
        let x_bone = f32_leaf(x);
        let block = f32_leaf(block);
        let bone = BoneAdapter::new(block.clone(), DropoutConfig::new(0.0).init())
            .add_to_output(x_bone.clone(), x_bone.clone().matmul(weight.clone()));
        let bone = Self::of(bone, cotangent, &x_bone, |g| {
            block.grad(g).expect("B is tracked").flatten(0, 1)
        });
        let x_bat = f32_leaf(x);
        let blocks = f32_leaf(blocks);
        let adapter = BatAdapter::new(blocks.clone(), BatOrientation::Peft);
        let bat = reference_block_affine_linear(x_bat.clone(), weight, None, &adapter);
        let bat = Self::of(bat, cotangent, &x_bat, |g| {
            blocks.grad(g).expect("D is tracked").flatten(0, 2)
        });
        [bone, bat]
    }

    /// The relative deviations of a bf16 result from this reference, and whether all three are
    /// within [`PARITY_TOLERANCE`].
    fn compare(&self, actual: Self) -> Value {
        fn deviation<const D: usize>(actual: Tensor<D>, expected: &Tensor<D>) -> f64 {
            let actual = actual.detach().cast(DType::F32);
            let scale = expected.clone().abs().max().into_scalar::<f64>();
            let worst = (actual - expected.clone()).abs().max().into_scalar::<f64>();
            worst / scale
        }
        let [y, dx, d_param] = [
            deviation(actual.y, &self.y),
            deviation(actual.dx, &self.dx),
            deviation(actual.d_param, &self.d_param),
        ];
        let ok = [y, dx, d_param].iter().all(|d| *d <= PARITY_TOLERANCE);
        json!({ "y": y, "dx": dx, "d_param": d_param, "ok": ok })
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
        progress(format_args!(
            "kernels: {tokens} × {d_input} × {d_output}, f32 references"
        ));
        let references = guarded(|| Parity::references(&x, &weight, &block, &blocks, &cotangent));
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
            progress(format_args!(
                "kernels: {tokens} × {d_input} × {d_output}, {case}"
            ));
            let fallbacks_before = single_pass_fallbacks();
            let measured = guarded(|| {
                let secs = median_secs(&device, || {
                    let grads = (forward() * cotangent.clone()).sum().backward();
                    assert!(x.grad(&grads).is_some());
                });
                let parity = match (case, &references) {
                    ("plain", _) => Value::Null,
                    (_, Err(error)) => json!({ "error": error }),
                    (_, Ok([bone, _])) if case.starts_with("bone") => {
                        bone.compare(Parity::of(forward(), &cotangent, &x, |g| {
                            block.grad(g).expect("B is tracked").flatten(0, 1)
                        }))
                    }
                    (_, Ok([_, bat])) => bat.compare(Parity::of(forward(), &cotangent, &x, |g| {
                        blocks.grad(g).expect("D is tracked").flatten(0, 2)
                    })),
                };
                (secs, parity)
            })
            .map(|(secs, parity)| {
                if case == "plain" {
                    plain = Some(secs);
                }
                json!({
                    "ms": secs * 1e3, "tflops": flops / secs / 1e12,
                    "vs_plain": plain.map(|p| secs / p),
                    // Single-pass products CubeK declined (run in the op body instead): 0
                    // expected.
                    "fallbacks": single_pass_fallbacks() - fallbacks_before,
                    "parity": parity,
                })
            });
            rows.push(row(
                json!({
                    "tokens": tokens, "in": d_input, "out": d_output, "r": r, "case": case,
                    "dtype": "bf16",
                }),
                measured,
            ));
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

/// One training step per method (and the frozen forward + loss) for `family` in `compute`,
/// appended to the family's section of the report.
fn train_steps(
    device: &Device,
    family: ModelFamily,
    compute: ComputeDtype,
    scale: Scale,
    report: &mut Report,
) {
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
    let device = device.clone().autodiff();
    let mut rows = report.rows(section(family));
    progress(format_args!(
        "{family:?}: random bf16 base, {compute} compute"
    ));
    // One base for every row: its weights are constants that each row's clone shares (adding
    // an adapter makes new parameters, it changes none of the base's; the rows' losses are the
    // same either way). On the H200, building it per row, each Llama row took 62–68 s of wall
    // time for steps under 0.6 s; drawing the 1.2 B random weights on the host is the likely
    // (unisolated) part of that.
    let base = guarded(|| {
        model(family, scale, &device)
            .with_compute_dtype(compute)
            .expect("the device computes in this dtype")
    });
    for (name, spec) in methods {
        progress(format_args!(
            "{family:?} train step: {name}, {compute} compute, {batch} × {seq} tokens"
        ));
        device.memory_cleanup();
        let measured = base.as_ref().map_err(Clone::clone).and_then(|base| {
            guarded(|| measure_step(&device, family, base.clone(), spec, batch, seq))
        });
        rows.push(row(
            json!({
                "method": name, "compute": compute.to_string(), "batch": batch, "seq": seq,
            }),
            measured,
        ));
        report.set(section(family), json!(rows));
    }
}

/// One method's row: the frozen forward + loss (`spec` `None`) or a training step of `model`
/// with `spec` added.
fn measure_step(
    device: &Device,
    family: ModelFamily,
    mut model: CausalLm,
    spec: Option<AdapterSpec>,
    batch: usize,
    seq: usize,
) -> Value {
    // LoRA's `A` is drawn from the device's generator: seeded per row, every run (and every
    // order of rows) starts from the same adapter.
    device.seed(SEED);
    let vocab = model.vocab_size();
    let mut data = common::random_token_loader(vocab, batch, seq, 11);
    let mut loss = 0.0;
    let secs = match spec {
        None => {
            let batch = data.next_batch();
            let ids =
                Tensor::<2, Int>::from_data(TensorData::new(batch.input_ids, batch.shape), device);
            median_secs(device, || {
                let l = causal_lm_loss(model.forward(ids.clone()), ids.clone());
                loss = l.into_scalar::<f64>();
            })
        }
        Some(spec) => {
            let targets = TargetModules::Names(default_targets(family));
            model
                .add_adapter("default", &PeftConfig::from_spec(&spec, targets))
                .expect("every projection takes every adapter");
            let model = mark_trainable(model, &[]).expect("the adapter is trainable");
            let mut learner =
                Learner::new(model, common::constant_lr_config(usize::MAX)).expect("a learner");
            median_secs(device, || {
                loss = learner.train_step(&mut data).expect("a training step").loss;
            })
        }
    };
    json!({
        "step_ms": secs * 1e3, "tokens_per_s": (batch * seq) as f64 / secs,
        "device_reserved_mb": reserved_mb(device), "loss": loss,
    })
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
    START.get_or_init(Instant::now);
    let device = Device::default();
    let mut report = Report::new(&device, scale);
    let kernels = kernels(&device, scale, &mut report);
    // The targets are set after every section, from the rows so far, so that a run cut short
    // still reports the ones it can (`null` values where a row is missing).
    report.set("targets", targets(&kernels, &[]));
    if std::env::var("DISHA_GPU_BENCH_ONLY").as_deref() == Ok("kernels") {
        println!("{}", report.to_json());
        return;
    }
    // Llama in bf16 and, for the comparison, f32 (last: the least telling rows); RWKV-7 in
    // bf16 only (its WKV recurrence computes in f32 in both), which keeps the whole run inside
    // its time budget.
    for (family, compute) in [
        (ModelFamily::Llama, ComputeDtype::Bf16),
        (ModelFamily::Rwkv7, ComputeDtype::Bf16),
        (ModelFamily::Llama, ComputeDtype::F32),
    ] {
        train_steps(&device, family, compute, scale, &mut report);
        let llama = report.rows(section(ModelFamily::Llama));
        report.set("targets", targets(&kernels, &llama));
    }
    report.set(
        "seconds",
        json!(START.get().map(|s| s.elapsed().as_secs_f64())),
    );
    println!("{}", report.to_json());
}
