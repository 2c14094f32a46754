//! Llama architecture hyperparameters, read from HF `config.json` (transformers 4.x and 5.x) or
//! GGUF metadata.

use std::path::Path;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use disha_core::limits::excerpt;

use crate::error::{ModelError, Result};

/// How RoPE frequencies are rescaled for long contexts (`rope_scaling` / `rope_parameters`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum RopeScaling {
    /// Plain RoPE.
    Default,
    /// Positions divided by `factor` (`rope_type: "linear"`).
    Linear {
        /// The divisor.
        factor: f64,
    },
    /// Llama 3.1 / 3.2 frequency-dependent scaling (`rope_type: "llama3"`).
    Llama3 {
        /// Overall scale factor (8 for Llama 3.1, 32 for Llama 3.2).
        factor: f64,
        /// Wavelengths longer than `original / low_freq_factor` are scaled by `factor`.
        low_freq_factor: f64,
        /// Wavelengths shorter than `original / high_freq_factor` are kept.
        high_freq_factor: f64,
        /// The pre-training context length.
        original_max_position_embeddings: f64,
    },
}

/// Hyperparameters of a Llama-family decoder (Llama 2/3/3.1/3.2, TinyLlama, SmolLM2,
/// Mistral-style GQA).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LlamaConfig {
    /// Vocabulary size.
    pub vocab_size: usize,
    /// Model width.
    pub hidden_size: usize,
    /// MLP width.
    pub intermediate_size: usize,
    /// Number of decoder layers.
    pub num_hidden_layers: usize,
    /// Query heads.
    pub num_attention_heads: usize,
    /// Key/value heads (GQA when fewer than query heads).
    pub num_key_value_heads: usize,
    /// Per-head width (`hidden_size / num_attention_heads` unless given).
    pub head_dim: usize,
    /// RMSNorm epsilon.
    pub rms_norm_eps: f64,
    /// RoPE base.
    pub rope_theta: f64,
    /// RoPE frequency scaling.
    pub rope_scaling: RopeScaling,
    /// Longest position the model was trained for.
    pub max_position_embeddings: usize,
    /// The output head shares the embedding matrix.
    pub tie_word_embeddings: bool,
    /// q/k/v/o projections have biases.
    pub attention_bias: bool,
    /// gate/up/down projections have biases.
    pub mlp_bias: bool,
    /// Beginning-of-sequence token.
    pub bos_token_id: Option<u32>,
    /// End-of-sequence token(s).
    pub eos_token_ids: Vec<u32>,
    /// The checkpoint's parameter dtype (`"float32"`, `"bfloat16"`, `"float16"`); merged
    /// exports are written in it.
    pub dtype: String,
}

impl LlamaConfig {
    /// The architecture of Llama-3.2-1B (hidden 2048, 16 layers, 32 query / 8 key-value heads,
    /// MLP 8192, vocabulary 128,256, tied head), for benchmarks with random weights.
    pub fn llama_3_2_1b_shape() -> Self {
        Self::benchmark_shape(128_256, 2048, 8192, 16, 32, 8, true)
    }

    /// The architecture of Llama-2-7B (hidden 4096, 32 layers, 32 heads, MLP 11,008,
    /// vocabulary 32,000, untied head), for benchmarks with random weights.
    pub fn llama_2_7b_shape() -> Self {
        Self::benchmark_shape(32_000, 4096, 11_008, 32, 32, 32, false)
    }

    /// A Llama shape with RoPE θ 500,000, 4,096 positions and no biases (bf16 checkpoint).
    #[allow(clippy::too_many_arguments)]
    pub fn benchmark_shape(
        vocab_size: usize,
        hidden_size: usize,
        intermediate_size: usize,
        num_hidden_layers: usize,
        num_attention_heads: usize,
        num_key_value_heads: usize,
        tie_word_embeddings: bool,
    ) -> Self {
        Self {
            vocab_size,
            hidden_size,
            intermediate_size,
            num_hidden_layers,
            num_attention_heads,
            num_key_value_heads,
            head_dim: hidden_size / num_attention_heads,
            rms_norm_eps: 1e-5,
            rope_theta: 500_000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 4096,
            tie_word_embeddings,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            dtype: "bfloat16".into(),
        }
    }

