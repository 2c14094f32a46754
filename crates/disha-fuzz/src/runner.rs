//! Running cases: a worker process runs them in order and reports each on stdout; the
//! supervisor (the process the user started) restarts the worker after a panic, an abort or a
//! hang, so one bad case never stops the run, and collects the report.
//!
//! Protocol, one line per event on the worker's stdout: `start <case>` before a case,
//! `done <case> <outcome> <millis> <peak bytes> <message>` after it, where the outcome is `ok`,
//! `error` (a typed error: what bad input must get) or `panic` (the worker exits after
//! reporting one). A case that starts and never reports is an abort (the worker died: an
//! allocation above the ceiling, a stack overflow, an abort in native code) or, past the
//! timeout, a hang (the worker is killed).

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::sync::mpsc::{RecvTimeoutError, channel};
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::mutate::Rng;
use crate::targets::{COMPUTED, Context, Target};

/// What one run of the harness is asked to do.
#[derive(Clone, Debug)]
pub struct Plan {
    /// Cases to run.
    pub cases: u64,
    /// The run's seed: case `i` is fully determined by `(seed, i, targets)`.
    pub seed: u64,
    /// Target names (empty: all); case `i` exercises target `i mod len`.
    pub targets: Vec<String>,
    /// Live-heap ceiling of a worker, bytes above its baseline.
    pub alloc_limit: usize,
    /// A case running longer than this is killed and reported as a hang.
    pub timeout: Duration,
    /// A case that finishes but takes longer than this is reported as slow.
    pub slow: Duration,
}

impl Plan {
    /// The arguments that reproduce this plan in a worker or a `reproduce` command.
    pub fn args(&self) -> Vec<String> {
        let mut args = vec![
            "--seed".to_string(),
            self.seed.to_string(),
            "--cases".into(),
            self.cases.to_string(),
        ];
        if !self.targets.is_empty() {
            args.extend(["--targets".into(), self.targets.join(",")]);
        }
        args
    }
}

/// The random source of case `case`.
pub fn case_rng(seed: u64, case: u64) -> Rng {
    Rng::new(seed ^ case.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ 0xD15A)
}

/// What happened to one case.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Outcome {
    /// The input was accepted.
    Ok,
    /// The input was refused with a typed error naming it.
    Error,
    /// The input was refused with a typed error that does not name the file.
    Unnamed,
    /// A computation on finite but extreme input values failed with a typed error naming the
    /// step or layer (a NaN loss, a merged weight out of range).
    Computed,
    /// A panic (caught only to report it).
    Panic,
    /// The worker process died.
    Abort,
    /// The case exceeded the timeout.
    Hang,
}

/// Totals of one target.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Totals {
    /// Cases run.
    pub cases: u64,
    /// Accepted.
    pub ok: u64,
    /// Refused with a typed error naming the input.
    pub errors: u64,
    /// Refused with a typed error that names neither the file nor its directory.
    pub unnamed: u64,
    /// Accepted, then a computation on its extreme values failed with a typed error naming
    /// the step or layer.
    pub computed: u64,
    /// Panics.
    pub panics: u64,
    /// Aborts.
    pub aborts: u64,
    /// Hangs.
    pub hangs: u64,
    /// Finished, but slower than the slow threshold.
    pub slow: u64,
    /// Slowest case, milliseconds.
    pub max_millis: u64,
    /// Largest live heap seen in a worker while running this target's cases, bytes.
    pub peak_bytes: u64,
    /// The case that reached it.
    pub peak_case: u64,
}

/// A case that failed, with what the report says about it.
#[derive(Clone, Debug, Serialize)]
pub struct Failure {
    /// Case index.
    pub case: u64,
    /// Target name.
    pub target: String,
    /// What happened (`slow` included).
    pub outcome: String,
    /// The panic message, the worker's last stderr lines, or the time taken.
    pub detail: String,
}

/// The harness's report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Report {
    /// Per target.
    pub targets: BTreeMap<String, Totals>,
    /// Every failure.
    pub failures: Vec<Failure>,
    /// Wall time of the whole run, seconds.
    pub seconds: f64,
    /// Worker processes started.
    pub workers: u64,
}

impl Report {
    /// Sum over the targets.
    pub fn total(&self) -> Totals {
        let mut t = Totals::default();
        for x in self.targets.values() {
            t.cases += x.cases;
            t.ok += x.ok;
            t.errors += x.errors;
            t.unnamed += x.unnamed;
            t.computed += x.computed;
            t.panics += x.panics;
            t.aborts += x.aborts;
            t.hangs += x.hangs;
            t.slow += x.slow;
            t.max_millis = t.max_millis.max(x.max_millis);
            if x.peak_bytes > t.peak_bytes {
                t.peak_bytes = x.peak_bytes;
                t.peak_case = x.peak_case;
            }
        }
        t
    }

