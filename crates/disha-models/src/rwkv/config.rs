//! RWKV-7 ("x070") dimensions, inferred from a BlinkDL checkpoint's keys and shapes (the files
//! carry no config).

use std::collections::BTreeMap;
use std::path::Path;

use disha_core::limits::limits;
use serde::{Deserialize, Serialize};

use crate::error::{ModelError, Result};

/// LayerNorm epsilon of `ln0`, `ln1`, `ln2` and `ln_out`.
pub const LAYER_NORM_EPS: f64 = 1e-5;
/// GroupNorm epsilon of the time mix's `ln_x` (`1e-5 · 8²`, the head-size divisor squared).
pub const GROUP_NORM_EPS: f64 = 64e-5;
/// Denominator floor of the removal key's per-head L2 normalization.
pub const L2_NORM_EPS: f64 = 1e-12;
/// `e^{-1/2}`: the decay is `exp(-e^{-1/2} · σ(ω))`, in `(0.5452, 1)`.
pub const DECAY_SCALE: f64 = 0.606_530_659_712_633_4;

/// The dimensions of an RWKV-7 model.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RwkvConfig {
    /// Rows of the embedding and the head (`V`).
    pub vocab_size: usize,
    /// Model width (`C = n_embd`).
    pub hidden_size: usize,
    /// Blocks (`L`).
    pub num_layers: usize,
    /// Heads (`H`), each of [`head_size`](Self::head_size) channels.
    pub num_heads: usize,
    /// Channels per head (`N`; 64 in every released x070 model).
    pub head_size: usize,
    /// Channel-mix width (`F`, `4·C` in released models).
    pub ffn_size: usize,
    /// Width of the decay MLP (`D_w`, `att.w1` columns).
    pub decay_rank: usize,
    /// Width of the in-context learning-rate MLP (`D_a`).
    pub iclr_rank: usize,
    /// Width of the value-residual MLP (`D_v`).
    pub value_rank: usize,
    /// Width of the output-gate MLP (`D_g`).
    pub gate_rank: usize,
    /// Whether layer 0 stores `v0/v1/v2` (unused there; some files omit them).
    pub layer0_value_residual: bool,
}

/// A shape from the checkpoint, or an error naming the key.
fn shape<'a>(
    shapes: &'a BTreeMap<String, Vec<usize>>,
    path: &Path,
    name: &str,
) -> Result<&'a [usize]> {
    shapes
        .get(name)
        .map(Vec::as_slice)
        .ok_or_else(|| ModelError::MissingTensor {
            path: path.to_path_buf(),
            name: name.to_string(),
            needed_for: "inferring the RWKV-7 configuration".into(),
        })
}

impl RwkvConfig {
    /// The architecture of RWKV-7 0.1B (C 768, 12 layers, 12 heads of 64, FFN 3072, vocabulary
    /// 65,536; low-rank widths 64 / 64 / 32 / 128), for benchmarks with random weights.
    pub fn rwkv7_0_1b_shape() -> Self {
        Self {
            vocab_size: 65_536,
            hidden_size: 768,
            num_layers: 12,
            num_heads: 12,
            head_size: 64,
            ffn_size: 3072,
            decay_rank: 64,
            iclr_rank: 64,
            value_rank: 32,
            gate_rank: 128,
            layer0_value_residual: false,
        }
    }

