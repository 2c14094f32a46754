//! `cargo xtask bench compare`: disha against PyTorch + PEFT on the same CPU, side by side.
//!
//! For every configuration and method, the training step `disha train` runs
//! ([`Learner::train_step`]: forward, causal-LM loss, backward, gradient norm, AdamW) — or the
//! frozen forward alone — is timed in a fresh process of this binary (`compare step …`), and the
//! same step in PyTorch + PEFT by `benches/python/peft_step.py` (same shapes, targets, ranks,
//! optimizer and batch), the two alternated round by round so that a noisy machine hits both
//! alike. Each side: `--threads` threads (Flex's rayon pool / torch's intra-op pool), `--warmup`
//! untimed steps, then `--steps` timed ones per round; the reported time is the median over every
//! timed step of every round, peak memory the largest peak RSS of a round's process.
//!
//! Configurations: `llama512` (random weights: hidden 512, 4 layers, 8 heads, MLP 1376, vocab
//! 2048, batch 4 × 128) and `smollm2` (SmolLM2-135M-Instruct from the shared GGUF, dequantized to
//! f32; PyTorch reads an HF directory converted from it once). Methods: `frozen` (forward only),
//! `full` (every parameter trained), `bone` r16, `bat` r16, `mini` r16 / mini_r 16, `lora` r8
//! (alpha 16), all seven projections of every layer.
//!
//! Results: `target/bench/compare.json` (PEFT `method_comparison`-style `run_info` /
//! `meta_info` / `train_info`), `compare.md` and `compare.png`.
//!
//! ```sh
//! cargo xtask bench compare -- --python /path/to/venv/bin/python
//! DISHA_BENCH_PYTHON=python3 cargo xtask bench compare -- --configs llama512 --methods bone,lora
//! ```
//! Without a Python (flag or `DISHA_BENCH_PYTHON`) that imports torch, transformers and peft,
//! the bench says so and times disha alone.

use std::path::{Path, PathBuf};

use std::process::Command;
use std::time::Instant;

use burn::module::{Module, ModuleMapper, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};
use clap::{Args, Parser, Subcommand, ValueEnum};
use disha_core::{AdapterSpec, BatOrientation, PeftConfig, PeftModelExt, TargetModules};
use disha_models::llama::{Llama, LlamaConfig, RopeScaling};
use disha_models::{CausalLm, RandomWeights, load_model};
use disha_train::data::{DataLoader, Example};
use disha_train::learner::{Learner, LearnerConfig, mark_trainable, peak_memory_mb};
use disha_train::plot::{BarGroup, bar_chart};
use disha_train::schedule::{LrSchedule, ScheduleKind};
use disha_train::settings::default_targets;
use serde_json::{Value, json};

mod common;

/// What one timed step does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Method {
    /// The forward pass of the frozen base on a non-autodiff device (logits only).
    Frozen,
    /// Every parameter trainable (no adapter), AdamW on all of them.
    Full,
    /// Bone (MiSS) r16.
    Bone,
    /// BAT r16 (PEFT orientation).
    Bat,
    /// MiSS-mini r16, mini_r 16.
    Mini,
    /// LoRA r8, alpha 16.
    Lora,
}

const METHODS: [Method; 6] = [
    Method::Frozen,
    Method::Full,
    Method::Bone,
    Method::Bat,
    Method::Mini,
    Method::Lora,
];

impl Method {
    fn name(self) -> &'static str {
        match self {
            Self::Frozen => "frozen",
            Self::Full => "full",
            Self::Bone => "bone",
            Self::Bat => "bat",
            Self::Mini => "mini",
            Self::Lora => "lora",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Self::Frozen => "frozen forward",
            Self::Full => "full fine-tune",
            Self::Bone => "Bone r16",
            Self::Bat => "BAT r16",
            Self::Mini => "mini r16",
            Self::Lora => "LoRA r8",
        }
    }

    /// The adapter, as `disha train --method … --r …` builds it (LoRA's alpha 2·r).
    fn adapter(self) -> Option<AdapterSpec> {
        match self {
            Self::Frozen | Self::Full => None,
            Self::Bone => Some(AdapterSpec::bone(16)),
            Self::Bat => Some(AdapterSpec::bat(16, BatOrientation::Peft)),
            Self::Mini => Some(AdapterSpec::mini(16, 16)),
            Self::Lora => Some(AdapterSpec::lora(8, 16.0)),
        }
    }
}

