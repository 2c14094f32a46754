//! Llama models from GGUF: config from `llama.*` metadata, tensors renamed to HF names,
//! dequantized to f32, and q/k rows permuted from llama.cpp's interleaved RoPE layout back to
//! HF's rotate-half layout (so HF-trained adapters apply to the same rows).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use disha_core::HostTensor;

use crate::error::{ModelError, Result};
use crate::gguf::{GgufFile, GgufValue};
use crate::llama::{LlamaConfig, RopeScaling};
use crate::weights::WeightSource;

/// Reads the architecture from GGUF metadata (`general.architecture = llama`).
///
/// # Errors
/// Another architecture, or a missing / malformed `llama.*` key (named).
pub fn config_from_gguf(file: &GgufFile) -> Result<LlamaConfig> {
    let path = file.path();
    let arch = file
        .get("general.architecture")
        .and_then(GgufValue::as_str)
        .unwrap_or("<missing>");
    if arch != "llama" {
        return Err(ModelError::config(
            path,
            "general.architecture",
            format!("`{arch}`: only `llama` GGUF files are supported"),
        ));
    }
    let int = |key: &str| -> Result<usize> {
        file.get(key)
            .and_then(GgufValue::as_u64)
            .map(|v| v as usize)
            .ok_or_else(|| ModelError::config(path, key, "missing or not an integer"))
    };
    let float = |key: &str, default: f64| -> Result<f64> {
        match file.get(key) {
            None => Ok(default),
            Some(v) => v
                .as_f64()
                .ok_or_else(|| ModelError::config(path, key, "not a number")),
        }
    };
    let hidden_size = int("llama.embedding_length")?;
    let heads = int("llama.attention.head_count")?;
    let kv_heads = match file.get("llama.attention.head_count_kv") {
        Some(_) => int("llama.attention.head_count_kv")?,
        None => heads,
    };
    let head_dim = match file.get("llama.attention.key_length") {
        Some(_) => int("llama.attention.key_length")?,
        None => hidden_size / heads.max(1),
    };
    let vocab_size = match file.get("llama.vocab_size") {
        Some(_) => int("llama.vocab_size")?,
        None => file
            .tensors
            .get("token_embd.weight")
            .map(|t| t.shape()[0])
            .ok_or_else(|| {
                ModelError::config(path, "llama.vocab_size", "missing and no token_embd.weight")
            })?,
    };
    let rope_scaling = match file
        .get("llama.rope.scaling.type")
        .and_then(GgufValue::as_str)
    {
        None | Some("none") => RopeScaling::Default,
        Some("linear") => RopeScaling::Linear {
            factor: float("llama.rope.scaling.factor", 1.0)?,
        },
        Some(other) => {
            return Err(ModelError::config(
                path,
                "llama.rope.scaling.type",
                format!("`{other}` is not supported (none, linear)"),
            ));
        }
    };
    if file.tensors.contains_key("rope_freqs.weight") {
        return Err(ModelError::config(
            path,
            "rope_freqs.weight",
            "Llama 3.1-style per-frequency RoPE factors in GGUF are not supported yet; \
             load the HF checkpoint (its rope_scaling is supported)",
        ));
    }
    let token = |key: &str| file.get(key).and_then(GgufValue::as_u64).map(|v| v as u32);
    let config = LlamaConfig {
        vocab_size,
        hidden_size,
        intermediate_size: int("llama.feed_forward_length")?,
        num_hidden_layers: int("llama.block_count")?,
        num_attention_heads: heads,
        num_key_value_heads: kv_heads,
        head_dim,
        rms_norm_eps: float("llama.attention.layer_norm_rms_epsilon", 1e-5)?,
        rope_theta: float("llama.rope.freq_base", 10_000.0)?,
        rope_scaling,
        max_position_embeddings: int("llama.context_length").unwrap_or(2048),
        tie_word_embeddings: !file.tensors.contains_key("output.weight"),
        attention_bias: file.tensors.contains_key("blk.0.attn_q.bias"),
        mlp_bias: file.tensors.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: token("tokenizer.ggml.bos_token_id"),
        eos_token_ids: token("tokenizer.ggml.eos_token_id").into_iter().collect(),
        dtype: "float32".into(),
    };
    config.validate(path)?;
    Ok(config)
}

