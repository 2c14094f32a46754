//! Valid inputs for every reader, built from one tiny Llama at start-up (deterministically, so a
//! case is reproducible from its seed): HF safetensors (f32, bf16, sharded), GGUF with both
//! tokenizer families and five tensor types, a llama2.c checkpoint, PEFT adapters of every
//! method, a `tokenizer.json`, JSONL data, a run config, and a training checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use burn::tensor::Device;
use disha_core::AdapterKind;
use disha_core::{
    MissInit, PeftConfig, PeftModelExt, TargetModules, freeze_all_but_active_adapters,
};
use disha_models::CausalLm;
use disha_models::PthTensor;
use disha_models::llama::{Llama, LlamaConfig, RopeScaling};
use disha_models::{RandomWeights, gguf_name};
use disha_train::data::{DataLoader, Example};
use disha_train::learner::Learner;
use disha_train::settings::{RunSettings, TrainSettings};
use half::{bf16, f16};
use safetensors::{Dtype, tensor::TensorView};

use crate::mutate::Field;

/// Files of one input: `(path relative to the case directory, bytes)`.
pub type Files = Vec<(String, Vec<u8>)>;

/// The tiny model every seed is made from: 64 tokens, width 32, 2 layers, GQA 4/2, untied head.
pub fn tiny_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 64,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 128,
        tie_word_embeddings: false,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(1),
        eos_token_ids: vec![2],
        dtype: "float32".into(),
    }
}

/// Synthetic training examples within the tiny vocabulary (the prompt half masked).
pub fn examples() -> Vec<Example> {
    (0..8)
        .map(|i| {
            let n = 6 + i % 5;
            let input_ids: Vec<u32> = (0..n).map(|t| 3 + ((i * 7 + t * 5) % 61) as u32).collect();
            let labels = input_ids
                .iter()
                .enumerate()
                .map(|(t, &id)| if t < n / 2 { -100 } else { id as i64 })
                .collect();
            Example { input_ids, labels }
        })
        .collect()
}

/// Every seed, built once per process.
#[derive(Debug)]
pub struct Seeds {
    /// HF directory, f32 weights.
    pub model_f32: Files,
    /// HF directory, bf16 weights.
    pub model_bf16: Files,
    /// HF directory with two shards and an index.
    pub sharded: Files,
    /// GGUF with a byte-level BPE tokenizer, and its numeric header fields.
    pub gguf_bpe: (Vec<u8>, Vec<Field>),
    /// GGUF with a SentencePiece tokenizer, and its numeric header fields.
    pub gguf_spm: (Vec<u8>, Vec<Field>),
    /// GGUF with one `[2, 256]` tensor per K-quant type ([`GGUF_KQUANT_TENSORS`]), and its
    /// numeric header fields.
    pub gguf_kquants: (Vec<u8>, Vec<Field>),
    /// llama2.c checkpoint.
    pub llama2c: Vec<u8>,
    /// PEFT adapter directories (`adapter/…`): Bone, BAT, MiSS-mini, LoRA.
    pub adapters: Vec<Files>,
    /// `tokenizer.json` + `tokenizer_config.json`.
    pub tokenizer: Files,
    /// A JSONL dataset (GSM8K fields).
    pub jsonl: Vec<u8>,
    /// A `disha train --config` TOML.
    pub run_toml: Vec<u8>,
    /// A run directory: `run.json` and one checkpoint.
    pub checkpoint: Files,
    /// `input_ids` for `disha logits --tokens-file`.
    pub input_ids: Vec<u8>,
    /// A tiny RWKV-7 in BlinkDL keys, as `.safetensors`, as a `torch.save` `.pth`, and as an
    /// rwkv.cpp `.bin`.
    pub rwkv: (Vec<u8>, Vec<u8>, Vec<u8>),
    /// RWKV-PEFT adapter checkpoints for that RWKV-7: Bone r4 with trained `ln1` / `ln2`
    /// weights, and BAT r4 (RWKV-PEFT orientation) with the legacy `.bone` suffix.
    pub rwkv_peft: (Vec<u8>, Vec<u8>),
    /// An RWKV World vocabulary file (every byte, then multi-byte tokens in every literal form).
    pub world_vocab: Vec<u8>,
}