    /// Reads an HF `config.json`.
    ///
    /// # Errors
    /// I/O, invalid JSON, a missing or malformed field (named), or an unsupported architecture
    /// feature (a non-SiLU activation, an unknown `rope_type`).
    pub fn from_hf_file(path: &Path) -> Result<Self> {
        let text = disha_core::limits::read_config_file(path)?;
        let value: Value = serde_json::from_str(&text)
            .map_err(|e| ModelError::config(path, "<json>", e.to_string()))?;
        Self::from_hf_json(&value, path)
    }

    /// Parses an HF `config.json` value; `path` is only used in errors.
    ///
    /// # Errors
    /// As [`Self::from_hf_file`].
    pub fn from_hf_json(value: &Value, path: &Path) -> Result<Self> {
        let obj = value
            .as_object()
            .ok_or_else(|| ModelError::config(path, "<root>", "expected a JSON object"))?;
        let field = HfFields { obj, path };
        if let Some(model_type) = obj.get("model_type").and_then(Value::as_str)
            && !["llama", "mistral", "smollm2", "smollm3"].contains(&model_type)
        {
            return Err(ModelError::config(
                path,
                "model_type",
                format!("`{model_type}` is not a Llama-family model (llama, mistral)"),
            ));
        }
        let act = obj
            .get("hidden_act")
            .and_then(Value::as_str)
            .unwrap_or("silu");
        if act != "silu" {
            return Err(ModelError::config(
                path,
                "hidden_act",
                format!("`{act}`: Llama uses `silu`"),
            ));
        }
        let hidden_size = field.usize("hidden_size")?;
        let num_attention_heads = field.usize("num_attention_heads")?;
        let head_dim = match obj.get("head_dim") {
            Some(Value::Null) | None => {
                if !hidden_size.is_multiple_of(num_attention_heads) {
                    return Err(ModelError::config(
                        path,
                        "head_dim",
                        format!(
                            "absent, and hidden_size {hidden_size} is not divisible by \
                             num_attention_heads {num_attention_heads}"
                        ),
                    ));
                }
                hidden_size.checked_div(num_attention_heads).unwrap_or(0)
            }
            Some(_) => field.usize("head_dim")?,
        };
        let num_key_value_heads = match obj.get("num_key_value_heads") {
            Some(Value::Null) | None => num_attention_heads,
            Some(_) => field.usize("num_key_value_heads")?,
        };
        // transformers 5.x nests RoPE settings under `rope_parameters`; 4.x keeps `rope_theta`
        // at the top level and the scaling under `rope_scaling`.
        let rope_params = obj.get("rope_parameters").and_then(Value::as_object);
        let rope_theta = match rope_params.and_then(|p| p.get("rope_theta")) {
            Some(v) => v.as_f64().ok_or_else(|| {
                ModelError::config(path, "rope_parameters.rope_theta", "expected a number")
            })?,
            None => obj
                .get("rope_theta")
                .map(|v| {
                    v.as_f64()
                        .ok_or_else(|| ModelError::config(path, "rope_theta", "expected a number"))
                })
                .transpose()?
                .unwrap_or(10_000.0),
        };
        let scaling = match rope_params {
            Some(p) => Some((p, "rope_parameters")),
            None => obj
                .get("rope_scaling")
                .and_then(Value::as_object)
                .map(|p| (p, "rope_scaling")),
        };
        let rope_scaling = match scaling {
            Some((p, name)) => parse_rope_scaling(p, name, path)?,
            None => RopeScaling::Default,
        };
        let token_id = |field: &str, v: &Value| {
            v.as_u64()
                .and_then(|x| u32::try_from(x).ok())
                .ok_or_else(|| {
                    ModelError::config(
                        path,
                        field,
                        format!("expected a token id, got {}", excerpt(v)),
                    )
                })
        };
        let eos_token_ids = match obj.get("eos_token_id") {
            None | Some(Value::Null) => Vec::new(),
            Some(Value::Array(ids)) => ids
                .iter()
                .map(|v| token_id("eos_token_id", v))
                .collect::<Result<_>>()?,
            Some(v) => vec![token_id("eos_token_id", v)?],
        };
        let bos_token_id = match obj.get("bos_token_id") {
            None | Some(Value::Null) => None,
            Some(v) => Some(token_id("bos_token_id", v)?),
        };
        let config = Self {
            vocab_size: field.usize("vocab_size")?,
            hidden_size,
            intermediate_size: field.usize("intermediate_size")?,
            num_hidden_layers: field.usize("num_hidden_layers")?,
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            rms_norm_eps: field.f64_or("rms_norm_eps", 1e-6)?,
            rope_theta,
            rope_scaling,
            max_position_embeddings: field.usize_or("max_position_embeddings", 2048)?,
            tie_word_embeddings: field.bool_or("tie_word_embeddings", false)?,
            attention_bias: field.bool_or("attention_bias", false)?,
            mlp_bias: field.bool_or("mlp_bias", false)?,
            bos_token_id,
            eos_token_ids,
            dtype: obj
                .get("dtype")
                .or_else(|| obj.get("torch_dtype"))
                .and_then(Value::as_str)
                .unwrap_or("float32")
                .to_string(),
        };
        config.validate(path)?;
        Ok(config)
    }

