//! [`AdapterSpec`]: the per-layer hyperparameters of one adapter, independent of any file format.
//!
//! A spec is what [`AdaptedLinear::add_adapter`](crate::AdaptedLinear::add_adapter) takes; PEFT's
//! `adapter_config.json` ([`PeftConfig`](crate::PeftConfig)) converts into one with
//! [`PeftConfig::spec`](crate::PeftConfig::spec).

use burn::nn::DropoutConfig;
use burn::tensor::{Device, Distribution, Tensor};
use serde::{Deserialize, Serialize};

use crate::adapter::Adapter;
use crate::bat::BatAdapter;
use crate::bone::BoneAdapter;
use crate::error::{DishaError, Result};
use crate::lora::LoraAdapter;

/// Which of the two incompatible BAT conventions an adapter follows (method.md §4).
///
/// Nothing in a BAT tensor says which one produced it, so the orientation is always explicit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum BatOrientation {
    /// HF PEFT (`init_weights="bat"`): `D` has shape `[out/r, r, r]` and `D[a]` is shared by every
    /// block of output-block row `a`: `W'_ab = W_ab (I + D[a]) + D[a]`.
    #[default]
    Peft,
    /// JL-er/RWKV-PEFT `BatLinear`: `D` has shape `[in/r, r, r]` and `D[b]` is shared by every block
    /// of input-block column `b`: `W'_ab = W_ab (I + D[b]) + D[b]`.
    RwkvPeft,
}

/// The four adapter families by name, without their settings: what a user picks
/// (`disha train --method`, a run config's `method`). [`AdapterMethod`] is the full description
/// ([`AdapterMethod::kind`] gives back the name).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[cfg_attr(feature = "clap", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum AdapterKind {
    /// Bone / MiSS standard (PEFT `MISS`, `init_weights=True`).
    Bone,
    /// BAT (`init_weights="bat"`): PEFT orientation on Llama, RWKV-PEFT's on RWKV-7.
    Bat,
    /// MiSS-mini (`init_weights="mini"`).
    Mini,
    /// LoRA.
    Lora,
}

impl AdapterKind {
    /// The method's usual name ("Bone", "BAT", "MiSS-mini", "LoRA").
    pub fn name(self) -> &'static str {
        match self {
            Self::Bone => "Bone",
            Self::Bat => "BAT",
            Self::Mini => "MiSS-mini",
            Self::Lora => "LoRA",
        }
    }
}

/// The adapter family and its family-specific settings.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub enum AdapterMethod {
    /// Bone, a.k.a. MiSS standard (`init_weights=true`): a `[r, out]` block shared by every input
    /// shard of width `r`; the forward is `base(x) + S(x̃)·B` (method.md §2).
    Bone,
    /// BAT, the block-affine transformation (`init_weights="bat"`), in the given orientation.
    Bat(BatOrientation),
    /// MiSS-mini (`init_weights="mini"`): one `[r, mini_r]` block tiled over the whole `ΔW`.
    Mini {
        /// Width of the shared block along the output dimension; must divide `out`.
        mini_r: usize,
    },
    /// LoRA, the baseline: `base(x) + s·(x Aᵀ) Bᵀ` with `s = alpha / r` (or `alpha / √r`).
    Lora {
        /// Scaling numerator (`lora_alpha`).
        alpha: f64,
        /// Use `alpha / √r` instead of `alpha / r` (PEFT `use_rslora`).
        use_rslora: bool,
    },
}

/// How an adapter's trainable tensors start.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum AdapterInit {
    /// The adapter starts as an exact no-op (PEFT's default): Bone / BAT / mini blocks are zero;
    /// LoRA's `A` is kaiming-uniform (`U(−1/√in, 1/√in)`) and its `B` zero.
    #[default]
    Identity,
    /// PEFT's `init_weights=False` (MiSS) / `init_lora_weights=False` (LoRA): every trainable tensor
    /// is kaiming-uniform with `a = √5`, i.e. `U(−1/√fan_in, 1/√fan_in)` with PyTorch's `fan_in`. The
    /// adapter changes the output from the start; PEFT uses this only for tests.
    Random,
    /// LoRA only (`init_lora_weights="gaussian"`): `A ~ N(0, (1/r)²)`, `B = 0`.
    Gaussian,
}

