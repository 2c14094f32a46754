//! The family-agnostic seam: one causal language model type over every model family.
//!
//! Everything after loading — the trainer, evaluation, generation, merged export, `inspect`
//! and Burn's training traits — works on [`CausalLm`], never on a family's own type. It is a
//! `#[derive(Module)]` enum (Burn's optimizers and gradient accumulators need one concrete
//! module type), so adding a family means one new folder under `src/` plus one arm here and in
//! the loader.

use burn::module::Module;
use burn::tensor::{Device, Int, Tensor};
use disha_core::{AdaptableModel, AdaptedLinear, LinearSite};

use crate::error::{ModelError, Result};
use crate::llama::{Llama, LlamaCache};
use crate::rwkv::{Rwkv7, RwkvState};

/// The model families disha implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum ModelFamily {
    /// Llama 2/3/3.1/3.2, TinyLlama, SmolLM2, Mistral-style GQA ([`crate::llama`]).
    Llama,
    /// RWKV-7 "x070" ([`crate::rwkv`]).
    Rwkv7,
}

impl ModelFamily {
    /// The family's display name.
    pub fn name(self) -> &'static str {
        match self {
            Self::Llama => "Llama",
            Self::Rwkv7 => "RWKV-7",
        }
    }
}

impl std::fmt::Display for ModelFamily {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A causal language model of any family, every adaptable projection an [`AdaptedLinear`]
/// (PEFT adapters apply by the family's own module names).
///
/// # Shapes
/// - input ids: `[batch, seq]` (Int)
/// - logits: `[batch, seq, vocab]`
#[derive(Module, Debug)]
pub enum CausalLm {
    /// A Llama-family decoder.
    Llama(Llama),
    /// An RWKV-7 model.
    Rwkv7(Rwkv7),
}

impl From<Llama> for CausalLm {
    fn from(model: Llama) -> Self {
        Self::Llama(model)
    }
}

impl From<Rwkv7> for CausalLm {
    fn from(model: Rwkv7) -> Self {
        Self::Rwkv7(model)
    }
}

/// What incremental decoding carries from one call to the next: a key/value cache for
/// attention models, the recurrent state for RWKV.
#[derive(Clone, Debug)]
pub enum DecodeState {
    /// Llama's per-layer key/value cache.
    Llama(LlamaCache),
    /// RWKV's recurrent state (O(1) in the sequence length).
    Rwkv7(RwkvState),
}

impl DecodeState {
    /// Positions already processed.
    pub fn len(&self) -> usize {
        match self {
            Self::Llama(cache) => cache.len(),
            Self::Rwkv7(state) => state.len,
        }
    }

    /// No position processed yet.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl CausalLm {
    /// Which family this is.
    pub fn family(&self) -> ModelFamily {
        match self {
            Self::Llama(_) => ModelFamily::Llama,
            Self::Rwkv7(_) => ModelFamily::Rwkv7,
        }
    }

    /// The dtype the frozen base's matrices are kept in (the token embedding's; every frozen
    /// matrix shares it — [`BaseDtype`](crate::BaseDtype)).
    pub fn base_dtype(&self) -> burn::tensor::DType {
        match self {
            Self::Llama(model) => model.embed_tokens.weight.val().dtype(),
            Self::Rwkv7(model) => model.emb.weight.val().dtype(),
        }
    }

    /// Computes the activations in `dtype` (see [`Llama::with_compute_dtype`] and
    /// [`Rwkv7::with_compute_dtype`]): inference, or mixed-precision training (adapters, their
    /// gradients and optimizer state stay f32).
    ///
    /// # Errors
    /// A device without tensors of that dtype (WGPU has no bf16).
    pub fn with_compute_dtype(self, dtype: crate::ComputeDtype) -> crate::Result<Self> {
        let device = self.device();
        if !device.supports_dtype(dtype.dtype()) {
            return Err(crate::ModelError::InvalidArgument {
                name: "compute dtype".into(),
                value: dtype.to_string(),
                message: format!(
                    "{device:?} has no {:?} tensors; compute in f32 (or f16 where the device \
                     has it)",
                    dtype.dtype()
                ),
            });
        }
        Ok(match self {
            Self::Llama(model) => Self::Llama(model.with_compute_dtype(dtype.dtype())),
            Self::Rwkv7(model) => Self::Rwkv7(model.with_compute_dtype(dtype.dtype())),
        })
    }

