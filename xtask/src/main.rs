//! Project automation for disha.
//!
//! - `cargo xtask ci` — everything CI checks (`.ci/run` calls exactly this): formatting, clippy
//!   with `-D warnings`, the README's test command on the CPU backend, clippy over every opt-in
//!   feature (type-checks the GPU backends), and the CubeCL kernel suite with the Llama / RWKV-7
//!   goldens on WGPU over a software Vulkan driver (skipped, with the reason printed, where none
//!   is installed); `--kernels` runs that last step alone.
//! - `cargo xtask bench [adapters|kernels|models|rwkv|compare|memory]` — the benchmarks, with
//!   their summary tables (`compare`: disha against PyTorch + PEFT, one training step side by
//!   side; `memory`: resident memory of a real-size Llama per base dtype); `bench gpu` prepares
//!   the one-shot GPU benchmark (CUDA release binaries and their run script, `target/gpu-bench/`).
//! - `cargo xtask converge` — Bone vs LoRA vs BAT fine-tuning convergence on SmolLM2 + GSM8K.
//! - `cargo xtask make-demo` — rebuild the embedded demo model and data under `assets/demo/`.
//! - `cargo xtask fuzz` — a long fuzzing campaign over every reader (`crates/disha-fuzz`).

mod converge;
mod gpu_bench;

use std::path::PathBuf;
use std::process::{Command, ExitCode};
use std::time::Instant;

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(about = "disha project automation")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand, Debug)]
enum Task {
    /// Run every CI check, in CI's order, stopping at the first failure.
    Ci {
        /// Skip the opt-in feature clippy (burn-train, wgpu, cuda, fusion, autotune): it checks the Burn
        /// stack again with those features, about 7 minutes.
        #[arg(long)]
        skip_feature_check: bool,
        /// Skip the kernel step (the kernel suite, the Llama / RWKV-7 goldens and burn-train's
        /// step on WGPU): its WGPU test build of the Burn stack takes about 15 minutes.
        #[arg(long, conflicts_with = "kernels")]
        skip_kernels: bool,
        /// Run the kernel step alone, failing where no Vulkan driver is installed (lavapipe:
        /// `apt-get install mesa-vulkan-drivers libvulkan1`).
        #[arg(long)]
        kernels: bool,
    },
    /// Run the benchmarks (release build) and print their summary tables.
    Bench {
        /// Which benchmark: `adapters` (one adapted linear, every method, fwd+bwd), `kernels` (fused
        /// vs unfused Bone / BAT), `models` (SmolLM2-135M from `../shared/assets`: prefill,
        /// decode, Bone / LoRA train step), `rwkv` (RWKV-7 834K and a random 0.1B shape:
        /// prefill, RNN decode, Bone / LoRA / BAT train step, peak memory against length) or
        /// `compare` (disha against PyTorch + PEFT: frozen forward, full fine-tune, Bone, BAT,
        /// mini, LoRA; one training step side by side, JSON / markdown / PNG in target/bench/)
        /// or `memory` (a generated Llama-3.2-1B- or Llama-2-7B-shaped bf16 checkpoint: resident
        /// memory after load and at one Bone r64 step's peak, per base dtype) or `gpu` (builds
        /// the one-shot GPU benchmark for CUDA into target/gpu-bench/: binaries + run.sh; it does
        /// not run it).
        #[arg(default_value = "adapters")]
        which: String,
        /// Arguments for the benchmark binary, after `--` (criterion's for the others;
        /// `compare`: `--python`, `--configs`, `--methods`, `--rounds`, `--steps`, …; `memory`:
        /// `--shape`, `--bases`, `--r`, `--seq`; see `benches/` of disha-train).
        #[arg(last = true)]
        args: Vec<String>,
    },
    /// Compare Bone r16, LoRA r8 and BAT r16 fine-tuning (same model, data, steps, seed)
    /// through the release `disha train`; needs `../shared/assets` (or --assets / DISHA_ASSETS).
    Converge {
        /// Optimizer steps per method.
        #[arg(long, default_value_t = 40)]
        steps: usize,
        /// GSM8K training examples to use (32 are held out for validation).
        #[arg(long, default_value_t = 256)]
        examples: usize,
        /// The shared assets directory.
        #[arg(long)]
        assets: Option<PathBuf>,
    },
    /// Fuzz every reader (release build of `disha-fuzz`): seeded mutations of model, adapter,
    /// tokenizer, data and checkpoint files; report in target/fuzz/.
    Fuzz {
        /// Cases to run.
        #[arg(long, default_value_t = 100_000)]
        cases: u64,
        /// Seed of the run (a case is reproducible from seed and index).
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Only these targets (comma-separated; `cargo run -p disha-fuzz -- --list`).
        #[arg(long)]
        targets: Option<String>,
    },
    /// Pre-train the embedded demo model (tiny byte-level Llama, a+b and a-b) and write it with
    /// the fine-tuning data under assets/demo/ (release build; about 5 minutes on 2 cores).
    MakeDemo {
        /// Pre-training steps.
        #[arg(long, default_value_t = 4000)]
        steps: usize,
    },
}

