//! `disha eval`: loss / perplexity on a dataset, and GSM8K-style exact match by greedy
//! generation, with a per-example JSONL of outputs.

use disha_models::stop_tokens;
use disha_train::evaluate::mean_loss;
use disha_train::settings::TrainSettings;
use std::fmt::Write as _;

use super::{exact_match_all, load_model_args, print_stdout, tokenizer_arg};
use crate::cli::{EvalArgs, EvalMetric};
use crate::error::CliResult;

pub fn run(args: EvalArgs) -> CliResult {
    // Reuse the training settings' field / template resolution.
    let settings = TrainSettings {
        data: Some(args.data.clone()),
        out: Some(".".into()),
        fields: args.fields.clone(),
        template: args.template,
        max_len: Some(args.max_len),
        skip_bad_lines: Some(args.skip_bad_lines),
        max_line_bytes: args.max_line_bytes,
        ..Default::default()
    }
    .resolve()?;
    let (mut records, skipped) = settings.read_records(&settings.data)?;
    if let Some(limit) = args.limit {
        records.truncate(limit);
    }
    let (loaded, _, _) = load_model_args(&args.model)?;
    let tokenizer = tokenizer_arg(args.tokenizer.as_deref(), &loaded)?;
    tokenizer.check_fits(loaded.model.vocab_size())?;
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
        let (examples, dropped) = settings.encode(&records, &tokenizer)?;
        let loss = mean_loss(model, &examples, args.batch_size, pad)?;
        let _ = writeln!(
            report,
            "loss {loss:.4}  perplexity {:.3}  ({} examples, {} too long)",
            loss.exp(),
            examples.len(),
            dropped
        );
    }

    if matches!(args.metric, EvalMetric::ExactMatch | EvalMetric::All) {
        let stop = stop_tokens(&loaded.model, &tokenizer);
        let outcomes = exact_match_all(
            model,
            &tokenizer,
            &records,
            settings.prompt_template(),
            args.max_new_tokens,
            &stop,
            args.out.as_deref(),
        )?;
        let correct = outcomes.iter().filter(|o| o.correct).count();
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
