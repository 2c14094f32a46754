//! The Llama family (Llama 2/3/3.1/3.2, TinyLlama, SmolLM2, Mistral-style GQA).

mod attention;
mod config;
mod mlp;
mod model;
mod rope;

pub use attention::{LayerKv, LlamaAttention, PositionContext};
pub use config::{LlamaConfig, RopeScaling};
pub use mlp::LlamaMlp;
pub use model::{Llama, LlamaCache, LlamaDecoderLayer, hf_tensor_shapes, projection_names};
pub use rope::{RotaryEmbedding, apply_rotary};