/// One step: a label, a program, its arguments, and extra environment variables.
struct Step {
    label: &'static str,
    args: &'static [&'static str],
    env: &'static [(&'static str, &'static str)],
}

/// The CI steps. The test step is the README's test command.
const CI_STEPS: &[Step] = &[
    Step {
        label: "format",
        args: &["fmt", "--all", "--check"],
        env: &[],
    },
    Step {
        label: "clippy",
        args: &[
            "clippy",
            "--workspace",
            "--all-targets",
            "--",
            "-D",
            "warnings",
        ],
        env: &[],
    },
    Step {
        label: "tests (README: cargo test --workspace)",
        args: &["test", "--workspace"],
        env: &[],
    },
];

/// The opt-in features (burn-train's `TrainStep` / `InferenceStep`, the WGPU and CUDA backends
/// with the CubeCL kernels, Fusion), all linted in one check build so the Burn stack is built
/// once more, not once per feature. CUDA builds normally need `nvcc` or LLVM at build time;
/// `DOCS_RS=1` with an explicit `CUDARC_CUDA_VERSION` type-checks without either.
const FEATURE_CHECK_STEPS: &[Step] = &[Step {
    label: "clippy, every opt-in feature (burn-train, wgpu, cuda, fusion, autotune)",
    args: &[
        "clippy",
        "-p",
        "disha-core",
        "-p",
        "disha-models",
        "-p",
        "disha-train",
        "--features",
        "disha-train/burn-train,disha-train/wgpu,disha-train/cuda,disha-train/fusion,disha-train/autotune",
        "--all-targets",
        "--",
        "-D",
        "warnings",
    ],
    env: &[("DOCS_RS", "1"), ("CUDARC_CUDA_VERSION", "12080")],
}];

/// The CubeCL kernels run on the CPU through WGPU over Mesa's software Vulkan driver (lavapipe:
/// `apt-get install mesa-vulkan-drivers libvulkan1`): the kernel suite against the reference,
/// the Llama adapter goldens (logits, gradients, 3 SGD steps) with the kernels active, the
/// RWKV-7 goldens (logits, states, RWKV-PEFT merges, half compute) through the WKV kernels,
/// and burn-train's step. One invocation, so the test targets share one WGPU build of the Burn
/// stack (about 15 minutes on CI's 2 cores, on top of the steps before; the tests take 1).
const KERNEL_TEST_STEPS: &[Step] = &[Step {
    label: "kernel suite + Llama / RWKV-7 goldens + burn-train step on WGPU (lavapipe)",
    args: &[
        "test",
        "-p",
        "disha-core",
        "-p",
        "disha-models",
        "--features",
        "disha-core/wgpu,disha-models/wgpu,disha-models/burn-train",
        "--test",
        "kernels",
        "--test",
        "llama_adapters",
        "--test",
        "rwkv7",
        "--test",
        "rwkv_peft",
        "--test",
        "burn_train",
    ],
    env: &[],
}];

