//! [`PeftConfig`]: HF PEFT's `adapter_config.json` for `MISS`, legacy `BONE` and `LORA`.
//!
//! Reading follows PEFT's rules (method.md §11.2): `peft_type` is required, missing keys take
//! their defaults, unknown keys are kept (and written back) with a warning. Keys that PEFT knows
//! but `disha` does not implement are accepted only at their no-op defaults; any other value is
//! an error naming the field, never a silently different function.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value, json};

use crate::error::{DishaError, Result};
use crate::limits::excerpt;
use crate::spec::{AdapterInit, AdapterSpec, BatOrientation};

/// The `peft_type` of an adapter directory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PeftType {
    /// MiSS (PEFT ≥ 0.17): Bone / BAT / mini, tensors `…miss_block`.
    Miss,
    /// Bone (PEFT 0.14–0.18), read only: converted to MiSS on load (tensors `…bone_block`).
    Bone,
    /// LoRA.
    Lora,
}

/// MiSS `init_weights`: which member of the family, and how it starts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MissInit {
    /// `true`: Bone / MiSS standard, zero block.
    Standard,
    /// `false`: Bone / MiSS standard, kaiming-uniform block (PEFT uses it for tests).
    Random,
    /// `"bat"`: BAT in PEFT orientation.
    Bat,
    /// `"bat_rwkv"` (a `disha` extension): BAT in RWKV-PEFT orientation. PEFT does not know this
    /// value and refuses such a directory with a shape error instead of silently computing
    /// another function (method.md §4.6).
    BatRwkv,
    /// `"mini"`: MiSS-mini.
    Mini,
}

/// `init_lora_weights`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LoraInit {
    /// `true`: `A` kaiming-uniform, `B = 0`.
    Default,
    /// `false`: both factors kaiming-uniform.
    Random,
    /// `"gaussian"`: `A ~ N(0, 1/r²)`, `B = 0`.
    Gaussian,
}

/// The family-specific part of a config.
#[derive(Clone, Debug, PartialEq)]
pub enum PeftMethod {
    /// MiSS / Bone.
    Miss {
        /// `init_weights`.
        init: MissInit,
        /// `mini_r` (used by mini only; default 1).
        mini_r: usize,
        /// `miss_dropout` (default 0).
        dropout: f64,
    },
    /// LoRA.
    Lora {
        /// `lora_alpha` (default 8).
        alpha: f64,
        /// `lora_dropout` (default 0).
        dropout: f64,
        /// `use_rslora` (default false).
        use_rslora: bool,
        /// `init_lora_weights` (default true).
        init: LoraInit,
    },
}

/// PEFT's `target_modules` / `exclude_modules`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum TargetModules {
    /// A list: each entry matches a module whose name equals it or ends with `"." + entry`.
    Names(Vec<String>),
    /// A string: a regular expression that must match the whole module name.
    Regex(String),
    /// `"all-linear"`: every linear layer except the output head.
    AllLinear,
}

impl std::fmt::Display for TargetModules {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Names(names) => write!(f, "{names:?}"),
            Self::Regex(re) => write!(f, "regex {re:?}"),
            Self::AllLinear => f.write_str("\"all-linear\""),
        }
    }
}