/// Reads every file under `dir` as `(relative path, bytes)`.
fn files_under(dir: &Path) -> Files {
    fn walk(root: &Path, dir: &Path, out: &mut Files) {
        let mut entries: Vec<_> = std::fs::read_dir(dir)
            .expect("seed directory")
            .flatten()
            .collect();
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let path = entry.path();
            if path.is_dir() {
                walk(root, &path, out);
            } else {
                let rel = path.strip_prefix(root).expect("under root");
                out.push((
                    rel.to_string_lossy().into_owned(),
                    std::fs::read(&path).expect("seed file"),
                ));
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out
}

/// The tiny model with seeded random weights.
pub fn tiny_model(device: &Device) -> CausalLm {
    let config = tiny_config();
    Llama::from_source(&config, &mut RandomWeights::new(&config, 0.2, 42), device)
        .expect("the tiny config is valid")
        .into()
}

impl Seeds {
    /// Builds every seed (a second or so; the scratch directory is removed afterwards).
    pub fn build() -> Self {
        let scratch = tempfile::tempdir().expect("a temporary directory");
        let dir = scratch.path();
        let device = Device::default();
        let model = tiny_model(&device);
        let config = tiny_config();

        let f32_dir = dir.join("f32");
        disha_models::export_merged(&model, &config.to_hf_json(), &[], &f32_dir).expect("export");
        let mut bf16_config = config.clone();
        bf16_config.dtype = "bfloat16".into();
        let bf16_model: CausalLm = Llama::from_source(
            &bf16_config,
            &mut RandomWeights::new(&bf16_config, 0.2, 42),
            &device,
        )
        .expect("valid config")
        .into();
        let bf16_dir = dir.join("bf16");
        disha_models::export_merged(&bf16_model, &bf16_config.to_hf_json(), &[], &bf16_dir)
            .expect("export");

        let hf = disha_core::read_safetensors(&f32_dir.join("model.safetensors")).expect("seed");
        Self {
            model_f32: files_under(&f32_dir),
            model_bf16: files_under(&bf16_dir),
            sharded: sharded(&config, &hf),
            gguf_bpe: gguf(&config, &hf, Tokenizer::Bpe),
            gguf_spm: gguf(&config, &hf, Tokenizer::SentencePiece),
            gguf_kquants: gguf_kquants(),
            llama2c: llama2c(&config),
            adapters: adapters(&model, dir),
            tokenizer: tokenizer_files(),
            jsonl: jsonl(),
            run_toml: RUN_TOML.as_bytes().to_vec(),
            checkpoint: checkpoint(&f32_dir, dir),
            input_ids: input_ids(),
            rwkv: rwkv(),
            rwkv_peft: rwkv_peft(),
            world_vocab: world_vocab(),
        }
    }
}

/// RWKV-PEFT checkpoints for [`rwkv`]'s model (C 16, F 64, 2 layers), seeded values: Bone r4
/// with trained `ln1` / `ln2` weights, and BAT r4 (RWKV-PEFT orientation, legacy `.bone`).
fn rwkv_peft_tensors() -> (Vec<PthTensor>, Vec<PthTensor>) {
    let mut rng = disha_models::SplitMix64::new(11);
    let mut tensor = |name: String, shape: Vec<usize>| {
        let values = (0..shape.iter().product())
            .map(|_| rng.normal() * 0.05)
            .collect();
        (name, shape, values)
    };
    let (c, f, r) = (16, 64, 4);
    let mut bone = Vec::new();
    let mut bat = Vec::new();
    for l in 0..2 {
        for (module, d_in, d_out) in [
            ("att.receptance", c, c),
            ("att.key", c, c),
            ("att.value", c, c),
            ("att.output", c, c),
            ("ffn.key", c, f),
            ("ffn.value", f, c),
        ] {
            bone.push(tensor(format!("blocks.{l}.{module}.disha"), vec![r, d_out]));
            bat.push(tensor(
                format!("blocks.{l}.{module}.bone"),
                vec![d_in / r, r, r],
            ));
        }
        for ln in ["ln1", "ln2"] {
            bone.push(tensor(format!("blocks.{l}.{ln}.weight"), vec![c]));
        }
    }
    (bone, bat)
}

/// [`rwkv_peft_tensors`] as `.pth` bytes.
fn rwkv_peft() -> (Vec<u8>, Vec<u8>) {
    let (bone, bat) = rwkv_peft_tensors();
    (
        disha_models::pth_bytes("rwkv-peft-adapter", &bone),
        disha_models::pth_bytes("rwkv-peft-adapter", &bat),
    )
}

/// The tiny RWKV-7 of [`rwkv`] as an rwkv.cpp `.bin` (version 101, FP32): token-shift vectors
/// packed into `att.x_rwkvag`, low-rank matrices transposed, shapes reversed.
fn rwkv_cpp(tensors: &[(String, Vec<usize>, Vec<f32>)]) -> Vec<u8> {
    let config = [0x6767_6d66u32 as i32, 101, 64, 16, 2, 0];
    let mut out: Vec<u8> = config.iter().flat_map(|v| v.to_le_bytes()).collect();
    let mut record = |key: &str, shape: &[usize], values: &[f32]| {
        for v in [shape.len(), key.len(), 0] {
            out.extend((v as i32).to_le_bytes());
        }
        for &d in shape.iter().rev() {
            out.extend((d as i32).to_le_bytes());
        }
        out.extend(key.as_bytes());
        out.extend(values.iter().flat_map(|v| v.to_le_bytes()));
    };
    let find = |name: &str| tensors.iter().find(|(n, ..)| n == name);
    for (name, shape, values) in tensors {
        let (module, param) = name.rsplit_once('.').expect("dotted names");
        match param {
            "x_r" => {
                let packed: Vec<f32> = ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"]
                    .iter()
                    .flat_map(|p| find(&format!("{module}.{p}")).expect("all six").2.clone())
                    .collect();
                record(&format!("{module}.x_rwkvag"), &[6, 1, shape[2]], &packed);
            }
            "x_w" | "x_k" | "x_v" | "x_a" | "x_g" if module.ends_with(".att") => {}
            "w1" | "w2" | "a1" | "a2" | "v1" | "v2" | "g1" | "g2" => {
                let (rows, cols) = (shape[0], shape[1]);
                let mut t = vec![0.0; values.len()];
                for r in 0..rows {
                    for c in 0..cols {
                        t[c * rows + r] = values[r * cols + c];
                    }
                }
                record(name, &[cols, rows], &t);
            }
            _ => record(name, shape, values),
        }
    }
    out
}

/// A tiny RWKV-7 (2 layers, 2 heads of 8, vocab 64; layer 0 without `v0/v1/v2`, as some
/// BlinkDL files) with seeded `N(0, 0.2²)` weights, as safetensors, `.pth` and rwkv.cpp `.bin`
/// bytes.
fn rwkv() -> (Vec<u8>, Vec<u8>, Vec<u8>) {
    let config = disha_models::rwkv::RwkvConfig {
        vocab_size: 64,
        hidden_size: 16,
        num_layers: 2,
        num_heads: 2,
        head_size: 8,
        ffn_size: 64,
        decay_rank: 4,
        iclr_rank: 4,
        value_rank: 4,
        gate_rank: 4,
        layer0_value_residual: false,
    };
    let mut rng = disha_models::SplitMix64::new(7);
    let tensors: Vec<(String, Vec<usize>, Vec<f32>)> = config
        .tensor_shapes()
        .into_iter()
        .map(|(name, shape)| {
            let n = shape.iter().product();
            let values = (0..n).map(|_| rng.normal() * 0.2).collect();
            (name, shape, values)
        })
        .collect();
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s, v)| (n.clone(), s.clone(), f32_bytes(v)))
        .collect();
    let views = data.iter().map(|(n, shape, bytes)| {
        (
            n.clone(),
            TensorView::new(Dtype::F32, shape.clone(), bytes).expect("seed tensor"),
        )
    });
    let safetensors = safetensors::serialize(views, None).expect("seed");
    (
        safetensors,
        disha_models::pth_bytes("archive", &tensors),
        rwkv_cpp(&tensors),
    )
}

