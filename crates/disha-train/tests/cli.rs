//! End-to-end tests of the `disha` binary: exit codes, one-line errors, and the parity
//! outputs of `logits`, `merge` and `export-adapter` against the golden fixtures.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::{
    disha, fails, loss_values, losses, max_relative_diff, ok, s, tiny_run_inputs, tiny_train_args,
    write_sums,
};

fn fixtures() -> Option<PathBuf> {
    let root = std::env::var_os("DISHA_FIXTURES")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/fixtures"));
    if root.join("llama_tiny").is_dir() {
        return Some(root.join("llama_tiny"));
    }
    let reason = format!(
        "fixtures not found at {} (set DISHA_FIXTURES)",
        root.display()
    );
    assert!(
        std::env::var("DISHA_REQUIRE_FIXTURES").as_deref() != Ok("1"),
        "{reason}"
    );
    eprintln!("SKIPPED: {reason}");
    None
}

fn tensors(path: &Path) -> BTreeMap<String, (Vec<usize>, Vec<f32>)> {
    let bytes = std::fs::read(path).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    file.iter()
        .filter(|(_, v)| v.dtype() == safetensors::Dtype::F32)
        .map(|(k, v)| {
            let values = v
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            (k.to_string(), (v.shape().to_vec(), values))
        })
        .collect()
}

fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

#[test]
fn help_lists_every_subcommand() {
    let help = ok(&["--help"]);
    for cmd in [
        "inspect",
        "logits",
        "generate",
        "merge",
        "export-adapter",
        "train",
        "eval",
        "plot",
    ] {
        assert!(help.contains(cmd), "{help}");
    }
    assert!(ok(&["logits", "--help"]).contains("--tokens-file"));
}

#[test]
fn bad_input_gives_one_line_errors() {
    let err = fails(&["inspect", "--model", "/nonexistent/model"]);
    assert!(
        err.contains("/nonexistent/model") && err.contains("not a model"),
        "{err}"
    );
    if !cfg!(feature = "cuda") {
        let err = fails(&["inspect", "--model", "x", "--device", "cuda"]);
        assert!(err.contains("--features cuda"), "{err}");
    }
    let Some(root) = fixtures() else { return };
    let base = root.join("div/base");
    let err = fails(&["logits", "--model", s(&base), "--tokens", "1,2,999"]);
    assert!(err.contains("999") && err.contains("vocabulary"), "{err}");
    let err = fails(&[
        "logits",
        "--model",
        s(&base),
        "--tokens-file",
        s(&base.join("config.json")),
    ]);
    assert!(err.contains("config.json"), "{err}");
    // BAT cannot adapt the non-divisible MLP: the error names the layer.
    let err = fails(&[
        "inspect",
        "--model",
        s(&root.join("nondiv/base")),
        "--adapter",
        s(&root.join("div/miss_bat_rand/adapter")),
    ]);
    assert!(err.contains("mlp"), "{err}");
}

#[test]
fn logits_reproduce_the_peft_adapter_logits() {
    let Some(root) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    for variant in [
        "div/miss_default_rand",
        "div/miss_bat_rand",
        "nondiv/lora_rand",
    ] {
        let dir = root.join(variant);
        let config = variant.split('/').next().unwrap();
        let out = tmp
            .path()
            .join(format!("{}.safetensors", variant.replace('/', "_")));
        let report = ok(&[
            "logits",
            "--model",
            s(&root.join(config).join("base")),
            "--adapter",
            s(&dir.join("adapter")),
            "--tokens-file",
            s(&dir.join("golden.safetensors")),
            "--out",
            s(&out),
            "--device",
            "flex",
        ]);
        assert!(report.contains("logits [2, 12, 128]"), "{report}");
        let ours = tensors(&out);
        let golden = tensors(&dir.join("golden.safetensors"));
        // Same tolerance as the library parity tests (fixtures' suggested 1e-4).
        let d = max_abs_diff(&ours["logits"].1, &golden["logits_adapter"].1);
        assert!(d <= 1e-4, "{variant}: {d:e}");
    }
}

