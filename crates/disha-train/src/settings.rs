//! `disha train` settings: every hyperparameter as a flag or in a TOML / JSON run config
//! (flags win), resolved into concrete values with errors naming the setting.

use std::path::{Path, PathBuf};

use clap::{Args, ValueEnum};
use disha_core::QuantFormat;
use disha_core::{AdapterKind, AdapterSpec, BatOrientation, PeftConfig, TargetModules};
use disha_models::{BaseDtype, ComputeDtype};
use serde::{Deserialize, Serialize};

use disha_models::llama::projection_names;
use disha_models::{ModelFamily, TextTokenizer};

use crate::TrainError;

use crate::data::{
    Example, FieldMap, JsonlOptions, PromptTemplate, Record, encode_all, read_jsonl,
};
use crate::learner::LearnerConfig;
use crate::schedule::{LrSchedule, ScheduleKind};

/// Base tensors trained with the adapter (RWKV-PEFT's `--train_parts`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum TrainPart {
    /// Every LayerNorm's weight and bias (RWKV-7: `ln0`, `ln1`, `ln2`, `att.ln_x`, `ln_out`).
    Ln,
}

/// Every `disha train` setting; unset ones come from `--config`, then the defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize, Args)]
#[serde(default, deny_unknown_fields)]
pub struct TrainSettings {
    /// Training data (JSONL).
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Field layout: alpaca (instruction/input/output), metamath (query/response), gsm8k
    /// (question/answer) [default: alpaca].
    #[arg(long)]
    pub fields: Option<String>,
    /// Override the instruction field name.
    #[arg(long)]
    pub instruction_field: Option<String>,
    /// Override the input field name ("" for none).
    #[arg(long)]
    pub input_field: Option<String>,
    /// Override the response field name.
    #[arg(long)]
    pub output_field: Option<String>,
    /// Prompt template [default: alpaca].
    #[arg(long, value_enum)]
    pub template: Option<PromptTemplate>,
    /// Adapter family [default: bone].
    #[arg(long, value_enum)]
    pub method: Option<AdapterKind>,
    /// Shard / block size, or LoRA rank [default: 16].
    #[arg(long)]
    pub r: Option<usize>,
    /// MiSS-mini's block width [default: r].
    #[arg(long)]
    pub mini_r: Option<usize>,
    /// LoRA alpha [default: 2r].
    #[arg(long)]
    pub lora_alpha: Option<f64>,
    /// Target modules, comma-separated, or `all-linear` [default: every projection of the
    /// model's blocks: Llama's seven, RWKV-7's six].
    #[arg(long, value_delimiter = ',')]
    pub targets: Option<Vec<String>>,
    /// Output directory: adapter/, metrics.jsonl, run.json.
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Optimizer steps [default: 100].
    #[arg(long)]
    pub max_steps: Option<usize>,
    /// Examples per micro-batch [default: 4].
    #[arg(long)]
    pub batch_size: Option<usize>,
    /// Micro-batches per optimizer step [default: 1].
    #[arg(long)]
    pub grad_accum: Option<usize>,
    /// Peak learning rate [default: 1e-4].
    #[arg(long)]
    pub lr: Option<f64>,
    /// Linear warmup steps [default: 0].
    #[arg(long)]
    pub warmup_steps: Option<usize>,
    /// Decay after warmup [default: cosine].
    #[arg(long, value_enum)]
    pub schedule: Option<ScheduleKind>,
    /// AdamW β₁ [default: 0.9].
    #[arg(long)]
    pub beta1: Option<f32>,
    /// AdamW β₂ [default: 0.999].
    #[arg(long)]
    pub beta2: Option<f32>,
    /// AdamW ε [default: 1e-8].
    #[arg(long)]
    pub eps: Option<f32>,
    /// Decoupled weight decay [default: 0].
    #[arg(long)]
    pub weight_decay: Option<f32>,
    /// Clip the global gradient norm; 0 disables [default: 1.0].
    #[arg(long)]
    pub max_grad_norm: Option<f64>,
    /// Maximum tokens per example (prompt + response) [default: 512].
    #[arg(long)]
    pub max_len: Option<usize>,
    /// Seed for shuffling, adapter init and dropout [default: 0].
    #[arg(long)]
    pub seed: Option<u64>,
    /// Examples held out for validation loss [default: 0].
    #[arg(long)]
    pub validation: Option<usize>,
    /// Skip malformed JSONL lines instead of stopping.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub skip_bad_lines: Option<bool>,
    /// Longest JSONL line accepted, in bytes; longer lines are bad lines [default: 1048576].
    #[arg(long)]
    pub max_line_bytes: Option<usize>,
    /// Pack several examples into each row of --max-len tokens (attention stays within each
    /// example; positions restart) instead of one padded example per row.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub packing: Option<bool>,
    /// Recompute memory-bound activations in the backward pass instead of keeping them
    /// (Burn's balanced gradient checkpointing): less memory, more compute.
    #[arg(long, num_args = 0..=1, default_missing_value = "true")]
    pub gradient_checkpointing: Option<bool>,
    /// Dtype the frozen base's matrices are kept in: auto (the checkpoint's: bf16 / f16 for a
    /// half-precision HF directory or RWKV checkpoint), f32, f16 or bf16. Adapters, their
    /// gradients and optimizer state stay f32 [default: auto].
    #[arg(long, value_name = "auto|f32|f16|bf16")]
    pub base_dtype: Option<BaseDtype>,
    /// Dtype the activations are computed in: f32, or bf16 / f16 for mixed-precision training
    /// as PEFT trains on a half-precision base (products and activations in the half dtype,
    /// norms and softmax in f32 (RWKV-7: norms and the WKV recurrence), adapter terms,
    /// gradients of the adapters and optimizer state in f32; f16 with dynamic loss scaling)
    /// [default: f32].
    #[arg(long, value_name = "f32|bf16|f16")]
    pub compute_dtype: Option<ComputeDtype>,
    /// Keep the decoder blocks' linear weights block-quantized, QLoRA-style: q8 (ggml Q8_0,
    /// 8.5 bits per weight), q4 (ggml Q4_0, 4.5 bits) or q4_1 (ggml Q4_1, 5 bits); a GGUF's
    /// blocks of that type are kept as they are. Embeddings, the output head and norms stay in
    /// --base-dtype; adapters train in f32 on top [default: not quantized].
    #[arg(long, value_enum)]
    pub base_quant: Option<QuantFormat>,
    /// Base tensors to train with the adapter, comma-separated: `ln` (RWKV-7's LayerNorms, as
    /// RWKV-PEFT's `--train_parts ln`; saved in the RWKV-PEFT checkpoint) [default: none].
    #[arg(long, value_enum, value_delimiter = ',')]
    pub train_parts: Option<Vec<TrainPart>>,
    /// Write a checkpoint every N steps (and always at the end); 0: only at the end
    /// [default: 0].
    #[arg(long)]
    pub save_every: Option<usize>,
    /// Checkpoints to keep [default: 2].
    #[arg(long)]
    pub keep_checkpoints: Option<usize>,
    /// Measure exact match (greedy generation, same fields and template) on this JSONL before
    /// and after training; outcomes go to OUT/eval-before.jsonl and OUT/eval-after.jsonl.
    #[arg(long, value_name = "FILE")]
    pub eval_data: Option<PathBuf>,
    /// Tokens to generate per --eval-data question [default: 256].
    #[arg(long)]
    pub eval_max_new_tokens: Option<usize>,
}