/// Where the Vulkan loader looks for driver (ICD) manifests.
const VULKAN_ICD_DIRS: [&str; 3] = [
    "/usr/share/vulkan/icd.d",
    "/usr/local/share/vulkan/icd.d",
    "/etc/vulkan/icd.d",
];

/// Whether a Vulkan driver (lavapipe or a GPU's) is installed for the kernel tests.
fn vulkan_driver_installed() -> bool {
    let listed = ["VK_ICD_FILENAMES", "VK_DRIVER_FILES"]
        .iter()
        .any(|var| std::env::var_os(var).is_some_and(|v| !v.is_empty()));
    listed
        || VULKAN_ICD_DIRS.iter().any(|dir| {
            std::fs::read_dir(dir).is_ok_and(|entries| {
                entries
                    .flatten()
                    .any(|e| e.path().extension().is_some_and(|x| x == "json"))
            })
        })
}

/// `target/xdg-runtime`, created private (mode 0700, as the XDG spec asks), given to every
/// cargo step where the environment has no runtime directory (the kernel tests open Vulkan
/// devices, and Mesa complains without one); `None` if it cannot be made.
fn private_runtime_dir() -> Option<PathBuf> {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../target/xdg-runtime");
    std::fs::create_dir_all(&dir).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).ok()?;
    }
    Some(dir)
}

fn run(step: &Step) -> bool {
    run_with_env(step.label, step.args, step.env)
}

