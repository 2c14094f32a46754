//! The readers under test: for each, how a case directory is built from the seeds, which file
//! is mutated (and how), and which library entry points read it. Every entry point returns a
//! typed error (`ModelError`, `DishaError`, `TrainError`); the harness only sees its message.
//!
//! A new reader joins the harness by adding one [`Target`] here.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Int, Tensor, TensorData};
use disha_core::{PeftModelExt, QuantFormat, SafetensorsFile};
use disha_models::gguf::GgufFile;
use disha_models::{
    BaseDtype, ChatMessage, LoadOptions, TextTokenizer, load_model, load_model_with,
};
use disha_models::{CausalLm, PthTensor};
use disha_train::data::{
    DataLoader, FieldMap, JsonlOptions, PromptTemplate, encode_all, read_jsonl,
};
use disha_train::settings::{RunSettings, TrainSettings};

use crate::mutate::{
    Field, Rng, mutate_bytes, mutate_field, mutate_json, mutate_jsonl, mutate_toml,
};
use crate::seeds::{Files, GGUF_KQUANT_TENSORS, Seeds, examples};

/// Longest JSONL line the `jsonl` target accepts (the default is 1 MiB; smaller keeps the
/// over-long-line cases fast).
pub const FUZZ_MAX_LINE: usize = 64 << 10;

/// Largest forward pass the harness runs on a loaded model (tokens): reading is what is under
/// test, not the model's legitimate cost on a long input.
const MAX_FORWARD_TOKENS: usize = 4096;

/// How the mutated file is structured.
#[derive(Clone, Debug)]
pub enum Kind {
    /// Binary with known numeric header fields; `hot` is the header's length.
    Binary {
        /// Numeric fields.
        fields: Vec<Field>,
        /// Bytes at the start that hold the header.
        hot: usize,
    },
    /// A safetensors file: 8-byte header length, JSON header, data.
    Safetensors,
    /// JSON.
    Json,
    /// JSON lines.
    Jsonl,
    /// TOML.
    Toml,
    /// A `torch.save` checkpoint of named tensors: rewritten with semantic edits (shapes,
    /// names, ranks, values) in a well-formed container, or mutated as bytes.
    TorchTensors,
}

/// A case directory ready to be mutated: which file, and how it is structured.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The file to mutate, relative to the case directory.
    pub file: PathBuf,
    /// Its structure.
    pub kind: Kind,
}

/// What stays loaded across cases: the tiny base model on both devices.
#[derive(Debug)]
pub struct Context {
    /// Every seed.
    pub seeds: Seeds,
    /// The tiny model (Flex).
    pub base: CausalLm,
    /// The tiny model on an autodiff device, for checkpoint resumes.
    pub base_autodiff: CausalLm,
}

impl Context {
    /// Builds the seeds and loads the base model.
    pub fn new() -> Self {
        let seeds = Seeds::build();
        let device = Device::default();
        let base = crate::seeds::tiny_model(&device);
        let base_autodiff = crate::seeds::tiny_model(&device.clone().autodiff());
        Self {
            seeds,
            base,
            base_autodiff,
        }
    }
}

/// One reader under test.
#[derive(Clone, Copy, Debug)]
pub struct Target {
    /// Name used in reports and `--targets`.
    pub name: &'static str,
    /// What it reads.
    pub about: &'static str,
    prepare: fn(&Context, &mut Rng, &Path) -> Prepared,
    run: fn(&Context, &mut Rng, &Path) -> Result<(), String>,
}