#[test]
fn merge_writes_peft_merge_and_unload_and_never_touches_inputs() {
    let Some(root) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let base = root.join("div/base");
    let variant = root.join("div/miss_bat_rand");
    let out = tmp.path().join("merged");
    let snapshot = |dir: &Path| -> Vec<(PathBuf, Vec<u8>)> {
        let mut files: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.is_file())
            .map(|p| (p.clone(), std::fs::read(&p).unwrap()))
            .collect();
        files.sort();
        files
    };
    let inputs_before = (snapshot(&base), snapshot(&variant.join("adapter")));
    ok(&[
        "merge",
        "--model",
        s(&base),
        "--adapter",
        s(&variant.join("adapter")),
        "--out",
        s(&out),
    ]);
    assert!(inputs_before == (snapshot(&base), snapshot(&variant.join("adapter"))));
    let ours = tensors(&out.join("model.safetensors"));
    let theirs = tensors(&variant.join("merged/model.safetensors"));
    assert_eq!(
        ours.keys().collect::<Vec<_>>(),
        theirs.keys().collect::<Vec<_>>()
    );
    for (k, (shape, values)) in &theirs {
        assert_eq!(&ours[k].0, shape, "{k}");
        // Merged weights are O(1); both sides fold the same blocks in f32.
        assert!(max_abs_diff(&ours[k].1, values) <= 1e-6, "{k}");
    }
    assert!(out.join("config.json").is_file() && out.join("generation_config.json").is_file());
    // Merging again into the same directory refuses instead of overwriting.
    let merge_into = |out: &Path| {
        fails(&[
            "merge",
            "--model",
            s(&base),
            "--adapter",
            s(&variant.join("adapter")),
            "--out",
            s(out),
        ])
    };
    let err = merge_into(&out);
    assert!(err.contains("not empty"), "{err}");
    let err = merge_into(&base);
    assert!(err.contains("input"), "{err}");
    // The merged directory is a model disha (and transformers) load: its logits equal the
    // adapter logits.
    let logits = tmp.path().join("merged_logits.safetensors");
    ok(&[
        "logits",
        "--model",
        s(&out),
        "--tokens-file",
        s(&variant.join("golden.safetensors")),
        "--out",
        s(&logits),
    ]);
    let d = max_abs_diff(
        &tensors(&logits)["logits"].1,
        &tensors(&variant.join("golden.safetensors"))["logits_merged"].1,
    );
    assert!(d <= 1e-4, "{d:e}");
}

#[test]
fn export_adapter_converts_bone_to_miss_and_miss_to_lora() {
    let Some(root) = fixtures() else { return };
    let tmp = tempfile::tempdir().unwrap();
    // Legacy Bone → MiSS: the same tensors, under MiSS names, as the MiSS fixture.
    let miss = tmp.path().join("miss");
    ok(&[
        "export-adapter",
        "--adapter",
        s(&root.join("div/bone_default_rand/adapter")),
        "--out",
        s(&miss),
    ]);
    let config = std::fs::read_to_string(miss.join("adapter_config.json")).unwrap();
    assert!(config.contains("\"peft_type\": \"MISS\""), "{config}");
    let ours = tensors(&miss.join("adapter_model.safetensors"));
    let theirs = tensors(&root.join("div/miss_default_rand/adapter/adapter_model.safetensors"));
    assert_eq!(ours, theirs);

    // MiSS → LoRA is exact: the LoRA adapter gives the MiSS logits.
    let lora = tmp.path().join("lora");
    let base = root.join("div/base");
    ok(&[
        "export-adapter",
        "--adapter",
        s(&root.join("div/miss_default_rand/adapter")),
        "--to",
        "lora",
        "--model",
        s(&base),
        "--out",
        s(&lora),
    ]);
    let logits = tmp.path().join("lora_logits.safetensors");
    let golden = root.join("div/miss_default_rand/golden.safetensors");
    ok(&[
        "logits",
        "--model",
        s(&base),
        "--adapter",
        s(&lora),
        "--tokens-file",
        s(&golden),
        "--out",
        s(&logits),
    ]);
    let d = max_abs_diff(
        &tensors(&logits)["logits"].1,
        &tensors(&golden)["logits_adapter"].1,
    );
    assert!(d <= 1e-4, "{d:e}");
    // --to lora without --model is a usage error (clap).
    let out = disha(&[
        "export-adapter",
        "--adapter",
        "x",
        "--out",
        "y",
        "--to",
        "lora",
    ]);
    assert!(!out.status.success());
}

fn assets() -> Option<PathBuf> {
    let root = std::env::var_os("DISHA_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/assets"));
    if root.join("smollm2-135m-instruct").is_dir() && root.join("gsm8k").is_dir() {
        return Some(root);
    }
    let reason = format!("assets not found at {} (set DISHA_ASSETS)", root.display());
    assert!(
        std::env::var("DISHA_REQUIRE_ASSETS").as_deref() != Ok("1"),
        "{reason}"
    );
    eprintln!("SKIPPED: {reason}");
    None
}

