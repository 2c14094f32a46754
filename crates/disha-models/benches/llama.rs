//! SmolLM2-135M-Instruct (the Q4_1 GGUF from `../shared/assets`, dequantized to f32) on the
//! default device (Flex on a CPU build): prefill and decode throughput, and one training step
//! (forward, causal-LM loss, backward, AdamW) with Bone r16 and LoRA r8 on all seven
//! projections of every layer. After the criterion group a table prints tokens/s.
//!
//! ```sh
//! cargo xtask bench models        # or: cargo bench -p disha-models --bench llama
//! DISHA_ASSETS=/path/to/assets cargo xtask bench models
//! ```

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::time::Duration;

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use criterion::Criterion;
use disha_core::{PeftConfig, PeftModelExt, TargetModules, freeze_all_but_active_adapters};
use disha_models::CausalLm;
use disha_models::causal_lm_loss;
use disha_models::llama::projection_names;
use disha_models::load_model;

const GROUP: &str = "smollm2_135m_f32";
const TOKENS: usize = 128;

/// `(case, tokens processed per iteration)`, in table order.
const CASES: [(&str, usize); 4] = [
    ("prefill 128 tok (all logits)", TOKENS),
    ("decode 1 tok at position 128 (KV cache)", 1),
    ("train step Bone r16 x7 proj (fwd+bwd+AdamW)", TOKENS),
    ("train step LoRA r8 x7 proj (fwd+bwd+AdamW)", TOKENS),
];

fn gguf_path() -> Option<PathBuf> {
    let root = std::env::var_os("DISHA_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/assets"));
    let path = root.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED: {} not found (set DISHA_ASSETS to the shared assets directory)",
            path.display()
        );
        None
    }
}

fn ids(device: &Device) -> Tensor<2, Int> {
    // A fixed, non-degenerate id pattern (real text is irrelevant to throughput).
    let ids: Vec<i64> = (0..TOKENS as i64)
        .map(|i| (i * 7919 + 13) % 49_000)
        .collect();
    Tensor::from_data(TensorData::new(ids, [1, TOKENS]), device)
}

fn train_case(c: &mut Criterion, name: &str, base: &CausalLm, config: PeftConfig) {
    let device = base.device();
    let mut model = base.clone();
    model
        .add_adapter("default", &config)
        .expect("SmolLM2 takes every adapter");
    let model = freeze_all_but_active_adapters(model);
    let input = ids(&device);
    let mut state = Some((model, AdamWConfig::new().init()));
    c.benchmark_group(GROUP)
        .sample_size(10)
        .warm_up_time(Duration::from_secs(2))
        .measurement_time(Duration::from_secs(20))
        .bench_function(name, |b| {
            b.iter(|| {
                let (model, mut optim) = state.take().expect("state is put back");
                let loss = causal_lm_loss(model.forward(input.clone()), input.clone());
                let grads = GradientsParams::from_grads(loss.backward(), &model);
                state = Some((optim.step(1e-4, model, grads), optim));
            })
        });
}

fn summary() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../target/criterion")
        .join(GROUP);
    println!("\nSmolLM2-135M (f32 from Q4_1 GGUF), batch 1, {TOKENS} tokens, default device");
    println!("{:<56} {:>12} {:>12}", "case", "median", "tokens/s");
    let read = |path: PathBuf| -> Option<serde_json::Value> {
        serde_json::from_str(&std::fs::read_to_string(path).ok()?).ok()
    };
    for (case, tokens) in CASES {
        // Criterion mangles ids into directory names; match on the recorded function id.
        let median = std::fs::read_dir(&dir).ok().and_then(|entries| {
            entries.flatten().find_map(|e| {
                let bench = read(e.path().join("new/benchmark.json"))?;
                if bench["function_id"].as_str()? != case {
                    return None;
                }
                read(e.path().join("new/estimates.json"))?["median"]["point_estimate"].as_f64()
            })
        });
        match median {
            Some(ns) => println!(
                "{case:<56} {:>10.1}ms {:>12.1}",
                ns / 1e6,
                tokens as f64 / (ns / 1e9)
            ),
            None => println!("{case:<56} {:>12} {:>12}", "-", "-"),
        }
    }
}

fn main() {
    let Some(path) = gguf_path() else { return };
    let device = Device::default();
    let mut c = Criterion::default().configure_from_args();

    let inference = load_model(&path, &device)
        .expect("SmolLM2 GGUF loads")
        .model;
    let input = ids(&device);
    c.benchmark_group(GROUP)
        .sample_size(10)
        .measurement_time(Duration::from_secs(10))
        .bench_function(CASES[0].0, |b| {
            b.iter(|| black_box(inference.forward(input.clone()).into_data()))
        });
    let mut prefilled = inference.new_decode_state();
    inference.forward_last(input.clone(), &mut prefilled);
    let next = Tensor::<2, Int>::from_data(TensorData::new(vec![42i64], [1, 1]), &device);
    c.benchmark_group(GROUP)
        .sample_size(30)
        .bench_function(CASES[1].0, |b| {
            b.iter(|| {
                let mut cache = prefilled.clone();
                black_box(inference.forward_last(next.clone(), &mut cache).into_data())
            })
        });
    drop(inference);

    let train_device = device.autodiff();
    let base = load_model(&path, &train_device)
        .expect("SmolLM2 GGUF loads")
        .model;
    let seven = TargetModules::Names(projection_names().map(String::from).to_vec());
    train_case(
        &mut c,
        CASES[2].0,
        &base,
        PeftConfig::miss(16, seven.clone()),
    );
    train_case(&mut c, CASES[3].0, &base, PeftConfig::lora(8, 16.0, seven));
    c.final_summary();
    summary();
}