    /// The dtype activations are computed in ([`with_compute_dtype`](Self::with_compute_dtype)).
    pub fn compute_dtype(&self) -> burn::tensor::DType {
        match self {
            Self::Llama(model) => model.compute_dtype(),
            Self::Rwkv7(model) => model.compute_dtype(),
        }
    }

    /// [`base_dtype`](Self::base_dtype) as `f32`, `f16` or `bf16`.
    pub fn base_dtype_name(&self) -> &'static str {
        match self.base_dtype() {
            burn::tensor::DType::F16 => "f16",
            burn::tensor::DType::BF16 => "bf16",
            _ => "f32",
        }
    }

    /// The Llama model, if this is one.
    pub fn as_llama(&self) -> Option<&Llama> {
        match self {
            Self::Llama(model) => Some(model),
            Self::Rwkv7(_) => None,
        }
    }

    /// The RWKV-7 model, if this is one.
    pub fn as_rwkv7(&self) -> Option<&Rwkv7> {
        match self {
            Self::Rwkv7(model) => Some(model),
            Self::Llama(_) => None,
        }
    }

    /// The RWKV-7 model, mutably, if this is one (RWKV-PEFT checkpoints load through it).
    pub fn as_rwkv7_mut(&mut self) -> Option<&mut Rwkv7> {
        match self {
            Self::Rwkv7(model) => Some(model),
            Self::Llama(_) => None,
        }
    }

    /// Base tensors trained with the adapter, under the family's checkpoint names (RWKV-7:
    /// the LayerNorms after [`Rwkv7::set_layer_norms_trainable`]); none on Llama, whose base is
    /// always frozen.
    pub fn trainable_base_tensors(&self) -> Vec<crate::PthTensor> {
        match self {
            Self::Llama(_) => Vec::new(),
            Self::Rwkv7(model) => model.trainable_base_tensors(),
        }
    }

    /// Rows of the output head (the largest id the model accepts, plus one).
    pub fn vocab_size(&self) -> usize {
        match self {
            Self::Llama(model) => model.config().vocab_size,
            Self::Rwkv7(model) => model.config().vocab_size,
        }
    }

    /// The end-of-sequence ids the model's own configuration declares (may be empty).
    pub fn eos_token_ids(&self) -> &[u32] {
        match self {
            Self::Llama(model) => &model.config().eos_token_ids,
            // BlinkDL checkpoints carry no config; the tokenizer supplies the stop ids.
            Self::Rwkv7(_) => &[],
        }
    }

    /// The device the weights live on.
    pub fn device(&self) -> Device {
        match self {
            Self::Llama(model) => model.device(),
            Self::Rwkv7(model) => model.device(),
        }
    }

    /// A one-paragraph description of the architecture (what `disha inspect` prints).
    pub fn architecture(&self) -> String {
        match self {
            Self::Llama(model) => {
                let c = model.config();
                format!(
                    "Llama: {} layers, hidden {}, MLP {}, heads {} (kv {}), head_dim {}\n\
                     vocab {}, rope_theta {}, rope scaling {:?}, rms eps {:e}, tied head {}, \
                     dtype {}",
                    c.num_hidden_layers,
                    c.hidden_size,
                    c.intermediate_size,
                    c.num_attention_heads,
                    c.num_key_value_heads,
                    c.head_dim,
                    c.vocab_size,
                    c.rope_theta,
                    c.rope_scaling,
                    c.rms_norm_eps,
                    c.tie_word_embeddings,
                    c.dtype
                )
            }
            Self::Rwkv7(model) => {
                let c = model.config();
                format!(
                    "RWKV-7: {} layers, hidden {}, FFN {}, heads {} × {}\n\
                     vocab {}, low-rank widths decay {} / iclr {} / value {} / gate {}",
                    c.num_layers,
                    c.hidden_size,
                    c.ffn_size,
                    c.num_heads,
                    c.head_size,
                    c.vocab_size,
                    c.decay_rank,
                    c.iclr_rank,
                    c.value_rank,
                    c.gate_rank
                )
            }
        }
    }

