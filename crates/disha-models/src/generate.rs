//! Autoregressive generation with the model's decoding state (a KV cache for attention
//! models): greedy, temperature, top-k and top-p sampling (seeded), stop tokens and a
//! streaming callback.

use std::ops::ControlFlow;

use burn::tensor::{Int, Tensor, TensorData};

use crate::causal_lm::CausalLm;
use crate::error::{ModelError, Result};
use crate::rng::SplitMix64;
use crate::tokenizer::TextTokenizer;

/// End-of-turn / end-of-text markers of the common chat templates (ChatML, Llama 3, Llama 2).
pub const END_OF_TURN_TOKENS: [&str; 4] = ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "</s>"];

/// The ids that end a generated answer — one rule for `disha generate`, `disha eval` and the
/// trainer's samples: the model configuration's EOS ids, the tokenizer's EOS, and those of
/// [`END_OF_TURN_TOKENS`] the tokenizer knows, each once, in that order.
pub fn stop_tokens(model: &CausalLm, tokenizer: &TextTokenizer) -> Vec<u32> {
    let mut stop: Vec<u32> = Vec::new();
    let candidates = model
        .eos_token_ids()
        .iter()
        .copied()
        .chain(tokenizer.eos_id())
        .chain(
            END_OF_TURN_TOKENS
                .iter()
                .filter_map(|t| tokenizer.token_to_id(t)),
        );
    for id in candidates {
        if !stop.contains(&id) {
            stop.push(id);
        }
    }
    stop
}

/// How to pick each next token.
#[derive(Clone, Debug, PartialEq)]
pub struct GenerationConfig {
    /// Tokens to generate at most.
    pub max_new_tokens: usize,
    /// Softmax temperature; `0` means greedy (argmax, first index on ties, like `torch.argmax`).
    pub temperature: f32,
    /// Keep only the `k` most likely tokens (`None` or 0: all).
    pub top_k: Option<usize>,
    /// Keep the smallest set of tokens whose probability mass reaches `p` (`None` or 1: all).
    pub top_p: Option<f32>,
    /// Sampling seed (the same seed gives the same text on every backend, up to ties).
    pub seed: u64,
    /// Generation stops after emitting any of these (it is included in the output).
    pub stop_tokens: Vec<u32>,
}

impl Default for GenerationConfig {
    fn default() -> Self {
        Self {
            max_new_tokens: 128,
            temperature: 0.0,
            top_k: None,
            top_p: None,
            seed: 0,
            stop_tokens: Vec::new(),
        }
    }
}

impl GenerationConfig {
    /// Checks the ranges.
    ///
    /// # Errors
    /// Negative or non-finite temperature, `top_p` outside `(0, 1]`.
    pub fn validate(&self) -> Result<()> {
        if !self.temperature.is_finite() || self.temperature < 0.0 {
            return Err(ModelError::invalid(
                "temperature",
                self.temperature,
                "must be finite and >= 0 (0 = greedy)",
            ));
        }
        if let Some(p) = self.top_p
            && !(p > 0.0 && p <= 1.0)
        {
            return Err(ModelError::invalid("top_p", p, "must be in (0, 1]"));
        }
        Ok(())
    }
}

/// Picks the next token from one row of logits.
fn sample(logits: &[f32], config: &GenerationConfig, rng: &mut SplitMix64) -> u32 {
    let argmax = || {
        let mut best = 0;
        for (i, &v) in logits.iter().enumerate() {
            if v > logits[best] {
                best = i;
            }
        }
        best as u32
    };
    if config.temperature == 0.0 {
        return argmax();
    }
    let mut order: Vec<usize> = (0..logits.len()).collect();
    order.sort_by(|&a, &b| logits[b].total_cmp(&logits[a]).then(a.cmp(&b)));
    if let Some(k) = config.top_k.filter(|&k| k > 0) {
        order.truncate(k);
    }
    let max = logits[order[0]] as f64;
    let t = config.temperature as f64;
    let mut probs: Vec<f64> = order
        .iter()
        .map(|&i| ((logits[i] as f64 - max) / t).exp())
        .collect();
    let total: f64 = probs.iter().sum();
    probs.iter_mut().for_each(|p| *p /= total);
    if let Some(top_p) = config.top_p.filter(|&p| p < 1.0) {
        let mut mass = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                mass += p;
                mass >= top_p as f64
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
        order.truncate(keep);
        let total: f64 = probs.iter().sum();
        probs.iter_mut().for_each(|p| *p /= total);
    }
    let mut u = rng.uniform();
    for (p, &i) in probs.iter().zip(&order) {
        if u < *p {
            return i as u32;
        }
        u -= p;
    }
    *order.last().expect("at least one candidate") as u32
}

