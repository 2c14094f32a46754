//! `disha plot`: the loss curves of `disha train` runs, one chart.

use std::path::Path;

use disha_train::learner::StepMetrics;
use disha_train::plot::{Series, loss_chart};
use disha_train::settings::RunSettings;

use crate::cli::PlotArgs;
use crate::error::{CliError, CliResult};

/// `(step, loss)` of every line of `run/metrics.jsonl`, with a line-numbered error for a
/// malformed one.
pub fn read_losses(run: &Path) -> CliResult<Vec<(usize, f64)>> {
    let path = run.join("metrics.jsonl");
    let text = disha_core::limits::read_text_file(&path)?;
    text.lines()
        .enumerate()
        .filter(|(_, line)| !line.trim().is_empty())
        .map(|(i, line)| {
            serde_json::from_str::<StepMetrics>(line)
                .map(|m| (m.step, m.loss))
                .map_err(|e| CliError::File {
                    path: path.clone(),
                    message: format!("line {}: {e}", i + 1),
                })
        })
        .collect()
}

/// "Bone r16", from the run's `run.json`; the directory name where there is none.
fn label(run: &Path) -> String {
    disha_core::limits::read_config_file(&run.join("run.json"))
        .ok()
        .and_then(|text| serde_json::from_str::<RunSettings>(&text).ok())
        .map(|s| format!("{} r{}", s.method.name(), s.r))
        .unwrap_or_else(|| run.display().to_string())
}

pub fn run(args: PlotArgs) -> CliResult {
    let series = args
        .runs
        .iter()
        .map(|run| {
            Ok(Series::smoothed(
                label(run),
                &read_losses(run)?,
                args.smooth,
            ))
        })
        .collect::<CliResult<Vec<_>>>()?;
    loss_chart(&args.out, &args.title, &series)?;
    println!("{}", args.out.display());
    Ok(())
}