/// A small World vocabulary: the 256 bytes (printable ASCII as str literals, the rest as bytes
/// literals), then tokens written with each escape form the real file uses.
fn world_vocab() -> Vec<u8> {
    let mut lines = Vec::new();
    for b in 0..=255u8 {
        let literal = if b.is_ascii_graphic() && b != b'\\' && b != b'\'' {
            format!("'{}'", b as char)
        } else {
            format!("b'\\x{b:02x}'")
        };
        lines.push(format!("{} {literal} 1", u32::from(b) + 1));
    }
    let extra = [
        ("'\\t\\n'", 2),
        ("'ab'", 2),
        ("\"it's\"", 4),
        ("'\\u00e9t\\u00e9'", 5),
        ("'中文'", 6),
        ("b'\\xe4\\xb8'", 2),
        ("'hello world'", 11),
    ];
    for (i, (literal, len)) in extra.iter().enumerate() {
        lines.push(format!("{} {literal} {len}", 257 + i));
    }
    (lines.join("\n") + "\n").into_bytes()
}

fn f32_bytes(values: &[f32]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le_bytes()).collect()
}

/// The HF tensors split over two shards with a `model.safetensors.index.json`.
fn sharded(config: &LlamaConfig, hf: &BTreeMap<String, disha_core::HostTensor>) -> Files {
    let names: Vec<&String> = hf.keys().collect();
    let (a, b) = names.split_at(names.len() / 2);
    let mut files = vec![(
        "config.json".to_string(),
        serde_json::to_vec_pretty(&config.to_hf_json()).expect("json"),
    )];
    let mut weight_map = serde_json::Map::new();
    for (i, part) in [a, b].iter().enumerate() {
        let file = format!("model-0000{}-of-00002.safetensors", i + 1);
        let data: Vec<(String, Vec<usize>, Vec<u8>)> = part
            .iter()
            .map(|n| {
                (
                    n.to_string(),
                    hf[*n].shape.clone(),
                    f32_bytes(&hf[*n].values),
                )
            })
            .collect();
        let views = data
            .iter()
            .map(|(n, shape, bytes)| {
                (
                    n.clone(),
                    TensorView::new(Dtype::F32, shape.clone(), bytes).expect("view"),
                )
            })
            .collect::<Vec<_>>();
        for (n, _, _) in &data {
            weight_map.insert(n.clone(), file.clone().into());
        }
        files.push((
            file,
            safetensors::serialize(views, None).expect("serialize"),
        ));
    }
    let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": weight_map});
    files.push((
        "model.safetensors.index.json".into(),
        serde_json::to_vec_pretty(&index).expect("json"),
    ));
    files
}