/// The real run of the issue: SmolLM2-135M GGUF + 64 GSM8K examples, Bone r16 on all seven
/// projections, 20 steps on Flex. Training loss falls, the adapter written is a PEFT directory
/// that reloads to the same logits (checked inside `disha train`) and that `inspect` and
/// `logits` load.
#[test]
fn train_bone_on_gsm8k_with_smollm2() {
    let Some(assets) = assets() else { return };
    let tmp = tempfile::tempdir().unwrap();
    let data = tmp.path().join("gsm64.jsonl");
    let lines: Vec<String> = std::fs::read_to_string(assets.join("gsm8k/train.jsonl"))
        .unwrap()
        .lines()
        .take(64)
        .map(str::to_string)
        .collect();
    std::fs::write(&data, lines.join("\n")).unwrap();
    let model = assets.join("smollm2-135m-instruct/SmolLM2-135M-Instruct.Q4_1.gguf");
    let out = tmp.path().join("run");
    let report = ok(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--fields",
        "gsm8k",
        "--template",
        "raw",
        "--method",
        "bone",
        "--r",
        "16",
        "--out",
        s(&out),
        "--max-steps",
        "20",
        "--batch-size",
        "2",
        "--max-len",
        "160",
        "--lr",
        "1e-3",
        "--warmup-steps",
        "2",
        "--validation",
        "8",
        "--device",
        "flex",
    ]);
    assert!(
        report.contains("reloaded: logits max |diff| 0e0"),
        "{report}"
    );
    let losses: Vec<f64> = std::fs::read_to_string(out.join("metrics.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["loss"]
                .as_f64()
                .unwrap()
        })
        .collect();
    assert_eq!(losses.len(), 20);
    let mean = |x: &[f64]| x.iter().sum::<f64>() / x.len() as f64;
    // Measured: 1.46 over the first five steps, 1.08 over the last five (batch 2, so single
    // steps are noisy; the five-step means are not).
    assert!(mean(&losses[15..]) < mean(&losses[..5]), "{losses:?}");
    let inspect = ok(&[
        "inspect",
        "--model",
        s(&model),
        "--adapter",
        s(&out.join("adapter")),
    ]);
    assert!(inspect.contains("trainable params: 2,488,320"), "{inspect}");
    assert!(
        inspect.contains("q_proj x30") && inspect.contains("down_proj x30"),
        "{inspect}"
    );
    let logits = ok(&[
        "logits",
        "--model",
        s(&model),
        "--adapter",
        s(&out.join("adapter")),
        "--tokens",
        "6403,1980,253,655",
    ]);
    assert!(logits.contains("logits [1, 4, 49152]"), "{logits}");
    // A second run into the same directory refuses instead of overwriting the metrics.
    let err = fails(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--out",
        s(&out),
    ]);
    assert!(
        err.contains("holds an earlier run") && err.contains("continue it with --resume"),
        "{err}"
    );
    // `disha eval` exact match: SmolLM2 answers easy sums in chat format ("2 + 3 = 5").
    let easy = tmp.path().join("easy.jsonl");
    std::fs::write(
        &easy,
        "{\"question\": \"What is 2+3?\", \"answer\": \"#### 5\"}\n{\"question\": \"What is 10+10?\", \"answer\": \"#### 20\"}\n",
    )
    .unwrap();
    let outputs = tmp.path().join("easy_out.jsonl");
    let report = ok(&[
        "eval",
        "--model",
        s(&model),
        "--data",
        s(&easy),
        "--fields",
        "gsm8k",
        "--template",
        "chat",
        "--metric",
        "exact-match",
        "--max-new-tokens",
        "24",
        "--out",
        s(&outputs),
    ]);
    assert!(report.contains("exact match 2/2"), "{report}");
    let first: serde_json::Value = serde_json::from_str(
        std::fs::read_to_string(&outputs)
            .unwrap()
            .lines()
            .next()
            .unwrap(),
    )
    .unwrap();
    assert_eq!(
        (first["predicted"].as_str(), first["correct"].as_bool()),
        (Some("5"), Some(true))
    );
    // Malformed data is named by line.
    std::fs::write(&data, "{\"question\": \"1+1\"}\n").unwrap();
    let err = fails(&[
        "train",
        "--model",
        s(&model),
        "--data",
        s(&data),
        "--fields",
        "gsm8k",
        "--out",
        s(&tmp.path().join("x")),
    ]);
    assert!(err.contains(":1:") && err.contains("answer"), "{err}");
}