/// Every target, in the order cases cycle through them.
pub const TARGETS: &[Target] = &[
    Target {
        name: "model-safetensors",
        about: "HF model.safetensors (f32 / bf16) through load_model, base kept in auto / f32 / \
                f16 / bf16, linears quantized or not",
        prepare: |ctx, rng, dir| {
            let files = if rng.chance(0.5) {
                &ctx.seeds.model_f32
            } else {
                &ctx.seeds.model_bf16
            };
            write_files(dir, files);
            prepared("model.safetensors", Kind::Safetensors)
        },
        run: |_, rng, dir| {
            let bases = [
                BaseDtype::Auto,
                BaseDtype::F32,
                BaseDtype::F16,
                BaseDtype::Bf16,
            ];
            let base = bases[rng.below(bases.len())];
            let options = LoadOptions::default()
                .with_base_dtype(base)
                .with_base_quant(random_quant(rng));
            load_and_forward_as(dir, &options)
        },
    },
    Target {
        name: "config-json",
        about: "HF config.json through load_model",
        prepare: |ctx, _, dir| {
            write_files(dir, &ctx.seeds.model_f32);
            prepared("config.json", Kind::Json)
        },
        run: |_, _, dir| load_and_forward(dir),
    },
    Target {
        name: "sharded-index",
        about: "model.safetensors.index.json and its shards through load_model",
        prepare: |ctx, rng, dir| {
            write_files(dir, &ctx.seeds.sharded);
            if rng.chance(0.7) {
                prepared("model.safetensors.index.json", Kind::Json)
            } else {
                prepared("model-00002-of-00002.safetensors", Kind::Safetensors)
            }
        },
        run: |_, _, dir| load_and_forward(dir),
    },
    Target {
        name: "gguf",
        about: "GGUF header, metadata, tensor table and data (dequantized, or its Q4_0 / Q8_0 \
                blocks kept by a quantized base); its tokenizer",
        prepare: |ctx, rng, dir| {
            let (bytes, fields) = if rng.chance(0.5) {
                &ctx.seeds.gguf_bpe
            } else {
                &ctx.seeds.gguf_spm
            };
            gguf_seed(dir, "model.gguf", bytes, fields)
        },
        run: |_, rng, dir| {
            let options = LoadOptions::default().with_base_quant(random_quant(rng));
            let loaded = load_model_with(&dir.join("model.gguf"), &Device::default(), &options)
                .map_err(text)?;
            let tokenizer = loaded.tokenizer().map_err(text)?;
            tokenizer
                .check_fits(loaded.model.vocab_size())
                .map_err(text)?;
            let ids = tokenizer.encode("hello Hello he", true).map_err(text)?;
            if tokenizer.chat_template().is_some() {
                tokenizer
                    .encode_chat(&[ChatMessage::new("user", "hello")])
                    .map_err(text)?;
            }
            tokenizer.decode(&ids, false).map_err(text)?;
            let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
            forward(&loaded.model, &ids, [1, ids.len()])
        },
    },
    Target {
        name: "gguf-kquants",
        about: "GGUF K-quant tensors (Q2_K-Q6_K, Q8_K) dequantized",
        prepare: |ctx, _, dir| {
            let (bytes, fields) = &ctx.seeds.gguf_kquants;
            gguf_seed(dir, "kquants.gguf", bytes, fields)
        },
        run: |_, _, dir| {
            let file = GgufFile::open(&dir.join("kquants.gguf")).map_err(text)?;
            for (name, _, _) in GGUF_KQUANT_TENSORS {
                if let Some(values) = file.dequantize(name).map_err(text)? {
                    // Whole 256-weight blocks, one per row: the directory was checked at open.
                    assert_eq!(values.len() % 256, 0, "{name}: {} values", values.len());
                }
            }
            Ok(())
        },
    },
    Target {
        name: "llama2c",
        about: "llama2.c .bin header and weights through load_model",
        prepare: |ctx, _, dir| {
            std::fs::write(dir.join("model.bin"), &ctx.seeds.llama2c).expect("write seed");
            let fields = (0..7).map(|i| Field::int(4 * i, 4)).collect();
            prepared("model.bin", Kind::Binary { fields, hot: 28 })
        },
        run: |_, _, dir| load_and_forward(&dir.join("model.bin")),
    },
    Target {
        name: "rwkv-safetensors",
        about: "BlinkDL RWKV-7 .safetensors (keys, shapes, data) through load_model",
        prepare: |ctx, _, dir| {
            std::fs::write(dir.join("model.safetensors"), &ctx.seeds.rwkv.0).expect("write seed");
            prepared("model.safetensors", Kind::Safetensors)
        },
        run: |_, _, dir| load_and_forward(&dir.join("model.safetensors")),
    },
    Target {
        name: "rwkv-pth",
        about: "BlinkDL RWKV-7 .pth (zip, pickle, storages) through load_model",
        prepare: |ctx, _, dir| {
            std::fs::write(dir.join("model.pth"), &ctx.seeds.rwkv.1).expect("write seed");
            // The pickle is the first entry: weight mutations towards it.
            prepared(
                "model.pth",
                Kind::Binary {
                    fields: Vec::new(),
                    hot: 4096,
                },
            )
        },
        run: |_, _, dir| load_and_forward(&dir.join("model.pth")),
    },
    Target {
        name: "rwkv-cpp-bin",
        about: "rwkv.cpp .bin (header, tensor records, packed / transposed tensors) through load_model",
        prepare: |ctx, _, dir| {
            std::fs::write(dir.join("model.bin"), &ctx.seeds.rwkv.2).expect("write seed");
            // The header and the first records: every count, rank, extent, key length, type.
            let mut fields: Vec<Field> = (0..6).map(|i| Field::int(4 * i, 4)).collect();
            fields.extend((0..6).map(|i| Field::int(24 + 4 * i, 4)));
            prepared("model.bin", Kind::Binary { fields, hot: 512 })
        },
        run: |_, _, dir| load_and_forward(&dir.join("model.bin")),
    },
    Target {
        name: "rwkv-peft-pth",
        about: "RWKV-PEFT adapter .pth (Bone / BAT tensors, replaced LayerNorms) through \
                load_rwkv_peft, forward, merge",
        prepare: |ctx, rng, dir| {
            std::fs::write(dir.join("model.pth"), &ctx.seeds.rwkv.1).expect("write seed");
            let seed = if rng.chance(0.5) {
                &ctx.seeds.rwkv_peft.0
            } else {
                &ctx.seeds.rwkv_peft.1
            };
            std::fs::write(dir.join("adapter.pth"), seed).expect("write seed");
            prepared("adapter.pth", Kind::TorchTensors)
        },
        run: |_, _, dir| {
            let mut loaded =
                load_model(&dir.join("model.pth"), &Device::default()).map_err(text)?;
            let rwkv = loaded
                .model
                .as_rwkv7_mut()
                .ok_or("the seed model is RWKV-7")?;
            rwkv.load_rwkv_peft(&dir.join("adapter.pth"), "default")
                .map_err(text)?;
            let ids: Vec<i64> = (0..6).map(|i| i * 5 % 64).collect();
            forward(&loaded.model, &ids, [1, 6])?;
            loaded
                .model
                .merge_adapters()
                .map_err(|e| format!("{COMPUTED}{e}"))?;
            forward(&loaded.model, &ids, [1, 6])
        },
    },
    Target {
        name: "world-vocab",
        about: "RWKV World vocabulary (.txt) through TextTokenizer::from_file, encode, decode",
        prepare: |ctx, _, dir| {
            std::fs::write(dir.join("vocab.txt"), &ctx.seeds.world_vocab).expect("write seed");
            let hot = ctx.seeds.world_vocab.len();
            prepared(
                "vocab.txt",
                Kind::Binary {
                    fields: Vec::new(),
                    hot,
                },
            )
        },
        run: |_, _, dir| {
            let tokenizer = TextTokenizer::from_file(&dir.join("vocab.txt")).map_err(text)?;
            let ids = tokenizer
                .encode("hello world, it's été 中文\t\n", true)
                .map_err(text)?;
            tokenizer.decode(&ids, false).map_err(text)?;
            Ok(())
        },
    },
    Target {
        name: "adapter-safetensors",
        about: "PEFT adapter_model.safetensors (Bone, BAT, mini, LoRA) through load_adapter, merge",
        prepare: |ctx, rng, dir| {
            write_files(dir, rng.pick(&ctx.seeds.adapters));
            prepared("adapter/adapter_model.safetensors", Kind::Safetensors)
        },
        run: |ctx, _, dir| load_adapter_and_merge(ctx, dir),
    },
    Target {
        name: "adapter-config",
        about: "PEFT adapter_config.json through load_adapter, merge",
        prepare: |ctx, rng, dir| {
            write_files(dir, rng.pick(&ctx.seeds.adapters));
            prepared("adapter/adapter_config.json", Kind::Json)
        },
        run: |ctx, _, dir| load_adapter_and_merge(ctx, dir),
    },
    Target {
        name: "tokenizer-json",
        about: "tokenizer.json and tokenizer_config.json (chat template)",
        prepare: |ctx, rng, dir| {
            write_files(dir, &ctx.seeds.tokenizer);
            if rng.chance(0.75) {
                prepared("tokenizer.json", Kind::Json)
            } else {
                prepared("tokenizer_config.json", Kind::Json)
            }
        },
        run: |_, _, dir| {
            let tokenizer = TextTokenizer::from_file(&dir.join("tokenizer.json")).map_err(text)?;
            let ids = tokenizer.encode("Hello he ll 01", true).map_err(text)?;
            tokenizer.decode(&ids, true).map_err(text)?;
            tokenizer.max_token_id();
            if tokenizer.chat_template().is_some() {
                tokenizer
                    .encode_chat(&[ChatMessage::new("user", "hello")])
                    .map_err(text)?;
            }
            Ok(())
        },
    },
    Target {
        name: "jsonl",
        about: "JSONL training data: read_jsonl, encode_all, batches",
        prepare: |ctx, _, dir| {
            std::fs::write(dir.join("data.jsonl"), &ctx.seeds.jsonl).expect("write seed");
            prepared("data.jsonl", Kind::Jsonl)
        },
        run: |_, rng, dir| {
            let path = dir.join("data.jsonl");
            let options = JsonlOptions {
                skip_bad_lines: rng.chance(0.5),
                max_line_bytes: FUZZ_MAX_LINE,
            };
            let fields = FieldMap::preset("gsm8k").expect("preset");
            let (records, _) = read_jsonl(&path, &fields, options).map_err(text)?;
            let tokenizer = TextTokenizer::byte_level();
            let template = if rng.chance(0.5) {
                PromptTemplate::Alpaca
            } else {
                PromptTemplate::Raw
            };
            let (examples, _) =
                encode_all(&path, &records, template, &tokenizer, 256).map_err(text)?;
            let mut data = DataLoader::new(examples, 4, 0, 258);
            for _ in 0..3 {
                data.next_batch();
            }
            Ok(())
        },
    },
    Target {
        name: "run-config",
        about: "disha train --config TOML through TrainSettings::from_file, resolve",
        prepare: |ctx, _, dir| {
            std::fs::write(dir.join("run.toml"), &ctx.seeds.run_toml).expect("write seed");
            prepared("run.toml", Kind::Toml)
        },
        run: |_, _, dir| {
            // As `disha train --data D --out O --config run.toml` merges them: flags first.
            let file = TrainSettings::from_file(&dir.join("run.toml")).map_err(text)?;
            let flags = TrainSettings {
                data: Some("data.jsonl".into()),
                out: Some("out".into()),
                ..TrainSettings::default()
            };
            flags
                .or(file)
                .resolve()
                .map_err(text)?
                .peft_config(disha_models::ModelFamily::Llama);
            Ok(())
        },
    },
    Target {
        name: "checkpoint-state",
        about: "a checkpoint's state.json through checkpoint::resume and one step",
        prepare: |ctx, _, dir| {
            write_files(&dir.join("run"), &ctx.seeds.checkpoint);
            prepared("run/checkpoints/step-000002/state.json", Kind::Json)
        },
        run: |ctx, _, dir| resume_and_step(ctx, &dir.join("run")),
    },
    Target {
        name: "checkpoint-optimizer",
        about: "a checkpoint's optimizer.bpk (burnpack) through checkpoint::resume and one step",
        prepare: |ctx, _, dir| {
            write_files(&dir.join("run"), &ctx.seeds.checkpoint);
            // Magic, version, metadata length, then CBOR metadata.
            let fields = vec![Field::int(4, 2), Field::int(6, 4)];
            prepared(
                "run/checkpoints/step-000002/optimizer.bpk",
                Kind::Binary { fields, hot: 1024 },
            )
        },
        run: |ctx, _, dir| resume_and_step(ctx, &dir.join("run")),
    },
    Target {
        name: "checkpoint-adapter",
        about: "a checkpoint's adapter through checkpoint::resume and one step",
        prepare: |ctx, rng, dir| {
            write_files(&dir.join("run"), &ctx.seeds.checkpoint);
            if rng.chance(0.5) {
                prepared(
                    "run/checkpoints/step-000002/adapter/adapter_model.safetensors",
                    Kind::Safetensors,
                )
            } else {
                prepared(
                    "run/checkpoints/step-000002/adapter/adapter_config.json",
                    Kind::Json,
                )
            }
        },
        run: |ctx, _, dir| resume_and_step(ctx, &dir.join("run")),
    },
    Target {
        name: "run-json",
        about: "a run's run.json through RunSettings::read, checkpoint::resume and one step",
        prepare: |ctx, _, dir| {
            write_files(&dir.join("run"), &ctx.seeds.checkpoint);
            prepared("run/run.json", Kind::Json)
        },
        run: |ctx, _, dir| resume_and_step(ctx, &dir.join("run")),
    },
    Target {
        name: "input-ids",
        about: "disha logits --tokens-file safetensors (I64 / I32 input_ids) and a forward",
        prepare: |ctx, _, dir| {
            std::fs::write(dir.join("ids.safetensors"), &ctx.seeds.input_ids).expect("write");
            prepared("ids.safetensors", Kind::Safetensors)
        },
        run: |ctx, _, dir| {
            // As `disha logits` does: errors about the ids name the file.
            let path = dir.join("ids.safetensors");
            let in_file = |e: String| format!("{}: {e}", path.display());
            let file = SafetensorsFile::open(&path).map_err(text)?;
            let (shape, ids) = file.read_i64("input_ids").map_err(text)?;
            let [batch, seq] = shape[..] else {
                return Err(in_file(format!("input_ids has shape {shape:?}")));
            };
            ctx.base
                .check_ids(&ids)
                .map_err(|e| in_file(e.to_string()))?;
            forward(&ctx.base, &ids, [batch, seq])
        },
    },
];