/// GGUF tensor name for an HF name (`model.layers.3.mlp.up_proj.weight` → `blk.3.ffn_up.weight`).
pub fn gguf_name(hf: &str) -> Option<String> {
    match hf {
        "model.embed_tokens.weight" => return Some("token_embd.weight".into()),
        "model.norm.weight" => return Some("output_norm.weight".into()),
        "lm_head.weight" => return Some("output.weight".into()),
        _ => {}
    }
    let rest = hf.strip_prefix("model.layers.")?;
    let (layer, module) = rest.split_once('.')?;
    let (module, param) = module.rsplit_once('.')?;
    let short = match module {
        "self_attn.q_proj" => "attn_q",
        "self_attn.k_proj" => "attn_k",
        "self_attn.v_proj" => "attn_v",
        "self_attn.o_proj" => "attn_output",
        "mlp.gate_proj" => "ffn_gate",
        "mlp.up_proj" => "ffn_up",
        "mlp.down_proj" => "ffn_down",
        "input_layernorm" => "attn_norm",
        "post_attention_layernorm" => "ffn_norm",
        _ => return None,
    };
    Some(format!("blk.{layer}.{short}.{param}"))
}

/// Reorders the rows of a q or k projection (`[heads·head_dim, …]`) from llama.cpp's
/// interleaved RoPE layout to HF's rotate-half layout: within each head, GGUF row `2i + j`
/// becomes HF row `j·head_dim/2 + i` (the inverse of llama.cpp's `permute`).
pub fn unpermute_rope_rows(values: &[f32], heads: usize, row_len: usize) -> Vec<f32> {
    let rows = values.len() / row_len;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![0.0; values.len()];
    for h in 0..heads {
        for i in 0..half {
            for j in 0..2 {
                let src = (h * head_dim + 2 * i + j) * row_len;
                let dst = (h * head_dim + j * half + i) * row_len;
                out[dst..dst + row_len].copy_from_slice(&values[src..src + row_len]);
            }
        }
    }
    out
}

/// A [`WeightSource`] over a GGUF file.
#[derive(Debug)]
pub struct GgufWeights {
    file: GgufFile,
    heads: usize,
    kv_heads: usize,
    left: BTreeMap<String, ()>,
    path: PathBuf,
}

impl GgufWeights {
    /// Wraps a parsed file for `config` (head counts drive the q/k permutation).
    pub fn new(file: GgufFile, config: &LlamaConfig) -> Self {
        let left = file.tensors.keys().map(|k| (k.clone(), ())).collect();
        Self {
            path: file.path().to_path_buf(),
            heads: config.num_attention_heads,
            kv_heads: config.num_key_value_heads,
            left,
            file,
        }
    }
}

impl WeightSource for GgufWeights {
    fn path(&self) -> &Path {
        &self.path
    }

    fn take(&mut self, name: &str) -> Result<Option<HostTensor>> {
        let Some(gguf) = gguf_name(name) else {
            return Ok(None);
        };
        if self.left.remove(&gguf).is_none() {
            return Ok(None);
        }
        let shape = self.file.tensors[&gguf].shape();
        let values = self.file.dequantize(&gguf)?.expect("listed tensor");
        let row_len: usize = shape[1..].iter().product();
        let values = if gguf.ends_with("attn_q.weight") || gguf.ends_with("attn_q.bias") {
            unpermute_rope_rows(&values, self.heads, row_len.max(1))
        } else if gguf.ends_with("attn_k.weight") || gguf.ends_with("attn_k.bias") {
            unpermute_rope_rows(&values, self.kv_heads, row_len.max(1))
        } else {
            values
        };
        Ok(Some(HostTensor::new(shape, values)))
    }

    fn remaining(&self) -> Vec<String> {
        self.left.keys().cloned().collect()
    }

    fn display_name(&self, name: &str) -> String {
        match gguf_name(name) {
            Some(g) => format!("{g} (HF {name})"),
            None => name.to_string(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_map_both_ways_for_every_projection() {
        assert_eq!(
            gguf_name("model.layers.12.self_attn.o_proj.weight").as_deref(),
            Some("blk.12.attn_output.weight")
        );
        assert_eq!(
            gguf_name("model.layers.0.post_attention_layernorm.weight").as_deref(),
            Some("blk.0.ffn_norm.weight")
        );
        assert_eq!(gguf_name("model.layers.0.mlp.nope.weight"), None);
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        // llama.cpp: w.reshape(heads, 2, hd/2, in).swapaxes(1, 2).reshape(...)
        let (heads, hd, row) = (2, 6, 3);
        let hf: Vec<f32> = (0..heads * hd * row).map(|x| x as f32).collect();
        let mut gguf = vec![0.0; hf.len()];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let dst = (h * hd + 2 * i + j) * row;
                    let src = (h * hd + j * hd / 2 + i) * row;
                    gguf[dst..dst + row].copy_from_slice(&hf[src..src + row]);
                }
            }
        }
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rope_rows(&gguf, heads, row), hf);
    }
}
