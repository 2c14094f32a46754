//! Rotary position embedding in the HF **rotate-half** layout, with Llama 3 / linear frequency
//! scaling.
//!
//! HF checkpoints (and PEFT adapters trained on them) pair dimension `i` with `i + d/2`; Burn's
//! `RotaryEncoding` pairs `2i` with `2i + 1`. Implementing rotate-half here keeps q/k weights
//! exactly as in the file, so an adapter on `q_proj` sees the same rows as in PEFT. GGUF and
//! llama2.c store q/k interleaved; their loaders permute the rows into this layout once.

use burn::tensor::{Device, Tensor, TensorData};

use super::config::{LlamaConfig, RopeScaling};

/// Inverse frequencies of one head, computed the way transformers does (f32).
#[derive(Clone, Debug)]
pub struct RotaryEmbedding {
    inv_freq: Vec<f32>,
    position_scale: f32,
    head_dim: usize,
}

impl RotaryEmbedding {
    /// Frequencies for `config` (`rope_theta`, `head_dim`, `rope_scaling`).
    pub fn new(config: &LlamaConfig) -> Self {
        let d = config.head_dim;
        let base = config.rope_theta as f32;
        // transformers: 1 / base ** (arange(0, d, 2).float() / d), in float32.
        let mut inv_freq: Vec<f32> = (0..d / 2)
            .map(|i| 1.0 / base.powf((2 * i) as f32 / d as f32))
            .collect();
        let mut position_scale = 1.0;
        match config.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => position_scale = 1.0 / factor as f32,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings: old,
            } => {
                let low_wavelen = old / low_freq_factor;
                let high_wavelen = old / high_freq_factor;
                for f in &mut inv_freq {
                    let freq = *f as f64;
                    let wavelen = 2.0 * std::f64::consts::PI / freq;
                    let scaled = if wavelen > low_wavelen {
                        freq / factor
                    } else {
                        freq
                    };
                    let medium = wavelen >= high_wavelen && wavelen <= low_wavelen;
                    *f = if medium {
                        let smooth = (old / wavelen - low_freq_factor)
                            / (high_freq_factor - low_freq_factor);
                        ((1.0 - smooth) * scaled / factor + smooth * scaled) as f32
                    } else {
                        scaled as f32
                    };
                }
            }
        }
        Self {
            inv_freq,
            position_scale,
            head_dim: d,
        }
    }

    /// `(cos, sin)` for positions `start..start + len`, each `[len, head_dim]` with the
    /// frequencies repeated for both halves.
    pub fn cos_sin(&self, start: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let positions: Vec<usize> = (start..start + len).collect();
        self.cos_sin_at(&positions, device)
    }

    /// `(cos, sin)` for arbitrary positions (packed rows restart at 0 for every sequence),
    /// each `[positions.len(), head_dim]`.
    pub fn cos_sin_at(&self, positions: &[usize], device: &Device) -> (Tensor<2>, Tensor<2>) {
        let d = self.head_dim;
        let len = positions.len();
        let mut cos = Vec::with_capacity(len * d);
        let mut sin = Vec::with_capacity(len * d);
        for &p in positions {
            let pos = p as f32 * self.position_scale;
            let row: Vec<f32> = self.inv_freq.iter().map(|f| pos * f).collect();
            for _ in 0..2 {
                cos.extend(row.iter().map(|a| a.cos()));
                sin.extend(row.iter().map(|a| a.sin()));
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [len, d]), device),
            Tensor::from_data(TensorData::new(sin, [len, d]), device),
        )
    }
}

/// Applies rotate-half RoPE: `x·cos + rotate_half(x)·sin`, `rotate_half(x) = [-x₂, x₁]`.
///
/// # Shapes
/// - x: `[batch, heads, seq, head_dim]`
/// - cos, sin: `[1, 1, seq, head_dim]`, or `[batch, 1, seq, head_dim]` when each row has its
///   own positions (packed rows)
///
/// One fused op ([`disha_core::fused::rotary`]): one pass forward, one backward (the rotation by
/// the opposite angle), and `x` may be strided (heads swapped out of `[batch, seq, heads, d]`).
pub fn apply_rotary(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    disha_core::fused::rotary(x, cos.clone(), sin.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn llama3_scaling_matches_transformers_reference_values() {
        // Llama 3.2 settings; reference: transformers `_compute_llama3_parameters` for
        // head_dim 64, base 500000 (first, middle and last frequency).
        let mut c = crate::llama::config::tests_support::tiny_config();
        c.head_dim = 64;
        c.rope_theta = 500_000.0;
        c.rope_scaling = RopeScaling::Llama3 {
            factor: 32.0,
            low_freq_factor: 1.0,
            high_freq_factor: 4.0,
            original_max_position_embeddings: 8192.0,
        };
        let r = RotaryEmbedding::new(&c);
        // High frequencies (wavelength < 2048) are untouched.
        assert_eq!(r.inv_freq[0], 1.0);
        // Low frequencies (wavelength > 8192) are divided by the factor.
        let plain = 1.0 / 500_000f32.powf(62.0 / 64.0);
        assert!((r.inv_freq[31] - plain / 32.0).abs() < 1e-12);
        // In between, a smooth interpolation strictly between the two.
        let i = 15;
        let plain = 1.0 / 500_000f32.powf((2 * i) as f32 / 64.0);
        let wavelen = 2.0 * std::f32::consts::PI / plain;
        assert!(wavelen > 2048.0 && wavelen < 8192.0, "{wavelen}");
        assert!(r.inv_freq[i] < plain && r.inv_freq[i] > plain / 32.0);
    }
}