/// Targets that fail on purpose, one per failure class the harness must catch (a panic, an
/// allocation above the ceiling, a hang, a slow case, an error that does not name its input).
/// Never run unless named; the harness's own tests run them.
pub const SELF_TESTS: &[Target] = &[
    Target {
        name: "selftest-panic",
        about: "panics",
        prepare: |_, _, dir| dummy(dir),
        run: |_, _, _| panic!("a deliberate panic"),
    },
    Target {
        name: "selftest-alloc",
        about: "allocates 4 GiB",
        prepare: |_, _, dir| dummy(dir),
        run: |_, _, _| {
            let huge: Vec<u8> = Vec::with_capacity(4 << 30);
            std::hint::black_box(&huge);
            Ok(())
        },
    },
    Target {
        name: "selftest-hang",
        about: "sleeps for an hour",
        prepare: |_, _, dir| dummy(dir),
        run: |_, _, _| {
            std::thread::sleep(std::time::Duration::from_secs(3600));
            Ok(())
        },
    },
    Target {
        name: "selftest-slow",
        about: "takes 1.5 s, then succeeds",
        prepare: |_, _, dir| dummy(dir),
        run: |_, _, _| {
            std::thread::sleep(std::time::Duration::from_millis(1500));
            Ok(())
        },
    },
    Target {
        name: "selftest-unnamed",
        about: "fails with an error that names no file",
        prepare: |_, _, dir| dummy(dir),
        run: |_, _, _| Err("something went wrong".into()),
    },
];

