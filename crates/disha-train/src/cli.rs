//! The command-line grammar (clap derive).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use disha_core::QuantFormat;
use disha_models::{BaseDtype, ComputeDtype, LoadOptions};

use crate::device::DeviceChoice;

/// DiSHA dimension-sharding fine-tuning (Bone / MiSS, BAT, MiSS-mini, LoRA) on Burn.
///
/// `--model` accepts an HF directory (config.json + safetensors, single or sharded), a
/// llama.cpp `.gguf` file or a llama2.c `.bin` checkpoint; `--adapter` a PEFT adapter directory (MISS, legacy BONE or LORA).
#[derive(Parser, Debug)]
#[command(name = "disha", version, about, long_about = None, propagate_version = true)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Subcommand, Debug)]
pub enum Command {
    /// Print the architecture, parameter counts and, with --adapter, what the adapter targets.
    Inspect(InspectArgs),
    /// Run the forward pass on token ids and write the logits (a parity tool).
    Logits(LogitsArgs),
    /// Generate text from a prompt (greedy by default), streaming it to stdout.
    Generate(GenerateArgs),
    /// Merge an adapter into the base weights and write a plain model directory (or, for
    /// RWKV-7, a BlinkDL .pth).
    Merge(MergeArgs),
    /// Convert an adapter: legacy Bone → MiSS, MiSS → an exactly equivalent LoRA, RWKV-PEFT
    /// `.pth` ↔ PEFT directory.
    ExportAdapter(ExportAdapterArgs),
    /// Fine-tune an adapter (Bone, BAT, mini or LoRA) on a JSONL dataset; with no --model, run
    /// the embedded demo.
    Train(Box<TrainArgs>),
    /// Evaluate a model (and adapter) on a JSONL dataset: loss / perplexity, GSM8K exact match.
    Eval(EvalArgs),
    /// Draw the training-loss curves of one or more `disha train` runs into one PNG chart.
    Plot(PlotArgs),
}

/// `disha plot`.
#[derive(Args, Debug)]
pub struct PlotArgs {
    /// Run directories (each with metrics.jsonl and run.json).
    #[arg(required = true, value_name = "RUN_DIR")]
    pub runs: Vec<PathBuf>,
    /// The PNG file to write.
    #[arg(long, value_name = "FILE")]
    pub out: PathBuf,
    /// Chart title.
    #[arg(long, default_value = "training loss")]
    pub title: String,
    /// Plot the running mean over this many steps (1: every step as logged).
    #[arg(long, default_value_t = 1)]
    pub smooth: usize,
}

/// What `disha eval` measures.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum EvalMetric {
    /// Mean cross-entropy over response tokens, and perplexity.
    Loss,
    /// Greedy generation; the answer after `####` (else the last number) must equal the
    /// reference's.
    ExactMatch,
    /// Both.
    All,
}

/// `disha eval`.
#[derive(Args, Debug)]
pub struct EvalArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Tokenizer: a tokenizer.json, or `byte-level`; default: the model's own.
    #[arg(long, value_name = "FILE|byte-level")]
    pub tokenizer: Option<String>,
    /// Evaluation data (JSONL).
    #[arg(long, value_name = "FILE")]
    pub data: PathBuf,
    /// Field layout: alpaca, metamath, gsm8k [default: alpaca].
    #[arg(long)]
    pub fields: Option<String>,
    /// Prompt template [default: alpaca].
    #[arg(long, value_enum)]
    pub template: Option<disha_train::data::PromptTemplate>,
    /// What to measure.
    #[arg(long, value_enum, default_value_t = EvalMetric::All)]
    pub metric: EvalMetric,
    /// Maximum tokens per example for the loss.
    #[arg(long, default_value_t = 512)]
    pub max_len: usize,
    /// Examples per forward pass for the loss.
    #[arg(long, default_value_t = 4)]
    pub batch_size: usize,
    /// Tokens to generate per question for exact match.
    #[arg(long, default_value_t = 256)]
    pub max_new_tokens: usize,
    /// Evaluate only the first N records.
    #[arg(long)]
    pub limit: Option<usize>,
    /// Write one JSON object per question (prompt, generated, predicted, reference, correct).
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
    /// Skip malformed JSONL lines.
    #[arg(long)]
    pub skip_bad_lines: bool,
    /// Longest JSONL line accepted, in bytes; longer lines are bad lines [default: 1048576].
    #[arg(long)]
    pub max_line_bytes: Option<usize>,
}

