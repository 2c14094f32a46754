//! The fuzzing harness as CI runs it: a fixed seed, every target, thousands of cases, and no
//! case may panic, abort, hang, run slow or fail with an error that does not name its input.
//! A second test proves the harness catches each of those failure classes.

use std::path::Path;
use std::process::Command;

/// Runs the harness binary with `args` plus a JSON report; returns (success, report).
fn harness(args: &[&str], dir: &Path) -> (bool, serde_json::Value) {
    let json = dir.join("report.json");
    let out = Command::new(env!("CARGO_BIN_EXE_disha-fuzz"))
        .args(args)
        .args(["--json", json.to_str().unwrap()])
        .output()
        .expect("the harness runs");
    let stdout = String::from_utf8_lossy(&out.stdout);
    let stderr = String::from_utf8_lossy(&out.stderr);
    println!("{stdout}");
    let report = std::fs::read_to_string(&json)
        .unwrap_or_else(|e| panic!("no report ({e}): {stdout}\n{stderr}"));
    (out.status.success(), serde_json::from_str(&report).unwrap())
}

/// The CI run: the case count is set so it stays within about a minute on 2 cores in a debug
/// build (`cargo xtask fuzz` runs longer campaigns in release).
#[test]
fn every_reader_survives_thousands_of_mutated_inputs() {
    let dir = tempfile::tempdir().unwrap();
    let cases = std::env::var("DISHA_FUZZ_CASES").unwrap_or_else(|_| "20000".into());
    let (success, report) = harness(&["--cases", &cases, "--seed", "1"], dir.path());
    let failures = &report["failures"];
    assert!(success, "failures: {failures:#}");
    assert_eq!(failures.as_array().unwrap().len(), 0);
    let targets = report["targets"].as_object().unwrap();
    assert_eq!(targets.len(), 21, "{:?}", targets.keys());
    for (name, t) in targets {
        let cases = t["cases"].as_u64().unwrap();
        assert!(cases >= 100, "{name}: {cases} cases");
        // Mutations that never get past the first check would test nothing beyond it.
        assert!(t["ok"].as_u64().unwrap() > 0, "{name}: no case accepted");
        assert!(t["errors"].as_u64().unwrap() > 0, "{name}: no case refused");
    }
}

#[test]
fn the_harness_catches_every_failure_class() {
    let dir = tempfile::tempdir().unwrap();
    let (success, report) = harness(
        &[
            "--cases",
            "5",
            "--targets",
            "selftest-panic,selftest-alloc,selftest-hang,selftest-slow,selftest-unnamed",
            "--timeout-secs",
            "3",
            "--slow-ms",
            "1000",
        ],
        dir.path(),
    );
    assert!(!success, "the harness must fail: {report:#}");
    let outcomes: Vec<(String, String)> = report["failures"]
        .as_array()
        .unwrap()
        .iter()
        .map(|f| {
            (
                f["target"].as_str().unwrap().to_string(),
                f["outcome"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    for (target, outcome) in [
        ("selftest-panic", "panic"),
        ("selftest-alloc", "abort"),
        ("selftest-hang", "hang"),
        ("selftest-slow", "slow"),
        ("selftest-unnamed", "unnamed"),
    ] {
        assert!(
            outcomes.contains(&(target.to_string(), outcome.to_string())),
            "{target} not reported as {outcome}: {outcomes:?}"
        );
    }
    // The allocation was refused by the ceiling, and the supervisor says so.
    let abort = report["failures"]
        .as_array()
        .unwrap()
        .iter()
        .find(|f| f["outcome"] == "abort")
        .unwrap();
    assert!(
        abort["detail"]
            .as_str()
            .unwrap()
            .contains("memory allocation"),
        "{abort:#}"
    );
}
