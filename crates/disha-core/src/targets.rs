//! [`TargetMatcher`]: PEFT's module-selection rules (`target_modules`, `exclude_modules`,
//! `layers_to_transform`, `layers_pattern`), applied to HF module names.

use regex::Regex;

use crate::error::{DishaError, Result};
use crate::peft_config::{PeftConfig, TargetModules};

/// Whether a linear layer is the model's output head (excluded by `"all-linear"`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LinearRole {
    /// Any linear layer inside the network.
    Hidden,
    /// The output head (`lm_head`), which `"all-linear"` never targets.
    OutputHead,
}

#[derive(Debug, Clone)]
enum Rule {
    Names(Vec<String>),
    Regex(Regex),
    AllLinear,
}

impl Rule {
    fn compile(targets: &TargetModules, field: &str) -> Result<Self> {
        Ok(match targets {
            TargetModules::Names(names) => Rule::Names(names.clone()),
            TargetModules::Regex(pattern) => Rule::Regex(full_match(pattern, field)?),
            TargetModules::AllLinear => Rule::AllLinear,
        })
    }
}

/// Longest regular expression a config may hold: PEFT's target patterns are a few dozen
/// bytes; compiling megabytes of pattern costs hundreds of megabytes of memory.
const MAX_PATTERN_BYTES: usize = 4096;

/// Compiles `regex`, built from the config's `pattern` in `field`, within
/// [`MAX_PATTERN_BYTES`] and the regex engine's default size limits.
fn compile(regex: &str, pattern: &str, field: &str) -> Result<Regex> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(DishaError::config(
            field,
            format!(
                "the pattern {} is {} bytes; patterns are at most {MAX_PATTERN_BYTES}",
                crate::limits::excerpt(pattern),
                pattern.len()
            ),
        ));
    }
    Regex::new(regex).map_err(|source| DishaError::Regex {
        field: field.to_string(),
        pattern: pattern.to_string(),
        source,
    })
}

/// PEFT's `re.fullmatch(pattern, key)`: the pattern anchored at both ends.
fn full_match(pattern: &str, field: &str) -> Result<Regex> {
    compile(&format!("^(?:{pattern})$"), pattern, field)
}

/// `key == name` or `key` ends with `"." + name`.
fn is_name_or_suffix(key: &str, names: &[String]) -> bool {
    names.iter().any(|name| {
        key == name
            || key
                .strip_suffix(name.as_str())
                .is_some_and(|rest| rest.ends_with('.'))
    })
}

/// Decides which modules an adapter config targets, with HF PEFT's exact rules
/// (`peft.tuners.tuners_utils.check_target_module_exists`):
///
/// 1. `exclude_modules` first: a string is a full-match regex; a list matches exact names or
///    dotted suffixes.
/// 2. `target_modules` as a string is a full-match regex; `"all-linear"` is every linear except the
///    output head; a list matches an exact name outright, or a dotted suffix subject to the layer
///    filter.
/// 3. The layer filter (`layers_to_transform`) reads the layer index with `.*\.[^.]*\.(\d+)\.`, or
///    `.*\.{pattern}\.(\d+)\.` for each `layers_pattern`, matched from the start of the name.
#[derive(Debug, Clone)]
pub struct TargetMatcher {
    target: Rule,
    exclude: Option<Rule>,
    layers: Option<Vec<usize>>,
    layer_index_patterns: Vec<Regex>,
}

impl TargetMatcher {
    /// Compiles the matcher of `config`; `default_targets` stands in for a null `target_modules`
    /// (PEFT's per-architecture default, e.g. `q_proj`, `v_proj` for Llama).
    ///
    /// # Errors
    /// A regex that does not compile, or a null `target_modules` without a model default.
    pub fn new(config: &PeftConfig, default_targets: Option<Vec<String>>) -> Result<Self> {
        config.validate()?;
        let target = match (&config.target_modules, default_targets) {
            (Some(t), _) => Rule::compile(t, "target_modules")?,
            (None, Some(names)) => Rule::Names(names),
            (None, None) => {
                return Err(DishaError::config(
                    "target_modules",
                    "is null and this model has no default target modules; list them",
                ));
            }
        };
        let exclude = config
            .exclude_modules
            .as_ref()
            .map(|e| Rule::compile(e, "exclude_modules"))
            .transpose()?;
        let layer_index_patterns = match &config.layers_pattern {
            None => vec![Regex::new(r"^.*\.[^.]*\.(\d+)\.").expect("valid regex")],
            Some(patterns) => patterns
                .iter()
                .map(|p| compile(&format!(r"^.*\.{p}\.(\d+)\."), p, "layers_pattern"))
                .collect::<Result<_>>()?,
        };
        Ok(Self {
            target,
            exclude,
            layers: config.layers_to_transform.clone(),
            layer_index_patterns,
        })
    }