/// Everything needed to create one adapter on one linear layer.
///
/// ```
/// use disha_core::{AdapterSpec, BatOrientation};
/// let bone = AdapterSpec::bone(64);
/// let bat = AdapterSpec::bat(64, BatOrientation::Peft);
/// let mini = AdapterSpec::mini(64, 64).with_dropout(0.05);
/// let lora = AdapterSpec::lora(32, 64.0);
/// assert_eq!(bone.num_params(4096, 4096), 64 * 4096);
/// assert_eq!(lora.num_params(4096, 4096), 32 * (4096 + 4096));
/// # let _ = (bat, mini);
/// ```
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct AdapterSpec {
    /// Family and family-specific settings.
    pub method: AdapterMethod,
    /// Shard / block size (PEFT's `r`); the LoRA rank for LoRA.
    pub r: usize,
    /// Input dropout probability (PEFT `miss_dropout` / `lora_dropout`); train mode only.
    pub dropout: f64,
    /// Initial values of the trainable tensors.
    pub init: AdapterInit,
}

impl AdapterMethod {
    /// The family's name, without its settings.
    pub fn kind(&self) -> AdapterKind {
        match self {
            Self::Bone => AdapterKind::Bone,
            Self::Bat(_) => AdapterKind::Bat,
            Self::Mini { .. } => AdapterKind::Mini,
            Self::Lora { .. } => AdapterKind::Lora,
        }
    }
}

impl AdapterSpec {
    fn new(method: AdapterMethod, r: usize) -> Self {
        Self {
            method,
            r,
            dropout: 0.0,
            init: AdapterInit::Identity,
        }
    }

    /// Bone / MiSS standard with shard size `r`.
    pub fn bone(r: usize) -> Self {
        Self::new(AdapterMethod::Bone, r)
    }

    /// BAT with block size `r` in the given orientation.
    pub fn bat(r: usize, orientation: BatOrientation) -> Self {
        Self::new(AdapterMethod::Bat(orientation), r)
    }

    /// MiSS-mini: an `[r, mini_r]` block tiled over the weight.
    pub fn mini(r: usize, mini_r: usize) -> Self {
        Self::new(AdapterMethod::Mini { mini_r }, r)
    }

    /// LoRA with rank `r` and scaling `alpha / r`.
    pub fn lora(r: usize, alpha: f64) -> Self {
        Self::new(
            AdapterMethod::Lora {
                alpha,
                use_rslora: false,
            },
            r,
        )
    }

    /// Set the input dropout probability.
    pub fn with_dropout(mut self, dropout: f64) -> Self {
        self.dropout = dropout;
        self
    }

    /// Set how the trainable tensors start.
    pub fn with_init(mut self, init: AdapterInit) -> Self {
        self.init = init;
        self
    }

    /// LoRA only: scale by `alpha / √r` (rsLoRA) instead of `alpha / r`. No effect on other methods.
    pub fn with_rslora(mut self, use_rslora: bool) -> Self {
        if let AdapterMethod::Lora { alpha, .. } = self.method {
            self.method = AdapterMethod::Lora { alpha, use_rslora };
        }
        self
    }

