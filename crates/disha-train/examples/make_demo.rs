//! Builds the embedded demo under `assets/demo/` (run through `cargo xtask make-demo`):
//! pre-trains the tiny byte-level Llama of `disha_train::demo` on every `a+b` and `a-b` with
//! operands below 100, measures its exact match on each operation (and on the unseen `a~b`),
//! and writes the model (`model/`, f16 safetensors), the fine-tuning data (`train.jsonl`,
//! `eval.jsonl`) and `pretraining.json` with the numbers.

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::Device;
use clap::Parser;
use disha_core::write_atomic;
use disha_models::{CausalLm, TextTokenizer, export_merged, stop_tokens};
use disha_train::data::{PromptTemplate, Record, shuffle};
use disha_train::demo::{Operation, PretrainConfig, demo_config, finetune_split, pretrain};
use disha_train::evaluate::exact_match;

#[derive(Parser, Debug)]
struct Args {
    /// Output directory (must not hold a model yet).
    #[arg(long, default_value = "assets/demo")]
    out: PathBuf,
    /// Pre-training steps.
    #[arg(long, default_value_t = PretrainConfig::default().steps)]
    steps: usize,
    /// Problems per step.
    #[arg(long, default_value_t = PretrainConfig::default().batch_size)]
    batch_size: usize,
    /// Peak learning rate.
    #[arg(long, default_value_t = PretrainConfig::default().lr)]
    lr: f64,
    /// Fine-tuning problems held out for evaluation.
    #[arg(long, default_value_t = 200)]
    eval: usize,
    /// Fine-tuning problems written to train.jsonl.
    #[arg(long, default_value_t = 2000)]
    train: usize,
}

/// Exact match of `model` on `records`.
fn accuracy(model: &CausalLm, records: &[Record]) -> f64 {
    let tokenizer = TextTokenizer::byte_level();
    let stop = stop_tokens(model, &tokenizer);
    let correct = records
        .iter()
        .filter(|r| {
            exact_match(model, &tokenizer, r, PromptTemplate::Raw, 5, &stop)
                .expect("byte-level generation cannot fail")
                .correct
        })
        .count();
    correct as f64 / records.len().max(1) as f64
}

fn sample(op: Operation, n: usize, seed: u64) -> Vec<Record> {
    let mut all = op.all_records();
    shuffle(&mut all, seed);
    all.truncate(n);
    all
}

fn write_jsonl(path: &Path, records: &[Record]) {
    let text: String = records
        .iter()
        .map(|r| {
            let line = serde_json::json!({"instruction": r.instruction, "output": r.output});
            format!("{line}\n")
        })
        .collect();
    write_atomic(path, text.as_bytes()).expect("write jsonl");
}

fn main() {
    let args = Args::parse();
    let config = PretrainConfig {
        steps: args.steps,
        batch_size: args.batch_size,
        lr: args.lr,
        ..PretrainConfig::default()
    };
    let device = Device::default();
    let start = Instant::now();
    let mut last = Vec::new();
    let model = pretrain(&config, &device, &mut |m| {
        last.push(m.loss);
        if m.step % 100 == 0 {
            let recent = &last[last.len().saturating_sub(100)..];
            eprintln!(
                "step {:5}  loss {:.4}  lr {:.2e}  {:.1} s",
                m.step,
                recent.iter().sum::<f64>() / recent.len() as f64,
                m.lr,
                start.elapsed().as_secs_f64()
            );
            std::io::stderr().flush().ok();
        }
    })
    .expect("pre-training diverged");
    let seconds = start.elapsed().as_secs_f64();

    std::fs::create_dir_all(&args.out).expect("create the output directory");
    let model_dir = args.out.join("model");
    if model_dir.exists() {
        std::fs::remove_dir_all(&model_dir).expect("replace the old model");
    }
    export_merged(&model, &demo_config().to_hf_json(), &[], &model_dir).expect("write model");
    // Measure what ships: the f16 weights as loaded back.
    let shipped = disha_models::load_model(&model_dir, &device)
        .expect("reload")
        .model;
    let (train, eval) = finetune_split(args.eval, 0);
    write_jsonl(
        &args.out.join("train.jsonl"),
        &train[..args.train.min(train.len())],
    );
    write_jsonl(&args.out.join("eval.jsonl"), &eval);

    let add = accuracy(&shipped, &sample(Operation::Add, 500, 1));
    let sub = accuracy(&shipped, &sample(Operation::Subtract, 500, 2));
    let distance = accuracy(&shipped, &eval);
    let tail = &last[last.len().saturating_sub(100)..];
    let summary = serde_json::json!({
        "steps": config.steps,
        "batch_size": config.batch_size,
        "lr": config.lr,
        "seed": config.seed,
        "seconds": seconds,
        "final_loss_mean_last_100": tail.iter().sum::<f64>() / tail.len().max(1) as f64,
        "exact_match": {"add_500": add, "subtract_500": sub, "distance_eval_before_finetune": distance},
    });
    let text = serde_json::to_string_pretty(&summary).expect("json");
    write_atomic(&args.out.join("pretraining.json"), text.as_bytes()).expect("write summary");
    println!("{text}");
}