/// An `adapter_config.json` for MiSS / Bone / LoRA.
///
/// ```
/// use disha_core::{PeftConfig, TargetModules};
/// let config = PeftConfig::miss(64, TargetModules::Names(vec!["q_proj".into(), "v_proj".into()]));
/// let json = config.to_json_string();
/// assert!(json.contains("\"peft_type\": \"MISS\""));
/// let back = PeftConfig::from_json_str(&json).unwrap();
/// assert_eq!(back, config.normalized()); // saving sets inference_mode, as PEFT does
/// ```
#[derive(Clone, Debug, PartialEq)]
pub struct PeftConfig {
    /// The type as read; a legacy `BONE` file reads as [`PeftType::Bone`] and is written as `MISS`.
    pub peft_type: PeftType,
    /// Shard / block size, or LoRA rank (default 64 for MiSS, 8 for LoRA).
    pub r: usize,
    /// Family-specific settings.
    pub method: PeftMethod,
    /// Which modules get an adapter; `None` means the model's default (Llama: `q_proj`, `v_proj`).
    pub target_modules: Option<TargetModules>,
    /// Modules never to adapt (same matching rules; `all-linear` is not allowed here).
    pub exclude_modules: Option<TargetModules>,
    /// Only adapt these layer indices (with list `target_modules` only).
    pub layers_to_transform: Option<Vec<usize>>,
    /// Name(s) of the layer container used to find the layer index (e.g. `layers`).
    pub layers_pattern: Option<Vec<String>>,
    /// PEFT `task_type` (e.g. `CAUSAL_LM`).
    pub task_type: Option<String>,
    /// PEFT `base_model_name_or_path`.
    pub base_model_name_or_path: Option<String>,
    /// PEFT `revision`.
    pub revision: Option<String>,
    /// PEFT `inference_mode` (written `true` on save, as PEFT does).
    pub inference_mode: bool,
    /// PEFT `peft_version` of the writer.
    pub peft_version: Option<String>,
    /// Every other key, kept verbatim so a read-write round trip preserves it.
    pub extra: BTreeMap<String, Value>,
}

/// Keys every PEFT config may carry that `disha` stores in [`PeftConfig::extra`] without a warning.
const PASSTHROUGH_KEYS: &[&str] = &["auto_mapping"];

/// LoRA keys PEFT writes that `disha` accepts only at these no-op values.
fn lora_noop_defaults() -> Vec<(&'static str, Value)> {
    vec![
        ("fan_in_fan_out", json!(false)),
        ("use_dora", json!(false)),
        ("lora_bias", json!(false)),
        ("use_qalora", json!(false)),
        ("rank_pattern", json!({})),
        ("alpha_pattern", json!({})),
        ("layer_replication", Value::Null),
        ("target_parameters", Value::Null),
        ("trainable_token_indices", Value::Null),
        ("alora_invocation_tokens", Value::Null),
        ("megatron_config", Value::Null),
        ("use_bdlora", Value::Null),
    ]
}

/// LoRA keys PEFT writes that have no effect on a plain linear forward (configs of init schemes
/// that ran before saving, tensor-parallel plumbing, ...); kept verbatim without a warning.
const LORA_INERT_KEYS: &[&str] = &[
    "loftq_config",
    "eva_config",
    "corda_config",
    "kasa_config",
    "lora_ga_config",
    "arrow_config",
    "monteclora_config",
    "velora_config",
    "megatron_core",
    "qalora_group_size",
    "ensure_weight_tying",
];

impl PeftConfig {
    fn base(peft_type: PeftType, r: usize, method: PeftMethod) -> Self {
        Self {
            peft_type,
            r,
            method,
            target_modules: None,
            exclude_modules: None,
            layers_to_transform: None,
            layers_pattern: None,
            task_type: None,
            base_model_name_or_path: None,
            revision: None,
            inference_mode: false,
            peft_version: None,
            extra: BTreeMap::new(),
        }
    }

    /// A MiSS config of the given member (`init_weights`).
    pub fn miss_with(r: usize, init: MissInit, targets: TargetModules) -> Self {
        Self {
            target_modules: Some(targets),
            ..Self::base(
                PeftType::Miss,
                r,
                PeftMethod::Miss {
                    init,
                    mini_r: 1,
                    dropout: 0.0,
                },
            )
        }
    }

    /// Bone / MiSS standard (`init_weights=true`).
    pub fn miss(r: usize, targets: TargetModules) -> Self {
        Self::miss_with(r, MissInit::Standard, targets)
    }

