//! Regressions of the hardening work, through the `disha` binary: every class of bad input a
//! hostile user found gets one clear error line naming the file, field or line — never a panic
//! or an abort — and a run that fails early leaves nothing half-written. (The format readers'
//! own regressions are unit tests next to them; the fuzzing harness in `crates/disha-fuzz`
//! covers the rest at random.)

mod common;

use std::path::{Path, PathBuf};

use common::{fails, fails_late, ok, s, tiny_byte_level_config, tiny_run_inputs, tiny_train_args};
use disha_models::llama::{Llama, LlamaConfig};

/// Writes a random tiny Llama of `config` (weights `N(0, 0.2²)`) as an HF directory; with
/// `final_norm` set, the final RMSNorm's weights all take that value.
fn model_dir(dir: &Path, name: &str, config: &LlamaConfig, final_norm: Option<f32>) -> PathBuf {
    let device = burn::tensor::Device::default();
    let mut model = Llama::from_source(
        config,
        &mut disha_models::RandomWeights::new(config, 0.2, 1),
        &device,
    )
    .unwrap();
    if let Some(value) = final_norm {
        let gamma =
            burn::tensor::Tensor::<1>::ones([config.hidden_size], &device).mul_scalar(value);
        model.norm.gamma = burn::module::Param::from_tensor(gamma).set_require_grad(false);
    }
    let out = dir.join(name);
    disha_models::export_merged(&model.into(), &config.to_hf_json(), &[], &out).unwrap();
    out
}

/// Ids past the model's vocabulary once panicked inside the backend's gather in `train` and
/// `eval --metric loss`, and the failed run left its directory behind.
#[test]
fn a_tokenizer_beyond_the_model_vocabulary_is_refused_before_step_one() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, data) = tiny_run_inputs(tmp.path());
    // 200 ids, while the byte-level tokenizer produces up to 258 (`<|pad|>`).
    let config = LlamaConfig {
        vocab_size: 200,
        ..tiny_byte_level_config()
    };
    let model = model_dir(tmp.path(), "small-vocab", &config, None);
    let out = tmp.path().join("run");
    let err = fails_late(&tiny_train_args(&model, &data, &out, "5"));
    assert!(
        err.contains("byte-level") && err.contains("produces id 258") && err.contains("200 tokens"),
        "{err}"
    );
    assert!(!out.exists(), "the failed run left {}", out.display());
    let err = fails(&[
        "eval",
        "--model",
        s(&model),
        "--tokenizer",
        "byte-level",
        "--data",
        s(&data),
        "--fields",
        "gsm8k",
        "--template",
        "raw",
        "--metric",
        "loss",
    ]);
    assert!(err.contains("produces id 258"), "{err}");
}

/// A run that fails before its first step (here: a final norm so large that the logits
/// overflow and the first loss is NaN) removes what it created — the whole directory, or only
/// its own entries in a directory the user made.
#[test]
fn a_run_that_fails_before_its_first_step_leaves_nothing_behind() {
    let tmp = tempfile::tempdir().unwrap();
    let (_, data) = tiny_run_inputs(tmp.path());
    let model = model_dir(
        tmp.path(),
        "overflowing",
        &tiny_byte_level_config(),
        Some(1e38),
    );
    let out = tmp.path().join("run");
    let err = fails_late(&tiny_train_args(&model, &data, &out, "5"));
    assert!(err.contains("step 1") && err.contains("loss"), "{err}");
    assert!(!out.exists(), "the failed run left {}", out.display());

    let own = tmp.path().join("mine");
    std::fs::create_dir(&own).unwrap();
    std::fs::write(own.join("notes.txt"), "keep me").unwrap();
    fails_late(&tiny_train_args(&model, &data, &own, "5"));
    let left: Vec<String> = std::fs::read_dir(&own)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(left, ["notes.txt"]);
}

/// Edits `run/checkpoints/step-NNNNNN/state.json` with `edit`.
fn edit_state(dir: &Path, edit: impl FnOnce(&mut serde_json::Value)) {
    let path = dir.join("state.json");
    let mut state: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    edit(&mut state);
    std::fs::write(&path, state.to_string()).unwrap();
}