/// Concrete settings of a run (written to `run.json`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RunSettings {
    /// Training data.
    pub data: PathBuf,
    /// Instruction field.
    pub instruction_field: String,
    /// Input field, if any.
    pub input_field: Option<String>,
    /// Response field.
    pub output_field: String,
    /// Prompt template.
    pub template: PromptTemplate,
    /// Adapter family.
    pub method: AdapterKind,
    /// Shard / block size or rank.
    pub r: usize,
    /// Mini block width.
    pub mini_r: usize,
    /// LoRA alpha.
    pub lora_alpha: f64,
    /// Target modules; empty: every projection of the model's family
    /// ([`default_targets`]).
    pub targets: Vec<String>,
    /// Output directory.
    pub out: PathBuf,
    /// Examples per micro-batch.
    pub batch_size: usize,
    /// Maximum tokens per example.
    pub max_len: usize,
    /// Seed.
    pub seed: u64,
    /// Held-out examples.
    pub validation: usize,
    /// Skip malformed lines.
    pub skip_bad_lines: bool,
    /// Longest JSONL line accepted.
    #[serde(default = "default_max_line_bytes")]
    pub max_line_bytes: usize,
    /// Pack examples into rows of `max_len` tokens.
    #[serde(default)]
    pub packing: bool,
    /// Burn's balanced gradient checkpointing.
    #[serde(default)]
    pub gradient_checkpointing: bool,
    /// Dtype of the frozen base's matrices.
    #[serde(default)]
    pub base_dtype: BaseDtype,
    /// Dtype the activations are computed in.
    #[serde(default)]
    pub compute_dtype: ComputeDtype,
    /// Block format of the decoder blocks' frozen linear weights (`None`: not quantized).
    #[serde(default)]
    pub base_quant: Option<QuantFormat>,
    /// Base tensors trained with the adapter.
    #[serde(default)]
    pub train_parts: Vec<TrainPart>,
    /// Checkpoint period in steps (0: only at the end).
    pub save_every: usize,
    /// Checkpoints kept.
    pub keep_checkpoints: usize,
    /// Exact-match data, measured before and after training.
    #[serde(default)]
    pub eval_data: Option<PathBuf>,
    /// Tokens generated per exact-match question.
    #[serde(default = "default_eval_max_new_tokens")]
    pub eval_max_new_tokens: usize,
    /// Optimizer and schedule.
    pub learner: LearnerConfig,
}