    /// Logits for every position.
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, vocab]`
    pub fn forward(&self, input_ids: Tensor<2, Int>) -> Tensor<3> {
        match self {
            Self::Llama(model) => model.forward(input_ids),
            Self::Rwkv7(model) => model.forward(input_ids),
        }
    }

    /// Logits of packed rows: row `b` holds the sequences of lengths `segments[b]` one after
    /// the other (then padding), and each sequence's logits are those of running it alone
    /// (see [`Llama::forward_packed`]).
    ///
    /// # Shapes
    /// - input_ids: `[batch, seq]` → `[batch, seq, vocab]`
    ///
    /// # Panics
    /// `segments` has not one entry per row, or a row's lengths add up to more than `seq`
    /// (a programmer error: the data pipeline builds both together).
    pub fn forward_packed(&self, input_ids: Tensor<2, Int>, segments: &[Vec<usize>]) -> Tensor<3> {
        match self {
            Self::Llama(model) => model.forward_packed(input_ids, segments),
            Self::Rwkv7(model) => model.forward_packed(input_ids, segments),
        }
    }

    /// An empty decoding state for [`forward_last`](Self::forward_last).
    pub fn new_decode_state(&self) -> DecodeState {
        match self {
            Self::Llama(_) => DecodeState::Llama(LlamaCache::new()),
            Self::Rwkv7(model) => DecodeState::Rwkv7(model.zero_state(1)),
        }
    }

    /// Logits of the last position only, extending `state` (what generation needs).
    ///
    /// # Shapes
    /// - input_ids: `[batch, new]` → `[batch, vocab]`
    ///
    /// # Panics
    /// `state` belongs to another family, or to another batch size once used (programmer
    /// errors: states come from [`new_decode_state`](Self::new_decode_state)).
    pub fn forward_last(&self, input_ids: Tensor<2, Int>, state: &mut DecodeState) -> Tensor<2> {
        match (self, state) {
            (Self::Llama(model), DecodeState::Llama(cache)) => model.forward_last(input_ids, cache),
            (Self::Rwkv7(model), DecodeState::Rwkv7(rnn)) => {
                let batch = input_ids.dims()[0];
                if rnn.len == 0 && rnn.batch() != batch {
                    *rnn = model.zero_state(batch);
                }
                model.forward_last(input_ids, rnn)
            }
            (model, state) => panic!(
                "a {} decode state given to a {} model",
                match state {
                    DecodeState::Llama(_) => "Llama",
                    DecodeState::Rwkv7(_) => "RWKV-7",
                },
                model.family()
            ),
        }
    }

    /// Checks that every id is inside the vocabulary.
    ///
    /// # Errors
    /// [`ModelError::TokenOutOfRange`] naming the first bad id and its position.
    pub fn check_ids(&self, ids: &[i64]) -> Result<()> {
        check_ids(ids, self.vocab_size())
    }
}

/// Checks that every id is in `0..vocab_size`.
///
/// # Errors
/// [`ModelError::TokenOutOfRange`] naming the first bad id and its position.
pub(crate) fn check_ids(ids: &[i64], vocab_size: usize) -> Result<()> {
    match ids
        .iter()
        .position(|&id| id < 0 || id as usize >= vocab_size)
    {
        Some(position) => Err(ModelError::TokenOutOfRange {
            id: ids[position],
            position,
            vocab_size,
        }),
        None => Ok(()),
    }
}

impl AdaptableModel for CausalLm {
    fn visit_linears(&self, f: &mut dyn FnMut(&LinearSite, &AdaptedLinear)) {
        match self {
            Self::Llama(model) => model.visit_linears(f),
            Self::Rwkv7(model) => model.visit_linears(f),
        }
    }

    fn visit_linears_mut(&mut self, f: &mut dyn FnMut(&LinearSite, &mut AdaptedLinear)) {
        match self {
            Self::Llama(model) => model.visit_linears_mut(f),
            Self::Rwkv7(model) => model.visit_linears_mut(f),
        }
    }

    fn default_target_modules(&self) -> Option<Vec<String>> {
        match self {
            Self::Llama(model) => model.default_target_modules(),
            Self::Rwkv7(model) => model.default_target_modules(),
        }
    }
}