fn dummy(dir: &Path) -> Prepared {
    std::fs::write(dir.join("input.json"), "{}").expect("write");
    prepared("input.json", Kind::Json)
}

/// Writes a GGUF seed as `file` in `dir`; its header (up to the last numeric field) is the hot
/// region: half the byte mutations land there, half anywhere (tensor data included).
fn gguf_seed(dir: &Path, file: &str, bytes: &[u8], fields: &[Field]) -> Prepared {
    std::fs::write(dir.join(file), bytes).expect("write seed");
    let hot = fields.last().map_or(0, |f| f.offset + f.width);
    prepared(
        file,
        Kind::Binary {
            fields: fields.to_vec(),
            hot,
        },
    )
}

fn prepared(file: &str, kind: Kind) -> Prepared {
    Prepared {
        file: file.into(),
        kind,
    }
}

/// The tensors of a `torch.save` checkpoint held in `bytes`, if it still parses.
fn torch_tensors(bytes: &[u8]) -> Option<Vec<PthTensor>> {
    let file = tempfile::NamedTempFile::new().ok()?;
    std::fs::write(file.path(), bytes).ok()?;
    let mut source = disha_models::PthWeights::open(file.path()).ok()?;
    let mut out = Vec::new();
    for name in disha_models::WeightSource::remaining(&source) {
        let t = disha_models::WeightSource::take(&mut source, &name).ok()??;
        out.push((name, t.shape, t.values));
    }
    Some(out)
}

