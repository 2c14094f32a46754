//! RWKV-7 against BlinkDL's `rwkv` package 0.8.32 (strategy `cpu fp32`): sequence-mode logits,
//! RNN-mode logits (one token per call), a prompt split in two chunks, and the final states; the
//! real 834K model against rwkv.cpp's expected logits; adapters and merged export; half-precision
//! compute against the package's `cpu bf16` / `cpu fp16` runs, and its gradients against f32.
//!
//! Tolerance (f32): the package computes in f32 as we do, in a different operation order; its own
//! sequence vs RNN runs differ by up to 2.7e-6 on these logits (of magnitude ~4). 1e-4 is ~40×
//! that and far below any real error (a wrong index convention or epsilon moves logits by
//! 1e-2 or more).

mod common;

use std::path::PathBuf;

use burn::tensor::{Device, Int, Tensor, TensorData};
use common::*;
use disha_core::{AdaptableModel, PeftConfig, PeftModelExt, TargetModules};
use disha_models::rwkv::{Rwkv7, RwkvState, RwkvStateData};
use disha_models::{CausalLm, ModelFamily, ModelFormat, export_merged, load_model};

const TOL: f32 = 1e-4;

fn fixture(name: &str) -> Option<PathBuf> {
    Some(fixtures_root()?.join("rwkv7").join(name))
}

fn rwkv(model: &CausalLm) -> &Rwkv7 {
    model.as_rwkv7().expect("an RWKV-7 model")
}

fn tokens(ids: &[i64], device: &Device) -> Tensor<2, Int> {
    Tensor::from_data(TensorData::new(ids.to_vec(), [1, ids.len()]), device)
}

/// Compares the state after the sequence with the golden's `{prefix}.layer{l}.*`.
fn check_state(what: &str, state: &RwkvState, golden: &std::collections::BTreeMap<String, Golden>) {
    for (l, layer) in state.layers.iter().enumerate() {
        for (name, t) in [
            ("att_x_prev", host(layer.att_x_prev.clone())),
            ("att_kv", host(layer.att_kv.clone())),
            ("ffn_x_prev", host(layer.ffn_x_prev.clone())),
        ] {
            let key = format!("{what}.layer{l}.{name}");
            assert_close(&key, &t, &golden[&key].f32, TOL);
        }
    }
}

/// Every golden of one fixture directory: sequence, RNN and chunked logits, both states.
fn check_fixture(model_path: &std::path::Path, dir: &std::path::Path) {
    let device = Device::default();
    let loaded = load_model(model_path, &device).unwrap();
    assert_eq!(loaded.format, ModelFormat::RwkvSafetensors);
    assert_eq!(loaded.model.family(), ModelFamily::Rwkv7);
    let model = rwkv(&loaded.model);
    let golden = read_golden(&dir.join("golden.safetensors"));
    let ids = &golden["tokens"].i64;
    let t = ids.len();
    let v = model.config().vocab_size;

    // Sequence mode from the zero state, with WKV chunks of 1 token (the per-token step), 16
    // (the default) and the whole sequence.
    for chunk in [1, 16, t] {
        let mut chunked = model.clone();
        chunked.set_wkv_chunk_len(chunk).unwrap();
        let mut state = chunked.zero_state(1);
        let seq = host(chunked.forward_with_state(tokens(ids, &device), &mut state));
        let what = format!("logits_seq_full (WKV chunk {chunk})");
        let d = assert_close(&what, &seq, &golden["logits_seq_full"].f32, TOL);
        eprintln!("{}: {what} max |diff| {d:e}", dir.display());
        check_state("state_seq", &state, &golden);
    }
    assert!(model.clone().set_wkv_chunk_len(65).is_err());

    // RNN mode: one token per call.
    let mut state = model.zero_state(1);
    let mut rnn = Vec::with_capacity(t * v);
    for &id in ids {
        rnn.extend(host(model.forward_last(tokens(&[id], &device), &mut state)));
    }
    assert_close("logits_rnn", &rnn, &golden["logits_rnn"].f32, TOL);
    check_state("state_rnn", &state, &golden);
    assert_eq!(state.len, t);

    // Two chunks with the state carried; the state survives a serde round trip in between.
    let mut state = model.zero_state(1);
    model.forward_last(tokens(&ids[..t / 2], &device), &mut state);
    let json = serde_json::to_string(&state.to_data()).unwrap();
    let data: RwkvStateData = serde_json::from_str(&json).unwrap();
    let mut state = RwkvState::from_data(&data, model.config(), &device).unwrap();
    let last = host(model.forward_last(tokens(&ids[t / 2..], &device), &mut state));
    assert_close(
        "logits_chunked_last",
        &last,
        &golden["logits_chunked_last"].f32,
        TOL,
    );
}