fn run_with_env(label: &str, args: &[&str], env: &[(&str, &str)]) -> bool {
    println!("\n==> {label} : cargo {}", args.join(" "));
    let start = Instant::now();
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let mut command = Command::new(cargo);
    command.args(args).envs(env.iter().copied());
    if std::env::var_os("XDG_RUNTIME_DIR").is_none()
        && let Some(dir) = private_runtime_dir()
    {
        // Mesa's Vulkan driver prints an error for every device opened without one.
        command.env("XDG_RUNTIME_DIR", dir);
    }
    let status = command.status();
    let ok = matches!(status, Ok(s) if s.success());
    println!(
        "<== {label} : {} in {:.0?}",
        if ok { "ok" } else { "FAILED" },
        start.elapsed()
    );
    if let Err(e) = status {
        eprintln!("could not start cargo: {e}");
    }
    ok
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Task::Converge {
        steps,
        examples,
        assets,
    } = &cli.command
    {
        return match converge::run(*steps, *examples, assets.clone()) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("xtask converge: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Task::Fuzz {
        cases,
        seed,
        targets,
    } = &cli.command
    {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let out = root.join("target/fuzz");
        if let Err(e) = std::fs::create_dir_all(&out) {
            eprintln!("xtask fuzz: {}: {e}", out.display());
            return ExitCode::FAILURE;
        }
        let report = out.join(format!("report-seed{seed}.json"));
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut command = Command::new(cargo);
        command
            .args(["run", "--release", "-p", "disha-fuzz", "--"])
            .args(["--cases", &cases.to_string(), "--seed", &seed.to_string()])
            .args(["--json", &report.to_string_lossy()])
            .current_dir(&root);
        if let Some(targets) = targets {
            command.args(["--targets", targets]);
        }
        return match command.status() {
            Ok(s) if s.success() => {
                println!("report: {}", report.display());
                ExitCode::SUCCESS
            }
            _ => {
                eprintln!("xtask fuzz: failures (report: {})", report.display());
                ExitCode::FAILURE
            }
        };
    }
    if let Task::Bench { which, .. } = &cli.command
        && which == "gpu"
    {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        return match gpu_bench::prepare(&root) {
            Ok(out) => {
                println!(
                    "ready: {}/ (two binaries, peft_gpu.py and run.sh). On the GPU machine: sh run.sh",
                    out.display()
                );
                ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("xtask bench gpu: {e}");
                ExitCode::FAILURE
            }
        };
    }
    if let Task::MakeDemo { steps } = &cli.command {
        let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let status = Command::new(cargo)
            .args([
                "run",
                "--release",
                "-p",
                "disha-train",
                "--example",
                "make_demo",
                "--",
            ])
            .args(["--out", "assets/demo", "--steps", &steps.to_string()])
            .current_dir(&root)
            .status();
        return match status {
            Ok(s) if s.success() => {
                println!("assets/demo rebuilt; `disha train` embeds it at the next build");
                ExitCode::SUCCESS
            }
            _ => {
                eprintln!("xtask make-demo: the make_demo example failed");
                ExitCode::FAILURE
            }
        };
    }
    let steps: Vec<&Step> = match &cli.command {
        Task::Ci {
            skip_feature_check,
            skip_kernels,
            kernels,
        } => {
            // Without a Vulkan driver WGPU falls back to OpenGL, whose limits (8 storage buffers
            // per shader stage) refuse the WKV-7 backward kernel with a bare "Validation Error",
            // so the kernel step needs one.
            let no_driver = format!(
                "no Vulkan driver found (no ICD file in {VULKAN_ICD_DIRS:?}, VK_ICD_FILENAMES / \
                 VK_DRIVER_FILES unset); install lavapipe with `apt-get install \
                 mesa-vulkan-drivers libvulkan1`"
            );
            let run_kernels = !skip_kernels && vulkan_driver_installed();
            if *kernels && !run_kernels {
                eprintln!("xtask ci --kernels: {no_driver}");
                return ExitCode::FAILURE;
            }
            if !skip_kernels && !run_kernels {
                println!("xtask ci: SKIPPED the kernel step on WGPU: {no_driver}");
            }
            let all = !*kernels;
            CI_STEPS
                .iter()
                .filter(|_| all)
                .chain(
                    FEATURE_CHECK_STEPS
                        .iter()
                        .filter(|_| all && !skip_feature_check),
                )
                .chain(KERNEL_TEST_STEPS.iter().filter(|_| run_kernels))
                .collect()
        }
        Task::Converge { .. } | Task::MakeDemo { .. } | Task::Fuzz { .. } => {
            unreachable!("handled above")
        }
        Task::Bench { which, args } => {
            let (label, package, bench) = match which.as_str() {
                "adapters" => (
                    "bench: adapted linear, every method",
                    "disha-core",
                    "adapted_linear",
                ),
                "models" => (
                    "bench: SmolLM2-135M prefill, decode, Bone/LoRA train step",
                    "disha-models",
                    "llama",
                ),
                "rwkv" => (
                    "bench: RWKV-7 834K and 0.1B shape: prefill, decode, Bone/LoRA/BAT train step, memory",
                    "disha-models",
                    "rwkv",
                ),
                "kernels" => (
                    "bench: fused vs unfused Bone / BAT, fwd+bwd, default device",
                    "disha-core",
                    "kernels",
                ),
                "compare" => (
                    "bench: disha vs PyTorch + PEFT, one training step",
                    "disha-train",
                    "compare",
                ),
                "memory" => (
                    "bench: resident memory per base dtype, real-size Llama, one Bone step",
                    "disha-train",
                    "memory",
                ),
                other => {
                    eprintln!(
                        "unknown benchmark `{other}` (available: adapters, models, rwkv, kernels, compare, memory, gpu)"
                    );
                    return ExitCode::from(2);
                }
            };
            // Everything after `--` goes to the benchmark binary.
            let mut command = vec!["bench", "-p", package, "--bench", bench];
            if !args.is_empty() {
                command.push("--");
                command.extend(args.iter().map(String::as_str));
            }
            return match run_with_env(label, &command, &[]) {
                true => ExitCode::SUCCESS,
                false => ExitCode::FAILURE,
            };
        }
    };
    let start = Instant::now();
    for step in steps {
        if !run(step) {
            eprintln!("\nxtask: step `{}` failed", step.label);
            return ExitCode::FAILURE;
        }
    }
    println!("\nxtask: all steps passed in {:.0?}", start.elapsed());
    ExitCode::SUCCESS
}
