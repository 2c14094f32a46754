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
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use disha_core::HostTensor;
use disha_core::limits::{exceeds, limits};

use crate::error::{ModelError, Result};
use crate::gguf_llama::unpermute_rope_rows;
use crate::llama::{LlamaConfig, RopeScaling};
use crate::weights::WeightSource;

/// Bytes of the header: seven little-endian `i32`.
const HEADER_BYTES: u64 = 28;

/// The tensors of a llama2.c checkpoint under HF names, read from the file one at a time.
#[derive(Debug)]
pub struct Llama2cWeights {
    path: PathBuf,
    file: File,
    /// HF name → (byte offset, shape), for the tensors not taken yet.
    slots: BTreeMap<String, (u64, Vec<usize>)>,
    heads: usize,
    kv_heads: usize,
}

impl Llama2cWeights {
    /// Opens `path`, returning the config its header describes and the weights (read when
    /// taken).
    ///
    /// # Errors
    /// I/O; a header field that is not positive or exceeds the limits (`max_layers`,
    /// `max_dim`), heads that do not divide the width; or a file whose size does not match the
    /// layout the header implies exactly (both sizes are named) — all checked before anything
    /// is allocated from the header.
    pub fn open(path: &Path) -> Result<(LlamaConfig, Self)> {
        let mut file = File::open(path).map_err(|e| ModelError::io(path, e))?;
        let file_len = file.metadata().map_err(|e| ModelError::io(path, e))?.len();
        let bad = |field: &str, message: String| {
            ModelError::config(path, format!("<llama2.c header>.{field}"), message)
        };
        if file_len < HEADER_BYTES {
            return Err(bad(
                "size",
                format!("{file_len} bytes is shorter than the 28-byte header"),
            ));
        }
        let mut raw = [0u8; HEADER_BYTES as usize];
        file.read_exact(&mut raw)
            .map_err(|e| ModelError::io(path, e))?;
        let header: Vec<i32> = raw
            .chunks_exact(4)
            .map(|b| i32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        let names = [
            "dim",
            "hidden_dim",
            "n_layers",
            "n_heads",
            "n_kv_heads",
            "vocab_size",
            "seq_len",
        ];
        let limits = limits();
        let mut fields = [0usize; 7];
        for (i, (&v, name)) in header.iter().zip(names).enumerate() {
            // A negative vocab_size marks an unshared classifier; its magnitude is the size.
            let magnitude = if name == "vocab_size" {
                v.unsigned_abs() as i64
            } else {
                v as i64
            };
            if magnitude <= 0 {
                return Err(bad(name, format!("{v} must be > 0")));
            }
            let (limit_name, limit) = if name == "n_layers" {
                ("max_layers", limits.max_layers)
            } else {
                ("max_dim", limits.max_dim)
            };
            if magnitude as usize > limit {
                return Err(bad(name, exceeds(magnitude, limit_name, limit)));
            }
            fields[i] = magnitude as usize;
        }
        let [dim, hidden, layers, heads, kv_heads, vocab, seq_len] = fields;
        let shared = header[5] > 0;
        if !dim.is_multiple_of(heads) {
            return Err(bad(
                "n_heads",
                format!("dim {dim} is not divisible by n_heads {heads}"),
            ));
        }
        let head_dim = dim / heads;
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
        // The layout in file order; sizes are summed in u128 so that no header (even with
        // raised limits) can overflow the comparison with the real file size.
        let kv = kv_heads * head_dim;
        let mut layout: Vec<(String, Vec<usize>)> = Vec::new();
        let mut per_layer = |name: &str, shape: Vec<usize>| {
            for l in 0..layers {
                layout.push((format!("model.layers.{l}.{name}"), shape.clone()));
            }
        };
        per_layer("input_layernorm.weight", vec![dim]);
        per_layer("self_attn.q_proj.weight", vec![dim, dim]);
        per_layer("self_attn.k_proj.weight", vec![kv, dim]);
        per_layer("self_attn.v_proj.weight", vec![kv, dim]);
        per_layer("self_attn.o_proj.weight", vec![dim, dim]);
        per_layer("post_attention_layernorm.weight", vec![dim]);
        per_layer("mlp.gate_proj.weight", vec![hidden, dim]);
        per_layer("mlp.down_proj.weight", vec![dim, hidden]);
        per_layer("mlp.up_proj.weight", vec![hidden, dim]);
        layout.insert(0, ("model.embed_tokens.weight".into(), vec![vocab, dim]));
        layout.push(("model.norm.weight".into(), vec![dim]));
        layout.push(("<rope tables>".into(), vec![2, seq_len, head_dim / 2]));
        if !shared {
            layout.push(("lm_head.weight".into(), vec![vocab, dim]));
        }
        let floats: u128 = layout
            .iter()
            .map(|(_, s)| s.iter().map(|&d| d as u128).product::<u128>())
            .sum();
        let expected = HEADER_BYTES as u128 + 4 * floats;
        if file_len as u128 != expected {
            return Err(bad(
                "size",
                format!("file has {file_len} bytes but header {header:?} implies {expected}"),
            ));
        }
        let mut offset = HEADER_BYTES;
        let mut slots = BTreeMap::new();
        for (name, shape) in layout {
            let n: u64 = shape.iter().map(|&d| d as u64).product();
            if !name.starts_with('<') {
                slots.insert(name, (offset, shape));
            }
            offset += 4 * n;
        }
        Ok((
            config,
            Self {
                path: path.to_path_buf(),
                file,
                slots,
                heads,
                kv_heads,
            },
        ))
    }
}

impl WeightSource for Llama2cWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some((offset, shape)) = self.slots.remove(name) else {
            return Ok(None);
        };
        let n: usize = shape.iter().product();
        let mut bytes = vec![0u8; 4 * n];
        let io = |e| ModelError::io(&self.path, e);
        let mut file = &self.file;
        file.seek(SeekFrom::Start(offset)).map_err(io)?;
        file.read_exact(&mut bytes).map_err(io)?;
        let mut values: Vec<f32> = bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().expect("4 bytes")))
            .collect();
        drop(bytes);
        // q/k rows are in Meta's interleaved RoPE layout; the model uses rotate-half.
        let row = shape.last().copied().unwrap_or(1);
        if name.ends_with("q_proj.weight") {
            values = unpermute_rope_rows(&values, self.heads, row);
        } else if name.ends_with("k_proj.weight") {
            values = unpermute_rope_rows(&values, self.kv_heads, row);
        }
        Ok(Some(HostTensor::new(shape, values)))
    }

    fn remaining(&self) -> Vec<String> {
        self.slots.keys().cloned().collect()
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
        // Absurd counts are refused from the 28 header bytes alone, before any allocation.
        for (header, field) in [
            ([8, 12, i32::MAX, 2, 1, 16, 4], "n_layers"),
            ([8, 12, 1, 2, 1, i32::MIN, 4], "vocab_size"),
            ([8, -12, 1, 2, 1, 16, 4], "hidden_dim"),
        ] {
            std::fs::write(&path, checkpoint(header, 0)).unwrap();
            let err = Llama2cWeights::open(&path).unwrap_err().to_string();
            assert!(err.contains("tiny.bin") && err.contains(field), "{err}");
        }
        std::fs::write(&path, checkpoint([8, 12, 1000, 2, 1, 16, 4], floats)).unwrap();
        let err = Llama2cWeights::open(&path).unwrap_err().to_string();
        assert!(err.contains("implies"), "{err}");
    }
}