/// One to three semantic edits of an RWKV-PEFT checkpoint's tensors: a changed extent or rank,
/// a renamed module / layer / suffix, a dropped or duplicated tensor, a non-finite value, an
/// unknown base tensor.
fn semantic_mutation(rng: &mut Rng, mut tensors: Vec<PthTensor>) -> Vec<PthTensor> {
    for _ in 0..1 + rng.below(3) {
        let i = rng.below(tensors.len());
        let (name, shape, values) = &mut tensors[i];
        match rng.below(8) {
            0 => {
                let d = rng.below(shape.len());
                shape[d] = *rng.pick(&[1, 2, 3, shape[d] + 1, shape[d] * 2, 48]);
                values.resize(shape.iter().product(), 0.01);
            }
            1 => {
                shape.push(1);
            }
            2 => {
                let from = *rng.pick(&["blocks.0", "att.key", ".disha", "ln1", "ffn"]);
                let to = *rng.pick(&["blocks.9", "att.query", ".lora_A", "ln7", "att"]);
                *name = name.replace(from, to);
            }
            3 => {
                tensors.remove(i);
            }
            4 => {
                let copy = (format!("{name}x"), shape.clone(), values.clone());
                tensors.push(copy);
            }
            5 => {
                let v = rng.below(values.len());
                values[v] = *rng.pick(&[f32::NAN, f32::INFINITY, 1e30, -1e30]);
            }
            6 => tensors.push(("emb.weight".into(), vec![64, 16], vec![0.0; 64 * 16])),
            _ => {
                *name = name.replace(".disha", ".bone").replace(".weight", ".disha");
            }
        }
        if tensors.is_empty() {
            break;
        }
    }
    tensors
}

