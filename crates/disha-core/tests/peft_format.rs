//! PEFT adapter directories, on the fixture copies bundled in `tests/fixtures/peft` (always run):
//! round trips, legacy Bone, and every load-time error naming file, key and shapes.

mod common;

use std::collections::BTreeMap;
use std::path::Path;

use burn::module::Module;
use common::*;
use disha_core::{
    AdaptableModel, DishaError, MissInit, PeftConfig, PeftMethod, PeftModelExt, PeftType,
    TargetModules, read_adapter_dir, write_adapter_dir,
};

fn bundled(name: &str) -> std::path::PathBuf {
    bundled_fixtures().join(name)
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), to.join(entry.file_name())).unwrap();
    }
}

#[test]
fn every_bundled_dir_round_trips_through_the_file_layer() {
    for entry in std::fs::read_dir(bundled_fixtures()).unwrap() {
        let dir = entry.unwrap().path();
        let first = read_adapter_dir(&dir).unwrap();
        let out = tempfile::tempdir().unwrap();
        write_adapter_dir(out.path(), &first.config, &first.tensors).unwrap();
        let second = read_adapter_dir(out.path()).unwrap();
        assert_eq!(second.tensors, first.tensors, "{}", dir.display());
        assert_eq!(
            second.config,
            first.config.normalized(),
            "{}",
            dir.display()
        );
        // A third pass is a fixed point, byte for byte.
        let again = tempfile::tempdir().unwrap();
        write_adapter_dir(again.path(), &second.config, &second.tensors).unwrap();
        for file in ["adapter_config.json", "adapter_model.safetensors"] {
            assert_eq!(
                std::fs::read(out.path().join(file)).unwrap(),
                std::fs::read(again.path().join(file)).unwrap(),
                "{file}"
            );
        }
    }
}

#[test]
fn legacy_bone_dirs_load_as_miss() {
    let bone = read_adapter_dir(&bundled("div_bone_bat_rand")).unwrap();
    assert_eq!(bone.config.peft_type, PeftType::Bone);
    assert!(matches!(
        bone.config.method,
        PeftMethod::Miss {
            init: MissInit::Bat,
            ..
        }
    ));
    assert!(
        bone.tensors.keys().all(|k| k.ends_with(".miss_block")),
        "renamed to miss_block"
    );
    assert_eq!(bone.tensors.len(), 14);
    assert_eq!(bone.tensors.values().next().unwrap().shape, vec![8, 8, 8]);
    // Model-level: loads onto the model and saves back as MISS with miss_block keys.
    let device = device();
    let mut model = TinyLlamaLinears::zeros(176, &device);
    let config = model
        .load_adapter(&bundled("div_bone_bat_rand"), "default")
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    model.save_adapter("default", &config, out.path()).unwrap();
    let saved = read_adapter_dir(out.path()).unwrap();
    assert_eq!(saved.config.peft_type, PeftType::Miss);
    assert_eq!(saved.tensors, bone.tensors);
    let text = std::fs::read_to_string(out.path().join("adapter_config.json")).unwrap();
    assert!(text.contains("\"init_weights\": \"bat\""), "{text}");
}

#[test]
fn model_level_load_then_save_reproduces_the_file() {
    let device = device();
    for (dir, intermediate) in [
        ("div_miss_default_rand", 176),
        ("div_miss_mini_rand", 176),
        ("div_lora_rand", 176),
        ("nondiv_miss_default_rand", 172),
        ("nondiv_bone_default_rand", 172),
    ] {
        let original = read_adapter_dir(&bundled(dir)).unwrap();
        let mut model = TinyLlamaLinears::zeros(intermediate, &device);
        let config = model.load_adapter(&bundled(dir), "default").unwrap();
        assert_eq!(config, original.config);
        let out = tempfile::tempdir().unwrap();
        model.save_adapter("default", &config, out.path()).unwrap();
        let saved = read_adapter_dir(out.path()).unwrap();
        assert_eq!(saved.tensors, original.tensors, "{dir}");
        assert_eq!(saved.config, original.config.normalized(), "{dir}");
        // Loading a second copy under another name works; the same name is refused.
        model.load_adapter(&bundled(dir), "second").unwrap();
        let e = model.load_adapter(&bundled(dir), "second").unwrap_err();
        assert!(matches!(e, DishaError::AdapterExists { .. }), "{e}");
        assert_eq!(model.adapter_names(), ["default", "second"]);
    }
}