#[test]
fn tiny_random_rwkv7_matches_the_rwkv_package() {
    let Some(dir) = fixture("tiny_random_v7") else {
        return;
    };
    check_fixture(&dir.join("model.safetensors"), &dir);
}

#[test]
fn trained_834k_rwkv7_matches_the_rwkv_package_and_rwkv_cpp() {
    let (Some(dir), Some(assets)) = (fixture("tiny_rwkv_7v0_834K_prompt_in"), assets_root()) else {
        return;
    };
    let model_path = assets.join("rwkv7-834K/model.safetensors");
    check_fixture(&model_path, &dir);
    // rwkv.cpp's own expected logits after `"in` (256 little-endian f32).
    let bytes = std::fs::read(assets.join("rwkv7-834K/expected-logits-7v0-834K.bin")).unwrap();
    let expected: Vec<f32> = bytes
        .chunks_exact(4)
        .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
        .collect();
    let device = Device::default();
    // From the BlinkDL conversion and from rwkv.cpp's own file (packed token-shift vectors,
    // transposed low-rank matrices, reversed shapes), read directly.
    for path in [
        model_path.clone(),
        assets.join("rwkv7-834K/tiny-rwkv-7v0-834K-FP32.bin"),
    ] {
        let loaded = load_model(&path, &device).unwrap();
        let mut state = loaded.model.new_decode_state();
        let last = host(
            loaded
                .model
                .forward_last(tokens(&[34, 105, 110], &device), &mut state),
        );
        let d = assert_close("rwkv.cpp expected logits", &last, &expected, TOL);
        eprintln!(
            "{}: rwkv.cpp expected logits max |diff| {d:e}",
            path.display()
        );
    }
    let cpp = load_model(
        &assets.join("rwkv7-834K/tiny-rwkv-7v0-834K-FP32.bin"),
        &device,
    )
    .unwrap();
    assert_eq!(cpp.format, ModelFormat::RwkvCpp);
    let blinkdl = load_model(&model_path, &device).unwrap();
    let ids = tokens(&[34, 105, 110, 7, 200], &device);
    assert_eq!(
        host(cpp.model.forward(ids.clone())),
        host(blinkdl.model.forward(ids)),
        "the rwkv.cpp file and its BlinkDL conversion are one model"
    );
}

/// Both containers of the same checkpoint give identical parameters, hence identical logits.
#[test]
fn pth_and_safetensors_load_the_same_model() {
    let device = Device::default();
    let mut pairs = Vec::new();
    if let Some(dir) = fixture("tiny_random_v7") {
        pairs.push((dir.join("model.pth"), dir.join("model.safetensors")));
    }
    if let Some(assets) = assets_root() {
        let dir = assets.join("rwkv7-834K");
        pairs.push((dir.join("model.pth"), dir.join("model.safetensors")));
    }
    for (pth, st) in pairs {
        let a = load_model(&pth, &device).unwrap();
        let b = load_model(&st, &device).unwrap();
        assert_eq!(a.format, ModelFormat::RwkvPth);
        assert_eq!(rwkv(&a.model).config(), rwkv(&b.model).config());
        let ids = tokens(&[34, 105, 110, 7, 200], &device);
        assert_eq!(
            host(a.model.forward(ids.clone())),
            host(b.model.forward(ids)),
            "{}",
            pth.display()
        );
    }
}