/// An error's one-line message.
fn text(e: impl std::fmt::Display) -> String {
    e.to_string()
}

fn write_files(dir: &Path, files: &Files) {
    for (name, bytes) in files {
        let path = dir.join(name);
        std::fs::create_dir_all(path.parent().expect("a parent")).expect("case directory");
        std::fs::write(path, bytes).expect("write seed");
    }
}

/// A forward pass over `ids` (skipped above [`MAX_FORWARD_TOKENS`] or when empty).
fn forward(model: &CausalLm, ids: &[i64], shape: [usize; 2]) -> Result<(), String> {
    if ids.is_empty() || ids.len() > MAX_FORWARD_TOKENS {
        return Ok(());
    }
    model.check_ids(ids).map_err(text)?;
    let device = model.device();
    let ids = Tensor::<2, Int>::from_data(TensorData::new(ids.to_vec(), shape), &device);
    model.forward(ids).into_data();
    Ok(())
}

fn load_and_forward(path: &Path) -> Result<(), String> {
    load_and_forward_as(path, &LoadOptions::default())
}

/// No quantization, Q8, Q4 or Q4_1, one in four each.
fn random_quant(rng: &mut Rng) -> Option<QuantFormat> {
    [
        None,
        Some(QuantFormat::Q8),
        Some(QuantFormat::Q4),
        Some(QuantFormat::Q4_1),
    ][rng.below(4)]
}