/// Which tokenizer a GGUF seed embeds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Tokenizer {
    Bpe,
    SentencePiece,
}

/// Writes GGUF v3 and records where every numeric header field is: [`Self::start`], the
/// metadata (`kv_*`), [`Self::end_metadata`], the tensors ([`Self::tensor`]), [`Self::finish`].
struct GgufWriter {
    out: Vec<u8>,
    fields: Vec<Field>,
    /// Metadata entries written.
    kvs: u64,
    /// Where the metadata count is, patched by [`Self::end_metadata`].
    kv_count_at: usize,
    /// The data section so far (each tensor padded to the 32-byte alignment).
    data: Vec<u8>,
}

impl GgufWriter {
    /// Magic, version 3, the tensor count and a metadata-count placeholder.
    fn start(tensors: usize) -> Self {
        let mut w = GgufWriter {
            out: b"GGUF".to_vec(),
            fields: Vec::new(),
            kvs: 0,
            kv_count_at: 0,
            data: Vec::new(),
        };
        w.int(3, 4);
        w.int(tensors as u64, 8);
        w.kv_count_at = w.out.len();
        w.int(0, 8);
        w
    }

    /// Writes the number of metadata entries written so far into the header.
    fn end_metadata(&mut self) {
        let at = self.kv_count_at;
        self.out[at..at + 8].copy_from_slice(&self.kvs.to_le_bytes());
    }

    /// One tensor-directory entry (`shape` in PyTorch order; GGUF stores it reversed) and its
    /// raw `bytes` in the data section.
    fn tensor(&mut self, name: &str, shape: &[usize], type_id: u32, bytes: &[u8]) {
        self.string(name);
        self.int(shape.len() as u64, 4);
        for d in shape.iter().rev() {
            self.int(*d as u64, 8);
        }
        self.int(type_id as u64, 4);
        self.int(self.data.len() as u64, 8);
        self.data.extend(bytes);
        self.data.resize(self.data.len().next_multiple_of(32), 0);
    }