    /// Checks every field's domain, in one place for every source (HF `config.json`, GGUF
    /// metadata, a llama2.c header), before anything is sized from the config.
    ///
    /// # Errors
    /// A [`ModelError::Config`] naming `path` and the field: sizes that are zero or above
    /// [`disha_core::limits::Limits`] (`max_layers`, `max_dim`), query heads not a multiple of
    /// key/value heads, an odd `head_dim` (RoPE rotates pairs), `rms_norm_eps` or `rope_theta`
    /// that is not a finite number > 0, or RoPE scaling factors outside their domain.
    pub fn validate(&self, path: &Path) -> Result<()> {
        let limits = disha_core::limits::limits();
        let bad = |field: &str, message: String| Err(ModelError::config(path, field, message));
        for (name, v) in [
            ("vocab_size", self.vocab_size),
            ("hidden_size", self.hidden_size),
            ("intermediate_size", self.intermediate_size),
            ("num_hidden_layers", self.num_hidden_layers),
            ("num_attention_heads", self.num_attention_heads),
            ("num_key_value_heads", self.num_key_value_heads),
            ("head_dim", self.head_dim),
            ("max_position_embeddings", self.max_position_embeddings),
        ] {
            if v == 0 {
                return bad(name, "must be > 0".into());
            }
            let (limit_name, limit) = if name == "num_hidden_layers" {
                ("max_layers", limits.max_layers)
            } else {
                ("max_dim", limits.max_dim)
            };
            if v > limit {
                return bad(name, disha_core::limits::exceeds(v, limit_name, limit));
            }
        }
        for (name, v) in [("q_dim", self.q_dim()), ("kv_dim", self.kv_dim())] {
            if v > limits.max_dim {
                return bad(
                    "head_dim",
                    format!(
                        "{name} = heads × head_dim {}",
                        disha_core::limits::exceeds(v, "max_dim", limits.max_dim)
                    ),
                );
            }
        }
        if !self
            .num_attention_heads
            .is_multiple_of(self.num_key_value_heads)
        {
            return bad(
                "num_key_value_heads",
                format!(
                    "{} query heads are not a multiple of {} key/value heads",
                    self.num_attention_heads, self.num_key_value_heads
                ),
            );
        }
        if !self.head_dim.is_multiple_of(2) {
            return bad(
                "head_dim",
                format!("{} is odd; RoPE rotates pairs", self.head_dim),
            );
        }
        if !["float32", "float16", "bfloat16"].contains(&self.dtype.as_str()) {
            return bad(
                "dtype",
                format!(
                    "`{}` is not supported (float32, float16, bfloat16)",
                    self.dtype
                ),
            );
        }
        // Finite and > 0 — in f32 too, where the model computes with them.
        let positive = |name: &str, v: f64| {
            if !(v.is_finite() && v > 0.0) {
                bad(name, format!("{v} must be a finite number > 0"))
            } else if v > f32::MAX as f64 {
                bad(name, format!("{v} does not fit in f32"))
            } else {
                Ok(())
            }
        };
        positive("rms_norm_eps", self.rms_norm_eps)?;
        positive("rope_theta", self.rope_theta)?;
        match self.rope_scaling {
            RopeScaling::Default => {}
            RopeScaling::Linear { factor } => positive("rope_scaling.factor", factor)?,
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                positive("rope_scaling.factor", factor)?;
                positive("rope_scaling.low_freq_factor", low_freq_factor)?;
                positive("rope_scaling.high_freq_factor", high_freq_factor)?;
                positive(
                    "rope_scaling.original_max_position_embeddings",
                    original_max_position_embeddings,
                )?;
                if high_freq_factor <= low_freq_factor {
                    return bad(
                        "rope_scaling.high_freq_factor",
                        format!(
                            "{high_freq_factor} must be greater than low_freq_factor \
                             {low_freq_factor} (the smoothing divides by their difference)"
                        ),
                    );
                }
            }
        }
        Ok(())
    }

    /// An HF `config.json` (transformers 5.x style, `rope_parameters`) describing this model,
    /// for exports from a GGUF source.
    pub fn to_hf_json(&self) -> Value {
        let mut rope = Map::new();
        rope.insert("rope_theta".into(), json!(self.rope_theta));
        match &self.rope_scaling {
            RopeScaling::Default => {
                rope.insert("rope_type".into(), json!("default"));
            }
            RopeScaling::Linear { factor } => {
                rope.insert("rope_type".into(), json!("linear"));
                rope.insert("factor".into(), json!(factor));
            }
            RopeScaling::Llama3 {
                factor,
                low_freq_factor,
                high_freq_factor,
                original_max_position_embeddings,
            } => {
                rope.insert("rope_type".into(), json!("llama3"));
                rope.insert("factor".into(), json!(factor));
                rope.insert("low_freq_factor".into(), json!(low_freq_factor));
                rope.insert("high_freq_factor".into(), json!(high_freq_factor));
                rope.insert(
                    "original_max_position_embeddings".into(),
                    json!(*original_max_position_embeddings as u64),
                );
            }
        }
        let eos = match self.eos_token_ids.as_slice() {
            [] => Value::Null,
            [one] => json!(one),
            many => json!(many),
        };
        json!({
            "architectures": ["LlamaForCausalLM"],
            "model_type": "llama",
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "num_hidden_layers": self.num_hidden_layers,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "head_dim": self.head_dim,
            "hidden_act": "silu",
            "rms_norm_eps": self.rms_norm_eps,
            "rope_theta": self.rope_theta,
            "rope_parameters": Value::Object(rope),
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings,
            "attention_bias": self.attention_bias,
            "mlp_bias": self.mlp_bias,
            "bos_token_id": self.bos_token_id,
            "eos_token_id": eos,
            "dtype": self.dtype,
        })
    }

    /// Key/value width (`num_key_value_heads · head_dim`).
    pub fn kv_dim(&self) -> usize {
        self.num_key_value_heads * self.head_dim
    }

    /// Query width (`num_attention_heads · head_dim`).
    pub fn q_dim(&self) -> usize {
        self.num_attention_heads * self.head_dim
    }
}