    /// LoRA with `lora_alpha = alpha`.
    pub fn lora(r: usize, alpha: f64, targets: TargetModules) -> Self {
        Self {
            target_modules: Some(targets),
            ..Self::base(
                PeftType::Lora,
                r,
                PeftMethod::Lora {
                    alpha,
                    dropout: 0.0,
                    use_rslora: false,
                    init: LoraInit::Default,
                },
            )
        }
    }

    /// The config that describes `spec` applied to `targets`.
    pub fn from_spec(spec: &AdapterSpec, targets: TargetModules) -> Self {
        use crate::spec::AdapterMethod as M;
        let miss = |init| PeftMethod::Miss {
            init,
            mini_r: 1,
            dropout: spec.dropout,
        };
        let random = spec.init == AdapterInit::Random;
        let method = match spec.method {
            M::Bone if random => miss(MissInit::Random),
            M::Bone => miss(MissInit::Standard),
            M::Bat(BatOrientation::Peft) => miss(MissInit::Bat),
            M::Bat(BatOrientation::RwkvPeft) => miss(MissInit::BatRwkv),
            M::Mini { mini_r } => PeftMethod::Miss {
                init: MissInit::Mini,
                mini_r,
                dropout: spec.dropout,
            },
            M::Lora { alpha, use_rslora } => PeftMethod::Lora {
                alpha,
                dropout: spec.dropout,
                use_rslora,
                init: match spec.init {
                    AdapterInit::Identity => LoraInit::Default,
                    AdapterInit::Random => LoraInit::Random,
                    AdapterInit::Gaussian => LoraInit::Gaussian,
                },
            },
        };
        let peft_type = match method {
            PeftMethod::Miss { .. } => PeftType::Miss,
            PeftMethod::Lora { .. } => PeftType::Lora,
        };
        Self {
            target_modules: Some(targets),
            ..Self::base(peft_type, spec.r, method)
        }
    }

    /// The per-layer [`AdapterSpec`] this config creates.
    pub fn spec(&self) -> AdapterSpec {
        match &self.method {
            PeftMethod::Miss {
                init,
                mini_r,
                dropout,
            } => {
                let spec = match init {
                    MissInit::Standard => AdapterSpec::bone(self.r),
                    MissInit::Random => AdapterSpec::bone(self.r).with_init(AdapterInit::Random),
                    MissInit::Bat => AdapterSpec::bat(self.r, BatOrientation::Peft),
                    MissInit::BatRwkv => AdapterSpec::bat(self.r, BatOrientation::RwkvPeft),
                    MissInit::Mini => AdapterSpec::mini(self.r, *mini_r),
                };
                spec.with_dropout(*dropout)
            }
            PeftMethod::Lora {
                alpha,
                dropout,
                use_rslora,
                init,
            } => AdapterSpec::lora(self.r, *alpha)
                .with_rslora(*use_rslora)
                .with_dropout(*dropout)
                .with_init(match init {
                    LoraInit::Default => AdapterInit::Identity,
                    LoraInit::Random => AdapterInit::Random,
                    LoraInit::Gaussian => AdapterInit::Gaussian,
                }),
        }
    }