    /// A short human-readable name of the method (`bone`, `bat`, `bat-rwkv`, `mini`, `lora`).
    pub fn method_name(&self) -> &'static str {
        match self.method {
            AdapterMethod::Bone => "bone",
            AdapterMethod::Bat(BatOrientation::Peft) => "bat",
            AdapterMethod::Bat(BatOrientation::RwkvPeft) => "bat-rwkv",
            AdapterMethod::Mini { .. } => "mini",
            AdapterMethod::Lora { .. } => "lora",
        }
    }

    /// Shape of the trainable tensor(s) on a `[d_input → d_output]` layer, in PEFT orientation.
    ///
    /// LoRA returns `lora_A` (`[r, in]`) then `lora_B` (`[out, r]`); the others one tensor.
    pub fn tensor_shapes(&self, d_input: usize, d_output: usize) -> Vec<Vec<usize>> {
        let r = self.r;
        match self.method {
            AdapterMethod::Bone => vec![vec![r, d_output]],
            AdapterMethod::Bat(BatOrientation::Peft) => vec![vec![d_output / r.max(1), r, r]],
            AdapterMethod::Bat(BatOrientation::RwkvPeft) => vec![vec![d_input / r.max(1), r, r]],
            AdapterMethod::Mini { mini_r } => vec![vec![r, mini_r]],
            AdapterMethod::Lora { .. } => vec![vec![r, d_input], vec![d_output, r]],
        }
    }

    /// Number of trainable parameters on a `[d_input → d_output]` layer (method.md §10).
    pub fn num_params(&self, d_input: usize, d_output: usize) -> usize {
        self.tensor_shapes(d_input, d_output)
            .iter()
            .map(|s| s.iter().product::<usize>())
            .sum()
    }

    /// The LoRA scaling `s` (1 for every other method: MiSS has no scaling).
    pub fn scale(&self) -> f64 {
        match self.method {
            AdapterMethod::Lora {
                alpha,
                use_rslora: false,
            } => alpha / self.r as f64,
            AdapterMethod::Lora {
                alpha,
                use_rslora: true,
            } => alpha / (self.r as f64).sqrt(),
            _ => 1.0,
        }
    }

    /// Check that this spec can be applied to the layer `layer` of shape `[d_input → d_output]`.
    ///
    /// # Errors
    /// Every rule of method.md §5: `r ≥ 1`; Bone / mini `r ≤ in`; BAT `in % r = out % r = 0`;
    /// mini `out % mini_r = 0`; dropout in `[0, 1)`; LoRA `alpha` finite; Gaussian init only for LoRA.
    pub fn validate(&self, layer: &str, d_input: usize, d_output: usize) -> Result<()> {
        let r = self.r;
        if r == 0 {
            return Err(DishaError::InvalidRank {
                layer: layer.to_string(),
                r: 0,
            });
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(DishaError::InvalidHyperparameter {
                what: format!("layer `{layer}`: dropout"),
                message: format!("must be in [0, 1), got {}", self.dropout),
            });
        }
        if self.init == AdapterInit::Gaussian && !matches!(self.method, AdapterMethod::Lora { .. })
        {
            return Err(DishaError::InvalidHyperparameter {
                what: format!("layer `{layer}`: init"),
                message: "Gaussian initialization exists only for LoRA".into(),
            });
        }
        match self.method {
            AdapterMethod::Bone | AdapterMethod::Mini { .. } if r > d_input => {
                return Err(DishaError::RankExceedsInput {
                    layer: layer.to_string(),
                    d_input,
                    d_output,
                    r,
                });
            }
            AdapterMethod::Bat(_) if !d_input.is_multiple_of(r) || !d_output.is_multiple_of(r) => {
                return Err(DishaError::BatNotDivisible {
                    layer: layer.to_string(),
                    d_input,
                    d_output,
                    r,
                });
            }
            AdapterMethod::Mini { mini_r } if mini_r == 0 || !d_output.is_multiple_of(mini_r) => {
                return Err(DishaError::MiniNotDivisible {
                    layer: layer.to_string(),
                    d_input,
                    d_output,
                    mini_r,
                });
            }
            AdapterMethod::Lora { .. } if r > d_input.saturating_add(d_output) => {
                // PEFT allows r > in (kept for parity), but the update's rank is at most
                // min(in, out): beyond in + out the extra memory only buys an abort when an
                // absurd r comes from a file or a flag.
                return Err(DishaError::InvalidHyperparameter {
                    what: format!("layer `{layer}` [in={d_input}, out={d_output}]: LoRA r"),
                    message: format!(
                        "r = {r} exceeds in + out = {}; a LoRA update has rank at most \
                         min(in, out) = {}",
                        d_input + d_output,
                        d_input.min(d_output)
                    ),
                });
            }
            AdapterMethod::Lora { alpha, .. } if !alpha.is_finite() => {
                return Err(DishaError::InvalidHyperparameter {
                    what: format!("layer `{layer}`: lora_alpha"),
                    message: format!("must be finite, got {alpha}"),
                });
            }
            _ => {}
        }
        if matches!(self.method, AdapterMethod::Bat(_)) && self.dropout > 0.0 {
            // PEFT silently ignores miss_dropout for BAT (method.md §13 #5); say so instead.
            tracing::warn!(
                layer,
                dropout = self.dropout,
                "BAT has no dropout path (as in PEFT); the dropout setting is ignored"
            );
        }
        Ok(())
    }

    /// Create the adapter for layer `layer` (`[d_input → d_output]`) on `device`.
    ///
    /// # Errors
    /// See [`validate`](Self::validate).
    pub fn init(
        &self,
        layer: &str,
        d_input: usize,
        d_output: usize,
        device: &Device,
    ) -> Result<Adapter> {
        self.validate(layer, d_input, d_output)?;
        let shapes = self.tensor_shapes(d_input, d_output);
        let dropout = DropoutConfig::new(self.dropout).init();
        let tensor = |shape: &Vec<usize>, zero: bool| -> Tensor<3> {
            // Tensors are created as 3-D and reshaped by the caller, so one closure serves all ranks.
            let dims3 = [
                if shape.len() == 3 { shape[0] } else { 1 },
                shape[shape.len() - 2],
                shape[shape.len() - 1],
            ];
            if zero {
                Tensor::zeros(dims3, device)
            } else {
                let bound = 1.0 / (torch_fan_in(shape) as f64).sqrt();
                Tensor::random(dims3, Distribution::Uniform(-bound, bound), device)
            }
        };
        let random = self.init == AdapterInit::Random;
        let adapter = match self.method {
            AdapterMethod::Bone | AdapterMethod::Mini { .. } => {
                let block = tensor(&shapes[0], !random).squeeze_dim::<2>(0);
                let adapter = BoneAdapter::new(block, dropout);
                match self.method {
                    AdapterMethod::Bone => Adapter::Bone(adapter),
                    _ => Adapter::Mini(adapter),
                }
            }
            AdapterMethod::Bat(orientation) => {
                Adapter::Bat(BatAdapter::new(tensor(&shapes[0], !random), orientation))
            }
            AdapterMethod::Lora { .. } => {
                let lora_a = match self.init {
                    AdapterInit::Gaussian => Tensor::random(
                        [self.r, d_input],
                        Distribution::Normal(0.0, 1.0 / self.r as f64),
                        device,
                    ),
                    _ => tensor(&shapes[0], false).squeeze_dim::<2>(0),
                };
                let lora_b = tensor(&shapes[1], !random).squeeze_dim::<2>(0);
                Adapter::Lora(LoraAdapter::new(lora_a, lora_b, self.scale(), dropout))
            }
        };
        Ok(adapter)
    }
}