/// 20 steps straight = 10 steps, stop, `--resume`, 10 more: the same loss trace, bit for bit.
#[test]
fn resume_continues_exactly() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_run_inputs(tmp.path());
    let straight = tmp.path().join("straight");
    ok(&tiny_train_args(&model, &data, &straight, "20"));
    let trace = losses(&straight);
    assert_eq!(trace.len(), 20);

    let split = tmp.path().join("split");
    let mut first = tiny_train_args(&model, &data, &split, "20");
    first.extend(["--stop-after-steps", "10"]);
    ok(&first);
    assert_eq!(losses(&split).len(), 10);
    ok(&[
        "train",
        "--model",
        s(&model),
        "--tokenizer",
        "byte-level",
        "--resume",
        "--out",
        s(&split),
    ]);
    assert_eq!(losses(&split), trace);
    // The final adapters agree too.
    let a = tensors(&straight.join("adapter/adapter_model.safetensors"));
    let b = tensors(&split.join("adapter/adapter_model.safetensors"));
    assert_eq!(a, b);
    // `disha eval`: the trained adapter lowers the loss on its training data.
    let eval_loss = |adapter: Option<&Path>| -> f64 {
        let mut args = vec![
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
        ];
        if let Some(a) = adapter {
            args.extend(["--adapter", s(a)]);
        }
        let report = ok(&args);
        let line = report
            .lines()
            .find(|l| l.starts_with("loss "))
            .expect("a loss line");
        line.split_whitespace().nth(1).unwrap().parse().unwrap()
    };
    let (before, after) = (eval_loss(None), eval_loss(Some(&split.join("adapter"))));
    assert!(after < before * 0.8, "loss {before} -> {after}");
    // Only the newest two checkpoints are kept.
    let kept: Vec<String> = std::fs::read_dir(split.join("checkpoints"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
}

/// A bf16 checkpoint trained with its base kept in bf16 (`auto`) and upcast to f32
/// (`--base-dtype f32`): the f32 compute sees the same values either way, so every product is
/// the same; only the order in which autodiff sums a tensor's several gradient contributions
/// can differ (the frozen product's node has one parent, Burn's `linear` two), which moves
/// gradients by an f32 ulp or so (measured: ≤ 1.7e-6 on O(1) Bone gradients). Twelve steps of
/// AdamW at lr 1e-2 keep the losses within 1e-5 (relative) and the adapters within 1e-4, where
/// a wrong cast or a dropped term is O(1). `run.json` records the choice; `merge` writes the
/// base dtype; an unknown dtype is a usage error.
#[test]
fn a_bf16_base_trains_like_its_f32_upcast() {
    use disha_models::llama::Llama;
    let tmp = tempfile::tempdir().unwrap();
    let (_, data) = tiny_run_inputs(tmp.path());
    let config = disha_models::llama::LlamaConfig {
        dtype: "bfloat16".into(),
        ..common::tiny_byte_level_config()
    };
    let device = burn::tensor::Device::default();
    let random = &mut disha_models::RandomWeights::new(&config, 0.2, 1);
    let model = Llama::from_source(&config, random, &device).unwrap();
    let model_dir = tmp.path().join("tiny-bf16");
    disha_models::export_merged(&model.into(), &config.to_hf_json(), &[], &model_dir).unwrap();
    let run = |name: &str, base: &str| -> PathBuf {
        let out = tmp.path().join(name);
        let mut args = tiny_train_args(&model_dir, &data, &out, "12");
        args.extend(["--base-dtype", base]);
        ok(&args);
        out
    };
    let (kept, upcast) = (run("kept", "auto"), run("upcast", "f32"));
    let (a, b) = (loss_values(&kept), loss_values(&upcast));
    assert_eq!(a.len(), 12);
    for (step, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(
            (a - b).abs() <= 1e-5 * b.abs(),
            "step {}: {a} vs {b}",
            step + 1
        );
    }
    assert!(a[11] < a[0] * 0.8, "the bf16 base trains: {a:?}");
    let (ta, tb) = (
        tensors(&kept.join("adapter/adapter_model.safetensors")),
        tensors(&upcast.join("adapter/adapter_model.safetensors")),
    );
    assert_eq!(ta.len(), tb.len());
    for (name, (_, values)) in &ta {
        let d = max_abs_diff(values, &tb[name].1);
        assert!(d <= 1e-4, "{name}: {d:e}");
    }
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(upcast.join("run.json")).unwrap()).unwrap();
    assert_eq!(settings["base_dtype"], "f32", "{settings}");
    // `merge --base-dtype f32` writes the bf16 checkpoint's merged model in f32.
    let merged = tmp.path().join("merged-f32");
    ok(&[
        "merge",
        "--model",
        s(&model_dir),
        "--adapter",
        s(&kept.join("adapter")),
        "--base-dtype",
        "f32",
        "--out",
        s(&merged),
    ]);
    let file = disha_core::SafetensorsFile::open(&merged.join("model.safetensors")).unwrap();
    assert!(
        file.tensors()
            .values()
            .all(|t| t.dtype == safetensors::Dtype::F32)
    );
    let config_json = std::fs::read_to_string(merged.join("config.json")).unwrap();
    assert!(config_json.contains("\"float32\""), "{config_json}");
    let out = disha(&["inspect", "--model", s(&model_dir), "--base-dtype", "int8"]);
    assert_eq!(out.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("use auto, f32, f16 or bf16"), "{err}");

    // Mixed precision (`--compute-dtype bf16|f16`): the same run with activations in a half
    // dtype. bf16 keeps 8 bits of mantissa, f16 11, so the trajectory parts from the f32 one
    // by that noise (measured: ≤ 1.9e-3 relative for bf16, ≤ 2.5e-4 for f16 on
    // these losses); a run that dropped the adapter's gradient or mis-scaled it would not track
    // the f32 losses at all. Parity with PEFT's half-precision training is pinned in
    // disha-models (`llama_adapters.rs`). f16 scales its loss: each step's scale is in
    // `metrics.jsonl`, and checkpoints keep it.
    for (dtype, tol) in [("bf16", 1e-2), ("f16", 2e-3)] {
        let out = tmp.path().join(format!("{dtype}-compute"));
        let mut args = tiny_train_args(&model_dir, &data, &out, "12");
        args.extend(["--compute-dtype", dtype]);
        ok(&args);
        let c = loss_values(&out);
        assert_eq!(c.len(), 12);
        let worst = max_relative_diff(&c, &a);
        eprintln!("{dtype} compute: losses within {worst:e} (relative) of f32 compute");
        assert!(worst <= tol, "{dtype} compute: {c:?} vs f32 {a:?}");
        let settings: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
        assert_eq!(settings["compute_dtype"], dtype, "{settings}");
        let metrics = std::fs::read_to_string(out.join("metrics.jsonl")).unwrap();
        let scales: Vec<Option<f64>> = metrics
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["loss_scale"].as_f64())
            .collect();
        let expected = (dtype == "f16").then_some(65536.0);
        assert!(scales.iter().all(|s| *s == expected), "{dtype}: {scales:?}");
        if dtype == "f16" {
            // A checkpoint keeps the loss scale; `--resume` continues the trace exactly.
            let split = tmp.path().join("f16-split");
            let mut first = tiny_train_args(&model_dir, &data, &split, "12");
            first.extend(["--compute-dtype", dtype, "--stop-after-steps", "6"]);
            ok(&first);
            let state =
                std::fs::read_to_string(split.join("checkpoints/step-000006/state.json")).unwrap();
            assert!(state.contains("\"loss_scaler\""), "{state}");
            ok(&[
                "train",
                "--model",
                s(&model_dir),
                "--tokenizer",
                "byte-level",
                "--resume",
                "--out",
                s(&split),
            ]);
            assert_eq!(loss_values(&split), c, "f16 resumed trace");
        }
    }
}