    /// Reads and validates `path` (an `adapter_config.json`).
    ///
    /// # Errors
    /// I/O, malformed JSON, or an invalid / unsupported field, naming the file and the field.
    pub fn from_file(path: &Path) -> Result<Self> {
        let text = crate::limits::read_config_file(path)?;
        let value: Value = serde_json::from_str(&text).map_err(|source| DishaError::Json {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_json(value).map_err(|e| e.in_file(path))
    }

    /// Parses a config from JSON text.
    ///
    /// # Errors
    /// Malformed JSON, or an invalid / unsupported field.
    pub fn from_json_str(text: &str) -> Result<Self> {
        let value: Value = serde_json::from_str(text)
            .map_err(|e| DishaError::config("<json>", format!("invalid JSON: {e}")))?;
        Self::from_json(value)
    }

    /// Parses a config from a JSON value.
    ///
    /// # Errors
    /// An invalid or unsupported field.
    pub fn from_json(value: Value) -> Result<Self> {
        let Value::Object(mut obj) = value else {
            return Err(DishaError::config("<root>", "expected a JSON object"));
        };
        let peft_type = match obj.remove("peft_type") {
            Some(Value::String(s)) => match s.as_str() {
                "MISS" => PeftType::Miss,
                "BONE" => PeftType::Bone,
                "LORA" => PeftType::Lora,
                other => {
                    return Err(DishaError::config(
                        "peft_type",
                        format!("`{}` is not supported (MISS, BONE or LORA)", excerpt(other)),
                    ));
                }
            },
            Some(other) => {
                return Err(DishaError::config(
                    "peft_type",
                    format!("expected a string, got {}", excerpt(&other)),
                ));
            }
            None => return Err(DishaError::config("peft_type", "required key is missing")),
        };
        let default_r = if peft_type == PeftType::Lora { 8 } else { 64 };
        let r = take_rank(&mut obj, default_r)?;
        let method = match peft_type {
            PeftType::Miss | PeftType::Bone => {
                let init = match obj.remove("init_weights") {
                    None | Some(Value::Bool(true)) => MissInit::Standard,
                    Some(Value::Bool(false)) => MissInit::Random,
                    Some(Value::String(s)) if s == "bat" => MissInit::Bat,
                    Some(Value::String(s)) if s == "bat_rwkv" => MissInit::BatRwkv,
                    Some(Value::String(s)) if s == "mini" && peft_type == PeftType::Miss => {
                        MissInit::Mini
                    }
                    Some(other) => {
                        return Err(DishaError::config(
                            "init_weights",
                            format!(
                                "expected true, false, \"bat\" or \"mini\", got {}",
                                excerpt(&other)
                            ),
                        ));
                    }
                };
                PeftMethod::Miss {
                    init,
                    mini_r: take_usize(&mut obj, "mini_r", 1)?,
                    dropout: take_prob(&mut obj, "miss_dropout")?,
                }
            }
            PeftType::Lora => {
                let alpha = match obj.remove("lora_alpha") {
                    None => 8.0,
                    Some(v) => v.as_f64().filter(|a| a.is_finite()).ok_or_else(|| {
                        DishaError::config(
                            "lora_alpha",
                            format!("expected a number, got {}", excerpt(&v)),
                        )
                    })?,
                };
                let init = match obj.remove("init_lora_weights") {
                    None | Some(Value::Bool(true)) => LoraInit::Default,
                    Some(Value::Bool(false)) => LoraInit::Random,
                    Some(Value::String(s)) if s == "gaussian" => LoraInit::Gaussian,
                    Some(other) => {
                        return Err(DishaError::config(
                            "init_lora_weights",
                            format!(
                                "{} is not supported (true, false or \"gaussian\"); \
                                 PiSSA/OLoRA-style inits change the base weights",
                                excerpt(&other)
                            ),
                        ));
                    }
                };
                let use_rslora = take_bool(&mut obj, "use_rslora", false)?;
                let dropout = take_prob(&mut obj, "lora_dropout")?;
                for (key, noop) in lora_noop_defaults() {
                    if let Some(v) = obj.get(key) {
                        let is_noop = v == &noop || (noop.is_null() && is_empty_json(v));
                        if !is_noop {
                            return Err(DishaError::config(
                                key,
                                format!("{} is not supported; only {noop} is", excerpt(v)),
                            ));
                        }
                    }
                }
                PeftMethod::Lora {
                    alpha,
                    dropout,
                    use_rslora,
                    init,
                }
            }
        };
        let target_modules = take_targets(&mut obj, "target_modules", true)?;
        let exclude_modules = take_targets(&mut obj, "exclude_modules", false)?;
        let layers_to_transform = match obj.remove("layers_to_transform") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_u64().map(|i| i as usize).ok_or_else(|| {
                            DishaError::config(
                                "layers_to_transform",
                                format!("expected layer indices, got {}", excerpt(v)),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(v) => Some(vec![v.as_u64().map(|i| i as usize).ok_or_else(|| {
                DishaError::config(
                    "layers_to_transform",
                    format!("expected an index or a list, got {}", excerpt(&v)),
                )
            })?]),
        };
        let layers_pattern = match obj.remove("layers_pattern") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(vec![s]),
            Some(Value::Array(items)) => Some(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            DishaError::config(
                                "layers_pattern",
                                format!("expected strings, got {}", excerpt(v)),
                            )
                        })
                    })
                    .collect::<Result<Vec<_>>>()?,
            ),
            Some(v) => {
                return Err(DishaError::config(
                    "layers_pattern",
                    format!("expected a string or a list, got {}", excerpt(&v)),
                ));
            }
        };
        match obj.remove("bias") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "none" => {}
            Some(v) => {
                return Err(DishaError::config(
                    "bias",
                    format!(
                        "{} is not supported; only \"none\" (biases stay frozen)",
                        excerpt(&v)
                    ),
                ));
            }
        }
        if let Some(v) = obj.remove("modules_to_save")
            && !is_empty_json(&v)
        {
            return Err(DishaError::config(
                "modules_to_save",
                format!(
                    "{} is not supported yet; only adapter tensors are trained and saved",
                    excerpt(&v)
                ),
            ));
        }
        if obj.remove("runtime_config").is_some() {
            tracing::warn!("adapter config: dropping `runtime_config` (as PEFT does)");
        }
        let mut config = Self {
            peft_type,
            r,
            method,
            target_modules,
            exclude_modules,
            layers_to_transform,
            layers_pattern,
            task_type: take_opt_string(&mut obj, "task_type")?,
            base_model_name_or_path: take_opt_string(&mut obj, "base_model_name_or_path")?,
            revision: take_opt_string(&mut obj, "revision")?,
            inference_mode: take_bool(&mut obj, "inference_mode", false)?,
            peft_version: take_opt_string(&mut obj, "peft_version")?,
            extra: BTreeMap::new(),
        };
        for (key, value) in obj {
            let known = PASSTHROUGH_KEYS.contains(&key.as_str())
                || (peft_type == PeftType::Lora
                    && (LORA_INERT_KEYS.contains(&key.as_str())
                        || lora_noop_defaults().iter().any(|(k, _)| *k == key)));
            if !known {
                tracing::warn!(key, "adapter config: unknown key kept as is");
            }
            config.extra.insert(key, value);
        }
        config.validate()?;
        Ok(config)
    }

    /// Cross-field rules of PEFT's `__post_init__`.
    ///
    /// # Errors
    /// `layers_to_transform` / `layers_pattern` with a regex `target_modules`, `layers_pattern`
    /// without `layers_to_transform`, or `all-linear` in `exclude_modules`.
    pub fn validate(&self) -> Result<()> {
        let string_targets = matches!(
            self.target_modules,
            Some(TargetModules::Regex(_) | TargetModules::AllLinear)
        );
        if string_targets && self.layers_to_transform.is_some() {
            return Err(DishaError::config(
                "layers_to_transform",
                "cannot be used when target_modules is a string (regex or \"all-linear\")",
            ));
        }
        if string_targets && self.layers_pattern.is_some() {
            return Err(DishaError::config(
                "layers_pattern",
                "cannot be used when target_modules is a string (regex or \"all-linear\")",
            ));
        }
        if self.layers_pattern.is_some() && self.layers_to_transform.is_none() {
            return Err(DishaError::config(
                "layers_pattern",
                "needs layers_to_transform to be set too",
            ));
        }
        if self.exclude_modules == Some(TargetModules::AllLinear) {
            return Err(DishaError::config(
                "exclude_modules",
                "\"all-linear\" excludes everything",
            ));
        }
        if self.r == 0 {
            return Err(DishaError::config("r", "must be >= 1, got 0"));
        }
        Ok(())
    }

    /// The config as PEFT writes it: every field, `inference_mode: true`, legacy Bone as `MISS`.
    pub fn to_json(&self) -> Value {
        let mut out: BTreeMap<String, Value> = self.extra.clone();
        let targets = |t: &Option<TargetModules>| match t {
            None => Value::Null,
            Some(TargetModules::Names(names)) => json!(names),
            Some(TargetModules::Regex(re)) => json!(re),
            Some(TargetModules::AllLinear) => json!("all-linear"),
        };
        let peft_type = match self.peft_type {
            PeftType::Miss | PeftType::Bone => "MISS",
            PeftType::Lora => "LORA",
        };
        let common = [
            ("peft_type", json!(peft_type)),
            ("r", json!(self.r)),
            ("target_modules", targets(&self.target_modules)),
            ("exclude_modules", targets(&self.exclude_modules)),
            ("layers_to_transform", json!(self.layers_to_transform)),
            (
                "layers_pattern",
                match &self.layers_pattern {
                    Some(p) if p.len() == 1 => json!(p[0]),
                    other => json!(other),
                },
            ),
            ("bias", json!("none")),
            ("modules_to_save", Value::Null),
            ("task_type", json!(self.task_type)),
            (
                "base_model_name_or_path",
                json!(self.base_model_name_or_path),
            ),
            ("revision", json!(self.revision)),
            ("inference_mode", json!(true)),
            ("peft_version", json!(self.peft_version)),
        ];
        out.extend(common.into_iter().map(|(k, v)| (k.to_string(), v)));
        match &self.method {
            PeftMethod::Miss {
                init,
                mini_r,
                dropout,
            } => {
                let init = match init {
                    MissInit::Standard => json!(true),
                    MissInit::Random => json!(false),
                    MissInit::Bat => json!("bat"),
                    MissInit::BatRwkv => json!("bat_rwkv"),
                    MissInit::Mini => json!("mini"),
                };
                out.insert("init_weights".into(), init);
                out.insert("mini_r".into(), json!(mini_r));
                out.insert("miss_dropout".into(), json!(dropout));
            }
            PeftMethod::Lora {
                alpha,
                dropout,
                use_rslora,
                init,
            } => {
                let init = match init {
                    LoraInit::Default => json!(true),
                    LoraInit::Random => json!(false),
                    LoraInit::Gaussian => json!("gaussian"),
                };
                // PEFT writes lora_alpha as a number; keep integers integral.
                let alpha = if alpha.fract() == 0.0 && alpha.abs() < 1e15 {
                    json!(*alpha as i64)
                } else {
                    json!(alpha)
                };
                out.insert("lora_alpha".into(), alpha);
                out.insert("lora_dropout".into(), json!(dropout));
                out.insert("use_rslora".into(), json!(use_rslora));
                out.insert("init_lora_weights".into(), init);
                for (key, noop) in lora_noop_defaults() {
                    out.entry(key.to_string()).or_insert(noop);
                }
            }
        }
        Value::Object(out.into_iter().collect::<Map<String, Value>>())
    }

    /// [`to_json`](Self::to_json) rendered like PEFT's `save_pretrained`: sorted keys, two-space indent.
    pub fn to_json_string(&self) -> String {
        // Serializing through a BTreeMap keeps keys sorted whatever serde_json features are enabled.
        let Value::Object(map) = self.to_json() else {
            unreachable!("to_json returns an object")
        };
        let sorted: BTreeMap<String, Value> = map.into_iter().collect();
        serde_json::to_string_pretty(&sorted).expect("JSON values serialize")
    }

    /// The equivalent config with legacy Bone normalized to MiSS and `inference_mode` as saved;
    /// two configs that describe the same adapter compare equal after this.
    pub fn normalized(&self) -> Self {
        let mut config = self.clone();
        if config.peft_type == PeftType::Bone {
            config.peft_type = PeftType::Miss;
        }
        config.inference_mode = true;
        config
    }
}