/// PyTorch's `fan_in` for `kaiming_uniform_`: `size(1) · prod(size(2..))`.
fn torch_fan_in(shape: &[usize]) -> usize {
    shape[1..].iter().product::<usize>().max(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameter_counts_match_method_md_section_10() {
        // Llama-3.2-3B, q_proj (3072→3072) + v_proj (3072→1024), 28 layers, r = 64.
        let qv = [(3072, 3072), (3072, 1024)];
        let total = |spec: &AdapterSpec, layers: &[(usize, usize)], n: usize| -> usize {
            n * layers
                .iter()
                .map(|&(i, o)| spec.num_params(i, o))
                .sum::<usize>()
        };
        assert_eq!(total(&AdapterSpec::bone(64), &qv, 28), 7_340_032);
        assert_eq!(
            total(&AdapterSpec::bat(64, BatOrientation::Peft), &qv, 28),
            7_340_032
        );
        assert_eq!(total(&AdapterSpec::mini(64, 64), &qv, 28), 229_376);
        assert_eq!(total(&AdapterSpec::lora(32, 64.0), &qv, 28), 9_175_040);
        assert_eq!(total(&AdapterSpec::lora(64, 128.0), &qv, 28), 18_350_080);
        // Llama-2-7B, all seven linears (hidden 4096, intermediate 11008), 32 layers.
        let all7 = [
            (4096, 4096),
            (4096, 4096),
            (4096, 4096),
            (4096, 4096),
            (4096, 11008),
            (4096, 11008),
            (11008, 4096),
        ];
        assert_eq!(total(&AdapterSpec::bone(64), &all7, 32), 87_031_808);
        assert_eq!(total(&AdapterSpec::lora(36, 72.0), &all7, 32), 89_948_160);
        // RWKV-PEFT orientation counts r·in instead of r·out.
        assert_eq!(
            AdapterSpec::bat(8, BatOrientation::RwkvPeft).num_params(64, 176),
            8 * 64
        );
    }

    #[test]
    fn validation_names_layer_and_dims() {
        let e = AdapterSpec::bone(0).validate("q", 8, 8).unwrap_err();
        assert!(matches!(e, DishaError::InvalidRank { .. }), "{e}");
        let e = AdapterSpec::bone(9).validate("q", 8, 8).unwrap_err();
        assert!(e.to_string().contains("r = 9 exceeds in_features"), "{e}");
        // r == in is allowed (PEFT >= #3708 allows it too).
        AdapterSpec::bone(8).validate("q", 8, 3).unwrap();
        let e = AdapterSpec::bat(8, BatOrientation::Peft)
            .validate("model.layers.0.mlp.gate_proj", 64, 172)
            .unwrap_err();
        let msg = e.to_string();
        assert!(
            msg.contains("gate_proj")
                && msg.contains("in=64, out=172")
                && msg.contains("out % r = 4"),
            "{msg}"
        );
        let e = AdapterSpec::bat(8, BatOrientation::RwkvPeft)
            .validate("down", 172, 64)
            .unwrap_err();
        assert!(matches!(e, DishaError::BatNotDivisible { .. }));
        let e = AdapterSpec::mini(2, 3).validate("up", 4, 8).unwrap_err();
        assert!(e.to_string().contains("out % mini_r = 2"), "{e}");
        let e = AdapterSpec::mini(2, 0).validate("up", 4, 8).unwrap_err();
        assert!(matches!(e, DishaError::MiniNotDivisible { .. }));
        let e = AdapterSpec::bone(2)
            .with_dropout(1.0)
            .validate("q", 4, 4)
            .unwrap_err();
        assert!(e.to_string().contains("dropout"), "{e}");
        let e = AdapterSpec::bone(2)
            .with_init(AdapterInit::Gaussian)
            .validate("q", 4, 4)
            .unwrap_err();
        assert!(e.to_string().contains("only for LoRA"), "{e}");
        // LoRA may have r > in (PEFT allows it), up to in + out.
        AdapterSpec::lora(16, 16.0).validate("q", 8, 8).unwrap();
        let e = AdapterSpec::lora(17, 16.0).validate("q", 8, 8).unwrap_err();
        assert!(e.to_string().contains("exceeds in + out = 16"), "{e}");
    }

    #[test]
    fn scale_follows_peft() {
        assert_eq!(AdapterSpec::lora(8, 16.0).scale(), 2.0);
        assert_eq!(AdapterSpec::lora(16, 16.0).with_rslora(true).scale(), 4.0);
        assert_eq!(AdapterSpec::bone(8).scale(), 1.0);
    }
}
