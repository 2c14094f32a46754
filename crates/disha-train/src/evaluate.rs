//! Evaluation helpers: GSM8K-style answer extraction and comparison.
//!
//! The reference answer of a GSM8K record follows `#### `; a generation's answer is the number
//! after its first `#### ` if it has one, else the last number in the text (how `lm-eval`'s
//! flexible GSM8K filter scores). [`mean_loss`] is the loss / perplexity metric. Numbers compare after removing thousands separators, a
//! leading `+`, a trailing `.` and trailing zeros after a decimal point (`1,000.50` = `1000.5`).

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use disha_models::{
    CausalLm, GenerationConfig, ModelError, TextTokenizer, causal_lm_loss_sum, generate,
};
use serde::{Deserialize, Serialize};

use crate::TrainError;
use crate::data::{Example, PromptTemplate, Record, collate, render_prompt};
use crate::learner::check_batch;

/// Mean cross-entropy over the target tokens of `examples` (prompt masked, as in training),
/// in batches of `batch_size`, without gradients.
///
/// # Errors
/// An id or label outside the model's vocabulary (checked per batch before the forward).
pub fn mean_loss(
    model: &CausalLm,
    examples: &[Example],
    batch_size: usize,
    pad: u32,
) -> Result<f64, TrainError> {
    let device = model.device();
    let mut total = 0.0;
    let mut targets = 0;
    for chunk in examples.chunks(batch_size.max(1)) {
        let refs: Vec<&Example> = chunk.iter().collect();
        let batch = collate(&refs, pad);
        check_batch(model, &batch)?;
        let ids =
            Tensor::<2, Int>::from_data(TensorData::new(batch.input_ids, batch.shape), &device);
        let labels =
            Tensor::<2, Int>::from_data(TensorData::new(batch.labels, batch.shape), &device);
        total += causal_lm_loss_sum(model.forward(ids), labels).into_scalar::<f64>();
        targets += batch.targets;
    }
    Ok(total / targets.max(1) as f64)
}

/// One exact-match outcome (also a line of `disha eval --out`).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExactMatch {
    /// The record's line in its file (0 for generated records).
    pub line: usize,
    /// The rendered prompt.
    pub prompt: String,
    /// The generated text, stop tokens removed.
    pub generated: String,
    /// The answer extracted from the generation.
    pub predicted: Option<String>,
    /// The answer extracted from the record's response.
    pub reference: Option<String>,
    /// Both answers exist and are equal.
    pub correct: bool,
}

/// Greedily generates a response to `record` (at most `max_new_tokens`, ending at any of
/// `stop`) and compares its [`extract_answer`] with the reference's.
///
/// # Errors
/// Prompt rendering, tokenizer or generation failures.
pub fn exact_match(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    record: &Record,
    template: PromptTemplate,
    max_new_tokens: usize,
    stop: &[u32],
) -> Result<ExactMatch, ModelError> {
    let prompt = render_prompt(record, template, tokenizer)?;
    let ids = tokenizer.encode(&prompt, template != PromptTemplate::Chat)?;
    let config = GenerationConfig {
        max_new_tokens,
        stop_tokens: stop.to_vec(),
        ..Default::default()
    };
    let new = generate(model, &ids, &config, &mut |_| ControlFlow::Continue(()))?;
    let text_ids: Vec<u32> = new.into_iter().filter(|t| !stop.contains(t)).collect();
    let generated = tokenizer.decode(&text_ids, true)?;
    let predicted = extract_answer(&generated);
    let reference = extract_answer(&record.output);
    Ok(ExactMatch {
        line: record.line,
        prompt,
        correct: predicted.is_some() && predicted == reference,
        generated,
        predicted,
        reference,
    })
}

/// The answer of `text`: the number after `####`, else the last number.
pub fn extract_answer(text: &str) -> Option<String> {
    if let Some(rest) = text.split("####").nth(1)
        && let Some(n) = numbers(rest).into_iter().next()
    {
        return Some(n);
    }
    numbers(text).pop()
}

/// Every number in `text` (optional sign, digits with `,` separators, optional decimals),
/// normalized.
fn numbers(text: &str) -> Vec<String> {
    let chars: Vec<char> = text.chars().collect();
    let mut out = Vec::new();
    let mut i = 0;
    while i < chars.len() {
        let negative = chars[i] == '-' && chars.get(i + 1).is_some_and(char::is_ascii_digit);
        if chars[i].is_ascii_digit() || negative {
            let start = i;
            i += 1;
            while i < chars.len()
                && (chars[i].is_ascii_digit()
                    || ((chars[i] == ',' || chars[i] == '.')
                        && chars.get(i + 1).is_some_and(char::is_ascii_digit)))
            {
                i += 1;
            }
            out.push(normalize_number(
                &chars[start..i].iter().collect::<String>(),
            ));
        } else {
            i += 1;
        }
    }
    out
}

/// Canonical form of a number string (`1,000.50` → `1000.5`, `7.0` → `7`).
pub fn normalize_number(n: &str) -> String {
    let mut s: String = n.trim().trim_start_matches('+').replace(',', "");
    if s.contains('.') {
        s = s.trim_end_matches('0').trim_end_matches('.').to_string();
    }
    if s.is_empty() || s == "-" {
        "0".into()
    } else {
        s
    }
}

/// [`exact_match`] on every record; each outcome is appended to `out` (one JSON object per
/// line) as soon as it is known, so an interrupted evaluation keeps what it did, and
/// `progress(correct, done)` is called after each.
///
/// # Errors
/// Generation errors; I/O errors on `out`, naming it.
#[allow(clippy::too_many_arguments)]
pub fn exact_match_all(
    model: &CausalLm,
    tokenizer: &TextTokenizer,
    records: &[Record],
    template: PromptTemplate,
    max_new_tokens: usize,
    stop: &[u32],
    out: Option<&Path>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<Vec<ExactMatch>, TrainError> {
    use std::io::Write;
    let mut file = match out {
        Some(path) => Some((
            std::fs::File::create(path).map_err(|e| TrainError::io(path, e))?,
            path,
        )),
        None => None,
    };
    let mut outcomes = Vec::with_capacity(records.len());
    let mut correct = 0;
    for record in records {
        let outcome = exact_match(model, tokenizer, record, template, max_new_tokens, stop)?;
        correct += usize::from(outcome.correct);
        if let Some((file, path)) = file.as_mut() {
            let line = serde_json::to_string(&outcome).expect("outcomes serialize");
            writeln!(file, "{line}").map_err(|e| TrainError::io(*path, e))?;
        }
        outcomes.push(outcome);
        progress(correct, outcomes.len());
    }
    Ok(outcomes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_come_from_the_marker_or_the_last_number() {
        assert_eq!(
            extract_answer("She has 3 + 4 = <<3+4=7>>7 apples.\n#### 7").as_deref(),
            Some("7")
        );
        assert_eq!(extract_answer("2 + 3 = 5").as_deref(), Some("5"));
        assert_eq!(
            extract_answer("#### 1,234.50 dollars").as_deref(),
            Some("1234.5")
        );
        assert_eq!(
            extract_answer("it dropped to -12 degrees").as_deref(),
            Some("-12")
        );
        assert_eq!(extract_answer("no number here"), None);
        assert_eq!(normalize_number("7.0"), "7");
        assert_eq!(normalize_number("+1,000"), "1000");
        // A sentence-ending period is not a decimal point.
        assert_eq!(extract_answer("The answer is 42.").as_deref(), Some("42"));
    }
}