/// `kill -9` at an arbitrary moment (checkpoints every step, so likely mid-write) leaves a
/// loadable checkpoint: `--resume` finishes the run with the same trace as a straight run.
#[test]
fn kill_during_checkpointing_leaves_a_resumable_run() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_run_inputs(tmp.path());
    let straight = tmp.path().join("straight");
    // Long enough that the kill lands mid-run.
    let mut args = tiny_train_args(&model, &data, &straight, "150");
    let every = args.iter().position(|a| *a == "--save-every").unwrap() + 1;
    args[every] = "1";
    ok(&args);
    let trace = losses(&straight);

    let killed = tmp.path().join("killed");
    let mut args = tiny_train_args(&model, &data, &killed, "150");
    args[every] = "1";
    let mut child = Command::new(env!("CARGO_BIN_EXE_disha"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    // Wait for a few checkpoints, then SIGKILL.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(120);
    let newest_checkpoint = || -> usize {
        std::fs::read_dir(killed.join("checkpoints"))
            .map(|entries| {
                entries
                    .flatten()
                    .filter_map(|e| e.file_name().to_str()?.strip_prefix("step-")?.parse().ok())
                    .max()
                    .unwrap_or(0)
            })
            .unwrap_or(0)
    };
    while newest_checkpoint() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(std::time::Duration::from_millis(2));
    }
    child.kill().ok();
    let status = child.wait().unwrap();
    assert!(
        !status.success(),
        "the run finished before it could be killed"
    );
    assert!(losses(&killed).len() < 150);
    ok(&[
        "train",
        "--model",
        s(&model),
        "--tokenizer",
        "byte-level",
        "--resume",
        "--out",
        s(&killed),
    ]);
    assert_eq!(losses(&killed), trace);
}

/// `(correct, total)` before and after, from the summary line
/// `exact match         7/200 = 3.5% -> 58/200 = 29.0%`.
fn exact_match_line(stdout: &str) -> ((usize, usize), (usize, usize)) {
    let line = stdout
        .lines()
        .find(|l| l.starts_with("exact match "))
        .unwrap_or_else(|| panic!("no exact-match line in {stdout}"));
    let fraction = |part: &str| {
        let (c, t) = part
            .split(" = ")
            .next()
            .unwrap()
            .trim()
            .split_once('/')
            .unwrap();
        (c.parse().unwrap(), t.parse().unwrap())
    };
    let (before, after) = line["exact match ".len()..].split_once("->").unwrap();
    (fraction(before), fraction(after))
}

#[test]
fn train_without_arguments_runs_the_embedded_demo_and_learns() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    // The full demo is 1200 steps (~25 s in release); 150 steps show the same learning in a
    // debug test build.
    let stdout = ok(&["train", "--max-steps", "150", "--out", s(&out)]);
    let ((before, n), (after, n_after)) = exact_match_line(&stdout);
    assert_eq!((n, n_after), (200, 200));
    // The base model was never shown `~`: measured 7/200 (3.5 %). After 150 Bone steps:
    // 58/200 in release; the bounds leave room for other float orderings, not for no learning.
    assert!(before <= 20, "{stdout}");
    assert!(after >= 40 && after >= before + 30, "{stdout}");
    for file in [
        "adapter/adapter_config.json",
        "adapter/adapter_model.safetensors",
        "base-model/model.safetensors",
        "data/train.jsonl",
        "loss.png",
        "metrics.jsonl",
    ] {
        assert!(out.join(file).is_file(), "{file} missing");
    }
    // Per-question outcomes agree with the summary.
    let correct = |name: &str| {
        let text = std::fs::read_to_string(out.join(name)).unwrap();
        assert_eq!(text.lines().count(), 200);
        text.lines()
            .filter(|l| l.contains("\"correct\":true"))
            .count()
    };
    assert_eq!(
        (correct("eval-before.jsonl"), correct("eval-after.jsonl")),
        (before, after)
    );
    // The written base model + adapter answer like the trained model did.
    let generated = ok(&[
        "generate",
        "--model",
        s(&out.join("base-model")),
        "--adapter",
        s(&out.join("adapter")),
        "--tokenizer",
        "byte-level",
        "--prompt",
        "97~78=",
        "--max-new-tokens",
        "4",
    ]);
    let after_text = std::fs::read_to_string(out.join("eval-after.jsonl")).unwrap();
    let outcome = after_text
        .lines()
        .find(|l| l.contains("\"prompt\":\"97~78=\""))
        .expect("97~78 is a held-out question");
    let value: serde_json::Value = serde_json::from_str(outcome).unwrap();
    // `disha generate` prints the prompt, then the continuation.
    assert_eq!(
        generated.trim_end(),
        format!("97~78={}", value["generated"].as_str().unwrap()),
        "{outcome}"
    );
    // The chart of this run, through `disha plot`.
    let chart = dir.path().join("chart.png");
    ok(&["plot", s(&out), "--out", s(&chart), "--smooth", "10"]);
    assert_eq!(&std::fs::read(&chart).unwrap()[1..4], b"PNG");
    // A finished run is never overwritten, and data without a model is refused.
    let err = fails(&["train", "--out", s(&out)]);
    assert!(err.contains("--resume"), "{err}");
    let err = fails(&["train", "--data", s(&out.join("data/train.jsonl"))]);
    assert!(err.contains("needs --model"), "{err}");
}