#[test]
fn packed_rows_equal_each_sequence_alone() {
    let Some(dir) = fixture("tiny_random_v7") else {
        return;
    };
    let device = Device::default();
    let model = load_model(&dir.join("model.safetensors"), &device)
        .unwrap()
        .model;
    let (a, b): (Vec<i64>, Vec<i64>) = (vec![1, 5, 9, 2, 7], vec![3, 8, 4]);
    let ids: Vec<i64> = [a.clone(), b.clone(), vec![0, 0]].concat();
    let packed = host(model.forward_packed(
        Tensor::from_data(TensorData::new(ids.clone(), [1, 10]), &device),
        &[vec![5, 3]],
    ));
    let v = model.vocab_size();
    let alone_b = host(model.forward(tokens(&b, &device)));
    // Same arithmetic on a sliced input: identical up to f32 rounding.
    assert_close("b packed vs alone", &packed[5 * v..8 * v], &alone_b, 1e-5);
    // Without the state reset, `b` would continue `a`'s state: the test can tell.
    let unreset = host(model.forward(tokens(&ids, &device)));
    assert!(max_abs_diff(&unreset[5 * v..8 * v], &alone_b) > 1e-3);
    let _ = a;
}

#[test]
fn zero_init_adapters_keep_the_output_and_merged_exports_reload() {
    let Some(dir) = fixture("tiny_random_v7") else {
        return;
    };
    let device = Device::default();
    let mut model = load_model(&dir.join("model.safetensors"), &device)
        .unwrap()
        .model;
    let ids = tokens(&[195, 84, 241, 105, 133, 218], &device);
    let base = host(model.forward(ids.clone()));
    // RWKV-PEFT's default targets: att.receptance/key/value/output and ffn.key/value.
    assert_eq!(
        model.default_target_modules().unwrap(),
        [
            "att.receptance",
            "att.key",
            "att.value",
            "att.output",
            "ffn.key",
            "ffn.value"
        ]
    );
    model
        .add_adapter("bone", &PeftConfig::miss(16, TargetModules::AllLinear))
        .unwrap();
    let layers = rwkv(&model).config().num_layers;
    // All six linears of every block, not the head (PEFT's all-linear skips output heads).
    assert_eq!(model.linear_sites().len(), 6 * layers + 1);
    let adapted = host(model.forward(ids.clone()));
    // Bone blocks start at zero: the adapted forward is the base forward exactly.
    assert_eq!(adapted, base);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("merged");
    let loaded = load_model(&dir.join("model.safetensors"), &device).unwrap();
    export_merged(&model, &loaded.export_config(), &[], &out).unwrap();
    let reloaded = load_model(&out, &device).unwrap();
    assert_eq!(reloaded.format, ModelFormat::RwkvSafetensors);
    assert_eq!(host(reloaded.model.forward(ids)), base);
}

#[test]
fn a_file_that_is_not_rwkv_is_named() {
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("other.safetensors");
    let data = vec![0u8; 16];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![4], &data).unwrap();
    std::fs::write(
        &path,
        safetensors::serialize([("x".to_string(), view)], None).unwrap(),
    )
    .unwrap();
    let e = load_model(&path, &Device::default())
        .unwrap_err()
        .to_string();
    assert!(
        e.contains("other.safetensors") && e.contains("RWKV-7"),
        "{e}"
    );
}