/// `disha train`.
#[derive(Args, Debug)]
pub struct TrainArgs {
    /// HF model directory, .gguf file or llama2.c .bin checkpoint. Without it (and without
    /// --data), the embedded demo runs: a tiny arithmetic Llama is taught a new operation with
    /// Bone, with exact match before and after.
    #[arg(long, value_name = "PATH")]
    pub model: Option<PathBuf>,
    /// Tokenizer: a tokenizer.json, or `byte-level`; default: the model's own (byte-level for
    /// the demo).
    #[arg(long, value_name = "FILE|byte-level")]
    pub tokenizer: Option<String>,
    /// A run config (.toml or .json) with any of the settings below; flags override it.
    #[arg(long, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Continue the run in --out from its newest checkpoint, with the settings it was started
    /// with (its run.json).
    #[arg(long, requires = "out")]
    pub resume: bool,
    /// End this session after N steps (a checkpoint is written); continue with --resume.
    #[arg(long, value_name = "N")]
    pub stop_after_steps: Option<usize>,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
    #[command(flatten)]
    pub settings: disha_train::settings::TrainSettings,
}

/// The model, an optional adapter, and the device.
#[derive(Args, Debug)]
pub struct ModelArgs {
    /// HF model directory, .gguf file or llama2.c .bin checkpoint.
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// PEFT adapter directory to load on top of the model.
    #[arg(long, value_name = "DIR")]
    pub adapter: Option<PathBuf>,
    /// Dtype the frozen base's matrices are kept in: auto (the checkpoint's), f32, f16, bf16.
    /// Activations and adapters stay f32.
    #[arg(long, value_name = "auto|f32|f16|bf16", default_value_t = BaseDtype::Auto)]
    pub base_dtype: BaseDtype,
    /// Keep the decoder blocks' linear weights block-quantized: q8 (ggml Q8_0), q4 (ggml Q4_0)
    /// or q4_1 (ggml Q4_1), as the adapter was trained with --base-quant [default: not
    /// quantized].
    #[arg(long, value_enum)]
    pub base_quant: Option<QuantFormat>,
    /// Dtype the activations are computed in: f32, or bf16 / f16 as transformers runs a
    /// half-precision model (Llama: norms and softmax in f32, each op rounded; RWKV-7: the
    /// norms and the WKV recurrence in f32).
    #[arg(long, value_name = "f32|f16|bf16", default_value_t = ComputeDtype::F32)]
    pub compute_dtype: ComputeDtype,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

impl ModelArgs {
    /// How to load `--model`.
    pub fn load_options(&self) -> LoadOptions {
        LoadOptions::default()
            .with_base_dtype(self.base_dtype)
            .with_base_quant(self.base_quant)
    }
}

/// `disha inspect`.
#[derive(Args, Debug)]
pub struct InspectArgs {
    #[command(flatten)]
    pub model: ModelArgs,
}

/// `disha logits`.
#[derive(Args, Debug)]
pub struct LogitsArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// Comma-separated token ids of one sequence, e.g. `1,2,3`.
    #[arg(
        long,
        value_delimiter = ',',
        conflicts_with = "tokens_file",
        required_unless_present = "tokens_file"
    )]
    pub tokens: Vec<i64>,
    /// A safetensors file with an I64 `input_ids` tensor [batch, seq] (the fixtures' format).
    #[arg(long, value_name = "FILE")]
    pub tokens_file: Option<PathBuf>,
    /// Write `logits` [batch, seq, vocab] (F32) and `input_ids` to this safetensors file.
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

