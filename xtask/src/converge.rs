//! `cargo xtask converge`: Bone r16 vs LoRA r8 (about the same trainable-parameter count) vs
//! BAT r16 on the same model, data, steps and seed, through the release `disha train` binary.
//! Prints loss after N steps, validation loss and wall time, and writes the table to
//! `target/converge/summary.md` and the loss curves to `target/converge/loss.png`.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

/// `(label, method, r)`.
const RUNS: [(&str, &str, &str); 3] = [
    ("Bone r16", "bone", "16"),
    ("LoRA r8", "lora", "8"),
    ("BAT r16", "bat", "16"),
];

fn mean(xs: &[f64]) -> f64 {
    xs.iter().sum::<f64>() / xs.len().max(1) as f64
}

/// Runs the comparison; `Err` carries a message for the user.
pub fn run(steps: usize, examples: usize, assets: Option<PathBuf>) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let assets = assets
        .or_else(|| std::env::var_os("DISHA_ASSETS").map(PathBuf::from))
        .unwrap_or_else(|| root.join("../shared/assets"));
    let model = assets.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let gsm8k = assets.join("gsm8k/train.jsonl");
    if !model.is_file() || !gsm8k.is_file() {
        return Err(format!(
            "needs {} and {} (set DISHA_ASSETS or --assets)",
            model.display(),
            gsm8k.display()
        ));
    }
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let status = Command::new(&cargo)
        .args(["build", "--release", "-p", "disha-train", "--bin", "disha"])
        .current_dir(&root)
        .status()
        .map_err(|e| format!("could not start cargo: {e}"))?;
    if !status.success() {
        return Err("release build of disha failed".into());
    }
    let disha = root.join("target/release/disha");
    let work = root.join("target/converge");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
    let data = work.join("gsm8k.jsonl");
    let text = std::fs::read_to_string(&gsm8k).map_err(|e| format!("{}: {e}", gsm8k.display()))?;
    let lines: Vec<&str> = text.lines().take(examples).collect();
    std::fs::write(&data, lines.join("\n")).map_err(|e| format!("{}: {e}", data.display()))?;

    let mut table = format!(
        "SmolLM2-135M-Instruct (Q4_1 GGUF, f32), {examples} GSM8K examples (32 held out), raw \
         template, max-len 160, batch 4, AdamW lr 1e-3, 3 warmup steps, cosine, {steps} steps, \
         seed 0, all seven projections, release build, Flex\n\n\
         | method | trainable | loss, first 5 steps | loss, last 5 steps | validation loss before → after | wall time |\n\
         |---|---|---|---|---|---|\n"
    );
    for (label, method, r) in RUNS {
        let out = work.join(method);
        let steps_arg = steps.to_string();
        let start = Instant::now();
        let output = Command::new(&disha)
            .args([
                "train",
                "--model",
                &model.to_string_lossy(),
                "--data",
                &data.to_string_lossy(),
                "--fields",
                "gsm8k",
                "--template",
                "raw",
                "--method",
                method,
                "--r",
                r,
                "--out",
                &out.to_string_lossy(),
                "--max-steps",
                &steps_arg,
                "--batch-size",
                "4",
                "--max-len",
                "160",
                "--lr",
                "1e-3",
                "--warmup-steps",
                "3",
                "--seed",
                "0",
                "--validation",
                "32",
                "--device",
                "flex",
            ])
            .output()
            .map_err(|e| format!("could not run {}: {e}", disha.display()))?;
        let seconds = start.elapsed().as_secs_f64();
        let stdout = String::from_utf8_lossy(&output.stdout);
        let stderr = String::from_utf8_lossy(&output.stderr);
        if !output.status.success() {
            return Err(format!("{label}: disha train failed: {stderr}"));
        }
        let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
            .map_err(|e| format!("{label}: metrics.jsonl: {e}"))?
            .lines()
            .filter_map(|l| {
                let key = "\"loss\":";
                let rest = &l[l.find(key)? + key.len()..];
                rest.split([',', '}']).next()?.parse().ok()
            })
            .collect();
        let k = losses.len().clamp(1, 5);
        let validation = stdout
            .lines()
            .find(|l| l.starts_with("validation loss"))
            .map(|l| {
                l.trim_start_matches("validation loss")
                    .trim()
                    .split(" (")
                    .next()
                    .unwrap_or("")
                    .to_string()
            })
            .unwrap_or_default();
        let trainable = stderr
            .lines()
            .find(|l| l.starts_with("trainable params:"))
            .and_then(|l| l.split("||").next())
            .map(|l| l.trim_start_matches("trainable params:").trim().to_string())
            .unwrap_or_default();
        let row = format!(
            "| {label} | {trainable} | {:.4} | {:.4} | {validation} | {seconds:.0} s |\n",
            mean(&losses[..k]),
            mean(&losses[losses.len() - k..])
        );
        print!("{row}");
        table.push_str(&row);
    }
    let summary = work.join("summary.md");
    std::fs::write(&summary, &table).map_err(|e| format!("{}: {e}", summary.display()))?;
    let chart = work.join("loss.png");
    let title = format!("SmolLM2-135M + GSM8K, {steps} steps: Bone r16 vs LoRA r8 vs BAT r16");
    let status = Command::new(&disha)
        .arg("plot")
        .args(RUNS.iter().map(|(_, method, _)| work.join(method)))
        .args(["--title", &title, "--out", &chart.to_string_lossy()])
        .status()
        .map_err(|e| format!("could not run {}: {e}", disha.display()))?;
    if !status.success() {
        return Err("disha plot failed".into());
    }
    println!(
        "\n{table}\nwritten to {} and {}",
        summary.display(),
        chart.display()
    );
    Ok(())
}