fn parse_rope_scaling(p: &Map<String, Value>, name: &str, path: &Path) -> Result<RopeScaling> {
    let kind = p
        .get("rope_type")
        .or_else(|| p.get("type"))
        .and_then(Value::as_str)
        .unwrap_or("default");
    let num = |key: &str| -> Result<f64> {
        p.get(key).and_then(Value::as_f64).ok_or_else(|| {
            ModelError::config(
                path,
                format!("{name}.{key}"),
                format!("required for rope_type `{kind}`"),
            )
        })
    };
    match kind {
        "default" => Ok(RopeScaling::Default),
        "linear" => Ok(RopeScaling::Linear {
            factor: num("factor")?,
        }),
        "llama3" => Ok(RopeScaling::Llama3 {
            factor: num("factor")?,
            low_freq_factor: num("low_freq_factor")?,
            high_freq_factor: num("high_freq_factor")?,
            original_max_position_embeddings: num("original_max_position_embeddings")?,
        }),
        other => Err(ModelError::config(
            path,
            format!("{name}.rope_type"),
            format!(
                "`{}` is not supported (default, linear, llama3)",
                excerpt(other)
            ),
        )),
    }
}

/// Typed access to top-level `config.json` fields with errors naming the field.
struct HfFields<'a> {
    obj: &'a Map<String, Value>,
    path: &'a Path,
}