/// `disha generate`.
#[derive(Args, Debug)]
pub struct GenerateArgs {
    #[command(flatten)]
    pub model: ModelArgs,
    /// The prompt text.
    #[arg(long)]
    pub prompt: String,
    /// Wrap the prompt in the model's chat template (as a user turn).
    #[arg(long)]
    pub chat: bool,
    /// System message for --chat (otherwise the template's default, if any).
    #[arg(long, requires = "chat")]
    pub system: Option<String>,
    /// Chat template: a built-in (`chatml`, `llama2`, `llama3`) or a .jinja file; default: the
    /// tokenizer's own.
    #[arg(long, requires = "chat", value_name = "NAME|FILE")]
    pub chat_template: Option<String>,
    /// Tokenizer: a tokenizer.json, or `byte-level`; default: the model's own.
    #[arg(long, value_name = "FILE|byte-level")]
    pub tokenizer: Option<String>,
    /// Maximum number of new tokens.
    #[arg(long, default_value_t = 128)]
    pub max_new_tokens: usize,
    /// Sampling temperature; 0 = greedy.
    #[arg(long, default_value_t = 0.0)]
    pub temperature: f32,
    /// Keep only the k most likely tokens.
    #[arg(long)]
    pub top_k: Option<usize>,
    /// Nucleus sampling: keep the smallest set with this probability mass.
    #[arg(long)]
    pub top_p: Option<f32>,
    /// Sampling seed.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
}

/// `disha merge`.
#[derive(Args, Debug)]
pub struct MergeArgs {
    /// The base model (any --model format).
    #[arg(long, value_name = "PATH")]
    pub model: PathBuf,
    /// PEFT adapter directory to merge (or, on RWKV-7, an RWKV-PEFT .pth checkpoint).
    #[arg(long, value_name = "PATH")]
    pub adapter: PathBuf,
    /// New output directory (must not exist, or be empty); on RWKV-7, a new `.pth` file writes
    /// a BlinkDL checkpoint instead.
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Dtype the frozen base is kept in and the merged model is written in: auto (the
    /// checkpoint's), f32, f16, bf16.
    #[arg(long, value_name = "auto|f32|f16|bf16", default_value_t = BaseDtype::Auto)]
    pub base_dtype: BaseDtype,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}

/// Target format of `disha export-adapter`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum AdapterFormat {
    /// PEFT MISS (reads legacy BONE directories and rewrites them as MISS).
    Miss,
    /// PEFT LORA, exactly equivalent (Bone / mini only; needs --model for the layer shapes).
    Lora,
    /// An RWKV-PEFT checkpoint (`--out` is a `.pth` file; Bone or BAT in RWKV-PEFT orientation;
    /// needs --model, an RWKV-7).
    RwkvPeft,
}

/// `disha export-adapter`.
#[derive(Args, Debug)]
pub struct ExportAdapterArgs {
    /// The adapter to convert: a PEFT directory, or an RWKV-PEFT `.pth` checkpoint.
    #[arg(long, value_name = "PATH")]
    pub adapter: PathBuf,
    /// Output directory (a `.pth` file for --to rwkv-peft).
    #[arg(long, value_name = "PATH")]
    pub out: PathBuf,
    /// Target format.
    #[arg(long, value_enum, default_value_t = AdapterFormat::Miss)]
    pub to: AdapterFormat,
    /// The base model (required for --to lora, whose A matrix needs each layer's input size, and
    /// for --to rwkv-peft).
    #[arg(long, value_name = "PATH", required_if_eq_any([("to", "lora"), ("to", "rwkv-peft")]))]
    pub model: Option<PathBuf>,
    /// Compute backend.
    #[arg(long, value_enum, default_value_t = DeviceChoice::Auto)]
    pub device: DeviceChoice,
}