/// `input_ids` `[1, n]` (I64) in a safetensors file, for `disha logits --tokens-file`.
fn write_input_ids(path: &Path, ids: &[i64]) {
    let bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::I64, vec![1, ids.len()], &bytes)
            .unwrap();
    std::fs::write(
        path,
        safetensors::serialize([("input_ids".to_string(), view)], None).unwrap(),
    )
    .unwrap();
}

/// RWKV-7 end to end: `merge` of an RWKV-PEFT checkpoint (Bone r24 with trained LayerNorms)
/// gives the model RWKV-PEFT's `merge_disha.py` gives (its logits under BlinkDL's `rwkv`
/// package); `train` adapts RWKV's six projections by default, writes an RWKV-PEFT checkpoint
/// besides the PEFT directory, and both load back with the trained function.
#[test]
fn rwkv_peft_checkpoints_merge_and_rwkv_trains() {
    let Some(root) = fixtures() else { return };
    let rwkv = root.parent().unwrap().join("rwkv7");
    let base = rwkv.join("tiny_random_v7/model.pth");
    let case = rwkv.join("rwkv_peft/bone_r24_partial_ln");
    let tmp = tempfile::tempdir().unwrap();
    let ids_file = tmp.path().join("ids.safetensors");
    let ids: Vec<i64> = {
        let bytes = std::fs::read(case.join("golden.safetensors")).unwrap();
        let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        file.tensor("tokens")
            .unwrap()
            .data()
            .chunks_exact(8)
            .map(|b| i64::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    write_input_ids(&ids_file, &ids);
    // `disha merge` of `adapter` onto the base, and `disha logits` of a model on the ids.
    let merge = |adapter: &Path, out: &Path| {
        ok(&[
            "merge",
            "--model",
            s(&base),
            "--adapter",
            s(adapter),
            "--out",
            s(out),
        ])
    };
    let logits_of = |model: &Path, name: &str| {
        let out = tmp.path().join(format!("{name}-logits.safetensors"));
        ok(&[
            "logits",
            "--model",
            s(model),
            "--tokens-file",
            s(&ids_file),
            "--out",
            s(&out),
        ]);
        tensors(&out)["logits"].clone()
    };
    let merged = tmp.path().join("merged");
    let stdout = merge(&case.join("rwkv-peft-adapter.pth"), &merged);
    assert!(stdout.contains("merged"), "{stdout}");
    let golden = tensors(&case.join("golden.safetensors"));
    let merged_logits = logits_of(&merged, "merged");
    // The RWKV model tolerance (see crates/disha-models/tests/rwkv7.rs).
    let d = max_abs_diff(&merged_logits.1, &golden["logits_seq_full"].1);
    assert!(d <= 1e-4, "{d:e}");
    // `--out FILE.pth`: the merged BlinkDL checkpoint, as merge_disha.py writes it; it loads
    // back to the same logits.
    let merged_pth = tmp.path().join("merged.pth");
    merge(&case.join("rwkv-peft-adapter.pth"), &merged_pth);
    assert_eq!(logits_of(&merged_pth, "merged-pth"), merged_logits);
    // A checkpoint file is refused on a Llama model, by name.
    let err = fails(&[
        "inspect",
        "--model",
        s(&root.join("div/base")),
        "--adapter",
        s(&case.join("rwkv-peft-adapter.pth")),
    ]);
    assert!(err.contains("RWKV-PEFT") && err.contains("Llama"), "{err}");

    // RWKV-PEFT ↔ PEFT directory: the same adapter both ways, and the same merged model.
    let err = fails(&[
        "export-adapter",
        "--adapter",
        s(&case.join("rwkv-peft-adapter.pth")),
        "--out",
        s(&tmp.path().join("no")),
    ]);
    assert!(err.contains("ln1.weight") && err.contains("merge"), "{err}");
    let bat = rwkv.join("rwkv_peft/bat_r16/rwkv-peft-adapter.pth");
    let peft_dir = tmp.path().join("bat-peft");
    ok(&[
        "export-adapter",
        "--adapter",
        s(&bat),
        "--out",
        s(&peft_dir),
    ]);
    let config = std::fs::read_to_string(peft_dir.join("adapter_config.json")).unwrap();
    assert!(config.contains("bat_rwkv"), "{config}");
    let back = tmp.path().join("bat-back.pth");
    ok(&[
        "export-adapter",
        "--to",
        "rwkv-peft",
        "--model",
        s(&base),
        "--adapter",
        s(&peft_dir),
        "--out",
        s(&back),
    ]);
    let merged_from = |adapter: &Path, name: &str| {
        let out = tmp.path().join(name);
        merge(adapter, &out);
        tensors(&out.join("model.safetensors"))
    };
    let direct = merged_from(&bat, "bat-direct");
    assert_eq!(direct, merged_from(&peft_dir, "bat-via-dir"));
    assert_eq!(direct, merged_from(&back, "bat-via-back"));
    let bat_golden = tensors(&rwkv.join("rwkv_peft/bat_r16/golden.safetensors"));
    for (key, (_, values)) in bat_golden.iter().filter(|(k, _)| k.starts_with("merged.")) {
        let ours = &direct[key.trim_start_matches("merged.")].1;
        // BAT's block products in another summation order than torch's (see rwkv_peft.rs).
        assert!(max_abs_diff(ours, values) <= 1e-5, "{key}");
    }

    // Train Bone on the byte-level tiny RWKV (vocab 256: the byte tokenizer is the default).
    let data = tmp.path().join("sums.jsonl");
    write_sums(&data, 32);
    let train_args = |out: &Path, extra: &[&str]| -> Vec<String> {
        let mut args: Vec<String> = [
            "train",
            "--model",
            s(&base),
            "--data",
            s(&data),
            "--fields",
            "gsm8k",
            "--template",
            "raw",
            "--out",
            s(out),
            "--max-steps",
            "6",
            "--batch-size",
            "4",
            "--lr",
            "1e-2",
            "--r",
            "16",
            "--device",
            "flex",
        ]
        .map(String::from)
        .to_vec();
        args.extend(extra.iter().map(|a| a.to_string()));
        args
    };
    let train = |args: Vec<String>| ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let out = tmp.path().join("run");
    let stdout = train(train_args(&out, &["--seed", "3"]));
    let config = std::fs::read_to_string(out.join("adapter/adapter_config.json")).unwrap();
    for target in [
        "att.receptance",
        "att.key",
        "att.value",
        "att.output",
        "ffn.key",
        "ffn.value",
    ] {
        assert!(config.contains(&format!("\"{target}\"")), "{config}");
    }
    let trace = losses(&out);
    assert_eq!(trace.len(), 6, "{stdout}");
    let f32_losses = loss_values(&out);
    // Mixed precision on RWKV (`--compute-dtype bf16|f16`): the same run tracks the f32 losses
    // within half-precision noise. AdamW's first steps move each element by about ±lr whatever
    // its gradient's size, so gradient elements near zero, whose sign the rounding decides,
    // part the trajectories by the same amount in bf16 and f16 (measured: 2.2e-3 and 2.4e-3
    // relative over these 6 steps, 3.7e-4 / 7.9e-5 at the first, forward-only, loss). Gradient
    // parity with f32 is pinned in disha-models' `rwkv7.rs`; a dropped or mis-scaled gradient
    // does not track the f32 losses at all.
    for (dtype, tol) in [("bf16", 1e-2), ("f16", 1e-2)] {
        let half = tmp.path().join(format!("run-{dtype}"));
        train(train_args(
            &half,
            &["--seed", "3", "--compute-dtype", dtype],
        ));
        let half = loss_values(&half);
        let worst = max_relative_diff(&half, &f32_losses);
        eprintln!("RWKV {dtype} compute: losses within {worst:e} (relative) of f32 compute");
        assert!(
            worst <= tol,
            "RWKV {dtype} compute: {half:?} vs {f32_losses:?}"
        );
    }
    // The two saved forms give one model: merged from the RWKV-PEFT checkpoint vs the PEFT dir.
    let via = |adapter: &Path, name: &str| {
        let merged = tmp.path().join(name);
        merge(adapter, &merged);
        logits_of(&merged, name).1
    };
    // generate (RNN mode) and eval run on RWKV with either saved form.
    for adapter in [out.join("rwkv-peft-adapter.pth"), out.join("adapter")] {
        let text = ok(&[
            "generate",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--prompt",
            "1+2=",
            "--max-new-tokens",
            "3",
        ]);
        assert!(text.starts_with("1+2="), "{text}");
        let report = ok(&[
            "eval",
            "--model",
            s(&base),
            "--adapter",
            s(&adapter),
            "--data",
            s(&data),
            "--fields",
            "gsm8k",
            "--template",
            "raw",
            "--metric",
            "loss",
        ]);
        assert!(report.contains("perplexity"), "{report}");
    }
    let from_pth = via(&out.join("rwkv-peft-adapter.pth"), "trained-pth");
    let from_dir = via(&out.join("adapter"), "trained-dir");
    assert_eq!(from_pth, from_dir);
    // And training changed the function.
    assert!(max_abs_diff(&from_pth, &logits_of(&base, "base").1) > 1e-3);

    // BAT (RWKV-PEFT orientation) with the LayerNorms trained too (`--train-parts ln`), straight
    // and split by a --resume: the same losses and the same checkpoint, LayerNorms included.
    let bat = [
        "--method",
        "bat",
        "--train-parts",
        "ln",
        "--save-every",
        "3",
        "--seed",
        "5",
    ];
    let straight = tmp.path().join("bat-straight");
    train(train_args(&straight, &bat));
    let split = tmp.path().join("bat-split");
    let mut args = train_args(&split, &bat);
    args.extend(["--stop-after-steps".into(), "3".into()]);
    train(args);
    ok(&["train", "--model", s(&base), "--resume", "--out", s(&split)]);
    assert_eq!(losses(&split), losses(&straight));
    let pth = |dir: &Path| std::fs::read(dir.join("rwkv-peft-adapter.pth")).unwrap();
    assert_eq!(pth(&split), pth(&straight));
    let checkpoint =
        disha_models::rwkv::RwkvPeftCheckpoint::read(&straight.join("rwkv-peft-adapter.pth"))
            .unwrap();
    assert_eq!(checkpoint.adapters.len(), 12);
    // ln0, ln_out, and per layer ln1, ln2, att.ln_x: weight and bias each.
    assert_eq!(
        checkpoint.overlay.len(),
        2 * (2 + 2 * 3),
        "{:?}",
        checkpoint.overlay.keys()
    );
    assert!(checkpoint.overlay.contains_key("blocks.1.att.ln_x.bias"));
    // The LayerNorm is not the base's any more.
    let base_ln = disha_models::PthWeights::open(&base)
        .and_then(|mut w| {
            use disha_models::WeightSource;
            w.take("blocks.0.ln1.weight")
        })
        .unwrap()
        .unwrap();
    assert!(
        max_abs_diff(
            &checkpoint.overlay["blocks.0.ln1.weight"].values,
            &base_ln.values
        ) > 0.0
    );
}

/// `--base-quant q4`: the decoder blocks' linears kept in ggml Q4_0 blocks; training still
/// lowers the loss (12 Bone steps on the tiny model, as the bf16 test above), `run.json`
/// records the format, `inspect` counts the quantized weights as weights (the same total as
/// the dense model), and a bad format is a usage error naming the choices.
#[test]
fn a_q4_base_trains_and_lowers_the_loss() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, data) = tiny_run_inputs(tmp.path());
    let out = tmp.path().join("q4");
    let mut args = tiny_train_args(&model, &data, &out, "12");
    args.extend(["--base-quant", "q4"]);
    ok(&args);
    let loss: Vec<f64> = losses(&out)
        .iter()
        .map(|l| l.split(':').nth(1).unwrap().parse().unwrap())
        .collect();
    assert_eq!(loss.len(), 12);
    assert!(loss[11] < loss[0] * 0.8, "the q4 base trains: {loss:?}");
    let settings: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("run.json")).unwrap()).unwrap();
    assert_eq!(settings["base_quant"], "q4", "{settings}");
    let total = |extra: &[&str]| -> String {
        let mut args = vec!["inspect", "--model", s(&model)];
        args.extend(extra);
        let text = ok(&args);
        text.lines()
            .find(|l| l.contains("all params"))
            .unwrap_or_else(|| panic!("no parameter line in {text}"))
            .to_string()
    };
    assert_eq!(total(&["--base-quant", "q4"]), total(&[]));
    let report = ok(&["inspect", "--model", s(&model), "--base-quant", "q4"]);
    assert!(report.contains("14 linears in q4 (ggml Q4_0"), "{report}");
    let bad = disha(&["inspect", "--model", s(&model), "--base-quant", "q3"]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    let err = String::from_utf8_lossy(&bad.stderr);
    assert!(err.contains("q8") && err.contains("q4"), "{err}");
}