#[derive(Parser, Debug)]
#[command(about = "disha vs PyTorch + PEFT, one training step side by side")]
struct Cli {
    #[command(subcommand)]
    command: Option<Mode>,
    #[command(flatten)]
    compare: CompareArgs,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Time one configuration and method in this process and print one JSON line.
    Step(StepArgs),
}

#[derive(Args, Debug)]
struct CompareArgs {
    /// A Python with torch, transformers and peft (else `DISHA_BENCH_PYTHON`; else disha alone).
    #[arg(long)]
    python: Option<PathBuf>,
    /// The shared assets directory (else `DISHA_ASSETS`, else `../shared/assets`).
    #[arg(long)]
    assets: Option<PathBuf>,
    /// Configurations, comma-separated: `llama512`, `smollm2`.
    #[arg(long, value_delimiter = ',', default_value = "llama512,smollm2")]
    configs: Vec<String>,
    /// Methods, comma-separated.
    #[arg(long, value_delimiter = ',', value_enum, default_values_t = METHODS)]
    methods: Vec<Method>,
    /// Threads per side.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Alternated rounds per method (each a fresh process per side).
    #[arg(long, default_value_t = 2)]
    rounds: usize,
    /// Untimed steps per round.
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Timed steps per round.
    #[arg(long, default_value_t = 5)]
    steps: usize,
    /// Where the JSON, markdown and chart go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[derive(Args, Debug, Clone)]
struct StepArgs {
    /// A name for the configuration (reported as is).
    #[arg(long, default_value = "llama512")]
    config: String,
    /// A model file or directory (any format `disha` reads); random `llama512` weights when
    /// absent.
    #[arg(long)]
    model: Option<PathBuf>,
    #[arg(long, value_enum)]
    method: Method,
    #[arg(long, default_value_t = 4)]
    batch: usize,
    #[arg(long, default_value_t = 128)]
    seq: usize,
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    #[arg(long, default_value_t = 5)]
    steps: usize,
}

/// The reference shape: a Llama of hidden 512, 4 layers, 8 heads (no GQA), SwiGLU 1376,
/// vocabulary 2048, untied head (`benches/python/peft_step.py` builds the same one).
fn llama512() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 2048,
        hidden_size: 512,
        intermediate_size: 1376,
        num_hidden_layers: 4,
        num_attention_heads: 8,
        num_key_value_heads: 8,
        head_dim: 64,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 2048,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        dtype: "float32".into(),
    }
}

/// Makes every parameter trainable (full fine-tuning).
struct TrainEverything;

impl ModuleMapper for TrainEverything {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        param.set_require_grad(true)
    }
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    let n = v.len();
    match n {
        0 => f64::NAN,
        _ if n % 2 == 1 => v[n / 2],
        _ => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn load(args: &StepArgs, device: &Device) -> Result<CausalLm, String> {
    match &args.model {
        Some(path) => load_model(path, device)
            .map(|loaded| loaded.model)
            .map_err(|e| format!("{}: {e}", path.display())),
        None => {
            let config = llama512();
            Llama::from_source(&config, &mut RandomWeights::new(&config, 0.02, 7), device)
                .map(CausalLm::from)
                .map_err(|e| e.to_string())
        }
    }
}

/// `compare step`: one configuration and method, timed in this process.
fn step(args: &StepArgs) -> Result<Value, String> {
    let frozen = args.method == Method::Frozen;
    let device = match frozen {
        true => Device::default(),
        false => Device::default().autodiff(),
    };
    let mut model = load(args, &device)?;
    let vocab = model.vocab_size();
    let tokens = args.batch * args.seq;
    let total = args.warmup + args.steps;
    let mut step_s = Vec::with_capacity(args.steps);
    let mut trainable = 0;
    if frozen {
        let ids: Vec<i64> = common::random_ids(tokens, vocab, 1)
            .into_iter()
            .map(i64::from)
            .collect();
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(ids, [args.batch, args.seq]), &device);
        for k in 0..total {
            let start = Instant::now();
            let logits = model.forward(ids.clone());
            // Reading one value waits for the whole forward on asynchronous backends.
            let _ = logits.narrow(1, args.seq - 1, 1).sum().into_scalar::<f32>();
            if k >= args.warmup {
                step_s.push(start.elapsed().as_secs_f64());
            }
        }
    } else {
        model = match args.method.adapter() {
            Some(spec) => {
                let targets = TargetModules::Names(default_targets(model.family()));
                model
                    .add_adapter("default", &PeftConfig::from_spec(&spec, targets))
                    .map_err(|e| e.to_string())?;
                mark_trainable(model, &[]).map_err(|e| e.to_string())?
            }
            None => model.map(&mut TrainEverything),
        };
        trainable = disha_train::learner::trainable_param_shapes(&model)
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum();
        let examples = (0..args.batch * total)
            .map(|k| {
                let ids = common::random_ids(args.seq, vocab, 100 + k as u64);
                Example {
                    labels: ids.iter().map(|&i| i64::from(i)).collect(),
                    input_ids: ids,
                }
            })
            .collect();
        let mut data = DataLoader::new(examples, args.batch, 0, 0);
        let config = LearnerConfig {
            max_steps: total,
            grad_accum: 1,
            schedule: LrSchedule {
                peak: 1e-4,
                warmup_steps: 0,
                total_steps: total,
                kind: ScheduleKind::Constant,
            },
            beta1: 0.9,
            beta2: 0.999,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: None,
        };
        let mut learner = Learner::new(model, config).map_err(|e| e.to_string())?;
        for k in 0..total {
            let start = Instant::now();
            learner.train_step(&mut data).map_err(|e| e.to_string())?;
            if k >= args.warmup {
                step_s.push(start.elapsed().as_secs_f64());
            }
        }
    }
    Ok(json!({
        "side": "disha",
        "config": args.config,
        "method": args.method.name(),
        "batch": args.batch,
        "seq": args.seq,
        "threads": std::env::var("RAYON_NUM_THREADS").ok(),
        "trainable_params": trainable,
        "step_s": step_s,
        "median_step_s": median(&step_s),
        "tokens_per_s": tokens as f64 / median(&step_s),
        "peak_rss_mb": peak_memory_mb(),
    }))
}

