//! The embedded demo: a tiny byte-level Llama that `cargo xtask make-demo` pre-trains on
//! generated two-operand arithmetic (`a+b`, `a-b`), and the new operation `disha train` teaches
//! it with no arguments (`a~b` = |a − b|, a symbol the base model has never seen).
//!
//! Everything here is deterministic for a seed: the problem sets, the split of the fine-tuning
//! problems into train / evaluation, and (on Flex) the pre-training run.

use std::path::Path;

use burn::module::{Module, ParamGroup};
use burn::tensor::Device;
use disha_models::CausalLm;
use disha_models::RandomWeights;
use disha_models::TextTokenizer;
use disha_models::llama::{Llama, LlamaConfig, RopeScaling};

use crate::TrainError;
use crate::data::{DataLoader, PromptTemplate, Record, encode_all, shuffle};
use crate::learner::{Learner, LearnerConfig, StepMetrics};
use crate::schedule::{LrSchedule, ScheduleKind};

/// Operands are drawn from `0..OPERAND_LIMIT` (one or two digits).
pub const OPERAND_LIMIT: u32 = 100;

/// A two-operand operation on small non-negative integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    /// `a+b`.
    Add,
    /// `a-b`, defined for `a >= b` only (the base model never sees a negative number).
    Subtract,
    /// `a~b` = |a − b|: the operation the demo fine-tune teaches.
    Distance,
}

impl Operation {
    /// The operations the demo base model is pre-trained on.
    pub const PRETRAINED: [Operation; 2] = [Operation::Add, Operation::Subtract];

    /// The byte written between the operands.
    pub fn symbol(self) -> char {
        match self {
            Self::Add => '+',
            Self::Subtract => '-',
            Self::Distance => '~',
        }
    }

    /// The result, or `None` where the operation is not defined.
    pub fn apply(self, a: u32, b: u32) -> Option<u32> {
        match self {
            Self::Add => Some(a + b),
            Self::Subtract => a.checked_sub(b),
            Self::Distance => Some(a.abs_diff(b)),
        }
    }

    /// The problem `a{op}b=` with its answer, as a record for the `raw` template (line 0: not
    /// from a file).
    pub fn record(self, a: u32, b: u32) -> Option<Record> {
        Some(Record {
            line: 0,
            instruction: format!("{a}{}{b}=", self.symbol()),
            input: None,
            output: self.apply(a, b)?.to_string(),
        })
    }

    /// Every defined problem with both operands below [`OPERAND_LIMIT`], in order.
    pub fn all_records(self) -> Vec<Record> {
        (0..OPERAND_LIMIT)
            .flat_map(|a| (0..OPERAND_LIMIT).filter_map(move |b| self.record(a, b)))
            .collect()
    }
}

/// The demo model: byte-level vocabulary (256 bytes + `<|bos|>`, `<|eos|>`, `<|pad|>` of
/// [`TextTokenizer::byte_level`]), 4 layers of width 128, GQA (4 query / 2 key-value heads),
/// tied head: 0.7 M parameters, 1.4 MB in f16.
pub fn demo_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 259,
        hidden_size: 128,
        intermediate_size: 320,
        num_hidden_layers: 4,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 32,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(256),
        eos_token_ids: vec![257],
        dtype: "float16".into(),
    }
}

/// The fine-tuning problems split into disjoint train and evaluation sets (seeded shuffle of
/// every `a~b`), `evaluation` problems held out.
pub fn finetune_split(evaluation: usize, seed: u64) -> (Vec<Record>, Vec<Record>) {
    let mut all = Operation::Distance.all_records();
    shuffle(&mut all, seed);
    let train = all.split_off(evaluation.min(all.len()));
    (train, all)
}

/// Pre-training settings.
#[derive(Clone, Debug)]
pub struct PretrainConfig {
    /// Optimizer steps.
    pub steps: usize,
    /// Problems per step.
    pub batch_size: usize,
    /// Peak learning rate (linear warmup, cosine decay).
    pub lr: f64,
    /// Seed of the initialization and the data order.
    pub seed: u64,
}

impl Default for PretrainConfig {
    fn default() -> Self {
        Self {
            steps: 4000,
            batch_size: 64,
            lr: 2e-3,
            seed: 0,
        }
    }
}

/// Pre-trains the demo model from scratch on every `a+b` and `a-b` problem (all parameters
/// trained, loss on the answer and EOS only), calling `on_step` after each optimizer step.
///
/// # Errors
/// A non-finite loss or gradient.
pub fn pretrain(
    config: &PretrainConfig,
    device: &Device,
    on_step: &mut dyn FnMut(&StepMetrics),
) -> Result<CausalLm, TrainError> {
    let model_config = demo_config();
    let mut weights = RandomWeights::new(&model_config, 0.02, config.seed);
    let model: CausalLm =
        Llama::from_source(&model_config, &mut weights, &device.clone().autodiff())
            .map_err(|e| TrainError::config("demo model", "<random init>", e.to_string()))?
            .into();
    // The base layers are built frozen (they are what adapters adapt); pre-training trains all.
    let all = ParamGroup::ids_from_module(model.clone());
    let model = model.set_require_grad_group(all, true);

    let tokenizer = TextTokenizer::byte_level();
    let records: Vec<Record> = Operation::PRETRAINED
        .iter()
        .flat_map(|op| op.all_records())
        .collect();
    let (examples, _) = encode_all(
        Path::new("<generated arithmetic>"),
        &records,
        PromptTemplate::Raw,
        &tokenizer,
        32,
    )?;
    let pad = tokenizer.token_to_id("<|pad|>").unwrap_or(0);
    let mut data = DataLoader::new(examples, config.batch_size, config.seed, pad);
    let mut learner = Learner::new(
        model,
        LearnerConfig {
            max_steps: config.steps,
            grad_accum: 1,
            schedule: LrSchedule {
                peak: config.lr,
                warmup_steps: config.steps / 20,
                total_steps: config.steps,
                kind: ScheduleKind::Cosine,
            },
            beta1: 0.9,
            beta2: 0.98,
            eps: 1e-8,
            weight_decay: 0.01,
            max_grad_norm: Some(1.0),
        },
    )?;
    while learner.step() < config.steps {
        let metrics = learner.train_step(&mut data)?;
        on_step(&metrics);
    }
    // Back to the frozen-base state every loaded model has.
    Ok(learner.into_model().valid().no_grad())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn problems_are_complete_and_the_split_is_disjoint() {
        assert_eq!(Operation::Add.all_records().len(), 10_000);
        // a >= b: 100 + 99 + … + 1.
        assert_eq!(Operation::Subtract.all_records().len(), 5_050);
        let r = Operation::Distance.record(12, 47).unwrap();
        assert_eq!(
            (r.instruction.as_str(), r.output.as_str()),
            ("12~47=", "35")
        );
        assert!(Operation::Subtract.record(3, 4).is_none());
        let (train, eval) = finetune_split(200, 1);
        assert_eq!((train.len(), eval.len()), (9_800, 200));
        let held: std::collections::HashSet<&str> =
            eval.iter().map(|r| r.instruction.as_str()).collect();
        assert!(train.iter().all(|r| !held.contains(r.instruction.as_str())));
        assert_eq!(finetune_split(200, 1).1, eval, "the split is seeded");
    }
}
