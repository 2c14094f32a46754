//! `disha-fuzz`: seeded mutation fuzzing of every disha reader, in-process, with a live-heap
//! ceiling, a per-case timeout and crash isolation.
//!
//! Each case takes a valid input for one reader (a model directory, a GGUF or llama2.c file,
//! a PEFT adapter, a tokenizer, JSONL data, a run config, a checkpoint), mutates it — bit flips,
//! truncation, insertion, numeric header fields and JSON / TOML values replaced by boundary
//! values, huge strings and arrays — and calls the library's entry points on it. A case passes
//! when they return `Ok` or a typed error within the time limit, without a panic and without
//! the worker's live heap crossing the ceiling (a counting global allocator refuses the
//! allocation; the worker aborts and the supervisor reports the case and starts a new worker).
//!
//! ```text
//! disha-fuzz --cases 20000 --seed 7            # a long run (cargo xtask fuzz)
//! disha-fuzz --targets gguf,llama2c --cases 500
//! disha-fuzz reproduce --seed 7 --case 1234 --out /tmp/case   # a failure, in the foreground
//! ```
//!
//! The book's "Limits and errors" page describes the harness and its last measured totals.

mod mutate;
mod runner;
mod seeds;
mod targets;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use cap::Cap;
use clap::{Parser, Subcommand};

/// Counts live heap bytes; workers set a ceiling on it.
#[global_allocator]
static ALLOCATOR: Cap<std::alloc::System> = Cap::new(std::alloc::System, usize::MAX);

#[derive(Parser, Debug)]
#[command(about = "Seeded mutation fuzzing of every disha reader")]
struct Cli {
    #[command(flatten)]
    plan: PlanArgs,
    /// Write the report as JSON here.
    #[arg(long, global = true)]
    json: Option<PathBuf>,
    /// List the targets and exit.
    #[arg(long)]
    list: bool,
    #[command(subcommand)]
    command: Option<Mode>,
}

#[derive(clap::Args, Debug, Clone)]
struct PlanArgs {
    /// Cases to run; case i exercises target i mod (number of targets).
    #[arg(long, default_value_t = 2000, global = true)]
    cases: u64,
    /// Seed of the run: a case is fully determined by (seed, case, targets).
    #[arg(long, default_value_t = 1, global = true)]
    seed: u64,
    /// Only these targets (comma-separated; see --list).
    #[arg(long, value_delimiter = ',', global = true)]
    targets: Vec<String>,
    /// Live-heap ceiling of a worker, in MiB above what it holds before the first case.
    #[arg(long, default_value_t = 1024, global = true)]
    alloc_limit_mib: usize,
    /// A case running longer than this is killed and reported as a hang (seconds).
    #[arg(long, default_value_t = 30, global = true)]
    timeout_secs: u64,
    /// A case finishing later than this is reported as slow (milliseconds).
    #[arg(long, default_value_t = 5000, global = true)]
    slow_ms: u64,
}

#[derive(Subcommand, Debug)]
enum Mode {
    /// Run cases from --from on in this process, reporting on stdout (started by the
    /// supervisor).
    #[command(hide = true)]
    Worker {
        /// First case.
        #[arg(long)]
        from: u64,
        /// Live-heap ceiling above the baseline, bytes.
        #[arg(long)]
        alloc_limit: usize,
    },
    /// Write one case's input files to a directory and run it in the foreground.
    Reproduce {
        /// The case.
        #[arg(long)]
        case: u64,
        /// Where to write its files.
        #[arg(long)]
        out: PathBuf,
    },
}

fn plan(args: &PlanArgs) -> runner::Plan {
    runner::Plan {
        cases: args.cases,
        seed: args.seed,
        targets: args.targets.clone(),
        alloc_limit: args.alloc_limit_mib << 20,
        timeout: Duration::from_secs(args.timeout_secs),
        slow: Duration::from_millis(args.slow_ms),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let plan = plan(&cli.plan);
    let targets = match targets::select(&plan.targets) {
        Ok(t) => t,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    if cli.list {
        for t in &targets {
            println!("{:<22} {}", t.name, t.about);
        }
        return ExitCode::SUCCESS;
    }
    match cli.command {
        Some(Mode::Worker { from, alloc_limit }) => {
            let baseline = ALLOCATOR.allocated();
            runner::work(&plan, &targets, from, &|| {
                // The ceiling is set once the seeds exist (first call), relative to them.
                if ALLOCATOR.limit() == usize::MAX {
                    let _ = ALLOCATOR.set_limit(ALLOCATOR.allocated().max(baseline) + alloc_limit);
                }
                (ALLOCATOR.allocated(), ALLOCATOR.max_allocated())
            });
            ExitCode::SUCCESS
        }
        Some(Mode::Reproduce { case, out }) => {
            match runner::reproduce(&plan, &targets, case, &out) {
                Ok(()) => println!("case {case}: Ok"),
                Err(e) => println!("case {case}: typed error: {e}"),
            }
            ExitCode::SUCCESS
        }
        None => {
            eprintln!(
                "disha-fuzz: {} cases over {} targets, seed {}",
                plan.cases,
                targets.len(),
                plan.seed
            );
            let real: Vec<_> = targets
                .iter()
                .filter(|t| !t.name.starts_with("selftest-"))
                .copied()
                .collect();
            if let Err(e) = targets::check_seeds(&targets::Context::new(), &real) {
                eprintln!("error: {e}");
                return ExitCode::FAILURE;
            }
            let report = runner::supervise(&plan, &targets, true);
            print!("{}", report.table());
            let total = report.total();
            println!(
                "{} cases in {:.1} s ({} worker processes); panics {}, aborts {}, hangs {}, slow {}; \
                 largest live heap {:.1} MiB",
                total.cases,
                report.seconds,
                report.workers,
                total.panics,
                total.aborts,
                total.hangs,
                total.slow,
                total.peak_bytes as f64 / (1 << 20) as f64
            );
            for f in report.failures.iter().take(20) {
                println!(
                    "FAILED case {} ({}): {}: {}\n  reproduce: disha-fuzz reproduce {} --case {} --out /tmp/disha-case-{}",
                    f.case,
                    f.target,
                    f.outcome,
                    f.detail,
                    plan.args().join(" "),
                    f.case,
                    f.case
                );
            }
            if let Some(path) = &cli.json
                && let Err(e) = std::fs::write(
                    path,
                    serde_json::to_string_pretty(&report).expect("the report serializes"),
                )
            {
                eprintln!("error: {}: {e}", path.display());
                return ExitCode::FAILURE;
            }
            if report.failures.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
    }
}