impl HfFields<'_> {
    fn usize(&self, key: &str) -> Result<usize> {
        match self.obj.get(key) {
            Some(v) => v.as_u64().map(|x| x as usize).ok_or_else(|| {
                ModelError::config(
                    self.path,
                    key,
                    format!("expected a non-negative integer, got {}", excerpt(v)),
                )
            }),
            None => Err(ModelError::config(self.path, key, "missing")),
        }
    }

    fn usize_or(&self, key: &str, default: usize) -> Result<usize> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(_) => self.usize(key),
        }
    }

    fn f64_or(&self, key: &str, default: f64) -> Result<f64> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_f64().ok_or_else(|| {
                ModelError::config(
                    self.path,
                    key,
                    format!("expected a number, got {}", excerpt(v)),
                )
            }),
        }
    }

    fn bool_or(&self, key: &str, default: bool) -> Result<bool> {
        match self.obj.get(key) {
            None | Some(Value::Null) => Ok(default),
            Some(v) => v.as_bool().ok_or_else(|| {
                ModelError::config(
                    self.path,
                    key,
                    format!("expected true or false, got {}", excerpt(v)),
                )
            }),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: Value) -> Result<LlamaConfig> {
        LlamaConfig::from_hf_json(&v, Path::new("config.json"))
    }

    fn base() -> Value {
        json!({"vocab_size": 128, "hidden_size": 64, "intermediate_size": 172,
               "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2})
    }

    #[test]
    fn rope_theta_from_either_transformers_version() {
        let mut v4 = base();
        v4["rope_theta"] = json!(500000.0);
        v4["rope_scaling"] = json!({"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let mut v5 = base();
        v5["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 32.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let a = parse(v4).unwrap();
        let b = parse(v5).unwrap();
        assert_eq!(a.rope_theta, 500000.0);
        assert_eq!(a, b);
        assert!(matches!(a.rope_scaling, RopeScaling::Llama3 { factor, .. } if factor == 32.0));
        assert_eq!(a.head_dim, 16);
    }

    #[test]
    fn bad_fields_are_named() {
        let mut v = base();
        v["hidden_act"] = json!("gelu");
        assert!(parse(v).unwrap_err().to_string().contains("hidden_act"));
        let mut v = base();
        v["num_key_value_heads"] = json!(3);
        assert!(
            parse(v)
                .unwrap_err()
                .to_string()
                .contains("num_key_value_heads")
        );
        let mut v = base();
        v.as_object_mut().unwrap().remove("vocab_size");
        assert!(
            parse(v)
                .unwrap_err()
                .to_string()
                .contains("`vocab_size`: missing")
        );
        let mut v = base();
        v["rope_scaling"] = json!({"type": "yarn", "factor": 4.0});
        assert!(
            parse(v)
                .unwrap_err()
                .to_string()
                .contains("rope_scaling.rope_type")
        );
    }

    /// Every field is checked for its domain before anything is sized from it; each error names
    /// the file and the field (hardening regressions: a non-positive epsilon once panicked
    /// inside Burn, an absurd layer count allocated until the process aborted).
    #[test]
    fn out_of_domain_values_are_named() {
        let cases: Vec<(&str, Value, &str)> = vec![
            ("rms_norm_eps", json!(0.0), "finite number > 0"),
            ("rms_norm_eps", json!(-1e-5), "finite number > 0"),
            ("rms_norm_eps", json!(1e300), "does not fit in f32"),
            ("rope_theta", json!(0), "finite number > 0"),
            ("num_hidden_layers", json!(1_000_000_000u64), "max_layers"),
            (
                "num_hidden_layers",
                json!(9_223_372_036_854_775_808u64),
                "max_layers",
            ),
            ("num_hidden_layers", json!(1e9), "non-negative integer"),
            ("num_hidden_layers", json!(0), "must be > 0"),
            ("hidden_size", json!(1u64 << 40), "max_dim"),
            ("vocab_size", json!(-1), "non-negative integer"),
            ("max_position_embeddings", json!(0), "must be > 0"),
            ("eos_token_id", json!(4_294_967_298u64), "token id"),
            ("bos_token_id", json!("<s>"), "token id"),
            ("dtype", json!("float64"), "not supported"),
            ("head_dim", json!(7), "odd"),
        ];
        for (field, value, expected) in cases {
            let mut v = base();
            v[field] = value.clone();
            let e = parse(v).unwrap_err().to_string();
            assert!(
                e.contains("config.json")
                    && e.contains(&format!("`{field}`"))
                    && e.contains(expected),
                "{field} = {value}: {e}"
            );
        }
        let mut v = base();
        v["num_attention_heads"] = json!(0);
        v["hidden_size"] = json!(0);
        assert!(parse(v).unwrap_err().to_string().contains("must be > 0"));
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 4.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        let e = parse(v).unwrap_err().to_string();
        assert!(e.contains("rope_scaling.high_freq_factor"), "{e}");
        let mut v = base();
        v["rope_scaling"] = json!({"rope_type": "linear", "factor": 0.0});
        assert!(
            parse(v)
                .unwrap_err()
                .to_string()
                .contains("rope_scaling.factor")
        );
    }

    #[test]
    fn hf_json_round_trips() {
        let mut v = base();
        v["rope_parameters"] = json!({"rope_theta": 500000.0, "rope_type": "llama3", "factor": 8.0,
            "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192});
        v["eos_token_id"] = json!([128001, 128009]);
        let c = parse(v).unwrap();
        assert_eq!(parse(c.to_hf_json()).unwrap(), c);
    }
}

#[cfg(test)]
pub(crate) mod tests_support {
    use super::*;

    /// A tiny GQA config with non-divisible MLP width, for unit tests.
    pub(crate) fn tiny_config() -> LlamaConfig {
        LlamaConfig {
            vocab_size: 32,
            hidden_size: 16,
            intermediate_size: 20,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            head_dim: 4,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            rope_scaling: RopeScaling::Default,
            max_position_embeddings: 64,
            tie_word_embeddings: false,
            attention_bias: false,
            mlp_bias: false,
            bos_token_id: Some(1),
            eos_token_ids: vec![2],
            dtype: "float32".into(),
        }
    }
}