/// A checkpoint whose `state.json` claimed an absurd step once resumed "successfully"; now
/// every part of a checkpoint is checked against its run before anything is loaded.
#[test]
fn a_checkpoint_that_does_not_belong_to_its_run_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_run_inputs(tmp.path());
    let out = tmp.path().join("run");
    let mut args = tiny_train_args(&model, &data, &out, "12");
    args.extend(["--stop-after-steps", "8"]);
    ok(&args);
    let step4 = out.join("checkpoints/step-000004");
    let step8 = out.join("checkpoints/step-000008");
    assert!(step4.is_dir() && step8.is_dir());
    let resume = [
        "train",
        "--model",
        s(&model),
        "--tokenizer",
        "byte-level",
        "--resume",
        "--out",
        s(&out),
    ];
    let backup = tmp.path().join("backup");
    std::fs::create_dir(&backup).unwrap();
    for file in ["state.json", "optimizer.bpk"] {
        std::fs::copy(step8.join(file), backup.join(file)).unwrap();
    }
    let restore = || {
        for file in ["state.json", "optimizer.bpk"] {
            std::fs::copy(backup.join(file), step8.join(file)).unwrap();
        }
    };

    // (how the checkpoint is corrupted, what the refusal says)
    type Corruption<'a> = (Box<dyn Fn() + 'a>, &'a str);
    let cases: Vec<Corruption<'_>> = vec![
        (
            Box::new(|| edit_state(&step8, |v| v["step"] = 999_999_999u64.into())),
            "disagrees with the directory name",
        ),
        (
            Box::new(|| edit_state(&step8, |v| v["position"]["cursor"] = 1_000_000u64.into())),
            "past the 48 training examples",
        ),
        (
            Box::new(|| edit_state(&step8, |v| v["position"]["epoch"] = u64::MAX.into())),
            "cannot happen in 8 steps",
        ),
        (
            Box::new(|| edit_state(&step8, |v| v["param_ids"][1] = v["param_ids"][0].clone())),
            "parameter ids repeat",
        ),
        (
            Box::new(|| {
                std::fs::copy(step4.join("optimizer.bpk"), step8.join("optimizer.bpk")).unwrap();
            }),
            "AdamW has taken Some(4) steps, the checkpoint says 8",
        ),
        (
            Box::new(|| {
                let bytes = std::fs::read(backup.join("optimizer.bpk")).unwrap();
                std::fs::write(step8.join("optimizer.bpk"), &bytes[..bytes.len() / 2]).unwrap();
            }),
            "unreadable optimizer state",
        ),
        (
            Box::new(|| {
                let f = std::fs::File::options()
                    .append(true)
                    .open(step8.join("optimizer.bpk"))
                    .unwrap();
                f.set_len(1 << 40).unwrap();
            }),
            "the optimizer state of this adapter can take",
        ),
    ];
    for (corrupt, expected) in cases {
        corrupt();
        let err = fails_late(&resume);
        assert!(
            err.contains(expected) && err.contains("step-000008"),
            "{expected}: {err}"
        );
        restore();
    }

    // run.json is checked like the flags it came from.
    let run_json = out.join("run.json");
    let original = std::fs::read_to_string(&run_json).unwrap();
    let mut settings: serde_json::Value = serde_json::from_str(&original).unwrap();
    settings["batch_size"] = 0.into();
    std::fs::write(&run_json, settings.to_string()).unwrap();
    let err = fails_late(&resume);
    assert!(
        err.contains("run.json") && err.contains("batch_size"),
        "{err}"
    );
    std::fs::write(&run_json, original).unwrap();

    // Untouched, the run resumes.
    ok(&resume);

    // A run that stopped before its first checkpoint cannot be resumed, and says so.
    let early = tmp.path().join("early");
    let mut args = tiny_train_args(&model, &data, &early, "12");
    args.extend(["--stop-after-steps", "1"]);
    ok(&args);
    std::fs::remove_dir_all(early.join("checkpoints")).unwrap();
    let err = fails_late(&[
        "train",
        "--model",
        s(&model),
        "--tokenizer",
        "byte-level",
        "--resume",
        "--out",
        s(&early),
    ]);
    assert!(err.contains("no checkpoint to resume from"), "{err}");
    let err = fails_late(&tiny_train_args(&model, &data, &early, "12"));
    assert!(err.contains("stopped before its first checkpoint"), "{err}");
}

/// A 50 MB JSONL line once exhausted memory during tokenization (~177 bytes per input byte),
/// and `--skip-bad-lines` did not skip a non-UTF-8 line, whose error had no line number.
#[test]
fn long_and_non_utf8_lines_are_bad_lines_named_by_number() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, good) = tiny_run_inputs(tmp.path());
    let mut bytes = std::fs::read(&good).unwrap();
    bytes.extend(b"\n{\"question\": \"\xff\", \"answer\": \"1\"}\n{\"question\": \"");
    bytes.extend(std::iter::repeat_n(b'7', 50 << 20));
    bytes.extend(b"\", \"answer\": \"1\"}\n");
    let data = tmp.path().join("bad.jsonl");
    std::fs::write(&data, bytes).unwrap();

    let out = tmp.path().join("run");
    let err = fails_late(&tiny_train_args(&model, &data, &out, "2"));
    assert!(
        err.contains("bad.jsonl:49:") && err.contains("UTF-8") && err.contains("--skip-bad-lines"),
        "{err}"
    );
    let mut args = tiny_train_args(&model, &data, &out, "2");
    args.push("--skip-bad-lines");
    ok(&args);
    let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
    let last: serde_json::Value = serde_json::from_str(metrics.lines().last().unwrap()).unwrap();
    // Without the line limit this run held the 50 MB line and its tokenization (about 9 GB).
    let peak = last["peak_memory_mb"].as_f64().unwrap_or(0.0);
    assert!(peak < 1000.0, "peak memory {peak} MB");

    let out2 = tmp.path().join("run2");
    let mut args = tiny_train_args(&model, &data, &out2, "2");
    args.extend(["--max-line-bytes", "100000000"]);
    let err = fails_late(&args);
    assert!(err.contains(":49:"), "{err}");
    let mut args = tiny_train_args(&model, &good, &out2, "2");
    args.extend(["--max-line-bytes", "10"]);
    let err = fails_late(&args);
    assert!(
        err.contains("sums.jsonl:1:") && err.contains("longer than the maximum of 10"),
        "{err}"
    );
}