    /// Whether `names` look like a BlinkDL RWKV-7 checkpoint (the x070 marker keys of layer 0,
    /// as web-rwkv detects versions).
    pub fn is_rwkv7<'a>(names: impl IntoIterator<Item = &'a String>) -> bool {
        let mut found = 0;
        for name in names {
            if matches!(
                name.as_str(),
                "blocks.0.att.r_k" | "blocks.0.att.k_k" | "blocks.0.att.a0" | "emb.weight"
            ) {
                found += 1;
            }
        }
        found == 4
    }

    /// Infers the dimensions from the checkpoint's tensor shapes: `V, C` from `emb.weight`,
    /// `H, N` from `blocks.0.att.r_k`, `L` from the highest block index, `F` and the low-rank
    /// widths from layer 0's tensors.
    ///
    /// # Errors
    /// A key that is missing or has an unexpected rank, a block index past the layer limit, or
    /// dimensions that fail [`validate`](Self::validate), named with `path`.
    pub fn infer(shapes: &BTreeMap<String, Vec<usize>>, path: &Path) -> Result<Self> {
        let dims = |name: &str, rank: usize| -> Result<Vec<usize>> {
            let s = shape(shapes, path, name)?;
            if s.len() != rank {
                return Err(ModelError::config(
                    path,
                    name,
                    format!("shape {s:?} should have {rank} dimensions"),
                ));
            }
            Ok(s.to_vec())
        };
        let emb = dims("emb.weight", 2)?;
        let r_k = dims("blocks.0.att.r_k", 2)?;
        let ffn = dims("blocks.0.ffn.key.weight", 2)?;
        let max_layers = limits().max_layers;
        let mut num_layers = 0usize;
        for name in shapes.keys() {
            if let Some(rest) = name.strip_prefix("blocks.")
                && let Some((index, _)) = rest.split_once('.')
            {
                let index: usize = index
                    .parse()
                    .map_err(|_| ModelError::config(path, name, "block index is not a number"))?;
                if index >= max_layers {
                    return Err(ModelError::config(
                        path,
                        name,
                        format!("block index {index} is past the limit of {max_layers} layers"),
                    ));
                }
                num_layers = num_layers.max(index + 1);
            }
        }
        let config = Self {
            vocab_size: emb[0],
            hidden_size: emb[1],
            num_layers,
            num_heads: r_k[0],
            head_size: r_k[1],
            ffn_size: ffn[0],
            decay_rank: dims("blocks.0.att.w1", 2)?[1],
            iclr_rank: dims("blocks.0.att.a1", 2)?[1],
            value_rank: match shapes.get("blocks.0.att.v1") {
                Some(s) if s.len() == 2 => s[1],
                Some(s) => {
                    return Err(ModelError::config(
                        path,
                        "blocks.0.att.v1",
                        format!("shape {s:?} should have 2 dimensions"),
                    ));
                }
                None if num_layers > 1 => dims("blocks.1.att.v1", 2)?[1],
                None => 0,
            },
            gate_rank: dims("blocks.0.att.g1", 2)?[1],
            layer0_value_residual: shapes.contains_key("blocks.0.att.v0"),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every dimension for its domain and the limits ([`disha_core::limits`]).
    ///
    /// # Errors
    /// The first bad field, named with `path`.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let l = limits();
        let fields = [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("num_heads", self.num_heads),
            ("head_size", self.head_size),
            ("ffn_size", self.ffn_size),
            ("decay_rank", self.decay_rank),
            ("iclr_rank", self.iclr_rank),
            ("gate_rank", self.gate_rank),
        ];
        for (field, value) in fields {
            if value == 0 || value > l.max_dim {
                return Err(ModelError::config(
                    path,
                    field,
                    format!("{value} is outside 1..={}", l.max_dim),
                ));
            }
        }
        if self.num_layers == 0 || self.num_layers > l.max_layers {
            return Err(ModelError::config(
                path,
                "num_layers",
                format!("{} is outside 1..={}", self.num_layers, l.max_layers),
            ));
        }
        if self.num_layers > 1 && (self.value_rank == 0 || self.value_rank > l.max_dim) {
            return Err(ModelError::config(
                path,
                "value_rank",
                format!("{} is outside 1..={}", self.value_rank, l.max_dim),
            ));
        }
        if self.num_heads.checked_mul(self.head_size) != Some(self.hidden_size) {
            return Err(ModelError::config(
                path,
                "blocks.0.att.r_k",
                format!(
                    "{} heads of {} channels do not make the width {} of emb.weight",
                    self.num_heads, self.head_size, self.hidden_size
                ),
            ));
        }
        Ok(())
    }

    /// Every tensor of a BlinkDL checkpoint with this configuration and its shape, in the
    /// order the model builder reads them.
    pub fn tensor_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, v, f) = (self.hidden_size, self.vocab_size, self.ffn_size);
        let mut out = vec![
            ("emb.weight".to_string(), vec![v, c]),
            ("blocks.0.ln0.weight".into(), vec![c]),
            ("blocks.0.ln0.bias".into(), vec![c]),
        ];
        for l in 0..self.num_layers {
            let p = |s: &str| format!("blocks.{l}.{s}");
            for ln in ["ln1", "ln2"] {
                out.push((p(&format!("{ln}.weight")), vec![c]));
                out.push((p(&format!("{ln}.bias")), vec![c]));
            }
            for mu in ["x_r", "x_w", "x_k", "x_v", "x_a", "x_g"] {
                out.push((p(&format!("att.{mu}")), vec![1, 1, c]));
            }
            let mut low_rank = vec![("w", self.decay_rank), ("a", self.iclr_rank)];
            if l > 0 || self.layer0_value_residual {
                low_rank.push(("v", self.value_rank));
            }
            for (name, rank) in low_rank {
                out.push((p(&format!("att.{name}0")), vec![1, 1, c]));
                out.push((p(&format!("att.{name}1")), vec![c, rank]));
                out.push((p(&format!("att.{name}2")), vec![rank, c]));
            }
            out.push((p("att.g1"), vec![c, self.gate_rank]));
            out.push((p("att.g2"), vec![self.gate_rank, c]));
            out.push((p("att.k_k"), vec![1, 1, c]));
            out.push((p("att.k_a"), vec![1, 1, c]));
            out.push((p("att.r_k"), vec![self.num_heads, self.head_size]));
            for linear in ["receptance", "key", "value", "output"] {
                out.push((p(&format!("att.{linear}.weight")), vec![c, c]));
            }
            out.push((p("att.ln_x.weight"), vec![c]));
            out.push((p("att.ln_x.bias"), vec![c]));
            out.push((p("ffn.x_k"), vec![1, 1, c]));
            out.push((p("ffn.key.weight"), vec![f, c]));
            out.push((p("ffn.value.weight"), vec![c, f]));
        }
        out.push(("ln_out.weight".into(), vec![c]));
        out.push(("ln_out.bias".into(), vec![c]));
        out.push(("head.weight".into(), vec![v, c]));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> RwkvConfig {
        RwkvConfig {
            vocab_size: 32,
            hidden_size: 16,
            num_layers: 2,
            num_heads: 2,
            head_size: 8,
            ffn_size: 64,
            decay_rank: 4,
            iclr_rank: 4,
            value_rank: 2,
            gate_rank: 4,
            layer0_value_residual: false,
        }
    }

    #[test]
    fn inference_reads_back_the_shapes_it_was_given() {
        for layer0_value_residual in [false, true] {
            let c = RwkvConfig {
                layer0_value_residual,
                ..tiny()
            };
            let shapes: BTreeMap<String, Vec<usize>> = c.tensor_shapes().into_iter().collect();
            assert!(RwkvConfig::is_rwkv7(shapes.keys()));
            assert_eq!(RwkvConfig::infer(&shapes, Path::new("m")).unwrap(), c);
        }
    }

    #[test]
    fn bad_dimensions_are_named() {
        let mut shapes: BTreeMap<String, Vec<usize>> = tiny().tensor_shapes().into_iter().collect();
        shapes.insert("blocks.0.att.r_k".into(), vec![3, 8]);
        let e = RwkvConfig::infer(&shapes, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("blocks.0.att.r_k") && e.contains("3 heads"),
            "{e}"
        );
        let mut shapes: BTreeMap<String, Vec<usize>> = tiny().tensor_shapes().into_iter().collect();
        shapes.insert("blocks.99999.ln1.weight".into(), vec![16]);
        let e = RwkvConfig::infer(&shapes, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("blocks.99999") && e.contains("limit"), "{e}");
        let mut shapes: BTreeMap<String, Vec<usize>> = tiny().tensor_shapes().into_iter().collect();
        shapes.remove("blocks.0.att.g1");
        let e = RwkvConfig::infer(&shapes, Path::new("m"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("blocks.0.att.g1"), "{e}");
    }
}