    /// The file (header padded to the alignment, then the data) and its numeric fields.
    fn finish(mut self) -> (Vec<u8>, Vec<Field>) {
        self.out.resize(self.out.len().next_multiple_of(32), 0);
        self.out.extend(self.data);
        (self.out, self.fields)
    }

    fn int(&mut self, value: u64, width: usize) {
        self.fields.push(Field::int(self.out.len(), width));
        self.out.extend(&value.to_le_bytes()[..width]);
    }

    fn string(&mut self, s: &str) {
        self.int(s.len() as u64, 8);
        self.out.extend(s.as_bytes());
    }

    fn key(&mut self, key: &str, type_id: u32) {
        self.kvs += 1;
        self.string(key);
        self.int(type_id as u64, 4);
    }

    fn kv_u32(&mut self, key: &str, v: u32) {
        self.key(key, 4);
        self.int(v as u64, 4);
    }

    fn kv_f32(&mut self, key: &str, v: f32) {
        self.key(key, 6);
        self.fields.push(Field::float(self.out.len(), 4));
        self.out.extend(v.to_le_bytes());
    }

    fn kv_bool(&mut self, key: &str, v: bool) {
        self.key(key, 7);
        self.int(v as u64, 1);
    }

    fn kv_str(&mut self, key: &str, v: &str) {
        self.key(key, 8);
        self.string(v);
    }

    fn kv_strs(&mut self, key: &str, items: &[String]) {
        self.key(key, 9);
        self.int(8, 4);
        self.int(items.len() as u64, 8);
        for item in items {
            self.string(item);
        }
    }

    fn kv_i32s(&mut self, key: &str, items: &[i32]) {
        self.key(key, 9);
        self.int(5, 4);
        self.int(items.len() as u64, 8);
        for &v in items {
            self.int(v as u32 as u64, 4);
        }
    }

    fn kv_f32s(&mut self, key: &str, items: &[f32]) {
        self.key(key, 9);
        self.int(6, 4);
        self.int(items.len() as u64, 8);
        for &v in items {
            self.fields.push(Field::float(self.out.len(), 4));
            self.out.extend(v.to_le_bytes());
        }
    }
}

