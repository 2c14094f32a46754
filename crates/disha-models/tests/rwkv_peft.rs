//! RWKV-PEFT adapter checkpoints against RWKV-PEFT's own merge (`merge/merge_disha.py`) and
//! BlinkDL's `rwkv` package 0.8.32 (`cpu fp32`) on the merged model: Bone r16 (`.disha` and the
//! legacy `.bone` suffix), BAT r16 in RWKV-PEFT orientation, and Bone r24 — a partial last chunk
//! on every layer (128 = 5·24 + 8, 512 = 21·24 + 8) — with trained LayerNorm weights replacing
//! the base ones.
//!
//! Tolerances: merged weights are compared in f32. Bone's merge is one addition per element, so
//! ours equals the script's exactly (0). BAT's is a block matmul whose summation order differs
//! from torch's; 1e-5 on weights of magnitude ~1 is a few ulps of the block products. Logits use
//! the RWKV tolerance of the model tests (1e-4, ~40× the reference's own sequence-vs-RNN spread).

mod common;

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use disha_core::{AdapterMethod, BatOrientation, PeftModelExt};
use disha_models::rwkv::{Rwkv7, RwkvPeftCheckpoint};
use disha_models::{CausalLm, ModelError, load_model, write_pth};

const LOGITS_TOL: f32 = 1e-4;
const BAT_WEIGHT_TOL: f32 = 1e-5;

fn fixture(name: &str) -> Option<PathBuf> {
    Some(fixtures_root()?.join("rwkv7").join(name))
}

