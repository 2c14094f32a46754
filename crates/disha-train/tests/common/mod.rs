//! Shared by the disha-train integration tests.

use disha_models::llama::LlamaConfig;

/// A small byte-level Llama (the demo model's vocabulary, heads and tied head, narrower and
/// shallower): trains in milliseconds per step on Flex.
pub fn tiny_byte_level_config() -> LlamaConfig {
    LlamaConfig {
        hidden_size: 32,
        intermediate_size: 64,
        num_hidden_layers: 2,
        head_dim: 8,
        dtype: "float32".into(),
        ..disha_train::demo::demo_config()
    }
}