/// ggml-style block quantization of `values` (row-major, rows a multiple of 32): layouts as
/// llama.cpp writes them; the rounding only needs to be plausible.
fn quantize(values: &[f32], type_id: u32) -> Vec<u8> {
    match type_id {
        0 => f32_bytes(values),
        1 => values
            .iter()
            .flat_map(|v| f16::from_f32(*v).to_le_bytes())
            .collect(),
        30 => values
            .iter()
            .flat_map(|v| bf16::from_f32(*v).to_le_bytes())
            .collect(),
        2 | 3 | 8 => values
            .chunks_exact(32)
            .flat_map(|block| {
                let (min, max) = block
                    .iter()
                    .fold((f32::MAX, f32::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
                let amax = min.abs().max(max.abs());
                match type_id {
                    8 => {
                        let d = amax / 127.0;
                        let mut out = f16::from_f32(d).to_le_bytes().to_vec();
                        out.extend(block.iter().map(|v| (v / d.max(1e-12)).round() as i8 as u8));
                        out
                    }
                    2 => {
                        let d = amax / 7.0;
                        let q = |v: f32| ((v / d.max(1e-12)).round() + 8.0).clamp(0.0, 15.0) as u8;
                        let mut out = f16::from_f32(d).to_le_bytes().to_vec();
                        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
                        out
                    }
                    _ => {
                        let d = (max - min) / 15.0;
                        let q = |v: f32| ((v - min) / d.max(1e-12)).round().clamp(0.0, 15.0) as u8;
                        let mut out = f16::from_f32(d).to_le_bytes().to_vec();
                        out.extend(f16::from_f32(min).to_le_bytes());
                        out.extend((0..16).map(|j| q(block[j]) | (q(block[j + 16]) << 4)));
                        out
                    }
                }
            })
            .collect(),
        other => unreachable!("no seed quantizer for type {other}"),
    }
}

/// The tokens of the GGUF tokenizers (64, the model's vocabulary).
fn gguf_tokens(kind: Tokenizer) -> (Vec<String>, Vec<i32>) {
    let letters = ('a'..='z').chain('A'..='Z').map(String::from);
    match kind {
        Tokenizer::Bpe => {
            let mut tokens: Vec<String> = ["<s>", "</s>", "<unk>", "Ġ", "he", "ll"]
                .map(String::from)
                .to_vec();
            tokens.extend(letters);
            tokens.extend(('0'..='5').map(String::from));
            let types = (0..64).map(|i| if i < 3 { 3 } else { 1 }).collect();
            (tokens, types)
        }
        Tokenizer::SentencePiece => {
            let mut tokens: Vec<String> = ["<unk>", "<s>", "</s>", "▁", "▁h", "he", "ll"]
                .map(String::from)
                .to_vec();
            tokens.extend(letters);
            tokens.extend(('0'..='4').map(String::from));
            let types = (0..64)
                .map(|i| match i {
                    0 => 2,
                    1 | 2 => 3,
                    _ => 1,
                })
                .collect();
            (tokens, types)
        }
    }
}

/// The tiny model as a GGUF file (llama.cpp's names and dim order; F32 norms, Q8_0 embeddings
/// and head, Q4_0 / Q4_1 / F16 / BF16 projections), with `kind`'s tokenizer in the metadata.
fn gguf(
    config: &LlamaConfig,
    hf: &BTreeMap<String, disha_core::HostTensor>,
    kind: Tokenizer,
) -> (Vec<u8>, Vec<Field>) {
    let mut w = GgufWriter::start(hf.len());
    w.kv_str("general.architecture", "llama");
    w.kv_u32("general.alignment", 32);
    for (key, v) in [
        ("llama.embedding_length", config.hidden_size),
        ("llama.block_count", config.num_hidden_layers),
        ("llama.feed_forward_length", config.intermediate_size),
        ("llama.attention.head_count", config.num_attention_heads),
        ("llama.attention.head_count_kv", config.num_key_value_heads),
        ("llama.context_length", config.max_position_embeddings),
        ("llama.vocab_size", config.vocab_size),
    ] {
        w.kv_u32(key, v as u32);
    }
    w.kv_f32("llama.rope.freq_base", config.rope_theta as f32);
    w.kv_f32(
        "llama.attention.layer_norm_rms_epsilon",
        config.rms_norm_eps as f32,
    );
    let (tokens, types) = gguf_tokens(kind);
    match kind {
        Tokenizer::Bpe => {
            w.kv_str("tokenizer.ggml.model", "gpt2");
            w.kv_str("tokenizer.ggml.pre", "default");
            w.kv_strs("tokenizer.ggml.merges", &["h e".into(), "l l".into()]);
            w.kv_bool("tokenizer.ggml.add_bos_token", false);
            w.kv_u32("tokenizer.ggml.bos_token_id", 0);
            w.kv_u32("tokenizer.ggml.eos_token_id", 1);
        }
        Tokenizer::SentencePiece => {
            w.kv_str("tokenizer.ggml.model", "llama");
            let scores: Vec<f32> = (0..64).map(|i| -(i as f32)).collect();
            w.kv_f32s("tokenizer.ggml.scores", &scores);
            w.kv_bool("tokenizer.ggml.add_space_prefix", true);
            w.kv_u32("tokenizer.ggml.unknown_token_id", 0);
            w.kv_u32("tokenizer.ggml.bos_token_id", 1);
            w.kv_u32("tokenizer.ggml.eos_token_id", 2);
        }
    }
    w.kv_strs("tokenizer.ggml.tokens", &tokens);
    w.kv_i32s("tokenizer.ggml.token_type", &types);
    w.kv_str(
        "tokenizer.chat_template",
        "{% for m in messages %}<s>{{ m['role'] }}: {{ m['content'] }}</s>{% endfor %}",
    );
    w.end_metadata();

    for (name, t) in hf {
        let gguf = gguf_name(name).expect("every Llama tensor has a GGUF name");
        let type_id = if t.shape.len() == 1 {
            0
        } else if gguf.starts_with("token_embd") || gguf.starts_with("output") {
            8
        } else if gguf.ends_with("attn_q.weight") {
            2
        } else if gguf.ends_with("attn_k.weight") {
            3
        } else if gguf.contains("ffn_down") {
            1
        } else {
            30
        };
        w.tensor(&gguf, &t.shape, type_id, &quantize(&t.values, type_id));
    }
    w.finish()
}

/// The tensors of [`Seeds::gguf_kquants`]: `(name, GGML type id, block bytes)` for Q2_K, Q3_K,
/// Q4_K, Q5_K, Q6_K and Q8_K.
pub const GGUF_KQUANT_TENSORS: [(&str, u32, usize); 6] = [
    ("q2_k", 10, 84),
    ("q3_k", 11, 110),
    ("q4_k", 12, 144),
    ("q5_k", 13, 176),
    ("q6_k", 14, 210),
    ("q8_k", 15, 292),
];

/// A GGUF file of K-quant tensors: two 256-weight blocks each, bytes from a fixed seed (every
/// bit pattern of a K-quant block is a block; the decoders' only inputs are these bytes).
fn gguf_kquants() -> (Vec<u8>, Vec<Field>) {
    let mut w = GgufWriter::start(GGUF_KQUANT_TENSORS.len());
    w.kv_str("general.architecture", "llama");
    w.kv_u32("general.alignment", 32);
    w.end_metadata();
    let mut rng = disha_models::SplitMix64::new(0x6b71);
    for (name, type_id, block_bytes) in GGUF_KQUANT_TENSORS {
        let bytes: Vec<u8> = (0..2 * block_bytes).map(|_| rng.next_u64() as u8).collect();
        w.tensor(name, &[2, 256], type_id, &bytes);
    }
    w.finish()
}

/// The tiny model as a llama.2c checkpoint (unshared classifier: negative vocab size).
fn llama2c(config: &LlamaConfig) -> Vec<u8> {
    let (dim, hidden, layers) = (
        config.hidden_size,
        config.intermediate_size,
        config.num_hidden_layers,
    );
    let (vocab, seq) = (config.vocab_size, config.max_position_embeddings);
    let kv = config.kv_dim();
    let header = [
        dim as i32,
        hidden as i32,
        layers as i32,
        config.num_attention_heads as i32,
        config.num_key_value_heads as i32,
        -(vocab as i32),
        seq as i32,
    ];
    let floats = vocab * dim
        + layers * (2 * dim + 2 * dim * dim + 2 * kv * dim + 3 * hidden * dim)
        + dim
        + seq * config.head_dim
        + vocab * dim;
    let mut out: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
    out.extend((0..floats).flat_map(|i| (((i * 37) % 101) as f32 * 2e-3 - 0.1).to_le_bytes()));
    out
}

/// A PEFT adapter directory for each method, on the projections and the untied head.
fn adapters(model: &CausalLm, dir: &Path) -> Vec<Files> {
    let targets = || {
        TargetModules::Names(
            ["q_proj", "v_proj", "down_proj", "lm_head"]
                .map(String::from)
                .to_vec(),
        )
    };
    let configs = [
        PeftConfig::miss_with(4, MissInit::Random, targets()),
        PeftConfig::miss_with(
            4,
            MissInit::Bat,
            TargetModules::Names(vec!["q_proj".into(), "o_proj".into()]),
        ),
        PeftConfig::miss_with(4, MissInit::Mini, targets()),
        PeftConfig::lora(2, 4.0, targets()),
    ];
    configs
        .iter()
        .enumerate()
        .map(|(i, config)| {
            let mut m = model.clone();
            m.add_adapter("default", config).expect("seed adapter");
            let out = dir.join(format!("adapter-{i}"));
            m.save_adapter("default", config, &out.join("adapter"))
                .expect("save");
            files_under(&out)
        })
        .collect()
}

/// A byte-level BPE `tokenizer.json` (the GGUF seed's vocabulary) and a `tokenizer_config.json`
/// with special tokens and a ChatML template.
fn tokenizer_files() -> Files {
    let (tokens, _) = gguf_tokens(Tokenizer::Bpe);
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .iter()
        .enumerate()
        .map(|(i, t)| (t.clone(), i.into()))
        .collect();
    let byte_level = serde_json::json!({"type": "ByteLevel", "add_prefix_space": false,
        "trim_offsets": true, "use_regex": true});
    let added: Vec<serde_json::Value> = tokens[..3]
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({"id": i, "content": t, "single_word": false,
            "lstrip": false, "rstrip": false, "normalized": false, "special": true})
        })
        .collect();
    let tokenizer = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null,
        "added_tokens": added, "normalizer": null, "pre_tokenizer": byte_level,
        "post_processor": null, "decoder": byte_level,
        "model": {"type": "BPE", "dropout": null, "unk_token": "<unk>",
                  "continuing_subword_prefix": null, "end_of_word_suffix": null,
                  "fuse_unk": false, "byte_fallback": false, "ignore_merges": false,
                  "vocab": vocab, "merges": ["h e", "l l"]}
    });
    let config = serde_json::json!({
        "bos_token": "<s>", "eos_token": {"content": "</s>"},
        "chat_template": "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
    });
    vec![
        (
            "tokenizer.json".into(),
            serde_json::to_vec_pretty(&tokenizer).expect("json"),
        ),
        (
            "tokenizer_config.json".into(),
            serde_json::to_vec_pretty(&config).expect("json"),
        ),
    ]
}