/// The World tokenizer reproduces the reference `TRIE_TOKENIZER`'s ids on its own test
/// vectors (ASCII, CJK, emoji, code, control bytes) and decodes each back exactly.
#[test]
fn world_tokenizer_matches_the_reference_vectors() {
    let Some(assets) = assets_root() else { return };
    let dir = assets.join("tokenizers/rwkv-world");
    let tokenizer =
        disha_models::TextTokenizer::from_file(&dir.join("rwkv_vocab_v20230424.txt")).unwrap();
    assert_eq!(tokenizer.vocab_size(), 65530);
    assert_eq!(tokenizer.eos_id(), Some(0));
    let vectors: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("test_vectors.json")).unwrap())
            .unwrap();
    let cases = vectors["cases"].as_array().unwrap();
    assert!(cases.len() >= 10);
    for case in cases {
        let text = case["text"].as_str().unwrap();
        let expected: Vec<u32> = case["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let ids = tokenizer.encode(text, true).unwrap();
        assert_eq!(ids, expected, "{text:?}");
        assert_eq!(tokenizer.decode(&ids, false).unwrap(), text);
    }
    // Any bytes round-trip, including invalid UTF-8 (through the byte API).
    let world =
        disha_models::WorldTokenizer::from_file(&dir.join("rwkv_vocab_v20230424.txt")).unwrap();
    let bytes: Vec<u8> = (0..=255u8)
        .rev()
        .chain(b"\xff\xfe hello".iter().copied())
        .collect();
    let ids = world.encode_bytes(&bytes).unwrap();
    assert_eq!(world.decode_bytes(&ids).unwrap(), bytes);
    // And 500 random byte strings (lengths 0..200, bytes biased to ASCII and UTF-8 lead bytes).
    let mut rng = disha_models::SplitMix64::new(2026);
    for _ in 0..500 {
        let len = (rng.next_u64() % 200) as usize;
        let bytes: Vec<u8> = (0..len)
            .map(|_| match rng.next_u64() % 4 {
                0 => b' ' + (rng.next_u64() % 95) as u8,
                1 => 0xE0 + (rng.next_u64() % 16) as u8,
                _ => rng.next_u64() as u8,
            })
            .collect();
        let ids = world.encode_bytes(&bytes).unwrap();
        assert_eq!(world.decode_bytes(&ids).unwrap(), bytes);
    }
}

/// The 834K model is byte-level: its own tokenizer is the byte one (ids = bytes, 256 of
/// them), which fits its vocabulary; `"in` is `[34, 105, 110]` as rwkv.cpp feeds it.
#[test]
fn byte_level_rwkv_gets_the_byte_tokenizer() {
    let Some(assets) = assets_root() else { return };
    let loaded = load_model(
        &assets.join("rwkv7-834K/model.safetensors"),
        &Device::default(),
    )
    .unwrap();
    let tokenizer = loaded.tokenizer().unwrap();
    tokenizer.check_fits(loaded.model.vocab_size()).unwrap();
    assert_eq!(tokenizer.encode("\"in", true).unwrap(), vec![34, 105, 110]);
}

