//! Shared by the disha-train integration tests.

use disha_models::llama::{LlamaConfig, RopeScaling};

/// A small byte-level Llama (vocabulary = 256 bytes + `TextTokenizer::byte_level()`'s three
/// specials), GQA, tied head: trains in milliseconds per step on Flex.
pub fn tiny_byte_level_config() -> LlamaConfig {
    LlamaConfig {
        vocab_size: 259,
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        num_attention_heads: 4,
        num_key_value_heads: 2,
        head_dim: 8,
        rms_norm_eps: 1e-5,
        rope_theta: 10_000.0,
        rope_scaling: RopeScaling::Default,
        max_position_embeddings: 64,
        tie_word_embeddings: true,
        attention_bias: false,
        mlp_bias: false,
        bos_token_id: Some(256),
        eos_token_ids: vec![257],
        dtype: "float32".into(),
    }
}