/// 24 GSM8K-style records.
fn jsonl() -> Vec<u8> {
    (0..24)
        .map(|i| {
            serde_json::json!({"question": format!("What is {i} + {}?", i % 5),
                               "answer": format!("{i} + {} = {}\n#### {}", i % 5, i + i % 5, i + i % 5)})
                .to_string()
        })
        .collect::<Vec<_>>()
        .join("\n")
        .into_bytes()
}

/// A `disha train --config` file using most settings.
const RUN_TOML: &str = r#"data = "train.jsonl"
out = "runs/fuzz"
fields = "gsm8k"
method = "lora"
r = 8
lora_alpha = 16.0
lr = 3e-4
max_steps = 10
batch_size = 2
grad_accum = 2
max_len = 128
warmup_steps = 1
schedule = "cosine"
max_grad_norm = 1.0
beta2 = 0.99
eps = 1e-8
targets = ["q_proj", "v_proj"]
skip_bad_lines = true
save_every = 5
keep_checkpoints = 2
"#;

/// The settings of the checkpoint seed's run (Bone r4, batch 2, checkpoint every 2 steps).
pub fn checkpoint_settings(out: &Path) -> RunSettings {
    TrainSettings {
        data: Some("data.jsonl".into()),
        out: Some(out.to_path_buf()),
        method: Some(AdapterKind::Bone),
        r: Some(4),
        max_steps: Some(6),
        batch_size: Some(2),
        max_len: Some(16),
        lr: Some(1e-2),
        save_every: Some(2),
        // f16 compute, so `state.json` holds a loss scale for the mutations to reach.
        compute_dtype: Some(disha_models::ComputeDtype::F16),
        ..TrainSettings::default()
    }
    .resolve()
    .expect("valid settings")
}

