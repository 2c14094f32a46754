//! `cargo xtask bench memory`: resident memory of a real-size model with its frozen base kept in
//! f32, f16 or bf16, or with its decoder blocks' linears block-quantized (q8 / q4 over the bf16
//! checkpoint) — after loading, and at the peak of one Bone training step.
//!
//! The bench writes a random Llama checkpoint of the chosen shape as a bf16 HF directory
//! (`config.json` + `model.safetensors`, streamed to disk tensor by tensor; never committed),
//! then measures each base dtype in a fresh process of this binary (`memory measure …`):
//! load it with `--base-dtype` / `--base-quant`, read the peak and current resident set (`VmHWM`, `VmRSS`), add
//! Bone on every projection of every layer, run one training step ([`Learner::train_step`]:
//! forward, loss, backward, gradient norm, AdamW) on `batch × seq` random tokens, and read the
//! peak again.
//!
//! Shapes: `llama1b` (Llama-3.2-1B: hidden 2048, 16 layers, 32 / 8 heads, MLP 8192, vocab
//! 128256, tied head) and `llama7b` (Llama-2-7B: hidden 4096, 32 layers, 32 heads, MLP 11008,
//! vocab 32000, untied head).
//!
//! Results: `target/bench/memory-<shape>.json` and `.md`.
//!
//! ```sh
//! cargo xtask bench memory                                  # llama1b, f32 / bf16 / q8 / q4
//! cargo xtask bench memory -- --shape llama7b --bases bf16  # the paper's setting
//! ```

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use clap::{Args, Parser, Subcommand, ValueEnum};
use disha_core::{
    AdapterSpec, PeftConfig, PeftModelExt, QuantFormat, TargetModules, safetensors_header,
};
use disha_models::llama::{LlamaConfig, hf_tensor_shapes};
use disha_models::{BaseDtype, LoadOptions, SplitMix64, load_model_with};
use disha_train::learner::{Learner, mark_trainable, peak_memory_mb, resident_memory_mb};
use disha_train::settings::default_targets;
use safetensors::Dtype;
use serde_json::{Value, json};

mod common;

/// A base to measure: a dtype (`f32`, `f16`, `bf16`), or the checkpoint's bf16 with the
/// decoder blocks' linears quantized (`q8`, `q4`, `q4_1`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Base {
    dtype: BaseDtype,
    quant: Option<QuantFormat>,
}

impl std::str::FromStr for Base {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let quant = |q| Self {
            dtype: BaseDtype::Auto,
            quant: Some(q),
        };
        match s {
            "q8" => Ok(quant(QuantFormat::Q8)),
            "q4" => Ok(quant(QuantFormat::Q4)),
            "q4_1" => Ok(quant(QuantFormat::Q4_1)),
            _ => Ok(Self {
                dtype: s.parse()?,
                quant: None,
            }),
        }
    }
}

impl std::fmt::Display for Base {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.quant {
            Some(q) => write!(f, "{q}"),
            None => write!(f, "{}", self.dtype),
        }
    }
}

/// A model shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Shape {
    /// Llama-3.2-1B.
    Llama1b,
    /// Llama-2-7B.
    Llama7b,
}

impl Shape {
    fn name(self) -> &'static str {
        match self {
            Self::Llama1b => "llama1b",
            Self::Llama7b => "llama7b",
        }
    }

    fn config(self) -> LlamaConfig {
        match self {
            Self::Llama1b => LlamaConfig::llama_3_2_1b_shape(),
            Self::Llama7b => LlamaConfig::llama_2_7b_shape(),
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "Resident memory of a real-size model per base dtype")]
struct Cli {
    #[command(subcommand)]
    command: Option<Sub>,
    #[command(flatten)]
    run: RunArgs,
}

#[derive(Subcommand, Debug)]
enum Sub {
    /// One base dtype, measured in this process (what the driver runs).
    Measure(MeasureArgs),
}

