//! Karpathy's llama2.c legacy (version 0) checkpoints (`stories15M.bin`, `stories260K.bin`, …).
//!
//! Layout: a header of 7 little-endian i32 — `dim, hidden_dim, n_layers, n_heads, n_kv_heads,
//! vocab_size, seq_len` (a negative `vocab_size` means an unshared classifier follows) — then
//! f32 arrays: `token_embedding [V, dim]`, `rms_att [L, dim]`, `wq [L, dim, dim]`,
//! `wk [L, kv, dim]`, `wv [L, kv, dim]`, `wo [L, dim, dim]`, `rms_ffn [L, dim]`,
//! `w1 [L, hidden, dim]` (gate), `w2 [L, dim, hidden]` (down), `w3 [L, hidden, dim]` (up),
//! `rms_final [dim]`, two legacy RoPE tables `[seq_len, head_dim / 2]`, and optionally
//! `wcls [V, dim]`. Weights are PyTorch `[out, in]`; q/k rows are in Meta's interleaved RoPE
//! layout and are permuted into HF's rotate-half layout here.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use disha_core::HostTensor;

use crate::error::{ModelError, Result};
use crate::gguf_llama::unpermute_rope_rows;
use crate::llama::{LlamaConfig, RopeScaling};
use crate::weights::WeightSource;

/// The tensors of a llama2.c checkpoint under HF names.
#[derive(Debug)]
pub struct Llama2cWeights {
    path: PathBuf,
    tensors: BTreeMap<String, HostTensor>,
}

impl Llama2cWeights {
    /// Reads `path`, returning the config its header describes and the weights.
    ///
    /// # Errors
    /// I/O, a header with non-positive sizes, or a file whose size does not match the layout
    /// the header implies exactly (both sizes are named).
    pub fn open(path: &Path) -> Result<(LlamaConfig, Self)> {
        let bytes = std::fs::read(path).map_err(|e| ModelError::io(path, e))?;
        let bad = |message: String| ModelError::config(path, "<llama2.c header>", message);
        if bytes.len() < 28 {
            return Err(bad(format!(
                "{} bytes is shorter than the 28-byte header",
                bytes.len()
            )));
        }
        let header: Vec<i32> = bytes[..28]
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let [dim, hidden, layers, heads, kv_heads, vocab, seq_len] =
            header[..].try_into().expect("7 fields");
        if [dim, hidden, layers, heads, kv_heads, seq_len]
            .iter()
            .any(|&v| v <= 0)
            || vocab == 0
        {
            return Err(bad(format!("implausible header {header:?}")));
        }
        let shared = vocab > 0;
        let [dim, hidden, layers, heads, kv_heads, vocab, seq_len] =
            [dim, hidden, layers, heads, kv_heads, vocab.abs(), seq_len].map(|v| v as usize);
        if !dim.is_multiple_of(heads) {
            return Err(bad(format!(
                "dim {dim} is not divisible by n_heads {heads}"
            )));
        }
        let head_dim = dim / heads;
        let kv = kv_heads * head_dim;
        let mut sizes: Vec<(String, Vec<usize>)> = Vec::new();
        let per_layer = |sizes: &mut Vec<(String, Vec<usize>)>, name: &str, shape: Vec<usize>| {
            for l in 0..layers {
                sizes.push((format!("model.layers.{l}.{name}"), shape.clone()));
            }
        };
        sizes.push(("model.embed_tokens.weight".into(), vec![vocab, dim]));
        per_layer(&mut sizes, "input_layernorm.weight", vec![dim]);
        per_layer(&mut sizes, "self_attn.q_proj.weight", vec![dim, dim]);
        per_layer(&mut sizes, "self_attn.k_proj.weight", vec![kv, dim]);
        per_layer(&mut sizes, "self_attn.v_proj.weight", vec![kv, dim]);
        per_layer(&mut sizes, "self_attn.o_proj.weight", vec![dim, dim]);
        per_layer(&mut sizes, "post_attention_layernorm.weight", vec![dim]);
        per_layer(&mut sizes, "mlp.gate_proj.weight", vec![hidden, dim]);
        per_layer(&mut sizes, "mlp.down_proj.weight", vec![dim, hidden]);
        per_layer(&mut sizes, "mlp.up_proj.weight", vec![hidden, dim]);
        sizes.push(("model.norm.weight".into(), vec![dim]));
        sizes.push(("<rope tables>".into(), vec![2, seq_len, head_dim / 2]));
        if !shared {
            sizes.push(("lm_head.weight".into(), vec![vocab, dim]));
        }
        let floats: usize = sizes.iter().map(|(_, s)| s.iter().product::<usize>()).sum();
        if bytes.len() != 28 + 4 * floats {
            return Err(bad(format!(
                "file has {} bytes but header {header:?} implies {}",
                bytes.len(),
                28 + 4 * floats
            )));
        }
        let mut offset = 28;
        let mut tensors = BTreeMap::new();
        for (name, shape) in sizes {
            let n: usize = shape.iter().product();
            let mut values: Vec<f32> = bytes[offset..offset + 4 * n]
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
                .collect();
            offset += 4 * n;
            if name.starts_with('<') {
                continue;
            }
            if name.ends_with("q_proj.weight") {
                values = unpermute_rope_rows(&values, heads, dim);
            } else if name.ends_with("k_proj.weight") {
                values = unpermute_rope_rows(&values, kv_heads, dim);
            }
            tensors.insert(name, HostTensor::new(shape, values));
        }
        let config = LlamaConfig {
            vocab_size: vocab,
            hidden_size: dim,
            intermediate_size: hidden,
            num_hidden_layers: layers,
            num_attention_heads: heads,
            num_key_value_heads: kv_heads,
            head_dim,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: seq_len,
            tie_word_embeddings: shared,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            dtype: "float32".into(),
        };
        config.validate(path)?;
        Ok((
            config,
            Self {
                path: path.to_path_buf(),
                tensors,
            },
        ))
    }
}