    fn layer_index(&self, key: &str) -> Option<usize> {
        self.layer_index_patterns
            .iter()
            .find_map(|re| re.captures(key))
            .and_then(|c| c[1].parse().ok())
    }

    fn passes_layer_filter(&self, key: &str) -> bool {
        match &self.layers {
            None => true,
            Some(layers) if layers.is_empty() => true,
            Some(layers) => self.layer_index(key).is_some_and(|i| layers.contains(&i)),
        }
    }

    /// `true` when the module `key` (an HF module name such as
    /// `model.layers.0.self_attn.q_proj`) gets an adapter.
    pub fn matches(&self, key: &str, role: LinearRole) -> bool {
        let excluded = match &self.exclude {
            Some(Rule::Regex(re)) => re.is_match(key),
            Some(Rule::Names(names)) => is_name_or_suffix(key, names),
            Some(Rule::AllLinear) | None => false,
        };
        if excluded {
            return false;
        }
        match &self.target {
            Rule::Regex(re) => re.is_match(key),
            Rule::AllLinear => role == LinearRole::Hidden && self.passes_layer_filter(key),
            Rule::Names(names) if names.iter().any(|n| n == key) => true,
            Rule::Names(names) => is_name_or_suffix(key, names) && self.passes_layer_filter(key),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peft_config::PeftConfig;

    fn config(json: &str) -> PeftConfig {
        PeftConfig::from_json_str(json).unwrap()
    }

    const KEYS: [&str; 4] = [
        "model.layers.0.self_attn.q_proj",
        "model.layers.1.self_attn.q_proj",
        "model.layers.1.mlp.down_proj",
        "lm_head",
    ];

    fn matched(json: &str) -> Vec<&'static str> {
        let m = TargetMatcher::new(&config(json), None).unwrap();
        KEYS.into_iter()
            .filter(|k| {
                let role = if *k == "lm_head" {
                    LinearRole::OutputHead
                } else {
                    LinearRole::Hidden
                };
                m.matches(k, role)
            })
            .collect()
    }

    #[test]
    fn list_matches_exact_names_and_dotted_suffixes_only() {
        assert_eq!(
            matched(r#"{"peft_type":"MISS","target_modules":["q_proj"]}"#),
            &KEYS[..2]
        );
        // "proj" is not a dotted suffix of "q_proj".
        assert!(matched(r#"{"peft_type":"MISS","target_modules":["proj"]}"#).is_empty());
        assert_eq!(
            matched(r#"{"peft_type":"MISS","target_modules":["self_attn.q_proj"]}"#),
            &KEYS[..2]
        );
    }

    #[test]
    fn string_is_a_full_match_regex() {
        assert_eq!(
            matched(r#"{"peft_type":"MISS","target_modules":".*\\.1\\..*"}"#),
            &KEYS[1..3]
        );
        // Not anchored by the user, but PEFT uses fullmatch: "q_proj" alone matches nothing.
        assert!(matched(r#"{"peft_type":"MISS","target_modules":"q_proj"}"#).is_empty());
    }

    #[test]
    fn all_linear_skips_the_output_head() {
        assert_eq!(
            matched(r#"{"peft_type":"MISS","target_modules":"all-linear"}"#),
            &KEYS[..3]
        );
    }

    #[test]
    fn exclude_and_layer_filters() {
        assert_eq!(
            matched(
                r#"{"peft_type":"MISS","target_modules":"all-linear","exclude_modules":["down_proj"]}"#
            ),
            &KEYS[..2]
        );
        assert_eq!(
            matched(
                r#"{"peft_type":"MISS","target_modules":["q_proj","down_proj"],"layers_to_transform":[1]}"#
            ),
            &KEYS[1..3]
        );
        assert_eq!(
            matched(
                r#"{"peft_type":"MISS","target_modules":["q_proj"],"layers_to_transform":0,"layers_pattern":"layers"}"#
            ),
            &KEYS[..1]
        );
        // An exact name bypasses the layer filter, as in PEFT.
        assert_eq!(
            matched(
                r#"{"peft_type":"MISS","target_modules":["model.layers.1.self_attn.q_proj"],"layers_to_transform":[0]}"#
            ),
            &KEYS[1..2]
        );
        // A layers_pattern that does not occur excludes everything.
        assert!(matched(
            r#"{"peft_type":"MISS","target_modules":["q_proj"],"layers_to_transform":[0],"layers_pattern":["h"]}"#
        )
        .is_empty());
    }

    #[test]
    fn bad_regex_names_the_field() {
        let e = TargetMatcher::new(
            &config(r#"{"peft_type":"MISS","target_modules":"(unclosed"}"#),
            None,
        )
        .unwrap_err();
        assert!(e.to_string().contains("target_modules"), "{e}");
        let e = TargetMatcher::new(&config(r#"{"peft_type":"MISS"}"#), None).unwrap_err();
        assert!(e.to_string().contains("no default target modules"), "{e}");
    }
}