/// `--compute-dtype bf16` on `logits`: the tiny model's logits computed in bf16 come back as
/// F32 values close to the f32 ones (bf16 keeps 8 bits: within 0.25 on these O(1) logits
/// through two layers) but not equal to them; an unknown dtype is a usage error.
#[test]
fn logits_in_bf16_compute() {
    let tmp = tempfile::tempdir().unwrap();
    let (model, _) = tiny_run_inputs(tmp.path());
    let run = |dtype: &str| {
        let out = tmp.path().join(format!("{dtype}.safetensors"));
        let report = ok(&[
            "logits",
            "--model",
            s(&model),
            "--tokens",
            "1,2,3,4,5",
            "--compute-dtype",
            dtype,
            "--out",
            s(&out),
        ]);
        assert!(report.contains("logits [1, 5,"), "{report}");
        tensors(&out).remove("logits").expect("logits").1
    };
    let (bf16, f32) = (run("bf16"), run("f32"));
    let d = max_abs_diff(&bf16, &f32);
    assert!(d > 0.0 && d < 0.25, "{d}");
    let bad = disha(&[
        "logits",
        "--model",
        s(&model),
        "--tokens",
        "1",
        "--compute-dtype",
        "q4",
    ]);
    assert_eq!(bad.status.code(), Some(2), "a usage error");
    assert!(String::from_utf8_lossy(&bad.stderr).contains("use f32, f16 or bf16"));
}
