//! Llama models from GGUF: config from `llama.*` metadata, tensors renamed to HF names,
//! dequantized to f32, and q/k rows permuted from llama.cpp's interleaved RoPE layout back to
//! HF's rotate-half layout (so HF-trained adapters apply to the same rows).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use disha_core::{HostTensor, QuantFormat};

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
            format!(
                "`{}`: only `llama` GGUF files are supported",
                disha_core::limits::excerpt(arch)
            ),
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
                format!(
                    "`{}` is not supported (none, linear)",
                    disha_core::limits::excerpt(other)
                ),
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
    let token = |key: &str| -> Result<Option<u32>> {
        match file.get(key) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .and_then(|id| u32::try_from(id).ok())
                .map(Some)
                .ok_or_else(|| {
                    ModelError::config(
                        path,
                        key,
                        format!(
                            "{} is not a token id",
                            disha_core::limits::excerpt(format!("{v:?}"))
                        ),
                    )
                }),
        }
    };
    let context_length = match file.get("llama.context_length") {
        Some(_) => int("llama.context_length")?,
        None => 2048,
    };
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
        max_position_embeddings: context_length,
        tie_word_embeddings: !file.tensors.contains_key("output.weight"),
        attention_bias: file.tensors.contains_key("blk.0.attn_q.bias"),
        mlp_bias: file.tensors.contains_key("blk.0.ffn_up.bias"),
        bos_token_id: token("tokenizer.ggml.bos_token_id")?,
        eos_token_ids: token("tokenizer.ggml.eos_token_id")?.into_iter().collect(),
        dtype: "float32".into(),
    };
    config.validate(path).map_err(|e| match e {
        // Name the GGUF key the user can see in the file, not the HF field it became.
        ModelError::Config {
            path,
            field,
            message,
        } => ModelError::Config {
            field: match gguf_key(&field) {
                Some(key) => format!("{key} ({field})"),
                None => field,
            },
            path,
            message,
        },
        other => other,
    })?;
    Ok(config)
}

