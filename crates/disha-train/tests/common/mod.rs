//! Shared by the disha-train integration tests: a tiny model and dataset, and helpers that
//! run the `disha` binary.
// Each test binary uses its own subset.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use disha_models::llama::LlamaConfig;

/// A small byte-level Llama (the demo model's vocabulary, heads and tied head, narrower and
/// shallower): trains in milliseconds per step on Flex.
pub fn tiny_byte_level_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        head_dim: 8,
        dtype: "float32".into(),
        ..disha_train::demo::demo_config()
    }
}

pub fn disha(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_disha"))
        .args(args)
        .output()
        .expect("the disha binary runs")
}

pub fn ok(args: &[&str]) -> String {
    let out = disha(args);
    assert!(
        out.status.success(),
        "disha {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Runs a command that must fail; returns its stderr, checked to be one `error:` line.
pub fn fails(args: &[&str]) -> String {
    let out = disha(args);
    assert!(!out.status.success(), "disha {args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    assert!(err.starts_with("error: "), "{err}");
    assert_eq!(err.trim_end().lines().count(), 1, "not one line: {err}");
    err
}

/// Runs a `disha train` (or other long command) that must fail: it may report progress on
/// stderr first, but ends with exactly one `error:` line, which is returned.
pub fn fails_late(args: &[&str]) -> String {
    let out = disha(args);
    assert!(!out.status.success(), "disha {args:?} should fail");
    let err = String::from_utf8(out.stderr).unwrap();
    let errors: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    assert_eq!(errors.len(), 1, "not one error line: {err}");
    assert!(
        err.trim_end().ends_with(errors[0]),
        "the error is not last: {err}"
    );
    errors[0].to_string()
}

pub fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

/// A small random byte-level Llama as an HF directory, and an arithmetic JSONL dataset.
pub fn tiny_run_inputs(dir: &Path) -> (PathBuf, PathBuf) {
    use disha_models::llama::Llama;
    let config = tiny_byte_level_config();
    let device = burn::tensor::Device::default();
    let model = Llama::from_source(
        &config,
        &mut disha_models::RandomWeights::new(&config, 0.2, 1),
        &device,
    )
    .unwrap();
    let model_dir = dir.join("tiny-model");
    disha_models::export_merged(&model.into(), &config.to_hf_json(), &[], &model_dir).unwrap();
    let data = dir.join("sums.jsonl");
    write_sums(&data, 48);
    (model_dir, data)
}

/// `n` small sums (`"3+4="` → `"7"`) as GSM8K-field JSONL.
pub fn write_sums(path: &Path, n: usize) {
    let lines: Vec<String> = (0..n)
        .map(|i| {
            format!(
                r#"{{"question": "{}+{}=", "answer": "{}"}}"#,
                i % 7,
                i % 5,
                i % 7 + i % 5
            )
        })
        .collect();
    std::fs::write(path, lines.join("\n")).unwrap();
}

pub fn losses(out: &Path) -> Vec<String> {
    std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let v: serde_json::Value = serde_json::from_str(l).unwrap();
            format!("{}:{}", v["step"], v["loss"])
        })
        .collect()
}

/// The loss of every step in `metrics.jsonl`, as numbers.
pub fn loss_values(out: &Path) -> Vec<f64> {
    losses(out)
        .iter()
        .map(|l| l.split(':').nth(1).unwrap().parse().unwrap())
        .collect()
}

/// Largest `|actual − expected| / |expected|` over two loss traces of the same length.
pub fn max_relative_diff(actual: &[f64], expected: &[f64]) -> f64 {
    assert_eq!(actual.len(), expected.len(), "loss trace lengths");
    actual
        .iter()
        .zip(expected)
        .fold(0.0, |m, (a, e)| m.max((a - e).abs() / e.abs()))
}

pub fn tiny_train_args<'a>(
    model: &'a Path,
    data: &'a Path,
    out: &'a Path,
    steps: &'a str,
) -> Vec<&'a str> {
    vec![
        "train",
        "--model",
        s(model),
        "--tokenizer",
        "byte-level",
        "--data",
        s(data),
        "--fields",
        "gsm8k",
        "--template",
        "raw",
        "--out",
        s(out),
        "--max-steps",
        steps,
        "--batch-size",
        "4",
        "--lr",
        "1e-2",
        "--warmup-steps",
        "2",
        "--seed",
        "3",
        "--save-every",
        "4",
        "--device",
        "flex",
    ]
}