fn tokens(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

fn rwkv(model: &mut CausalLm) -> &mut Rwkv7 {
    match model {
        CausalLm::Rwkv7(m) => m,
        CausalLm::Llama(_) => panic!("an RWKV-7 model"),
    }
}

/// Every merged linear `[out, in]` of the model, under its BlinkDL weight name.
fn merged_linears(model: &Rwkv7) -> Vec<(String, Vec<f32>)> {
    let mut out = Vec::new();
    for (l, block) in model.blocks.iter().enumerate() {
        let (a, f) = (&block.att, &block.ffn);
        for (name, linear) in [
            ("att.receptance", &a.receptance),
            ("att.key", &a.key),
            ("att.value", &a.value),
            ("att.output", &a.output),
            ("ffn.key", &f.key),
            ("ffn.value", &f.value),
        ] {
            out.push((
                format!("blocks.{l}.{name}.weight"),
                host(linear.merged_weight().transpose()),
            ));
        }
    }
    out
}

/// Loads the tiny random base with the fixture's adapter, checks the unmerged logits, merges,
/// and checks the merged weights and logits against the goldens. Returns the largest merged
/// weight difference.
fn check(case: &str, method: AdapterMethod, r: usize, replaced: usize) -> Option<f32> {
    let base = fixture("tiny_random_v7")?.join("model.pth");
    let dir = fixture("rwkv_peft")?.join(case);
    let golden = read_golden(&dir.join("golden.safetensors"));
    let device = Device::default();
    let mut model = load_model(&base, &device).unwrap().model;
    let loaded = rwkv(&mut model)
        .load_rwkv_peft(&dir.join("rwkv-peft-adapter.pth"), "default")
        .unwrap();
    assert_eq!((loaded.spec.method, loaded.spec.r), (method, r), "{case}");
    assert_eq!(
        loaded.layers.len(),
        12,
        "{case}: six linears on each of two layers"
    );
    assert_eq!(
        loaded.replaced.len(),
        replaced,
        "{case}: {:?}",
        loaded.replaced
    );

    let ids = tokens(&golden["tokens"].i64, &device);
    let unmerged = host(model.forward(ids.clone()));
    let d = assert_close(
        "logits (adapter active, unmerged)",
        &unmerged,
        &golden["logits_seq_full"].f32,
        LOGITS_TOL,
    );
    eprintln!("{case}: unmerged logits max |diff| {d:e}");

    // Written back as an RWKV-PEFT checkpoint, the adapter tensors are the file's, exactly.
    let tmp = tempfile::tempdir().unwrap();
    let saved = tmp.path().join("saved.pth");
    let written = rwkv(&mut model).save_rwkv_peft("default", &saved).unwrap();
    assert_eq!(written, 12);
    let original = RwkvPeftCheckpoint::read(&dir.join("rwkv-peft-adapter.pth")).unwrap();
    let reread = RwkvPeftCheckpoint::read(&saved).unwrap();
    assert_eq!(reread.suffix, "disha");
    assert_eq!(reread.adapters, original.adapters, "{case}");
    assert_eq!(reread.spec, original.spec);
    assert!(reread.overlay.is_empty());

    model.merge_adapters().unwrap();
    let mut worst = 0f32;
    for (name, weight) in merged_linears(rwkv(&mut model)) {
        let want = &golden[&format!("merged.{name}")].f32;
        let tol = if method == AdapterMethod::Bone {
            0.0
        } else {
            BAT_WEIGHT_TOL
        };
        worst = worst.max(assert_close(&name, &weight, want, tol));
    }
    eprintln!("{case}: merged weights max |diff| {worst:e}");
    let merged = host(model.forward(ids));
    assert_close(
        "logits (merged)",
        &merged,
        &golden["logits_seq_full"].f32,
        LOGITS_TOL,
    );
    Some(worst)
}

#[test]
fn bone_r16_merges_like_rwkv_peft() {
    check("bone_r16", AdapterMethod::Bone, 16, 0);
}

#[test]
fn legacy_bone_suffix_merges_like_rwkv_peft() {
    check("legacy_bone_r16", AdapterMethod::Bone, 16, 0);
}

#[test]
fn bat_r16_in_rwkv_peft_orientation_merges_like_rwkv_peft() {
    check(
        "bat_r16",
        AdapterMethod::Bat(BatOrientation::RwkvPeft),
        16,
        0,
    );
}

#[test]
fn bone_r24_partial_chunks_and_trained_layer_norms_merge_like_rwkv_peft() {
    // ln1.weight and ln2.weight of both layers replace the base ones.
    check("bone_r24_partial_ln", AdapterMethod::Bone, 24, 4);
}

fn adapter_error(model_file: &Path, adapter: &Path) -> ModelError {
    let mut model = load_model(model_file, &Device::default()).unwrap().model;
    let before = host(model.forward(tokens(&[1, 2, 3], &Device::default())));
    let e = rwkv(&mut model)
        .load_rwkv_peft(adapter, "default")
        .unwrap_err();
    // Nothing changed: no adapter attached, no base tensor replaced.
    assert!(model.adapter_names().is_empty(), "{e}");
    assert_eq!(
        host(model.forward(tokens(&[1, 2, 3], &Device::default()))),
        before
    );
    e
}

#[test]
fn checkpoints_that_do_not_fit_are_refused_by_name_and_change_nothing() {
    let (Some(base_dir), Some(peft)) = (fixture("tiny_random_v7"), fixture("rwkv_peft")) else {
        return;
    };
    let base = base_dir.join("model.pth");
    let tmp = tempfile::tempdir().unwrap();
    let write = |file: &str, tensors: &[(&str, Vec<usize>)]| {
        let path = tmp.path().join(file);
        let tensors: Vec<_> = tensors
            .iter()
            .map(|(n, s)| (n.to_string(), s.clone(), vec![0.01; s.iter().product()]))
            .collect();
        write_pth(&path, &tensors).unwrap();
        path
    };

    // A base model is not an adapter.
    let e = RwkvPeftCheckpoint::read(&base).unwrap_err().to_string();
    assert!(
        e.contains("model.pth") && e.contains("no adapter tensor"),
        "{e}"
    );

    // Bone on a module this model does not have, and a replaced tensor it does not have.
    let path = write(
        "unknown.pth",
        &[
            ("blocks.7.att.key.disha", vec![16, 128]),
            ("blocks.0.ln9.weight", vec![128]),
        ],
    );
    let e = adapter_error(&base, &path).to_string();
    assert!(
        e.contains("unknown.pth")
            && e.contains("blocks.7.att.key.disha")
            && e.contains("blocks.0.ln9.weight"),
        "{e}"
    );

    // A Bone tensor whose output width is not the layer's.
    let path = write("shape.pth", &[("blocks.0.ffn.key.disha", vec![16, 128])]);
    let e = adapter_error(&base, &path).to_string();
    assert!(
        e.contains("shape.pth") && e.contains("blocks.0.ffn.key.disha") && e.contains("512"),
        "{e}"
    );

    // A replaced LayerNorm of the wrong width.
    let path = write(
        "ln.pth",
        &[
            ("blocks.0.att.key.disha", vec![16, 128]),
            ("blocks.0.ln1.weight", vec![64]),
        ],
    );
    let e = adapter_error(&base, &path).to_string();
    assert!(
        e.contains("ln.pth") && e.contains("blocks.0.ln1.weight"),
        "{e}"
    );

    // BAT whose r does not divide the layer.
    let path = write("bat.pth", &[("blocks.0.att.key.disha", vec![2, 48, 48])]);
    let e = adapter_error(&base, &path).to_string();
    assert!(
        e.contains("bat.pth") && e.contains("blocks.0.att.key"),
        "{e}"
    );

    // Bone and BAT mixed, and both suffixes mixed: one checkpoint holds one adapter.
    let path = write(
        "mixed.pth",
        &[
            ("blocks.0.att.key.disha", vec![16, 128]),
            ("blocks.0.att.value.disha", vec![8, 16, 16]),
        ],
    );
    let e = RwkvPeftCheckpoint::read(&path).unwrap_err().to_string();
    assert!(e.contains("mixed.pth") && e.contains("one adapter"), "{e}");
    let path = write(
        "suffix.pth",
        &[
            ("blocks.0.att.key.disha", vec![16, 128]),
            ("blocks.0.att.value.bone", vec![16, 128]),
        ],
    );
    let e = RwkvPeftCheckpoint::read(&path).unwrap_err().to_string();
    assert!(e.contains("suffix.pth") && e.contains("one suffix"), "{e}");

    // The right file twice under one name.
    let mut model = load_model(&base, &Device::default()).unwrap().model;
    let adapter = peft.join("bone_r16/rwkv-peft-adapter.pth");
    rwkv(&mut model)
        .load_rwkv_peft(&adapter, "default")
        .unwrap();
    let e = rwkv(&mut model)
        .load_rwkv_peft(&adapter, "default")
        .unwrap_err()
        .to_string();
    assert!(e.contains("default") && e.contains("blocks.0.att"), "{e}");
}

/// Every tensor of a BlinkDL checkpoint names a base parameter (linears transposed, `[1, 1, C]`
/// vectors, `ln0` under `blocks.0`): replacing all of them with the file's own values keeps
/// the logits bit-identical.
#[test]
fn every_checkpoint_tensor_replaces_its_parameter() {
    let Some(dir) = fixture("tiny_random_v7") else {
        return;
    };
    let path = dir.join("model.pth");
    let all = disha_models::PthWeights::open(&path)
        .unwrap()
        .take_all()
        .unwrap();
    let device = Device::default();
    let mut model = load_model(&path, &device).unwrap().model;
    let ids = tokens(&[3, 1, 4, 1, 5, 9, 2, 6], &device);
    let before = host(model.forward(ids.clone()));
    let replaced = rwkv(&mut model).replace_base_tensors(&path, &all).unwrap();
    assert_eq!(replaced.len(), all.len());
    assert_eq!(host(model.forward(ids)), before);
}