/// Loads `path` with `options` and runs a forward.
fn load_and_forward_as(path: &Path, options: &LoadOptions) -> Result<(), String> {
    let loaded = load_model_with(path, &Device::default(), options).map_err(text)?;
    let vocab = loaded.model.vocab_size() as i64;
    let ids: Vec<i64> = (0..6).map(|i| (i * 5) % vocab).collect();
    forward(&loaded.model, &ids, [1, 6])
}

/// Marks an error that finite but extreme values produced in a computation (a NaN loss, a
/// merged weight out of range): it names the step or layer where it arose, not the file.
pub const COMPUTED: &str = "[computed] ";

/// Loads an adapter, runs it, exports the merged model (`disha merge`), and merges in place.
fn load_adapter_and_merge(ctx: &Context, dir: &Path) -> Result<(), String> {
    let mut model = ctx.base.clone();
    model
        .load_adapter(&dir.join("adapter"), "default")
        .map_err(text)?;
    let ids: Vec<i64> = (0..6).map(|i| i * 7 % 64).collect();
    forward(&model, &ids, [1, 6])?;
    let config = crate::seeds::tiny_config().to_hf_json();
    disha_models::export_merged(&model, &config, &[], &dir.join("merged")).map_err(
        |e| match e {
            disha_models::ModelError::NonFiniteExport { .. } => format!("{COMPUTED}{e}"),
            e => e.to_string(),
        },
    )?;
    model.merge_adapters().map_err(|e| match e {
        disha_core::DishaError::NonFiniteMerge { .. } => format!("{COMPUTED}{e}"),
        e => e.to_string(),
    })?;
    forward(&model, &ids, [1, 6])
}

/// `--resume` as the library does it: run.json, the checkpoint, then one training step.
fn resume_and_step(ctx: &Context, run: &Path) -> Result<(), String> {
    let settings = RunSettings::read(&run.join("run.json")).map_err(text)?;
    let mut data = DataLoader::new(examples(), settings.batch_size, settings.seed, 0);
    if settings.packing {
        data = data.with_packing(settings.max_len);
    }
    let model = ctx
        .base_autodiff
        .clone()
        .with_compute_dtype(settings.compute_dtype)
        .map_err(text)?;
    let (mut learner, _) =
        disha_train::checkpoint::resume(run, &settings, model, &mut data).map_err(text)?;
    learner.train_step(&mut data).map_err(|e| match e {
        disha_train::TrainError::NonFinite { .. } => format!("{COMPUTED}{e}"),
        e => e.to_string(),
    })?;
    Ok(())
}

/// Mutates the prepared file in place: 1–3 mutations of its kind, or of its bytes.
pub fn mutate(rng: &mut Rng, dir: &Path, prepared: &Prepared) {
    let path = dir.join(&prepared.file);
    let mut bytes = std::fs::read(&path).expect("the prepared file exists");
    for _ in 0..=rng.below(3) {
        match &prepared.kind {
            Kind::Binary { fields, hot } => {
                if !fields.is_empty() && rng.chance(0.6) {
                    let field = *rng.pick(fields);
                    mutate_field(rng, &mut bytes, field);
                } else {
                    mutate_bytes(rng, &mut bytes, *hot);
                }
            }
            Kind::Safetensors => mutate_safetensors(rng, &mut bytes),
            Kind::Json => mutate_json(rng, &mut bytes),
            Kind::Jsonl => mutate_jsonl(rng, &mut bytes, FUZZ_MAX_LINE),
            Kind::Toml => mutate_toml(rng, &mut bytes),
            Kind::TorchTensors => match torch_tensors(&bytes) {
                Some(tensors) if rng.chance(0.5) => {
                    bytes = disha_models::pth_bytes("archive", &semantic_mutation(rng, tensors));
                }
                _ => mutate_bytes(rng, &mut bytes, 2048),
            },
        }
    }
    std::fs::write(&path, bytes).expect("write the mutated file");
}

