//! `disha logits`: forward pass on given ids, summary, optional safetensors output.

use std::collections::HashMap;
use std::fmt::Write;
use std::path::Path;

use burn::tensor::{Int, Tensor, TensorData};
use safetensors::{Dtype, tensor::TensorView};

use super::{load_model_args, print_stdout};
use crate::cli::LogitsArgs;
use crate::error::{CliError, CliResult};

/// Reads the I64 (or I32) `input_ids` [batch, seq] tensor of a safetensors file.
fn read_input_ids(path: &Path) -> CliResult<(Vec<i64>, [usize; 2])> {
    let file = disha_core::SafetensorsFile::open(path)?;
    if !file.tensors().contains_key("input_ids") {
        return Err(CliError::File {
            path: path.to_path_buf(),
            message: "no `input_ids` tensor".into(),
        });
    }
    let (shape, ids) = file.read_i64("input_ids")?;
    let shape: [usize; 2] = shape.as_slice().try_into().map_err(|_| CliError::File {
        path: path.to_path_buf(),
        message: format!("`input_ids` has shape {shape:?}, expected [batch, seq]"),
    })?;
    Ok((ids, shape))
}

fn write_logits(
    path: &Path,
    logits: &[f32],
    shape: [usize; 3],
    ids: &[i64],
    ids_shape: [usize; 2],
) -> CliResult {
    let logits_bytes: Vec<u8> = logits.iter().flat_map(|v| v.to_le_bytes()).collect();
    let ids_bytes: Vec<u8> = ids.iter().flat_map(|v| v.to_le_bytes()).collect();
    let views = [
        (
            "logits",
            TensorView::new(Dtype::F32, shape.to_vec(), &logits_bytes),
        ),
        (
            "input_ids",
            TensorView::new(Dtype::I64, ids_shape.to_vec(), &ids_bytes),
        ),
    ]
    .into_iter()
    .map(|(k, v)| v.map(|v| (k.to_string(), v)))
    .collect::<Result<Vec<_>, _>>()
    .map_err(|e| CliError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    let metadata = HashMap::from([("format".to_string(), "pt".to_string())]);
    let bytes = safetensors::serialize(views, Some(metadata)).map_err(|e| CliError::File {
        path: path.to_path_buf(),
        message: e.to_string(),
    })?;
    disha_core::write_atomic(path, &bytes)?;
    Ok(())
}

pub fn run(args: LogitsArgs) -> CliResult {
    let mut report = String::new();
    let (ids, shape) = match &args.tokens_file {
        Some(path) => read_input_ids(path)?,
        None => {
            let n = args.tokens.len();
            (args.tokens.clone(), [1, n])
        }
    };
    if shape[0] == 0 || shape[1] == 0 {
        return Err(CliError::Usage("no token ids given".into()));
    }
    let (loaded, _, device) = load_model_args(&args.model)?;
    loaded
        .model
        .check_ids(&ids)
        .map_err(|e| match &args.tokens_file {
            Some(path) => CliError::File {
                path: path.clone(),
                message: e.to_string(),
            },
            None => e.into(),
        })?;
    let input = Tensor::<2, Int>::from_data(TensorData::new(ids.clone(), shape), &device);
    let logits = loaded.model.forward(input);
    let dims = logits.dims();
    let values = logits
        .into_data()
        .try_to_vec_as::<f32>()
        .map_err(|e| CliError::Usage(format!("logits are not float: {e:?}")))?;
    let n = values.len() as f64;
    let mean = values.iter().map(|&v| v as f64).sum::<f64>() / n;
    let std = (values
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum::<f64>()
        / n)
        .sqrt();
    let (min, max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(a, b), &v| {
            (a.min(v), b.max(v))
        });
    let _ = writeln!(
        report,
        "logits [{}, {}, {}]  mean {mean:.6}  std {std:.6}  min {min:.6}  max {max:.6}",
        dims[0], dims[1], dims[2]
    );
    let vocab = dims[2];
    for b in 0..dims[0] {
        let last = &values[(b * dims[1] + dims[1] - 1) * vocab..(b * dims[1] + dims[1]) * vocab];
        let mut order: Vec<usize> = (0..vocab).collect();
        order.sort_by(|&x, &y| last[y].total_cmp(&last[x]));
        let top: Vec<String> = order
            .iter()
            .take(5)
            .map(|&i| format!("{i} ({:.4})", last[i]))
            .collect();
        let _ = writeln!(
            report,
            "sequence {b}: last-position top-5 {}",
            top.join(", ")
        );
    }
    if let Some(out) = &args.out {
        write_logits(out, &values, dims, &ids, shape)?;
        let _ = writeln!(report, "wrote {}", out.display());
    }
    print_stdout(&report);
    Ok(())
}