/// Continues `prompt` (ids) with up to `config.max_new_tokens` tokens, calling `on_token` with
/// each new id as soon as it is chosen (return `ControlFlow::Break(())` to stop early). Returns
/// the new ids (not the prompt).
///
/// # Errors
/// An empty prompt, an id outside the vocabulary, or an invalid config.
pub fn generate(
    model: &CausalLm,
    prompt: &[u32],
    config: &GenerationConfig,
    on_token: &mut dyn FnMut(u32) -> ControlFlow<()>,
) -> Result<Vec<u32>> {
    config.validate()?;
    if prompt.is_empty() {
        return Err(ModelError::invalid(
            "prompt",
            "[]",
            "needs at least one token (add BOS or some text)",
        ));
    }
    let ids: Vec<i64> = prompt.iter().map(|&t| t as i64).collect();
    model.check_ids(&ids)?;
    let device = model.device();
    let mut rng = SplitMix64::new(config.seed);
    let mut state = model.new_decode_state();
    let mut input = Tensor::<2, Int>::from_data(TensorData::new(ids, [1, prompt.len()]), &device);
    let mut out = Vec::new();
    for _ in 0..config.max_new_tokens {
        let logits = model
            .forward_last(input, &mut state)
            .into_data()
            .try_to_vec_as::<f32>()
            .expect("float logits");
        let next = sample(&logits, config, &mut rng);
        out.push(next);
        if on_token(next).is_break() || config.stop_tokens.contains(&next) {
            break;
        }
        input = Tensor::from_data(TensorData::new(vec![next as i64], [1, 1]), &device);
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_takes_the_first_maximum() {
        let c = GenerationConfig::default();
        let mut rng = SplitMix64::new(0);
        assert_eq!(sample(&[0.0, 3.0, 3.0, 1.0], &c, &mut rng), 1);
    }

    #[test]
    fn top_k_one_is_greedy_and_top_p_keeps_the_mass() {
        let logits = [0.0, 2.0, 1.0, -1.0];
        let mut rng = SplitMix64::new(3);
        let k1 = GenerationConfig {
            temperature: 1.0,
            top_k: Some(1),
            ..Default::default()
        };
        assert!((0..50).all(|_| sample(&logits, &k1, &mut rng) == 1));
        // p(1) = 0.64, p(2) = 0.23: top_p 0.8 keeps exactly tokens 1 and 2.
        let p = GenerationConfig {
            temperature: 1.0,
            top_p: Some(0.8),
            ..Default::default()
        };
        let draws: Vec<u32> = (0..2000).map(|_| sample(&logits, &p, &mut rng)).collect();
        assert!(draws.iter().all(|&t| t == 1 || t == 2));
        let ones = draws.iter().filter(|&&t| t == 1).count() as f64 / 2000.0;
        // Renormalized p(1) = 0.731; 2000 draws give a standard error of 0.01.
        assert!((ones - 0.731).abs() < 0.04, "{ones}");
    }

    #[test]
    fn same_seed_same_draws() {
        let logits: Vec<f32> = (0..50).map(|i| (i as f32 * 0.37).sin()).collect();
        let c = GenerationConfig {
            temperature: 0.8,
            top_p: Some(0.9),
            seed: 11,
            ..Default::default()
        };
        let run = || {
            let mut rng = SplitMix64::new(c.seed);
            (0..20)
                .map(|_| sample(&logits, &c, &mut rng))
                .collect::<Vec<_>>()
        };
        assert_eq!(run(), run());
    }

    #[test]
    fn bad_parameters_are_named() {
        let c = GenerationConfig {
            top_p: Some(1.5),
            ..Default::default()
        };
        assert!(c.validate().unwrap_err().to_string().contains("top_p"));
        let c = GenerationConfig {
            temperature: -1.0,
            ..Default::default()
        };
        assert!(
            c.validate()
                .unwrap_err()
                .to_string()
                .contains("temperature")
        );
    }
}