impl WeightSource for Llama2cWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        Ok(self.tensors.remove(name))
    }

    fn remaining(&self) -> Vec<String> {
        self.tensors.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn checkpoint(header: [i32; 7], floats: usize) -> Vec<u8> {
        let mut bytes: Vec<u8> = header.iter().flat_map(|v| v.to_le_bytes()).collect();
        bytes.extend((0..floats).flat_map(|i| (i as f32 * 1e-3).to_le_bytes()));
        bytes
    }

    #[test]
    fn reads_a_tiny_checkpoint_and_names_size_mismatches() {
        // dim 8, hidden 12, 1 layer, 2 heads, 1 kv head, vocab 16 (shared), seq_len 4.
        let (dim, hidden, vocab, kv) = (8, 12, 16, 4);
        let floats = vocab * dim
            + dim
            + dim * dim
            + 2 * kv * dim
            + dim * dim
            + dim
            + 3 * hidden * dim
            + dim
            + 2 * 4 * 2;
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("tiny.bin");
        std::fs::write(&path, checkpoint([8, 12, 1, 2, 1, 16, 4], floats)).unwrap();
        let (config, mut weights) = Llama2cWeights::open(&path).unwrap();
        assert_eq!((config.head_dim, config.kv_dim()), (4, 4));
        assert!(config.tie_word_embeddings);
        let k = weights
            .take("model.layers.0.self_attn.k_proj.weight")
            .unwrap()
            .unwrap();
        assert_eq!(k.shape, vec![kv, dim]);

        std::fs::write(&path, checkpoint([8, 12, 1, 2, 1, 16, 4], floats - 1)).unwrap();
        let err = Llama2cWeights::open(&path).unwrap_err().to_string();
        assert!(err.contains("tiny.bin") && err.contains("implies"), "{err}");
        std::fs::write(&path, checkpoint([8, 12, 1, 3, 1, 16, 4], floats)).unwrap();
        let err = Llama2cWeights::open(&path).unwrap_err().to_string();
        assert!(err.contains("not divisible"), "{err}");
    }
}