#[test]
fn shape_mismatch_names_key_expected_and_actual() {
    let device = device();
    // A `div` adapter (intermediate 176) on the `nondiv` model (172).
    let mut model = TinyLlamaLinears::zeros(172, &device);
    let e = model
        .load_adapter(&bundled("div_miss_default_rand"), "default")
        .unwrap_err();
    let DishaError::TensorShape {
        key,
        expected,
        actual,
        ..
    } = &e
    else {
        panic!("expected a shape error, got {e}");
    };
    assert!(key.ends_with("mlp.gate_proj.miss_block"), "{key}");
    assert_eq!(
        (expected.clone(), actual.clone()),
        (vec![8, 172], vec![8, 176])
    );
    assert!(e.to_string().contains("adapter_model.safetensors"), "{e}");
    assert!(
        model.adapter_names().is_empty(),
        "nothing attached on error"
    );

    // Tensors of one mode, config of another.
    let tmp = tempfile::tempdir().unwrap();
    copy_dir(&bundled("div_miss_default_rand"), tmp.path());
    let mut config = PeftConfig::from_file(&tmp.path().join("adapter_config.json")).unwrap();
    config.method = PeftMethod::Miss {
        init: MissInit::Bat,
        mini_r: 1,
        dropout: 0.0,
    };
    std::fs::write(
        tmp.path().join("adapter_config.json"),
        config.to_json_string(),
    )
    .unwrap();
    let mut model = TinyLlamaLinears::zeros(176, &device);
    let e = model.load_adapter(tmp.path(), "default").unwrap_err();
    assert!(
        matches!(&e, DishaError::TensorShape { expected, .. } if expected.len() == 3),
        "{e}"
    );
}

#[test]
fn missing_and_unexpected_tensors_are_errors() {
    let device = device();
    let src = read_adapter_dir(&bundled("div_miss_default_rand")).unwrap();
    // Missing: drop one tensor.
    let tmp = tempfile::tempdir().unwrap();
    let mut tensors = src.tensors.clone();
    let dropped = "base_model.model.model.layers.1.self_attn.v_proj.miss_block";
    tensors.remove(dropped).unwrap();
    write_adapter_dir(tmp.path(), &src.config, &tensors).unwrap();
    let mut model = TinyLlamaLinears::zeros(176, &device);
    let e = model.load_adapter(tmp.path(), "default").unwrap_err();
    assert!(
        matches!(&e, DishaError::MissingTensor { key, layer, .. }
            if key == dropped && layer == "model.layers.1.self_attn.v_proj"),
        "{e}"
    );
    // Unexpected: the config targets q_proj only but the file holds all seven modules.
    let tmp = tempfile::tempdir().unwrap();
    let mut config = src.config.clone();
    config.target_modules = Some(TargetModules::Names(vec!["q_proj".into()]));
    write_adapter_dir(tmp.path(), &config, &src.tensors).unwrap();
    let e = model.load_adapter(tmp.path(), "default").unwrap_err();
    assert!(
        matches!(&e, DishaError::UnexpectedTensors { keys, .. } if keys.len() == 12),
        "{e}"
    );
    assert!(model.adapter_names().is_empty());
}

#[test]
fn targets_that_match_nothing_list_the_modules() {
    let mut model = TinyLlamaLinears::zeros(176, &device());
    let config = PeftConfig::miss(8, TargetModules::Names(vec!["qkv".into()]));
    let e = model.add_adapter("default", &config).unwrap_err();
    let msg = e.to_string();
    assert!(msg.contains("matches no module"), "{msg}");
    assert!(
        msg.contains("model.layers.1.mlp.down_proj") && msg.contains("lm_head"),
        "{msg}"
    );
}