/// A bf16 RWKV-7 checkpoint (the tiny random model rounded to bf16 and written as such) keeps its
/// base in bf16 under `auto` and computes the same bits as the same checkpoint upcast to an f32
/// base (bf16 → f32 is exact; every product is the same f32 product); its merged export is bf16
/// and reloads to the same logits. Against the f32 golden it is off by bf16's rounding of the
/// weights only (logits ~4, weights rounded to 8 bits: well under 0.1, where a wrong cast or
/// layout is O(1)).
#[test]
fn bf16_checkpoint_keeps_a_bf16_base_with_f32_compute() {
    use burn::tensor::DType;
    use disha_core::{SafetensorsFile, SafetensorsWriter};
    use disha_models::{BaseDtype, LoadOptions, load_model_with};
    let Some(dir) = fixture("tiny_random_v7") else {
        return;
    };
    let tmp = tempfile::tempdir().unwrap();
    let bf16_path = tmp.path().join("model-bf16.safetensors");
    let source = SafetensorsFile::open(&dir.join("model.safetensors")).unwrap();
    let mut writer = SafetensorsWriter::create(&bf16_path).unwrap();
    for (name, slot) in source.tensors() {
        let values = source.read_f32(name).unwrap().values;
        let bytes: Vec<u8> = values
            .iter()
            .flat_map(|v| half::bf16::from_f32(*v).to_le_bytes())
            .collect();
        writer
            .write(name, safetensors::Dtype::BF16, &slot.shape, &bytes)
            .unwrap();
    }
    writer.finish(&[("format", "pt")]).unwrap();

    let device = Device::default();
    if !device.supports_dtype(DType::BF16) {
        // WGPU has no bf16: the load refuses, naming the setting, instead of computing zeros.
        let options = LoadOptions::default().with_base_dtype(BaseDtype::Auto);
        let e = load_model_with(&bf16_path, &device, &options).unwrap_err();
        assert!(e.to_string().starts_with("base dtype = bfloat16"), "{e}");
        eprintln!("SKIPPED (bf16 compute): {device:?} has no bf16 tensors; the load refused: {e}");
        return;
    }
    let ids = tokens(&[195, 84, 241, 105, 133, 218, 7, 64], &device);
    let load = |base: BaseDtype| {
        let options = LoadOptions::default().with_base_dtype(base);
        load_model_with(&bf16_path, &device, &options).unwrap()
    };
    let kept = load(BaseDtype::Auto);
    assert_eq!(kept.model.base_dtype(), DType::BF16);
    let att = &rwkv(&kept.model).blocks[0].att;
    assert_eq!(att.receptance.weight.val().dtype(), DType::BF16);
    assert_eq!(rwkv(&kept.model).head.weight.val().dtype(), DType::BF16);
    let upcast = load(BaseDtype::F32);
    assert_eq!(upcast.model.base_dtype(), DType::F32);
    let logits = host(kept.model.forward(ids.clone()));
    assert_eq!(logits, host(upcast.model.forward(ids.clone())), "same bits");
    let f32_model = load_model(&dir.join("model.safetensors"), &device).unwrap();
    let d = max_abs_diff(&logits, &host(f32_model.model.forward(ids.clone())));
    assert!(
        d > 0.0 && d < 0.1,
        "bf16-rounded weights move the logits by {d}"
    );

    let out = tmp.path().join("merged");
    export_merged(&kept.model, &kept.export_config(), &[], &out).unwrap();
    let written = SafetensorsFile::open(&out.join("model.safetensors")).unwrap();
    assert!(
        written
            .tensors()
            .values()
            .all(|slot| slot.dtype == safetensors::Dtype::BF16),
        "a bf16 base exports bf16"
    );
    let reloaded = load_model(&out, &device).unwrap();
    assert_eq!(reloaded.model.base_dtype(), DType::BF16);
    assert_eq!(host(reloaded.model.forward(ids)), logits);
}