    /// A markdown table of the totals.
    pub fn table(&self) -> String {
        let mut out = String::from(
            "| target | cases | ok | typed errors | computed | unnamed | panics | aborts | hangs | slow | slowest ms | peak heap MiB |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        );
        let row = |name: &str, t: &Totals| {
            format!(
                "| {name} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {:.1} |\n",
                t.cases,
                t.ok,
                t.errors,
                t.computed,
                t.unnamed,
                t.panics,
                t.aborts,
                t.hangs,
                t.slow,
                t.max_millis,
                t.peak_bytes as f64 / (1 << 20) as f64
            )
        };
        for (name, t) in &self.targets {
            out.push_str(&row(name, t));
        }
        out.push_str(&row("**all**", &self.total()));
        out
    }
}

/// The panic message of the last panic on this process (set by the hook the worker installs).
static LAST_PANIC: Mutex<String> = Mutex::new(String::new());

/// Runs cases `from..plan.cases` in this process, reporting each on stdout (the worker side).
pub fn work(plan: &Plan, targets: &[Target], from: u64, alloc: &dyn Fn() -> (usize, usize)) {
    std::panic::set_hook(Box::new(|info| {
        let message = format!("{info}").replace('\n', " ");
        *LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()) = message;
    }));
    let ctx = Context::new();
    let scratch = tempfile::tempdir().expect("a scratch directory");
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "ready");
    let _ = out.flush();
    for case in from..plan.cases {
        let target = targets[(case % targets.len() as u64) as usize];
        let dir = scratch.path().join(format!("case-{case}"));
        std::fs::create_dir_all(&dir).expect("case directory");
        let _ = writeln!(out, "start {case}");
        let _ = out.flush();
        let (_, peak_before) = alloc();
        let start = Instant::now();
        let mut mutated = PathBuf::new();
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let mut rng = case_rng(plan.seed, case);
            mutated = target.prepare_case(&ctx, &mut rng, &dir);
            target.run(&ctx, &mut rng, &dir)
        }));
        let millis = start.elapsed().as_millis();
        let (_, peak_after) = alloc();
        // The process-wide peak only moves when this case set a new one.
        let peak = if peak_after > peak_before {
            peak_after
        } else {
            0
        };
        let (outcome, message) = match result {
            Ok(Ok(())) => ("ok", String::new()),
            Ok(Err(message)) if message.starts_with(COMPUTED) => {
                ("computed", message[COMPUTED.len()..].to_string())
            }
            // An error must point the user at the input: the file (or its directory) by name.
            Ok(Err(message)) if names_the_input(&message, &dir, &mutated) => ("error", message),
            Ok(Err(message)) => ("unnamed", message),
            Err(_) => (
                "panic",
                LAST_PANIC.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            ),
        };
        let message = message.replace(['\n', '\r'], " ");
        let _ = writeln!(out, "done {case} {outcome} {millis} {peak} {message}");
        let _ = out.flush();
        let _ = std::fs::remove_dir_all(&dir);
        if outcome == "panic" {
            // A panic can leave locks poisoned and state half-updated: start afresh.
            std::process::exit(3);
        }
    }
}

/// Whether an error message names the mutated file or a directory holding it (below the case
/// directory).
fn names_the_input(message: &str, case_dir: &Path, mutated: &Path) -> bool {
    let full = case_dir.join(mutated);
    full.ancestors()
        .take_while(|p| p.starts_with(case_dir) && *p != case_dir)
        .chain([case_dir])
        .any(|p| message.contains(&*p.to_string_lossy()))
}