/// Runs `command`, returning the JSON object its last stdout line holds.
fn run_json(mut command: Command, what: &str) -> Result<Value, String> {
    let output = command
        .output()
        .map_err(|e| format!("{what}: could not start: {e}"))?;
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        return Err(format!(
            "{what}: failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr).trim()
        ));
    }
    let line = stdout.lines().last().unwrap_or_default();
    serde_json::from_str(line).map_err(|e| format!("{what}: no JSON result ({e}): {line}"))
}

/// The Python to compare against, if it imports torch, transformers and peft.
fn find_python(flag: Option<PathBuf>, script: &Path) -> Option<PathBuf> {
    let Some(python) = flag.or_else(|| std::env::var_os("DISHA_BENCH_PYTHON").map(PathBuf::from))
    else {
        println!(
            "no Python given (--python or DISHA_BENCH_PYTHON): timing disha alone. The PyTorch side \
             needs a Python with torch, transformers and peft, running {}",
            script.display()
        );
        return None;
    };
    let check = Command::new(&python)
        .args(["-c", "import torch, transformers, peft"])
        .output();
    match check {
        Ok(out) if out.status.success() => Some(python),
        Ok(out) => {
            println!(
                "{} cannot import torch, transformers and peft ({}): timing disha alone",
                python.display(),
                String::from_utf8_lossy(&out.stderr)
                    .lines()
                    .last()
                    .unwrap_or_default()
            );
            None
        }
        Err(e) => {
            println!("{}: {e}: timing disha alone", python.display());
            None
        }
    }
}

/// One configuration of the comparison.
struct Config {
    name: String,
    label: String,
    /// The model for disha (`None`: random `llama512`).
    model: Option<PathBuf>,
    /// The model argument for the Python side and where it caches a converted HF directory.
    python_model: Option<(PathBuf, PathBuf)>,
    batch: usize,
    seq: usize,
}

fn configs(args: &CompareArgs, root: &Path) -> Vec<Config> {
    let assets = args
        .assets
        .clone()
        .or_else(|| std::env::var_os("DISHA_ASSETS").map(PathBuf::from))
        .unwrap_or_else(|| root.join("../shared/assets"));
    let mut out = Vec::new();
    for name in &args.configs {
        match name.as_str() {
            "llama512" => out.push(Config {
                name: name.clone(),
                label: "Llama h512 L4 (random), batch 4 × 128".into(),
                model: None,
                python_model: None,
                batch: 4,
                seq: 128,
            }),
            "smollm2" => {
                let gguf = assets.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
                if !gguf.is_file() {
                    println!(
                        "SKIPPED smollm2: {} not found (set --assets or DISHA_ASSETS)",
                        gguf.display()
                    );
                    continue;
                }
                out.push(Config {
                    name: name.clone(),
                    label: "SmolLM2-135M (f32), batch 4 × 128".into(),
                    python_model: Some((gguf.clone(), root.join("target/bench/smollm2-135m-hf"))),
                    model: Some(gguf),
                    batch: 4,
                    seq: 128,
                });
            }
            other => println!("SKIPPED {other}: unknown configuration (llama512, smollm2)"),
        }
    }
    out
}

