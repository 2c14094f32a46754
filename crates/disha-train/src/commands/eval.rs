//! `disha eval`: loss / perplexity on a dataset, and GSM8K-style exact match by greedy
//! generation, with a per-example JSONL of outputs.

use std::fmt::Write as _;
use std::io::Write as _;
use std::ops::ControlFlow;

use disha_models::{GenerationConfig, generate};
use disha_train::data::{encode_all, read_jsonl, render_prompt};
use disha_train::evaluate::{extract_answer, mean_loss};
use disha_train::settings::TrainSettings;
use indicatif::{ProgressBar, ProgressStyle};

use super::{load_model_args, print_stdout, tokenizer_arg};
use crate::cli::{EvalArgs, EvalMetric};
use crate::error::{CliError, CliResult};

pub fn run(args: EvalArgs) -> CliResult {
    // Reuse the training settings' field / template resolution.
    let settings = TrainSettings {
        data: Some(args.data.clone()),
        out: Some(".".into()),
        fields: args.fields.clone(),
        template: args.template,
        max_len: Some(args.max_len),
        skip_bad_lines: Some(args.skip_bad_lines),
        ..Default::default()
    }
    .resolve()?;
    let (mut records, skipped) = read_jsonl(
        &settings.data,
        &settings.field_map(),
        settings.skip_bad_lines,
    )?;
    if let Some(limit) = args.limit {
        records.truncate(limit);
    }
    let (loaded, _, _) = load_model_args(&args.model)?;
    let tokenizer = tokenizer_arg(args.tokenizer.as_deref(), &loaded)?;
    let model = &loaded.model;
    let mut report = String::new();
    let _ = writeln!(
        report,
        "data: {} records from {} ({} malformed lines skipped)",
        records.len(),
        settings.data.display(),
        skipped
    );

    if matches!(args.metric, EvalMetric::Loss | EvalMetric::All) {
        let pad = tokenizer.eos_id().unwrap_or(0);
        let (examples, dropped) = encode_all(
            &settings.data,
            &records,
            settings.prompt_template(),
            &tokenizer,
            settings.max_len,
        )?;
        let loss = mean_loss(model, &examples, args.batch_size, pad);
        let _ = writeln!(
            report,
            "loss {loss:.4}  perplexity {:.3}  ({} examples, {} too long)",
            loss.exp(),
            examples.len(),
            dropped
        );
    }

    if matches!(args.metric, EvalMetric::ExactMatch | EvalMetric::All) {
        let mut stop_tokens = loaded.config().eos_token_ids.clone();
        stop_tokens.extend(tokenizer.eos_id());
        stop_tokens.extend(
            ["<|im_end|>", "<|eot_id|>", "<|end_of_text|>"]
                .iter()
                .filter_map(|t| tokenizer.token_to_id(t)),
        );
        let config = GenerationConfig {
            max_new_tokens: args.max_new_tokens,
            stop_tokens: stop_tokens.clone(),
            ..Default::default()
        };
        let mut out = match &args.out {
            Some(path) => Some(std::fs::File::create(path).map_err(|e| CliError::File {
                path: path.clone(),
                message: e.to_string(),
            })?),
            None => None,
        };
        let bar = ProgressBar::new(records.len() as u64);
        bar.set_style(
            ProgressStyle::with_template(
                "{bar:30} {pos}/{len} [{elapsed_precise}<{eta_precise}] {msg}",
            )
            .expect("valid template"),
        );
        let mut correct = 0;
        for (i, record) in records.iter().enumerate() {
            let prompt = render_prompt(record, settings.prompt_template(), &tokenizer)?;
            let ids = tokenizer.encode(
                &prompt,
                settings.prompt_template() != disha_train::data::PromptTemplate::Chat,
            )?;
            let new = generate(model, &ids, &config, &mut |_| ControlFlow::Continue(()))?;
            let text_ids: Vec<u32> = new
                .into_iter()
                .filter(|t| !stop_tokens.contains(t))
                .collect();
            let generated = tokenizer.decode(&text_ids, true)?;
            let predicted = extract_answer(&generated);
            let reference = extract_answer(&record.output);
            let ok = predicted.is_some() && predicted == reference;
            correct += usize::from(ok);
            if let Some(file) = out.as_mut() {
                let line = serde_json::json!({
                    "line": record.line, "prompt": prompt, "generated": generated,
                    "predicted": predicted, "reference": reference, "correct": ok,
                });
                writeln!(file, "{line}").map_err(|e| CliError::File {
                    path: args.out.clone().expect("file open"),
                    message: e.to_string(),
                })?;
            }
            bar.inc(1);
            bar.set_message(format!("exact match {correct}/{}", i + 1));
        }
        bar.finish();
        let n = records.len().max(1);
        let _ = writeln!(
            report,
            "exact match {correct}/{} = {:.4}",
            records.len(),
            correct as f64 / n as f64
        );
        if let Some(path) = &args.out {
            let _ = writeln!(report, "outputs {}", path.display());
        }
    }
    print_stdout(&report);
    Ok(())
}