/// RWKV-7 with a quantized base: the six projections of every block in Q8 / Q4 / Q4_1 blocks (the
/// head and embedding dense), the logits equal to a dense twin holding the dequantized weights
/// (1e-5, f32 summation order), and a Bone adapter on top still trains the quantized model
/// (its loss gradient reaches the adapter).
#[test]
fn quantized_base_computes_its_dequantized_model() {
    use disha_core::{AdaptableModel, AdaptedLinear, AdapterSpec, QuantFormat};
    use disha_models::{LoadOptions, load_model_with};
    let Some(dir) = fixture("tiny_random_v7") else {
        return;
    };
    let device = Device::default();
    let ids = tokens(&[195, 84, 241, 105, 133, 218, 7, 64], &device);
    for format in [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Q4_1] {
        let options = LoadOptions::default().with_base_quant(Some(format));
        let path = dir.join("model.safetensors");
        let codes = match format {
            QuantFormat::Q8 => burn::tensor::DType::I8,
            _ => burn::tensor::DType::U8,
        };
        if !device.supports_dtype(codes) {
            // WGSL has no 8-bit integers: the load refuses, naming the setting.
            let e = load_model_with(&path, &device, &options).unwrap_err();
            assert!(e.to_string().starts_with("base quantization = "), "{e}");
            eprintln!("SKIPPED ({format}): {device:?} has no {codes:?} tensors; refused: {e}");
            continue;
        }
        let mut loaded = load_model_with(&path, &device, &options).unwrap();
        let (mut quantized, mut total) = (0, 0);
        loaded.model.visit_linears(&mut |_, l| {
            total += 1;
            quantized += usize::from(l.quantized.is_some());
        });
        assert_eq!(quantized, total - 1, "{format}: all but the head");
        assert!(rwkv(&loaded.model).head.quantized.is_none());
        let logits = host(loaded.model.forward(ids.clone()));
        loaded.model.visit_linears_mut(&mut |_, l| {
            if l.quantized.is_some() {
                *l = AdaptedLinear::from_weights(l.dense_base_weight(), None);
            }
        });
        let twin = host(loaded.model.forward(ids.clone()));
        let d = max_abs_diff(&logits, &twin);
        assert!(d <= 1e-5, "{format}: {d}");

        // Gradients reach a Bone adapter through the quantized products.
        let device = device.clone().autodiff();
        let mut model = load_model_with(&path, &device, &options).unwrap().model;
        model.visit_linears_mut(&mut |site, l| {
            if site.name.ends_with("att.key") {
                l.add_adapter("a", &AdapterSpec::bone(4)).unwrap();
            }
        });
        let ids = tokens(&[195, 84, 241, 105, 133, 218, 7, 64], &device);
        let loss = disha_models::causal_lm_loss(model.forward(ids.clone()), ids);
        let grads = loss.backward();
        let mut with_grad = 0;
        model.visit_linears(&mut |_, l| {
            if let Some(disha_core::Adapter::Bone(b)) = l.adapter("a") {
                let g = b.block.val().grad(&grads).expect("a gradient");
                with_grad += usize::from(g.abs().sum().into_scalar::<f32>() > 0.0);
            }
        });
        assert!(with_grad > 0, "{format}");
    }
}

/// Root mean square of `a - b`.
fn rms_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "length mismatch");
    let sum: f64 = a.iter().zip(b).map(|(x, y)| f64::from(x - y).powi(2)).sum();
    (sum / a.len() as f64).sqrt() as f32
}