fn default_eval_max_new_tokens() -> usize {
    256
}

fn default_max_line_bytes() -> usize {
    disha_core::limits::limits().max_line_bytes
}

impl TrainSettings {
    /// Reads a run config (`.toml`, or `.json`) and checks its values' ranges.
    ///
    /// # Errors
    /// I/O, a parse error, an unknown key (named by the parser), or a value out of range —
    /// all naming the file.
    pub fn from_file(path: &Path) -> Result<Self, TrainError> {
        let text = disha_core::limits::read_config_file(path)?;
        let is_json = path
            .extension()
            .is_some_and(|e| e.eq_ignore_ascii_case("json"));
        let parsed = if is_json {
            serde_json::from_str(&text).map_err(|e| e.to_string())
        } else {
            toml::from_str(&text).map_err(|e| e.to_string())
        };
        let settings: Self = parsed.map_err(|message| TrainError::File {
            path: path.to_path_buf(),
            message: format!("invalid run config: {message}"),
        })?;
        // The file's values on their own (defaults for the rest): a bad value is the file's,
        // and the error says so.
        Self {
            data: Some(settings.data.clone().unwrap_or_else(|| "data.jsonl".into())),
            out: Some(settings.out.clone().unwrap_or_else(|| "out".into())),
            ..settings.clone()
        }
        .resolve()
        .map_err(|e| TrainError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(settings)
    }

    /// `self` where set, else `file`.
    pub fn or(self, file: Self) -> Self {
        macro_rules! pick {
            ($($f:ident),*) => { Self { $($f: self.$f.or(file.$f)),* } };
        }
        pick!(
            data,
            fields,
            instruction_field,
            input_field,
            output_field,
            template,
            method,
            r,
            mini_r,
            lora_alpha,
            targets,
            out,
            max_steps,
            batch_size,
            grad_accum,
            lr,
            warmup_steps,
            schedule,
            beta1,
            beta2,
            eps,
            weight_decay,
            max_grad_norm,
            max_len,
            seed,
            validation,
            skip_bad_lines,
            max_line_bytes,
            packing,
            gradient_checkpointing,
            base_dtype,
            compute_dtype,
            base_quant,
            train_parts,
            save_every,
            keep_checkpoints,
            eval_data,
            eval_max_new_tokens
        )
    }

    /// Fills defaults and checks ranges.
    ///
    /// # Errors
    /// A missing `data` / `out`, an unknown field preset, or an out-of-range value (named).
    pub fn resolve(self) -> Result<RunSettings, TrainError> {
        let data = self
            .data
            .ok_or_else(|| TrainError::config("data", "<unset>", "pass --data FILE.jsonl"))?;
        let out = self
            .out
            .ok_or_else(|| TrainError::config("out", "<unset>", "pass --out DIR"))?;
        let preset = self.fields.unwrap_or_else(|| "alpaca".into());
        let fields = FieldMap::preset(&preset).ok_or_else(|| {
            TrainError::config("fields", &preset, "one of alpaca, metamath, gsm8k")
        })?;
        let r = self.r.unwrap_or(16);
        let method = self.method.unwrap_or(AdapterKind::Bone);
        if self.train_parts.as_ref().is_some_and(|p| !p.is_empty())
            && !matches!(method, AdapterKind::Bone | AdapterKind::Bat)
        {
            return Err(TrainError::config(
                "train_parts",
                "ln",
                "trained base tensors are saved in the RWKV-PEFT checkpoint, which holds Bone or \
                 BAT: use --method bone or bat",
            ));
        }
        let max_steps = self.max_steps.unwrap_or(100);
        let max_grad_norm = self.max_grad_norm.unwrap_or(1.0);
        if max_grad_norm.is_nan() || max_grad_norm < 0.0 {
            return Err(TrainError::config(
                "max_grad_norm",
                max_grad_norm,
                "must be >= 0 (0 disables clipping)",
            ));
        }
        let settings = RunSettings {
            data,
            instruction_field: self.instruction_field.unwrap_or(fields.instruction),
            input_field: match self.input_field {
                Some(f) if f.is_empty() => None,
                Some(f) => Some(f),
                None => fields.input,
            },
            output_field: self.output_field.unwrap_or(fields.output),
            template: self.template.unwrap_or(PromptTemplate::Alpaca),
            method,
            r,
            mini_r: self.mini_r.unwrap_or(r),
            lora_alpha: self.lora_alpha.unwrap_or(2.0 * r as f64),
            targets: self.targets.unwrap_or_default(),
            out,
            batch_size: self.batch_size.unwrap_or(4),
            max_len: self.max_len.unwrap_or(512),
            seed: self.seed.unwrap_or(0),
            validation: self.validation.unwrap_or(0),
            skip_bad_lines: self.skip_bad_lines.unwrap_or(false),
            max_line_bytes: self.max_line_bytes.unwrap_or_else(default_max_line_bytes),
            packing: self.packing.unwrap_or(false),
            gradient_checkpointing: self.gradient_checkpointing.unwrap_or(false),
            base_dtype: self.base_dtype.unwrap_or_default(),
            compute_dtype: self.compute_dtype.unwrap_or_default(),
            base_quant: self.base_quant,
            train_parts: self.train_parts.unwrap_or_default(),
            save_every: self.save_every.unwrap_or(0),
            keep_checkpoints: self.keep_checkpoints.unwrap_or(2),
            eval_data: self.eval_data,
            eval_max_new_tokens: self
                .eval_max_new_tokens
                .unwrap_or_else(default_eval_max_new_tokens),
            learner: LearnerConfig {
                max_steps,
                grad_accum: self.grad_accum.unwrap_or(1),
                schedule: LrSchedule {
                    peak: self.lr.unwrap_or(1e-4),
                    warmup_steps: self.warmup_steps.unwrap_or(0),
                    total_steps: max_steps,
                    kind: self.schedule.unwrap_or(ScheduleKind::Cosine),
                },
                beta1: self.beta1.unwrap_or(0.9),
                beta2: self.beta2.unwrap_or(0.999),
                eps: self.eps.unwrap_or(1e-8),
                weight_decay: self.weight_decay.unwrap_or(0.0),
                max_grad_norm: (max_grad_norm > 0.0).then_some(max_grad_norm),
            },
        };
        settings.validate()?;
        Ok(settings)
    }
}

/// The largest value each count-like setting accepts: far above any real run, low enough that
/// nothing sized from it can exhaust memory before the run starts.
pub const SETTING_BOUNDS: &[(&str, usize)] = &[
    ("r", 1 << 24),
    ("mini_r", 1 << 24),
    ("batch_size", 1 << 16),
    ("grad_accum", 1 << 12),
    ("max_len", 1 << 24),
    ("max_steps", 1 << 40),
    ("keep_checkpoints", 1 << 16),
    ("eval_max_new_tokens", 1 << 24),
    ("max_line_bytes", 1 << 30),
];

impl RunSettings {
    /// How the trainer loads the model: the base dtype and quantization.
    pub fn load_options(&self) -> disha_models::LoadOptions {
        disha_models::LoadOptions::default()
            .with_base_dtype(self.base_dtype)
            .with_base_quant(self.base_quant)
    }