/// The GGUF metadata key an HF config field is read from.
fn gguf_key(hf_field: &str) -> Option<&'static str> {
    Some(match hf_field {
        "vocab_size" => "llama.vocab_size",
        "hidden_size" => "llama.embedding_length",
        "intermediate_size" => "llama.feed_forward_length",
        "num_hidden_layers" => "llama.block_count",
        "num_attention_heads" => "llama.attention.head_count",
        "num_key_value_heads" => "llama.attention.head_count_kv",
        "head_dim" => "llama.attention.key_length",
        "rms_norm_eps" => "llama.attention.layer_norm_rms_epsilon",
        "rope_theta" => "llama.rope.freq_base",
        "rope_scaling.factor" => "llama.rope.scaling.factor",
        "max_position_embeddings" => "llama.context_length",
        _ => return None,
    })
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
/// Rows are `row_len` elements of any kind: values, or the bytes of a row of ggml blocks.
pub fn unpermute_rope_rows<T: Copy + Default>(
    values: &[T],
    heads: usize,
    row_len: usize,
) -> Vec<T> {
    let rows = values.len() / row_len;
    let head_dim = rows / heads;
    let half = head_dim / 2;
    let mut out = vec![T::default(); values.len()];
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

    /// A `Q8_0` / `Q4_0` weight asked for in its own format: its blocks as stored (q/k rows
    /// reordered whole, as [`take`](Self::take) reorders values).
    fn take_ggml_blocks(
        &mut self,
        name: &str,
        format: QuantFormat,
    ) -> Result<Option<(Vec<u8>, Vec<usize>)>> {
        let Some(gguf) = gguf_name(name) else {
            return Ok(None);
        };
        match self.file.tensors.get(&gguf) {
            Some(info) if info.type_id == format.ggml_type() && self.left.contains_key(&gguf) => {}
            _ => return Ok(None),
        }
        self.left.remove(&gguf);
        let info = &self.file.tensors[&gguf];
        let shape = info.shape();
        let bytes = self.file.raw(&gguf)?.expect("listed tensor");
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let row_bytes = bytes.len() / rows;
        let bytes = if gguf.ends_with("attn_q.weight") {
            unpermute_rope_rows(&bytes, self.heads, row_bytes.max(1))
        } else if gguf.ends_with("attn_k.weight") {
            unpermute_rope_rows(&bytes, self.kv_heads, row_bytes.max(1))
        } else {
            bytes
        };
        Ok(Some((bytes, shape)))
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

    /// llama.cpp's converter permutation (HF rotate-half rows → interleaved):
    /// `w.reshape(heads, 2, hd/2, in).swapaxes(1, 2).reshape(...)`.
    fn llama_cpp_permute(hf: &[f32], heads: usize, row: usize) -> Vec<f32> {
        let hd = hf.len() / row / heads;
        let mut out = vec![0.0; hf.len()];
        for h in 0..heads {
            for i in 0..hd / 2 {
                for j in 0..2 {
                    let dst = (h * hd + 2 * i + j) * row;
                    let src = (h * hd + j * hd / 2 + i) * row;
                    out[dst..dst + row].copy_from_slice(&hf[src..src + row]);
                }
            }
        }
        out
    }

    #[test]
    fn unpermute_inverts_llama_cpp_permute() {
        let (heads, row) = (2, 3);
        let hf: Vec<f32> = (0..heads * 6 * row).map(|x| x as f32).collect();
        let gguf = llama_cpp_permute(&hf, heads, row);
        assert_ne!(gguf, hf);
        assert_eq!(unpermute_rope_rows(&gguf, heads, row), hf);
    }

    /// Q8_0 blocks of a row-major tensor (round-to-nearest, as llama.cpp's reference).
    fn quantize_q8_0(values: &[f32]) -> Vec<u8> {
        values
            .chunks_exact(32)
            .flat_map(|block| {
                let amax = block.iter().fold(0.0f32, |m, v| m.max(v.abs()));
                let d = amax / 127.0;
                let inv = if d == 0.0 { 0.0 } else { 1.0 / d };
                let mut out = half::f16::from_f32(d).to_le_bytes().to_vec();
                out.extend(block.iter().map(|v| (v * inv).round() as i8 as u8));
                out
            })
            .collect()
    }

    /// Converts the bundled tiny HF Llama into a GGUF the way llama.cpp's converter does
    /// (GGUF names, reversed dims, q/k rows permuted to the interleaved layout), with Q8_0 for
    /// the matrices whose rows split into 32-blocks when `quantize` is set.
    fn tiny_llama_gguf(quantize: bool) -> Vec<u8> {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/llama_tiny_div/base");
        let hf = disha_core::read_safetensors(&dir.join("model.safetensors")).unwrap();
        let config = LlamaConfig::from_hf_file(&dir.join("config.json")).unwrap();
        let mut tensors = Vec::new();
        for (name, t) in &hf {
            let gguf = gguf_name(name).unwrap();
            let row: usize = t.shape[1..].iter().product();
            let values = if gguf.ends_with("attn_q.weight") {
                llama_cpp_permute(&t.values, config.num_attention_heads, row)
            } else if gguf.ends_with("attn_k.weight") {
                llama_cpp_permute(&t.values, config.num_key_value_heads, row)
            } else {
                t.values.clone()
            };
            let dims: Vec<usize> = t.shape.iter().rev().copied().collect();
            let (type_id, data) = if quantize && t.shape.len() == 2 && row.is_multiple_of(32) {
                (8, quantize_q8_0(&values))
            } else {
                (0, values.iter().flat_map(|v| v.to_le_bytes()).collect())
            };
            tensors.push((gguf, dims, type_id, data));
        }
        let s = |v: &str| GgufValue::String(v.into());
        let u = |v: usize| GgufValue::U64(v as u64);
        let metadata = [
            ("general.architecture", s("llama")),
            ("llama.embedding_length", u(config.hidden_size)),
            ("llama.block_count", u(config.num_hidden_layers)),
            ("llama.feed_forward_length", u(config.intermediate_size)),
            ("llama.attention.head_count", u(config.num_attention_heads)),
            (
                "llama.attention.head_count_kv",
                u(config.num_key_value_heads),
            ),
            ("llama.attention.key_length", u(config.head_dim)),
            ("llama.rope.freq_base", GgufValue::F64(config.rope_theta)),
            (
                "llama.attention.layer_norm_rms_epsilon",
                GgufValue::F64(config.rms_norm_eps),
            ),
            ("llama.context_length", u(config.max_position_embeddings)),
        ];
        let refs: Vec<(&str, Vec<usize>, u32, Vec<u8>)> = tensors
            .iter()
            .map(|(n, d, t, b)| (n.as_str(), d.clone(), *t, b.clone()))
            .collect();
        crate::gguf::tests::build_gguf(&metadata, &refs)
    }

    fn logits_of(path: &std::path::Path) -> Vec<f32> {
        use burn::tensor::{Device, Int, Tensor, TensorData};
        let device = Device::default();
        let model = crate::load_model(path, &device).unwrap().model;
        let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % 128).collect();
        let ids = Tensor::<2, Int>::from_data(TensorData::new(ids, [2, 12]), &device);
        model
            .forward(ids)
            .into_data()
            .try_to_vec_as::<f32>()
            .unwrap()
    }

    #[test]
    fn gguf_conversion_of_the_tiny_llama_gives_the_hf_logits() {
        let tmp = tempfile::tempdir().unwrap();
        let hf_dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures/llama_tiny_div/base");
        let reference = logits_of(&hf_dir);
        let max_diff = |a: &[f32], b: &[f32]| {
            a.iter()
                .zip(b)
                .map(|(x, y)| (x - y).abs())
                .fold(0.0f32, f32::max)
        };

        // F32 GGUF: the same weights after the round trip through GGUF names, reversed dims and
        // the q/k permutation, so the logits are identical.
        let f32_path = tmp.path().join("tiny-f32.gguf");
        std::fs::write(&f32_path, tiny_llama_gguf(false)).unwrap();
        assert_eq!(logits_of(&f32_path), reference);

        // Q8_0: each weight is off by up to amax/254 per 32-block (~1% of these N(0, 0.1²)
        // weights); through two layers that moves logits of magnitude ~4 by 7.2e-2 (measured).
        // A permutation, block-order or scale error moves them by O(1), as large as the logits.
        let q8_path = tmp.path().join("tiny-q8_0.gguf");
        std::fs::write(&q8_path, tiny_llama_gguf(true)).unwrap();
        let d = max_diff(&logits_of(&q8_path), &reference);
        assert!(d > 0.0 && d < 0.25, "{d:e}");
    }

    /// `--base-quant q8` on a Q8_0 GGUF keeps the file's blocks: `take_ggml_blocks` hands out a
    /// Q8_0 weight's blocks (q/k rows reordered whole) whose dequantized values are exactly what
    /// `take` dequantizes, refuses other formats and F32 tensors (leaving them in place), and the
    /// model built from the blocks computes the logits of the dequantized model to 1e-5 (f32
    /// summation order; the F32 `down_proj`, whose rows of 176 do not split into blocks, is
    /// quantized by the loader, and by hand on the dense side).
    #[test]
    fn q8_0_blocks_map_into_a_quantized_base_unchanged() {
        use burn::tensor::Device;
        use disha_core::QuantizedMatrix;
        let tmp = tempfile::tempdir().unwrap();
        let path = tmp.path().join("tiny-q8_0.gguf");
        std::fs::write(&path, tiny_llama_gguf(true)).unwrap();
        let device = Device::default();
        let config = config_from_gguf(&GgufFile::open(&path).unwrap()).unwrap();
        let mut blocks_source = GgufWeights::new(GgufFile::open(&path).unwrap(), &config);
        let mut values_source = GgufWeights::new(GgufFile::open(&path).unwrap(), &config);
        for name in [
            "model.layers.0.self_attn.q_proj.weight",
            "model.layers.0.self_attn.k_proj.weight",
            "model.layers.1.mlp.up_proj.weight",
        ] {
            assert!(
                blocks_source
                    .take_ggml_blocks(name, QuantFormat::Q4)
                    .unwrap()
                    .is_none(),
                "{name}: stored as Q8_0, not Q4_0"
            );
            let (blocks, shape) = blocks_source
                .take_ggml_blocks(name, QuantFormat::Q8)
                .unwrap()
                .expect("a Q8_0 tensor");
            let expected = values_source.take(name).unwrap().unwrap();
            assert_eq!(shape, expected.shape, "{name}");
            let m = QuantizedMatrix::from_ggml_blocks(
                &blocks,
                [shape[0], shape[1]],
                QuantFormat::Q8,
                name,
                &device,
            )
            .unwrap();
            let dense = m.dequantize().into_data().try_to_vec::<f32>().unwrap();
            assert_eq!(dense, expected.values, "{name}");
        }
        assert!(
            blocks_source
                .take_ggml_blocks("model.norm.weight", QuantFormat::Q8)
                .unwrap()
                .is_none(),
            "an F32 tensor"
        );
        assert!(
            blocks_source
                .remaining()
                .contains(&"output_norm.weight".to_string())
        );

        let ids: Vec<i64> = (0..24).map(|i| (i * 37 + 5) % 128).collect();
        let ids = burn::tensor::Tensor::<2, burn::tensor::Int>::from_data(
            burn::tensor::TensorData::new(ids, [2, 12]),
            &device,
        );
        let options = crate::LoadOptions::default().with_base_quant(Some(QuantFormat::Q8));
        let quantized = crate::load_model_with(&path, &device, &options)
            .unwrap()
            .model;
        let mut count = 0;
        disha_core::AdaptableModel::visit_linears(&quantized, &mut |_, l| {
            count += usize::from(l.quantized.is_some())
        });
        assert!(count > 0, "the blocks were kept");
        let logits = |m: &crate::CausalLm| {
            m.forward(ids.clone())
                .into_data()
                .try_to_vec_as::<f32>()
                .unwrap()
        };
        // The dense load, with the F32 `down_proj` quantized as the loader does: the same
        // weights everywhere.
        let mut dense = crate::load_model(&path, &device).unwrap().model;
        disha_core::AdaptableModel::visit_linears_mut(&mut dense, &mut |site, l| {
            if site.name.ends_with("down_proj") {
                l.quantize_base(QuantFormat::Q8).unwrap();
            }
        });
        let d = logits(&quantized)
            .iter()
            .zip(logits(&dense))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max);
        assert!(d <= 1e-5, "{d:e}");
    }

    /// Re-emits `bytes` (a GGUF file) with metadata `key` replaced by `value`.
    fn with_metadata(bytes: Vec<u8>, key: &str, value: GgufValue) -> Vec<u8> {
        let file = crate::gguf::GgufFile::parse(std::path::Path::new("t.gguf"), bytes).unwrap();
        let mut metadata: Vec<(&str, GgufValue)> = file
            .metadata
            .iter()
            .filter(|(k, _)| k.as_str() != key)
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        metadata.push((key, value));
        let tensors: Vec<(&str, Vec<usize>, u32, Vec<u8>)> = file
            .tensors
            .iter()
            .map(|(n, info)| {
                let values = file.dequantize(n).unwrap().unwrap();
                let data = values.iter().flat_map(|v| v.to_le_bytes()).collect();
                (n.as_str(), info.dims.clone(), 0, data)
            })
            .collect();
        crate::gguf::tests::build_gguf(&metadata, &tensors)
    }

    /// GGUF metadata gets the same domain checks as config.json, and the error names the GGUF
    /// key (hardening regressions: epsilon <= 0 panicked in Burn; an absurd block_count
    /// allocated until abort).
    #[test]
    fn out_of_domain_gguf_metadata_is_named_by_its_key() {
        let tmp = tempfile::tempdir().unwrap();
        let cases = [
            (
                "llama.attention.layer_norm_rms_epsilon",
                GgufValue::F64(0.0),
                "finite number > 0",
            ),
            (
                "llama.attention.layer_norm_rms_epsilon",
                GgufValue::F64(f64::NAN),
                "finite number > 0",
            ),
            ("llama.block_count", GgufValue::U64(1 << 63), "max_layers"),
            (
                "llama.block_count",
                GgufValue::U64(1_000_000_000),
                "max_layers",
            ),
            (
                "llama.rope.freq_base",
                GgufValue::F64(-1.0),
                "finite number > 0",
            ),
            ("llama.embedding_length", GgufValue::U64(0), "must be > 0"),
            (
                "tokenizer.ggml.eos_token_id",
                GgufValue::U64(1 << 40),
                "not a token id",
            ),
        ];
        for (key, value, expected) in cases {
            let bytes = with_metadata(tiny_llama_gguf(false), key, value.clone());
            let path = tmp.path().join("bad.gguf");
            std::fs::write(&path, bytes).unwrap();
            let err = crate::load_model(&path, &burn::tensor::Device::default())
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("bad.gguf") && err.contains(key) && err.contains(expected),
                "{key} = {value:?}: {err}"
            );
        }
    }

    #[test]
    fn missing_gguf_tensors_are_named_in_both_namings() {
        let tmp = tempfile::tempdir().unwrap();
        let bytes = tiny_llama_gguf(false);
        let file = crate::gguf::GgufFile::parse(std::path::Path::new("t.gguf"), bytes).unwrap();
        // Re-emit without blk.1.ffn_up.weight.
        let metadata: Vec<(&str, GgufValue)> = file
            .metadata
            .iter()
            .map(|(k, v)| (k.as_str(), v.clone()))
            .collect();
        let tensors: Vec<(&str, Vec<usize>, u32, Vec<u8>)> = file
            .tensors
            .iter()
            .filter(|(n, _)| n.as_str() != "blk.1.ffn_up.weight")
            .map(|(n, info)| {
                let values = file.dequantize(n).unwrap().unwrap();
                (
                    n.as_str(),
                    info.dims.clone(),
                    0,
                    values.iter().flat_map(|v| v.to_le_bytes()).collect(),
                )
            })
            .collect();
        let path = tmp.path().join("broken.gguf");
        std::fs::write(&path, crate::gguf::tests::build_gguf(&metadata, &tensors)).unwrap();
        let err = crate::load_model(&path, &burn::tensor::Device::default())
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("blk.1.ffn_up.weight")
                && err.contains("model.layers.1.mlp.up_proj.weight"),
            "{err}"
        );
    }
}