/// A safetensors mutation: the header length replaced, the JSON header edited (and the length
/// fixed up, or not), or bytes anywhere (biased to the header).
fn mutate_safetensors(rng: &mut Rng, bytes: &mut Vec<u8>) {
    let header_len = bytes
        .get(..8)
        .map(|b| u64::from_le_bytes(b.try_into().expect("8 bytes")) as usize)
        .filter(|&n| n.checked_add(8).is_some_and(|end| end <= bytes.len()));
    match (rng.below(4), header_len) {
        (0, _) => mutate_field(rng, bytes, Field::int(0, 8)),
        (1 | 2, Some(n)) => {
            let mut header = bytes[8..8 + n].to_vec();
            mutate_json(rng, &mut header);
            let fix_length = rng.chance(0.8);
            let mut out = if fix_length {
                (header.len() as u64).to_le_bytes().to_vec()
            } else {
                bytes[..8].to_vec()
            };
            out.extend(&header);
            out.extend(&bytes[8 + n..]);
            *bytes = out;
        }
        _ => {
            let hot = header_len.map_or(256, |n| n + 8);
            mutate_bytes(rng, bytes, hot);
        }
    }
}

/// The targets named in `names` (all of [`TARGETS`] when empty; [`SELF_TESTS`] only by name).
///
/// # Errors
/// An unknown name.
pub fn select(names: &[String]) -> Result<Vec<Target>, String> {
    if names.is_empty() {
        return Ok(TARGETS.to_vec());
    }
    names
        .iter()
        .map(|n| {
            TARGETS
                .iter()
                .chain(SELF_TESTS)
                .find(|t| t.name == n)
                .copied()
                .ok_or_else(|| {
                    format!(
                        "unknown target `{n}` (known: {})",
                        TARGETS
                            .iter()
                            .map(|t| t.name)
                            .collect::<Vec<_>>()
                            .join(", ")
                    )
                })
        })
        .collect()
}

/// Runs every target on its unmutated seed (each variant): all must be accepted, or the
/// harness would be fuzzing inputs that fail for an unrelated reason.
///
/// # Errors
/// The first target whose seed is refused, with the error.
pub fn check_seeds(ctx: &Context, targets: &[Target]) -> Result<(), String> {
    let scratch = tempfile::tempdir().map_err(|e| e.to_string())?;
    for target in targets {
        // Variants are picked by the case's random source: a few draws reach each of them.
        for draw in 0..8u64 {
            let dir = scratch.path().join(format!("{}-{draw}", target.name));
            std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
            let mut rng = Rng::new(draw);
            let prepared = (target.prepare)(ctx, &mut rng, &dir);
            target.run(ctx, &mut rng, &dir).map_err(|e| {
                format!(
                    "seed of `{}` ({}) refused: {e}",
                    target.name,
                    prepared.file.display()
                )
            })?;
        }
    }
    Ok(())
}

impl Target {
    /// Builds the case directory and mutates it; returns the mutated file.
    pub fn prepare_case(&self, ctx: &Context, rng: &mut Rng, dir: &Path) -> PathBuf {
        let prepared = (self.prepare)(ctx, rng, dir);
        mutate(rng, dir, &prepared);
        prepared.file
    }

    /// Runs the entry points on a prepared case.
    ///
    /// # Errors
    /// The typed error of the first entry point that refused the input, as its message.
    pub fn run(&self, ctx: &Context, rng: &mut Rng, dir: &Path) -> Result<(), String> {
        (self.run)(ctx, rng, dir)
    }
}