    /// Reads a run's `run.json` (as `disha train` writes it) and checks it like the flags it
    /// came from.
    ///
    /// # Errors
    /// I/O, a file over the text-file limit, invalid JSON, or a setting out of range — all
    /// naming the file.
    pub fn read(path: &Path) -> Result<Self, TrainError> {
        let text = disha_core::limits::read_config_file(path)?;
        let settings: Self = serde_json::from_str(&text).map_err(|e| TrainError::File {
            path: path.to_path_buf(),
            message: format!("invalid run settings: {e}"),
        })?;
        settings.validate().map_err(|e| TrainError::File {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
        Ok(settings)
    }

    /// Checks every range, for settings resolved from flags and for a `run.json` read back on
    /// `--resume` alike.
    ///
    /// # Errors
    /// A count that is 0 or above [`SETTING_BOUNDS`], or an optimizer setting outside its
    /// domain (see [`LearnerConfig::validate`]), naming the setting.
    pub fn validate(&self) -> Result<(), TrainError> {
        for (name, value) in [
            ("r", self.r),
            ("mini_r", self.mini_r),
            ("batch_size", self.batch_size),
            ("grad_accum", self.learner.grad_accum),
            ("max_len", self.max_len),
            ("max_steps", self.learner.max_steps),
            ("keep_checkpoints", self.keep_checkpoints),
            ("eval_max_new_tokens", self.eval_max_new_tokens),
            ("max_line_bytes", self.max_line_bytes),
        ] {
            let bound = SETTING_BOUNDS
                .iter()
                .find(|(n, _)| *n == name)
                .map_or(usize::MAX, |(_, b)| *b);
            if value == 0 {
                return Err(TrainError::config(name, 0, "must be >= 1"));
            }
            if value > bound {
                return Err(TrainError::config(
                    name,
                    value,
                    format!("must be <= {bound}"),
                ));
            }
        }
        if !self.lora_alpha.is_finite() {
            return Err(TrainError::config(
                "lora_alpha",
                self.lora_alpha,
                "must be finite",
            ));
        }
        if self.learner.schedule.total_steps != self.learner.max_steps {
            return Err(TrainError::config(
                "schedule.total_steps",
                self.learner.schedule.total_steps,
                format!("must equal max_steps {}", self.learner.max_steps),
            ));
        }
        self.learner.validate()
    }

    /// The field layout.
    pub fn field_map(&self) -> FieldMap {
        FieldMap {
            instruction: self.instruction_field.clone(),
            input: self.input_field.clone(),
            output: self.output_field.clone(),
        }
    }

    /// The prompt template.
    pub fn prompt_template(&self) -> PromptTemplate {
        self.template
    }

    /// Reads a JSONL file with this run's field layout and bad-line policy (the training data,
    /// or the exact-match data); returns the records and how many lines were skipped.
    ///
    /// # Errors
    /// As [`read_jsonl`].
    pub fn read_records(&self, path: &Path) -> Result<(Vec<Record>, usize), TrainError> {
        let options = JsonlOptions {
            skip_bad_lines: self.skip_bad_lines,
            max_line_bytes: self.max_line_bytes,
        };
        read_jsonl(path, &self.field_map(), options)
    }

    /// Tokenizes records of the training data with this run's template and `max_len`; returns
    /// the examples and how many prompts were too long.
    ///
    /// # Errors
    /// As [`encode_all`].
    pub fn encode(
        &self,
        records: &[Record],
        tokenizer: &TextTokenizer,
    ) -> Result<(Vec<Example>, usize), TrainError> {
        encode_all(
            &self.data,
            records,
            self.prompt_template(),
            tokenizer,
            self.max_len,
        )
    }

    /// The PEFT config of the adapter to train on a `family` model: the targets given, else
    /// [`default_targets`]; BAT in the family's convention (PEFT's on Llama, RWKV-PEFT's on
    /// RWKV-7, so the adapter merges with RWKV-PEFT's own tools).
    pub fn peft_config(&self, family: ModelFamily) -> PeftConfig {
        let targets = match self.targets.as_slice() {
            [] => TargetModules::Names(default_targets(family)),
            [one] if one == "all-linear" => TargetModules::AllLinear,
            names => TargetModules::Names(names.to_vec()),
        };
        let bat = match family {
            ModelFamily::Llama => BatOrientation::Peft,
            ModelFamily::Rwkv7 => BatOrientation::RwkvPeft,
        };
        let spec = match self.method {
            AdapterKind::Bone => AdapterSpec::bone(self.r),
            AdapterKind::Bat => AdapterSpec::bat(self.r, bat),
            AdapterKind::Mini => AdapterSpec::mini(self.r, self.mini_r),
            AdapterKind::Lora => AdapterSpec::lora(self.r, self.lora_alpha),
        };
        PeftConfig::from_spec(&spec, targets)
    }
}

/// The modules `disha train` adapts when no `--targets` are given: every projection of a
/// block (Llama: `q/k/v/o_proj`, `gate/up/down_proj`; RWKV-7: RWKV-PEFT's six,
/// `att.receptance/key/value/output`, `ffn.key/value`). Not the output head.
pub fn default_targets(family: ModelFamily) -> Vec<String> {
    match family {
        ModelFamily::Llama => projection_names().map(String::from).to_vec(),
        ModelFamily::Rwkv7 => disha_models::rwkv::PROJECTION_NAMES
            .map(String::from)
            .to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_override_the_file_and_defaults_fill_the_rest() {
        let file: TrainSettings = toml::from_str(
            "data = \"train.jsonl\"\nout = \"runs/a\"\nlr = 3e-4\nr = 8\nmethod = \"lora\"\n",
        )
        .unwrap();
        let cli = TrainSettings {
            lr: Some(1e-3),
            ..Default::default()
        };
        let run = cli.or(file).resolve().unwrap();
        assert_eq!(run.learner.schedule.peak, 1e-3);
        assert_eq!(
            (run.r, run.method, run.lora_alpha),
            (8, AdapterKind::Lora, 16.0)
        );
        assert!(run.targets.is_empty());
        assert_eq!(
            run.peft_config(ModelFamily::Llama).target_modules,
            Some(TargetModules::Names(default_targets(ModelFamily::Llama)))
        );
        assert_eq!(default_targets(ModelFamily::Llama).len(), 7);
        assert_eq!(default_targets(ModelFamily::Rwkv7).len(), 6);
        assert_eq!(run.learner.max_grad_norm, Some(1.0));
        let unknown = toml::from_str::<TrainSettings>("learning_rate = 1.0");
        assert!(unknown.unwrap_err().to_string().contains("learning_rate"));
        let err = TrainSettings {
            data: Some("d".into()),
            out: Some("o".into()),
            batch_size: Some(0),
            ..Default::default()
        }
        .resolve()
        .unwrap_err()
        .to_string();
        assert!(err.contains("batch_size"), "{err}");
    }
}
