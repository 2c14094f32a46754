//! # disha-models
//!
//! Causal language models for [disha](https://github.com/disha-rs/disha), written with Burn
//! 0.22 modules, every projection an [`disha_core::AdaptedLinear`] so PEFT adapters (MiSS /
//! Bone, BAT, MiSS-mini, LoRA) load onto them by module name and reproduce transformers + PEFT.
//!
//! - [`CausalLm`]: the family-agnostic model everything after loading works on (forward,
//!   packed forward, incremental decoding with a [`DecodeState`], vocabulary and stop ids,
//!   merged export), a `#[derive(Module)]` enum over the families.
//! - [`llama::Llama`]: the Llama family (rotate-half RoPE, GQA, KV cache, tied or untied head).
//! - [`causal_lm_loss`]: the loss every family trains with, labels [`IGNORE_INDEX`] skipped.
//! - Loading: [`load_model`] takes an HF directory (single or sharded safetensors, f32 / f16 /
//!   bf16), a GGUF v3 file (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q2_K–Q6_K, Q8_K dequantized into the frozen base),
//!   or a llama2.c `.bin` checkpoint.
//! - [`TextTokenizer`]: `tokenizer.json` or the tokenizer embedded in a GGUF, with chat
//!   templates rendered by `minijinja`.
//! - [`generate`]: greedy / temperature / top-k / top-p sampling, seeded, with stop tokens and a
//!   streaming callback.
//! - [`export_merged`]: a plain HF directory of the merged model that transformers can load.
//! - Feature `burn-train`: `TrainStep` / `InferenceStep` for [`CausalLm`] on
//!   `CausalLmBatch`, so Burn's own training drivers can train it.
#![warn(missing_docs)]

mod base_dtype;
#[cfg(feature = "burn-train")]
mod burn_train;
mod causal_lm;
mod chat;
mod error;
mod export;
mod generate;
pub mod gguf;
mod gguf_llama;
pub mod llama;
mod llama2c;
mod load;
mod loss;
mod pth;
mod pth_writer;
mod rng;
pub mod rwkv;
mod tokenizer;
mod weights;
mod world_tokenizer;

pub use base_dtype::{BaseDtype, BaseDtypeSource, ComputeDtype};
#[cfg(feature = "burn-train")]
pub use burn_train::CausalLmBatch;
pub use causal_lm::{CausalLm, DecodeState, ModelFamily};
pub use chat::{ChatMessage, ChatTemplate};

/// The built-in chat templates' Jinja sources.
pub mod chat_templates {
    pub use crate::chat::{CHATML, LLAMA2, LLAMA3};
}
pub use error::{ModelError, Result};
pub use export::{export_merged, export_merged_pth};
pub use generate::{END_OF_TURN_TOKENS, GenerationConfig, generate, stop_tokens};
pub use gguf_llama::{GgufWeights, config_from_gguf, gguf_name, unpermute_rope_rows};
pub use llama2c::Llama2cWeights;
pub use load::{
    LoadOptions, LoadedModel, ModelFormat, load_model, load_model_with, load_tokenizer,
};
pub use loss::{IGNORE_INDEX, causal_lm_loss, causal_lm_loss_sum};
pub use pth::PthWeights;
pub use pth_writer::{PthTensor, pth_bytes, write_pth};
pub use rng::SplitMix64;
pub use tokenizer::TextTokenizer;
pub use weights::{RandomWeights, SafetensorsWeights, WeightSource};
pub use world_tokenizer::WorldTokenizer;