fn is_empty_json(v: &Value) -> bool {
    match v {
        Value::Null => true,
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    }
}

fn take_rank(obj: &mut Map<String, Value>, default: usize) -> Result<usize> {
    match obj.remove("r") {
        None => Ok(default),
        Some(v) => match v.as_i64() {
            Some(r) if r >= 1 => Ok(r as usize),
            Some(r) => Err(DishaError::config("r", format!("must be >= 1, got {r}"))),
            None => Err(DishaError::config(
                "r",
                format!("expected a positive integer, got {}", excerpt(&v)),
            )),
        },
    }
}

fn take_usize(obj: &mut Map<String, Value>, key: &str, default: usize) -> Result<usize> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(default),
        Some(v) => v.as_u64().map(|n| n as usize).ok_or_else(|| {
            DishaError::config(
                key,
                format!("expected a non-negative integer, got {}", excerpt(&v)),
            )
        }),
    }
}

fn take_prob(obj: &mut Map<String, Value>, key: &str) -> Result<f64> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(0.0),
        Some(v) => v
            .as_f64()
            .filter(|p| (0.0..1.0).contains(p))
            .ok_or_else(|| {
                DishaError::config(
                    key,
                    format!("expected a number in [0, 1), got {}", excerpt(&v)),
                )
            }),
    }
}