#[test]
fn target_selection_counts_and_defaults() {
    let device = device();
    let count = |config: PeftConfig| {
        let mut model = TinyLlamaLinears::zeros(176, &device);
        let matched = model.add_adapter("default", &config).unwrap();
        (matched.len(), model.parameter_count().trainable)
    };
    // all-linear = the 14 projections, never lm_head.
    assert_eq!(
        count(PeftConfig::miss(8, TargetModules::AllLinear)),
        (14, 9_728)
    );
    assert_eq!(
        count(PeftConfig::lora(8, 16.0, TargetModules::AllLinear)),
        (14, 18_688)
    );
    // Null target_modules = the model default (q_proj, v_proj).
    let mut config = PeftConfig::miss(8, TargetModules::AllLinear);
    config.target_modules = None;
    assert_eq!(count(config).0, 4);
    // Regex, exclude, layer filter.
    let mut config = PeftConfig::miss(8, TargetModules::Regex(r".*\.mlp\..*".into()));
    config.exclude_modules = Some(TargetModules::Names(vec!["down_proj".into()]));
    assert_eq!(count(config).0, 4);
    let mut config = PeftConfig::miss(8, TargetModules::Names(vec!["q_proj".into()]));
    config.layers_to_transform = Some(vec![1]);
    assert_eq!(count(config).0, 1);
}

#[test]
fn lifecycle_on_a_model_merge_unmerge_disable_delete() {
    let device = device();
    let mut model = TinyLlamaLinears::zeros(176, &device);
    // Give the base non-zero weights so merging is visible.
    model.visit_linears_mut(&mut |_, l| {
        let dims = l.weight.dims();
        let w = to_tensor(&randn(dims[0], dims[1], 0.5, 99));
        let label = l.label().to_string();
        *l = disha_core::AdaptedLinear::from_weights(w, None).with_label(label);
    });
    model
        .load_adapter(&bundled("div_miss_default_rand"), "default")
        .unwrap();
    let before: BTreeMap<String, Mat> = weights(&model);
    let x = to_tensor(&randn(3, 64, 1.0, 100));
    let y = to_mat(model.layer0("q_proj").forward(x.clone()));
    model.merge_adapters().unwrap();
    assert!(model.merge_adapters().is_err(), "merge twice");
    assert!(to_mat(model.layer0("q_proj").forward(x.clone())).max_abs_diff(&y) < 1e-5);
    model.unmerge_adapters().unwrap();
    for (name, w) in weights(&model) {
        assert!(w.max_abs_diff(&before[&name]) < 1e-6, "{name}");
    }
    assert!(model.unmerge_adapters().is_err(), "unmerge unmerged");
    model.merge_adapters().unwrap();
    model.disable_adapters().unwrap();
    let base = to_mat(x.clone()).matmul(&before["model.layers.0.self_attn.q_proj"]);
    assert!(to_mat(model.layer0("q_proj").forward(x.clone())).max_abs_diff(&base) < 1e-5);
    model.enable_adapters();
    model.delete_adapter("default").unwrap();
    assert!(model.adapter_names().is_empty());
    assert_eq!(
        model.num_params(),
        2 * (64 * 64 * 2 + 64 * 32 * 2 + 3 * 64 * 176) + 64 * 128
    );
}

fn weights(model: &TinyLlamaLinears) -> BTreeMap<String, Mat> {
    let mut out = BTreeMap::new();
    model.visit_linears(&mut |site, l| {
        out.insert(site.name.clone(), to_mat(l.weight.val()));
    });
    out
}

#[test]
fn miss_converts_to_an_equivalent_peft_lora_dir() {
    let device = device();
    let mut model = TinyLlamaLinears::zeros(172, &device);
    let config = model
        .load_adapter(&bundled("nondiv_miss_default_rand"), "default")
        .unwrap();
    let out = tempfile::tempdir().unwrap();
    model
        .save_adapter_as_lora("default", &config, out.path())
        .unwrap();
    let lora = read_adapter_dir(out.path()).unwrap();
    assert_eq!(lora.config.peft_type, PeftType::Lora);
    assert_eq!(lora.config.spec().scale(), 1.0, "lora_alpha = r");
    let a = &lora.tensors["base_model.model.model.layers.0.mlp.down_proj.lora_A.weight"];
    assert_eq!(a.shape, vec![8, 172]);
    let mut converted = TinyLlamaLinears::zeros(172, &device);
    converted.load_adapter(out.path(), "default").unwrap();
    let x = to_tensor(&randn(4, 172, 1.0, 101));
    let lhs = to_mat(model.layers[0].projections[6].forward(x.clone()));
    let rhs = to_mat(converted.layers[0].projections[6].forward(x));
    assert!(
        lhs.max_abs_diff(&rhs) < 1e-5,
        "down_proj (in % r = 4) outputs agree"
    );
}