/// Half-precision compute (`Rwkv7::with_compute_dtype`, `--compute-dtype bf16|f16`) against
/// BlinkDL's `rwkv` package run with strategies `cpu bf16` / `cpu fp16` (bundled
/// `tests/fixtures/rwkv7_half/golden.safetensors`, from `generate.py` there), on the random tiny
/// model and the trained 834K model.
///
/// The two half runs round at different points (the package rounds the outer products `v kᵀ`
/// and the state's read-out to the half dtype, disha keeps the recurrence in f32), so they
/// cannot agree bit for bit; each approximates the same f32 model. Measured as the RMS over all
/// logits, with `gap` the package's own half-vs-f32 distance:
/// - disha's half run is within `1.25 · gap` of the f32 model: no less accurate than the
///   package's half run (measured 0.81–1.01 gap), with a margin for the backend's matmul order;
/// - and at least `gap / 8` away from it: it really rounds (an f32 run is ~1e-6 away);
/// - it is within `1.5 · gap` of the package's half run (two roundings of about `gap` each
///   differ by up to `√2 · gap` where independent; measured 1.14 on the random tiny model);
/// - on the trained model within `0.75 · gap` of it: there the shared rounding points (the
///   projections, the LayerNorms computed in f32 and rounded once, the head) dominate
///   (measured 0.54 bf16 / 0.44 f16; LayerNorms computed in the half dtype instead give 1.01 /
///   1.08).
///
/// Then the prompt without its last token, and that token alone (RNN decoding: the per-token
/// WKV step, one-row products) continue the f32 state: the decoded logits must be within the
/// package's largest half-vs-f32 logit deviation of the f32 logits. Measured 0.51 / 0.77 of it
/// in bf16 and 0.69 / 0.66 in f16 (tiny / trained), the same logits as the sequence's. (Flex's
/// own f16 matmul sums a one-row product in f16 — 2.7 / 2.4 of it when the projections took that
/// route; they take the frozen-matmul op, which sums in f32.)
#[test]
fn half_compute_matches_the_rwkv_package_half_runs() {
    use burn::tensor::DType;
    use disha_models::ComputeDtype;
    let Some(dir) = fixture("tiny_random_v7") else {
        return;
    };
    let golden = read_golden(
        &std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/rwkv7_half/golden.safetensors"),
    );
    let mut models = vec![("tiny", dir.join("model.safetensors"))];
    match assets_root() {
        Some(assets) => models.push(("trained", assets.join("rwkv7-834K/model.safetensors"))),
        None => eprintln!("SKIPPED (trained 834K model): no shared assets"),
    }
    let device = Device::default();
    for (tag, path) in models {
        let ids = &golden[&format!("{tag}_tokens")].i64;
        let reference = &golden[&format!("{tag}_logits_fp32")].f32;
        let f32_model = load_model(&path, &device).unwrap().model;
        let f32_logits = host(f32_model.forward(tokens(ids, &device)));
        let d = assert_close(&format!("{tag} f32"), &f32_logits, reference, TOL);
        eprintln!("{tag} f32: max |diff| {d:e} from the package's fp32 run");
        for (compute, name) in [(ComputeDtype::Bf16, "bf16"), (ComputeDtype::F16, "fp16")] {
            if !device.supports_dtype(compute.dtype()) {
                eprintln!("SKIPPED ({tag} {name}): {device:?} has no {name} tensors");
                continue;
            }
            let model = f32_model.clone().with_compute_dtype(compute).unwrap();
            assert_eq!(model.compute_dtype(), compute.dtype());
            let logits = model.forward(tokens(ids, &device));
            assert_eq!(logits.dtype(), DType::F32, "logits are returned in f32");
            let logits = host(logits);
            let package = &golden[&format!("{tag}_logits_{name}")].f32;
            let gap = rms_diff(package, reference);
            let to_package = rms_diff(&logits, package);
            let to_f32 = rms_diff(&logits, reference);
            eprintln!(
                "{tag} {name}: rms to the package's {name} run {to_package:e}, to f32 \
                 {to_f32:e}; the package's own gap {gap:e}; max |diff| to its {name} run {:e}",
                max_abs_diff(&logits, package)
            );
            let what = format!(
                "{tag} {name}: rms {to_f32:e} from f32, {to_package:e} from the \
                                package's {name} run, gap {gap:e}"
            );
            assert!(
                to_f32 <= 1.25 * gap,
                "{what}: less accurate than the package"
            );
            assert!(to_f32 >= gap / 8.0, "{what}: no half-precision run");
            let shared = if tag == "trained" { 0.75 } else { 1.5 };
            assert!(
                to_package <= shared * gap,
                "{what}: too far from the package"
            );

            // The carried state stays f32 (readable as such), and RNN mode continues it.
            let mut state = model.new_decode_state();
            // The prompt through the fused WKV op, the last token through the per-token step
            // (RNN decoding).
            let split = ids.len() - 1;
            model.forward_last(tokens(&ids[..split], &device), &mut state);
            let last = host(model.forward_last(tokens(&ids[split..], &device), &mut state));
            let v = last.len();
            let seq_last = &logits[logits.len() - v..];
            let ref_last = &reference[reference.len() - v..];
            let package_worst = max_abs_diff(package, reference);
            let decoded = max_abs_diff(&last, ref_last);
            eprintln!(
                "{tag} {name}: last token decoded alone {decoded:e} from f32 (the sequence's {:e}; \
                 the package's largest half-vs-f32 deviation {package_worst:e})",
                max_abs_diff(seq_last, ref_last)
            );
            assert!(decoded <= package_worst, "{tag} {name}: decoding step");
            let disha_models::DecodeState::Rwkv7(state) = state else {
                panic!("an RWKV-7 model decodes with an RWKV-7 state")
            };
            assert_eq!(
                state.to_data().len,
                ids.len(),
                "the state reads back as f32"
            );
        }
    }
}