/// Runs the plan in worker processes and collects the report (the supervisor side).
pub fn supervise(plan: &Plan, targets: &[Target], progress: bool) -> Report {
    let start = Instant::now();
    let mut report = Report::default();
    for t in targets {
        report.targets.insert(t.name.to_string(), Totals::default());
    }
    let stderr_dir = tempfile::tempdir().expect("a scratch directory");
    let mut next = 0;
    while next < plan.cases {
        report.workers += 1;
        let stderr_path = stderr_dir
            .path()
            .join(format!("worker-{}.txt", report.workers));
        let mut child = Command::new(std::env::current_exe().expect("the harness binary"))
            .arg("worker")
            .args(plan.args())
            .args(["--from", &next.to_string()])
            .args(["--alloc-limit", &plan.alloc_limit.to_string()])
            // Abort messages ("memory allocation of N bytes failed") without backtraces.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(std::fs::File::create(&stderr_path).expect("stderr file"))
            .spawn()
            .expect("start a worker");
        let stdout = child.stdout.take().expect("piped stdout");
        let (tx, rx) = channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        // Seeds are built before the first case: allow for that.
        let mut deadline = Instant::now() + plan.timeout.max(Duration::from_secs(120));
        let mut current: Option<u64> = None;
        loop {
            let wait = deadline.saturating_duration_since(Instant::now());
            match rx.recv_timeout(wait) {
                Ok(line) => {
                    let mut parts = line.splitn(6, ' ');
                    match parts.next() {
                        Some("start") => {
                            current = parts.next().and_then(|c| c.parse().ok());
                            deadline = Instant::now() + plan.timeout;
                        }
                        Some("done") => {
                            let case: u64 =
                                parts.next().and_then(|c| c.parse().ok()).unwrap_or(next);
                            let outcome = parts.next().unwrap_or("");
                            let millis: u64 =
                                parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
                            let peak: u64 = parts.next().and_then(|c| c.parse().ok()).unwrap_or(0);
                            let message = parts.next().unwrap_or("").to_string();
                            let target = targets[(case % targets.len() as u64) as usize].name;
                            let outcome = match outcome {
                                "ok" => Outcome::Ok,
                                "error" => Outcome::Error,
                                "unnamed" => Outcome::Unnamed,
                                "computed" => Outcome::Computed,
                                _ => Outcome::Panic,
                            };
                            record(
                                &mut report,
                                plan,
                                case,
                                target,
                                outcome,
                                millis,
                                peak,
                                message,
                            );
                            current = None;
                            next = case + 1;
                            if progress && next.is_multiple_of(500) {
                                eprintln!(
                                    "  {next}/{} cases, {:.0} s",
                                    plan.cases,
                                    start.elapsed().as_secs_f64()
                                );
                            }
                        }
                        _ => {}
                    }
                }
                Err(RecvTimeoutError::Timeout) => {
                    let _ = child.kill();
                    let _ = child.wait();
                    if let Some(case) = current {
                        let target = targets[(case % targets.len() as u64) as usize].name;
                        let detail = format!("killed after {} s", plan.timeout.as_secs());
                        record(&mut report, plan, case, target, Outcome::Hang, 0, 0, detail);
                        next = case + 1;
                    } else {
                        panic!(
                            "a worker did not start within its deadline: {}",
                            tail(&stderr_path)
                        );
                    }
                    break;
                }
                Err(RecvTimeoutError::Disconnected) => {
                    let status = child.wait().expect("wait for the worker");
                    if let Some(case) = current {
                        let target = targets[(case % targets.len() as u64) as usize].name;
                        let detail = format!("worker {status}: {}", tail(&stderr_path));
                        record(
                            &mut report,
                            plan,
                            case,
                            target,
                            Outcome::Abort,
                            0,
                            0,
                            detail,
                        );
                        next = case + 1;
                    } else if next < plan.cases && !status.success() && status.code() != Some(3) {
                        panic!(
                            "a worker failed between cases ({status}): {}",
                            tail(&stderr_path)
                        );
                    }
                    break;
                }
            }
        }
    }
    report.seconds = start.elapsed().as_secs_f64();
    report
}

#[allow(clippy::too_many_arguments)]
fn record(
    report: &mut Report,
    plan: &Plan,
    case: u64,
    target: &str,
    outcome: Outcome,
    millis: u64,
    peak: u64,
    message: String,
) {
    let t = report.targets.entry(target.to_string()).or_default();
    t.cases += 1;
    t.max_millis = t.max_millis.max(millis);
    if peak > t.peak_bytes {
        t.peak_bytes = peak;
        t.peak_case = case;
    }
    let failure = |outcome: &str, detail: String| Failure {
        case,
        target: target.to_string(),
        outcome: outcome.to_string(),
        detail,
    };
    match outcome {
        Outcome::Ok => t.ok += 1,
        Outcome::Error => t.errors += 1,
        Outcome::Computed => t.computed += 1,
        Outcome::Unnamed => {
            t.unnamed += 1;
            report.failures.push(failure("unnamed", message.clone()));
        }
        Outcome::Panic => {
            t.panics += 1;
            report.failures.push(failure("panic", message.clone()));
        }
        Outcome::Abort => {
            t.aborts += 1;
            report.failures.push(failure("abort", message.clone()));
        }
        Outcome::Hang => {
            t.hangs += 1;
            report.failures.push(failure("hang", message.clone()));
        }
    }
    if matches!(
        outcome,
        Outcome::Ok | Outcome::Error | Outcome::Unnamed | Outcome::Computed
    ) && millis > plan.slow.as_millis() as u64
    {
        let t = report.targets.get_mut(target).expect("inserted above");
        t.slow += 1;
        report.failures.push(failure(
            "slow",
            format!("{millis} ms ({outcome:?}: {message})"),
        ));
    }
}

/// The last lines of a worker's stderr (the abort message is there).
fn tail(path: &Path) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().rev().take(3).collect();
    lines.into_iter().rev().collect::<Vec<_>>().join(" | ")
}

/// Writes case `case`'s files to `out` and runs it in this process (no catching): the
/// command a failure report tells you to run.
pub fn reproduce(plan: &Plan, targets: &[Target], case: u64, out: &Path) -> Result<(), String> {
    let ctx = Context::new();
    let target = targets[(case % targets.len() as u64) as usize];
    std::fs::create_dir_all(out).map_err(|e| format!("{}: {e}", out.display()))?;
    let mut rng = case_rng(plan.seed, case);
    let file: PathBuf = target.prepare_case(&ctx, &mut rng, out);
    eprintln!(
        "case {case}: target {} ({}), mutated file {}",
        target.name,
        target.about,
        out.join(file).display()
    );
    target.run(&ctx, &mut rng, out)
}