/// Every timed step of every round of one side, and its largest peak RSS.
#[derive(Default)]
struct Side {
    step_s: Vec<f64>,
    peak_rss_mb: f64,
    trainable: u64,
    versions: Option<Value>,
}

impl Side {
    fn add(&mut self, result: &Value) {
        if let Some(steps) = result["step_s"].as_array() {
            self.step_s.extend(steps.iter().filter_map(Value::as_f64));
        }
        self.peak_rss_mb = self
            .peak_rss_mb
            .max(result["peak_rss_mb"].as_f64().unwrap_or(0.0));
        self.trainable = result["trainable_params"].as_u64().unwrap_or(0);
        if result.get("versions").is_some() {
            self.versions = Some(result["versions"].clone());
        }
    }

    fn median(&self) -> f64 {
        median(&self.step_s)
    }
}

fn compare(args: &CompareArgs) -> Result<(), String> {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let root = root.canonicalize().unwrap_or(root);
    let script = root.join("benches/python/peft_step.py");
    let python = find_python(args.python.clone(), &script);
    let me = std::env::current_exe().map_err(|e| format!("this binary's path: {e}"))?;
    let out_dir = if args.out.is_absolute() {
        args.out.clone()
    } else {
        root.join(&args.out)
    };
    std::fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let threads = args.threads.to_string();
    let mut results = Vec::new();
    let mut rows = Vec::new();
    let mut groups = Vec::new();
    let mut torch_versions = None;
    for config in configs(args, &root) {
        println!("\n{}", config.label);
        for &method in &args.methods {
            let (mut disha, mut torch) = (Side::default(), Side::default());
            for round in 0..args.rounds {
                let common = |c: &mut Command| {
                    c.args(["--config", &config.name, "--method", method.name()])
                        .args(["--batch", &config.batch.to_string()])
                        .args(["--seq", &config.seq.to_string()])
                        .args(["--warmup", &args.warmup.to_string()])
                        .args(["--steps", &args.steps.to_string()]);
                };
                let mut ours = Command::new(&me);
                ours.arg("step").env("RAYON_NUM_THREADS", &threads);
                common(&mut ours);
                if let Some(model) = &config.model {
                    ours.arg("--model").arg(model);
                }
                let mut theirs = python.as_ref().map(|python| {
                    let mut c = Command::new(python);
                    c.arg(&script)
                        .args(["--threads", &threads])
                        .env("OMP_NUM_THREADS", &threads)
                        .env("HF_HUB_OFFLINE", "1")
                        .env("TRANSFORMERS_VERBOSITY", "error");
                    common(&mut c);
                    if let Some((model, cache)) = &config.python_model {
                        c.arg("--model").arg(model).arg("--cache").arg(cache);
                    }
                    c
                });
                // Alternate which side goes first, so drift on a noisy machine hits both alike.
                let mut order: Vec<(bool, Command)> = vec![(true, ours)];
                if let Some(c) = theirs.take() {
                    order.push((false, c));
                }
                if round % 2 == 1 {
                    order.reverse();
                }
                for (is_disha, command) in order {
                    let what = format!(
                        "{} {} {}",
                        if is_disha { "disha" } else { "pytorch" },
                        config.name,
                        method.name()
                    );
                    let result = run_json(command, &what)?;
                    match is_disha {
                        true => disha.add(&result),
                        false => torch.add(&result),
                    }
                }
            }
            let tokens = (config.batch * config.seq) as f64;
            let (ours, theirs) = (disha.median(), torch.median());
            let ratio = ours / theirs;
            println!(
                "  {:<15} disha {:>7.3} s/step {:>8.0} tok/s {:>6.0} MB | PyTorch+PEFT {} | disha ÷ PyTorch {}",
                method.label(),
                ours,
                tokens / ours,
                disha.peak_rss_mb,
                match theirs.is_finite() {
                    true => format!(
                        "{theirs:>7.3} s/step {:>8.0} tok/s {:>6.0} MB",
                        tokens / theirs,
                        torch.peak_rss_mb
                    ),
                    false => "-".into(),
                },
                if ratio.is_finite() {
                    format!("{ratio:.2}")
                } else {
                    "-".into()
                },
            );
            torch_versions = torch_versions.or(torch.versions.clone());
            for (side, s) in [("disha", &disha), ("pytorch+peft", &torch)] {
                if s.step_s.is_empty() {
                    continue;
                }
                results.push(json!({
                    "meta_info": {
                        "framework": side,
                        "config": config.name,
                        "method": method.name(),
                        "method_label": method.label(),
                        "batch_size": config.batch,
                        "sequence_length": config.seq,
                    },
                    "train_info": {
                        "num_trainable_params": s.trainable,
                        "step_times_s": s.step_s,
                        "step_time_median_s": s.median(),
                        "tokens_per_second": tokens / s.median(),
                        "cpu_memory_max_mb": s.peak_rss_mb,
                    },
                }));
            }
            rows.push(format!(
                "| {} | {} | {} | {:.3} | {:.0} | {:.0} | {} | {} | {} | {} |",
                config.name,
                method.label(),
                disha.trainable,
                ours,
                tokens / ours,
                disha.peak_rss_mb,
                fmt_or_dash(theirs, 3),
                fmt_or_dash(tokens / theirs, 0),
                fmt_or_dash(
                    if theirs.is_finite() {
                        torch.peak_rss_mb
                    } else {
                        f64::NAN
                    },
                    0
                ),
                fmt_or_dash(ratio, 2),
            ));
            // Against PyTorch: the ratio (PyTorch = 1). Alone: disha's step time.
            groups.push(BarGroup {
                label: format!("{} {}", config.name, method.name()),
                values: match python.is_some() {
                    true => vec![ratio, 1.0],
                    false => vec![ours * 1e3],
                },
            });
        }
    }
    let run_info = json!({
        "created_at_unix_s": std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0),
        "cpu": cpu_model(),
        "threads_per_side": args.threads,
        "rounds": args.rounds,
        "warmup_steps": args.warmup,
        "timed_steps_per_round": args.steps,
        "disha_version": env!("CARGO_PKG_VERSION"),
        "pytorch": torch_versions,
        "python": python.as_ref().map(|p| p.display().to_string()),
    });
    let report = json!({ "run_info": run_info, "results": results });
    let json_path = out_dir.join("compare.json");
    let text = serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?;
    disha_core::write_atomic(&json_path, text.as_bytes())
        .map_err(|e| format!("{}: {e}", json_path.display()))?;
    let md = format!(
        "{} threads per side, {} rounds × ({} warm-up + {} timed steps), median step time; CPU: {}\n\n\
         | config | method | trainable | disha s/step | disha tok/s | disha peak RSS MB | PyTorch+PEFT s/step | PyTorch+PEFT tok/s | PyTorch+PEFT peak RSS MB | disha ÷ PyTorch |\n\
         |---|---|---:|---:|---:|---:|---:|---:|---:|---:|\n{}\n",
        args.threads,
        args.rounds,
        args.warmup,
        args.steps,
        cpu_model(),
        rows.join("\n")
    );
    let md_path = out_dir.join("compare.md");
    disha_core::write_atomic(&md_path, md.as_bytes())
        .map_err(|e| format!("{}: {e}", md_path.display()))?;
    let png = out_dir.join("compare.png");
    match python.is_some() {
        true => bar_chart(
            &png,
            "step time relative to PyTorch + PEFT (lower is faster)",
            "disha step time / PyTorch + PEFT's",
            &["disha", "PyTorch + PEFT"],
            &groups,
        ),
        false => bar_chart(
            &png,
            "disha: one training step",
            "ms / step",
            &["disha"],
            &groups,
        ),
    }
    .map_err(|e| e.to_string())?;
    println!(
        "\n{md}\nwrote {}, {} and {}",
        json_path.display(),
        md_path.display(),
        png.display()
    );
    Ok(())
}

fn fmt_or_dash(value: f64, digits: usize) -> String {
    match value.is_finite() {
        true => format!("{value:.digits$}"),
        false => "-".into(),
    }
}

/// The CPU's model name (Linux), for the report.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|s| s.trim().to_string())
        })
        .unwrap_or_else(|| "unknown".into())
}

fn main() -> std::process::ExitCode {
    // The same allocator settings as `disha train` (each `compare step` process applies them).
    disha_train::allocator::tune_and_reexec();
    let cli = Cli::parse();
    let result = match &cli.command {
        Some(Mode::Step(args)) => step(args).map(|json| println!("{json}")),
        None => compare(&cli.compare),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("compare: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