/// Mixed-precision training: under half compute the loss's gradient reaches every adapter of
/// every RWKV-PEFT target (through the f32 WKV op, the casts around it and the half
/// projections) and agrees with the f32 model's gradient. Bone and BAT adapters (random
/// blocks, so BAT's term is not zero) on the trained 834K model (the random tiny one where the
/// assets are absent).
///
/// Tolerance: relative L2 error of all adapter gradients together ≤ 3 % (bf16) / 0.4 % (f16).
/// Each rounding to the half dtype is relative 2⁻⁹ (bf16) or 2⁻¹² (f16), and the forward and
/// backward pass some tens of them per layer; measured on the 834K model 0.98 % / 0.10 %
/// (Bone), 0.71 % / 0.085 % (BAT), so the bounds are about 3× that. A gradient lost at a cast
/// (detached or zero) or flowing through the wrong branch is off by O(1).
#[test]
fn half_compute_gradients_reach_the_adapters_and_match_f32() {
    use disha_core::{Adapter, AdapterInit, AdapterSpec, BatOrientation};
    use disha_models::ComputeDtype;
    let Some(dir) = fixture("tiny_random_v7") else {
        return;
    };
    let path = match assets_root() {
        Some(assets) => assets.join("rwkv7-834K/model.safetensors"),
        None => dir.join("model.safetensors"),
    };
    let device = Device::default().autodiff();
    let ids: Vec<i64> = "Once upon a time, there was a little girl"
        .bytes()
        .map(i64::from)
        .collect();
    let gradients = |compute: ComputeDtype, spec: &AdapterSpec| -> Vec<f32> {
        let mut model = load_model(&path, &device)
            .unwrap()
            .model
            .with_compute_dtype(compute)
            .unwrap();
        device.seed(5);
        model.visit_linears_mut(&mut |site, l| {
            if site.role == disha_core::LinearRole::Hidden {
                l.add_adapter("a", spec).unwrap();
            }
        });
        let ids = tokens(&ids, &device);
        let grads = disha_models::causal_lm_loss(model.forward(ids.clone()), ids).backward();
        let mut all = Vec::new();
        model.visit_linears(&mut |site, l| {
            let g = match l.adapter("a") {
                Some(Adapter::Bone(b)) => b.block.val().grad(&grads).map(host),
                Some(Adapter::Bat(b)) => b.blocks.val().grad(&grads).map(host),
                _ => return,
            };
            let g = g.unwrap_or_else(|| panic!("{}: no gradient", site.name));
            assert!(g.iter().any(|x| *x != 0.0), "{}: no gradient", site.name);
            all.extend(g);
        });
        all
    };
    for spec in [
        AdapterSpec::bone(16),
        AdapterSpec::bat(16, BatOrientation::RwkvPeft).with_init(AdapterInit::Random),
    ] {
        let reference = gradients(ComputeDtype::F32, &spec);
        for (compute, tol) in [(ComputeDtype::Bf16, 0.03), (ComputeDtype::F16, 0.004)] {
            if !device.supports_dtype(compute.dtype()) {
                eprintln!("SKIPPED ({compute}): {device:?} has no {compute} tensors");
                continue;
            }
            let half = gradients(compute, &spec);
            let norm = reference.iter().map(|x| x * x).sum::<f32>().sqrt();
            let err = half
                .iter()
                .zip(&reference)
                .map(|(a, b)| (a - b) * (a - b))
                .sum::<f32>()
                .sqrt()
                / norm;
            let what = format!("{} {compute}", spec.method_name());
            eprintln!("{what}: relative gradient error {err:e}");
            assert!(
                err <= tol,
                "{what}: relative gradient error {err:e} > {tol}"
            );
        }
    }
}