#[derive(Args, Debug)]
struct RunArgs {
    /// Model shape.
    #[arg(long, value_enum, default_value_t = Shape::Llama1b)]
    shape: Shape,
    /// Bases to measure, comma-separated: f32, f16, bf16, q8, q4, q4_1.
    #[arg(long, value_delimiter = ',', default_value = "f32,bf16,q8,q4")]
    bases: Vec<Base>,
    /// Bone's block size.
    #[arg(long, default_value_t = 64)]
    r: usize,
    /// Sequences per step.
    #[arg(long, default_value_t = 1)]
    batch: usize,
    /// Tokens per sequence.
    #[arg(long, default_value_t = 256)]
    seq: usize,
    /// Where the generated checkpoint and the results go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
    /// Swallows `--bench`, which `cargo bench` passes to every bench binary.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Args, Debug)]
struct MeasureArgs {
    #[arg(long)]
    model: PathBuf,
    #[arg(long)]
    base: Base,
    #[arg(long)]
    r: usize,
    #[arg(long)]
    batch: usize,
    #[arg(long)]
    seq: usize,
}

/// Writes a random bf16 checkpoint of `config` into `dir` (unless one is there), streaming the
/// values to disk: the header first (the offsets follow from the shapes), then the values, drawn
/// from `N(0, 0.02²)` (norm scales 1), a buffer of 1 MiB at a time.
fn write_checkpoint(config: &LlamaConfig, dir: &Path) -> Result<(), String> {
    use std::io::Write;
    let weights = dir.join("model.safetensors");
    if weights.is_file() && dir.join("config.json").is_file() {
        return Ok(());
    }
    std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let shapes = hf_tensor_shapes(config);
    let mut offset = 0u64;
    let ranges: Vec<std::ops::Range<u64>> = shapes
        .iter()
        .map(|(_, shape)| {
            let start = offset;
            offset += shape.iter().product::<usize>() as u64 * 2;
            start..offset
        })
        .collect();
    let text = safetensors_header(
        shapes
            .iter()
            .zip(ranges)
            .map(|((name, shape), range)| (name.as_str(), Dtype::BF16, shape.as_slice(), range)),
        &[("format", "pt")],
    );
    let partial = dir.join("model.safetensors.partial");
    let io = |e: std::io::Error| format!("{}: {e}", partial.display());
    let mut file = std::io::BufWriter::new(std::fs::File::create(&partial).map_err(io)?);
    file.write_all(&(text.len() as u64).to_le_bytes())
        .map_err(io)?;
    file.write_all(text.as_bytes()).map_err(io)?;
    let mut rng = SplitMix64::new(2024);
    let mut buffer = Vec::with_capacity(1 << 20);
    for (name, shape) in &shapes {
        let n: usize = shape.iter().product();
        let norm = name.ends_with("norm.weight");
        for _ in 0..n {
            let v = if norm { 1.0 } else { rng.normal() * 0.02 };
            buffer.extend_from_slice(&half::bf16::from_f32(v).to_le_bytes());
            if buffer.len() >= 1 << 20 {
                file.write_all(&buffer).map_err(io)?;
                buffer.clear();
            }
        }
    }
    file.write_all(&buffer).map_err(io)?;
    file.flush().map_err(io)?;
    drop(file);
    std::fs::rename(&partial, &weights).map_err(io)?;
    let mut config_json = config.to_hf_json();
    config_json["architectures"] = json!(["LlamaForCausalLM"]);
    std::fs::write(
        dir.join("config.json"),
        serde_json::to_string_pretty(&config_json).expect("JSON serializes"),
    )
    .map_err(|e| format!("{}: {e}", dir.display()))
}

/// `memory measure`: load, peak, one Bone step, peak — one JSON line on stdout.
fn measure(args: &MeasureArgs) -> Result<Value, String> {
    let device = burn::tensor::Device::default().autodiff();
    let start = Instant::now();
    let options = LoadOptions::default()
        .with_base_dtype(args.base.dtype)
        .with_base_quant(args.base.quant);
    let loaded = load_model_with(&args.model, &device, &options)
        .map_err(|e| format!("{}: {e}", args.model.display()))?;
    let load_s = start.elapsed().as_secs_f64();
    let load_peak = peak_memory_mb();
    let loaded_rss = resident_memory_mb();
    let mut model = loaded.model;
    let vocab = model.vocab_size();
    let targets = TargetModules::Names(default_targets(model.family()));
    model
        .add_adapter(
            "default",
            &PeftConfig::from_spec(&AdapterSpec::bone(args.r), targets),
        )
        .map_err(|e| e.to_string())?;
    let model = mark_trainable(model, &[]).map_err(|e| e.to_string())?;
    let trainable: usize = disha_train::learner::trainable_param_shapes(&model)
        .iter()
        .map(|s| s.iter().product::<usize>())
        .sum();
    let mut data = common::random_token_loader(vocab, args.batch, args.seq, 7);
    let config = common::constant_lr_config(1);
    let mut learner = Learner::new(model, config).map_err(|e| e.to_string())?;
    let before_step = resident_memory_mb();
    let start = Instant::now();
    let metrics = learner.train_step(&mut data).map_err(|e| e.to_string())?;
    let step_s = start.elapsed().as_secs_f64();
    Ok(json!({
        "base": args.base.to_string(),
        "trainable_params": trainable,
        "load_s": load_s,
        "load_peak_mb": load_peak,
        "loaded_rss_mb": loaded_rss,
        "before_step_rss_mb": before_step,
        "step_s": step_s,
        "step_peak_mb": peak_memory_mb(),
        "loss": metrics.loss,
    }))
}

fn run(args: &RunArgs) -> Result<(), String> {
    let config = args.shape.config();
    let params: usize = hf_tensor_shapes(&config)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>())
        .sum();
    // A relative `--out` is under the workspace root (cargo runs benches in the crate's directory).
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = match args.out.is_absolute() {
        true => args.out.clone(),
        false => root.canonicalize().unwrap_or(root).join(&args.out),
    };
    let dir = out.join(format!("memory-{}-bf16", args.shape.name()));
    let start = Instant::now();
    write_checkpoint(&config, &dir)?;
    eprintln!(
        "checkpoint: {} ({:.2} B parameters, bf16; {:.0?})",
        dir.display(),
        params as f64 / 1e9,
        start.elapsed()
    );
    let exe = std::env::current_exe().map_err(|e| e.to_string())?;
    let mut rows = Vec::new();
    for base in &args.bases {
        let mut command = Command::new(&exe);
        command
            .arg("measure")
            .args([
                "--model",
                &dir.to_string_lossy(),
                "--base",
                &base.to_string(),
            ])
            .args(["--r", &args.r.to_string()])
            .args(["--batch", &args.batch.to_string()])
            .args(["--seq", &args.seq.to_string()]);
        let output = command.output().map_err(|e| e.to_string())?;
        let stdout = String::from_utf8_lossy(&output.stdout);
        let line = stdout.lines().last().unwrap_or_default();
        let row: Value = serde_json::from_str(line).map_err(|_| {
            format!(
                "measure --base {base} failed: {}",
                String::from_utf8_lossy(&output.stderr)
            )
        })?;
        eprintln!("{row}");
        rows.push(row);
    }
    let f32_row = rows.iter().find(|r| r["base"] == "f32").cloned();
    let mb = |r: &Value, k: &str| r[k].as_f64().unwrap_or(f64::NAN);
    let mut md = format!(
        "# Memory: {} ({:.2} B parameters), Bone r{} on all seven projections, batch {} × {} \
         tokens, Flex, {} threads\n\n\
         | base | load s | load peak MB | loaded RSS MB | load peak ÷ loaded | step s | step peak MB \
         | step peak ÷ f32's | loaded ÷ f32's | before step ÷ f32's |\n\
         |---|---|---|---|---|---|---|---|---|---|\n",
        args.shape.name(),
        params as f64 / 1e9,
        args.r,
        args.batch,
        args.seq,
        std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".into()),
    );
    for r in &rows {
        let ratio = |k: &str| match &f32_row {
            Some(f) => format!("{:.3}", mb(r, k) / mb(f, k)),
            None => "—".into(),
        };
        md.push_str(&format!(
            "| {} | {:.1} | {:.0} | {:.0} | {:.3} | {:.1} | {:.0} | {} | {} | {} |\n",
            r["base"].as_str().unwrap_or("?"),
            mb(r, "load_s"),
            mb(r, "load_peak_mb"),
            mb(r, "loaded_rss_mb"),
            mb(r, "load_peak_mb") / mb(r, "loaded_rss_mb"),
            mb(r, "step_s"),
            mb(r, "step_peak_mb"),
            ratio("step_peak_mb"),
            ratio("loaded_rss_mb"),
            ratio("before_step_rss_mb"),
        ));
    }
    let json_path = out.join(format!("memory-{}.json", args.shape.name()));
    let md_path = json_path.with_extension("md");
    let report = json!({
        "shape": args.shape.name(),
        "parameters": params,
        "config": config.to_hf_json(),
        "bone_r": args.r,
        "batch": args.batch,
        "seq": args.seq,
        "rows": rows,
    });
    std::fs::write(
        &json_path,
        serde_json::to_string_pretty(&report).expect("JSON serializes"),
    )
    .map_err(|e| format!("{}: {e}", json_path.display()))?;
    std::fs::write(&md_path, &md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    println!("{md}");
    println!("results: {} and {}", json_path.display(), md_path.display());
    Ok(())
}

fn main() -> std::process::ExitCode {
    // The same allocator settings as `disha train` (each `measure` process applies them).
    disha_train::allocator::tune_and_reexec();
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Sub::Measure(args)) => measure(args).map(|row| println!("{row}")),
        None => run(&cli.run),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("memory bench: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