/// A run directory after 2 steps of Bone training of the tiny model (`base` holds it as an
/// HF directory) in f16 compute: `run.json` and `checkpoints/step-000002/`.
fn checkpoint(base: &Path, dir: &Path) -> Files {
    let out = dir.join("run");
    let settings = checkpoint_settings(&out);
    let device = Device::default().autodiff();
    let mut model = disha_models::load_model(base, &device)
        .expect("seed model")
        .model
        .with_compute_dtype(settings.compute_dtype)
        .expect("Flex computes in f16");
    let peft = settings.peft_config(disha_models::ModelFamily::Llama);
    model.add_adapter("default", &peft).expect("adapter");
    let model = freeze_all_but_active_adapters(model);
    let mut learner = Learner::new(model, settings.learner.clone()).expect("learner");
    let mut data = DataLoader::new(examples(), settings.batch_size, settings.seed, 0);
    for _ in 0..2 {
        learner.train_step(&mut data).expect("seed training step");
    }
    disha_train::checkpoint::save(&out, &learner, &peft, data.position(), 2).expect("save");
    let json = serde_json::to_vec_pretty(&settings).expect("settings serialize");
    std::fs::write(out.join("run.json"), json).expect("write");
    files_under(&out)
}

/// `input_ids` [2, 8] (I64), as `disha logits --tokens-file` reads it.
fn input_ids() -> Vec<u8> {
    let ids: Vec<u8> = (0..16i64)
        .flat_map(|i| (i * 3 % 64).to_le_bytes())
        .collect();
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    safetensors::serialize(
        [(
            "input_ids",
            TensorView::new(Dtype::I64, vec![2, 8], &ids).expect("view"),
        )],
        Some(metadata),
    )
    .expect("serialize")
}