fn take_bool(obj: &mut Map<String, Value>, key: &str, default: bool) -> Result<bool> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(default),
        Some(Value::Bool(b)) => Ok(b),
        Some(v) => Err(DishaError::config(
            key,
            format!("expected true or false, got {}", excerpt(&v)),
        )),
    }
}

fn take_opt_string(obj: &mut Map<String, Value>, key: &str) -> Result<Option<String>> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) => Ok(Some(s)),
        Some(v) => Err(DishaError::config(
            key,
            format!("expected a string, got {}", excerpt(&v)),
        )),
    }
}

fn take_targets(
    obj: &mut Map<String, Value>,
    key: &str,
    allow_all_linear: bool,
) -> Result<Option<TargetModules>> {
    match obj.remove(key) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::String(s)) if allow_all_linear && s.eq_ignore_ascii_case("all-linear") => {
            Ok(Some(TargetModules::AllLinear))
        }
        Some(Value::String(s)) => Ok(Some(TargetModules::Regex(s))),
        Some(Value::Array(items)) => {
            let mut names = items
                .iter()
                .map(|v| {
                    v.as_str().map(str::to_string).ok_or_else(|| {
                        DishaError::config(
                            key,
                            format!("expected module names, got {}", excerpt(v)),
                        )
                    })
                })
                .collect::<Result<Vec<_>>>()?;
            // PEFT stores a set; the order is arbitrary, so sort for stable comparisons.
            names.sort();
            names.dedup();
            Ok(Some(TargetModules::Names(names)))
        }
        Some(v) => Err(DishaError::config(
            key,
            format!(
                "expected a list of names or a regex string, got {}",
                excerpt(&v)
            ),
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_peft_type_is_an_error() {
        let e = PeftConfig::from_json_str(r#"{"r": 8}"#).unwrap_err();
        assert!(e.to_string().contains("peft_type"), "{e}");
    }

    #[test]
    fn defaults_follow_peft() {
        let c = PeftConfig::from_json_str(r#"{"peft_type": "MISS"}"#).unwrap();
        assert_eq!(c.r, 64);
        assert_eq!(
            c.method,
            PeftMethod::Miss {
                init: MissInit::Standard,
                mini_r: 1,
                dropout: 0.0
            }
        );
        let c = PeftConfig::from_json_str(r#"{"peft_type": "LORA"}"#).unwrap();
        assert_eq!(c.r, 8);
        assert_eq!(c.spec().scale(), 1.0);
    }

    #[test]
    fn rejects_what_would_silently_change_the_function() {
        for (json, field) in [
            (r#"{"peft_type":"MISS","r":-2}"#, "r"),
            (r#"{"peft_type":"MISS","r":0}"#, "r"),
            (
                r#"{"peft_type":"MISS","init_weights":"pissa"}"#,
                "init_weights",
            ),
            (
                r#"{"peft_type":"BONE","init_weights":"mini"}"#,
                "init_weights",
            ),
            (r#"{"peft_type":"MISS","miss_dropout":1.5}"#, "miss_dropout"),
            (r#"{"peft_type":"LORA","use_dora":true}"#, "use_dora"),
            (
                r#"{"peft_type":"LORA","rank_pattern":{"q":4}}"#,
                "rank_pattern",
            ),
            (
                r#"{"peft_type":"LORA","init_lora_weights":"pissa"}"#,
                "init_lora_weights",
            ),
            (r#"{"peft_type":"MISS","bias":"all"}"#, "bias"),
            (
                r#"{"peft_type":"MISS","modules_to_save":["lm_head"]}"#,
                "modules_to_save",
            ),
            (
                r#"{"peft_type":"MISS","target_modules":".*q","layers_to_transform":[0]}"#,
                "layers_to_transform",
            ),
            (
                r#"{"peft_type":"MISS","target_modules":["q"],"layers_pattern":"layers"}"#,
                "layers_pattern",
            ),
            (r#"{"peft_type":"IA3"}"#, "peft_type"),
        ] {
            let e = PeftConfig::from_json_str(json).unwrap_err();
            assert!(
                e.to_string().contains(&format!("field `{field}`")),
                "{json}: {e}"
            );
        }
    }

    #[test]
    fn unknown_keys_are_kept_and_written_back() {
        let c = PeftConfig::from_json_str(
            r#"{"peft_type":"MISS","r":4,"target_modules":["q_proj"],"future_knob":{"a":1}}"#,
        )
        .unwrap();
        assert_eq!(c.extra.get("future_knob"), Some(&json!({"a": 1})));
        let text = c.to_json_string();
        assert!(text.contains("\"future_knob\""), "{text}");
        assert_eq!(PeftConfig::from_json_str(&text).unwrap(), c.normalized());
    }

    #[test]
    fn written_keys_are_sorted_with_two_space_indent() {
        let text = PeftConfig::lora(8, 16.0, TargetModules::AllLinear).to_json_string();
        let keys: Vec<&str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("  \""))
            .filter_map(|l| l.split('"').next())
            .collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
        assert!(text.contains("\"lora_alpha\": 16,"), "{text}");
        assert!(
            text.contains("\"target_modules\": \"all-linear\""),
            "{text}"
        );
    }

    #[test]
    fn legacy_bone_reads_as_miss_and_writes_as_miss() {
        let c = PeftConfig::from_json_str(r#"{"peft_type":"BONE","r":8,"init_weights":"bat"}"#)
            .unwrap();
        assert_eq!(c.peft_type, PeftType::Bone);
        assert_eq!(c.spec(), AdapterSpec::bat(8, BatOrientation::Peft));
        assert!(c.to_json_string().contains("\"peft_type\": \"MISS\""));
    }

    #[test]
    fn spec_round_trips_through_config() {
        for spec in [
            AdapterSpec::bone(8),
            AdapterSpec::bone(8).with_init(AdapterInit::Random),
            AdapterSpec::bat(4, BatOrientation::Peft),
            AdapterSpec::bat(4, BatOrientation::RwkvPeft),
            AdapterSpec::mini(8, 4).with_dropout(0.1),
            AdapterSpec::lora(8, 16.0).with_rslora(true),
            AdapterSpec::lora(8, 16.0).with_init(AdapterInit::Gaussian),
        ] {
            let config = PeftConfig::from_spec(&spec, TargetModules::AllLinear);
            let back = PeftConfig::from_json_str(&config.to_json_string()).unwrap();
            assert_eq!(back.spec(), spec);
        }
    }
}
