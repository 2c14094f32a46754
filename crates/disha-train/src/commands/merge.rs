//! `disha merge`: base + adapter → a plain HF directory.

use disha_models::LoadOptions;
use disha_models::{export_merged, export_merged_pth};

use super::load_with_adapter;
use crate::cli::MergeArgs;
use crate::error::{CliError, CliResult};

/// Files copied from an HF source directory so the merged model is usable as is.
const COPIED: [&str; 5] = [
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "chat_template.jinja",
];

pub fn run(args: MergeArgs) -> CliResult {
    for input in [&args.model, &args.adapter] {
        if args.out == *input || (args.out.exists() && same_file(&args.out, input)) {
            return Err(CliError::Usage(format!(
                "--out {} is an input; the inputs are never modified, choose a new directory",
                args.out.display()
            )));
        }
    }
    let device = args.device.device()?;
    let (loaded, _) = load_with_adapter(
        &args.model,
        Some(&args.adapter),
        &LoadOptions::default().with_base_dtype(args.base_dtype),
        &device,
    )?;
    if args.out.extension().is_some_and(|e| e == "pth") {
        // A BlinkDL checkpoint, as RWKV-PEFT's merge script writes.
        let rwkv = loaded.model.as_rwkv7().ok_or_else(|| {
            CliError::Usage(format!(
                "--out {}: a .pth output is a BlinkDL RWKV-7 checkpoint; {} is a {} model (give \
                 a directory for an HF model)",
                args.out.display(),
                args.model.display(),
                loaded.model.family()
            ))
        })?;
        export_merged_pth(rwkv, &args.out).map_err(|e| non_finite_is_the_adapters(e, &args))?;
        println!(
            "merged {} into {} -> {} (BlinkDL .pth, f32)",
            args.adapter.display(),
            args.model.display(),
            args.out.display()
        );
        return Ok(());
    }
    let extra: Vec<_> = if args.model.is_dir() {
        COPIED
            .iter()
            .map(|f| args.model.join(f))
            .filter(|p| p.is_file())
            .collect()
    } else {
        Vec::new()
    };
    export_merged(&loaded.model, &loaded.export_config(), &extra, &args.out)
        .map_err(|e| non_finite_is_the_adapters(e, &args))?;
    println!(
        "merged {} into {} -> {} (model.safetensors, config.json{})",
        args.adapter.display(),
        args.model.display(),
        args.out.display(),
        extra
            .iter()
            .filter_map(|p| p.file_name())
            .map(|n| format!(", {}", n.to_string_lossy()))
            .collect::<String>()
    );
    Ok(())
}

/// Weights out of range once merged: the adapter is what to look at.
fn non_finite_is_the_adapters(e: disha_models::ModelError, args: &MergeArgs) -> CliError {
    match e {
        disha_models::ModelError::NonFiniteExport { .. } => CliError::File {
            path: args.adapter.clone(),
            message: e.to_string(),
        },
        e => e.into(),
    }
}

fn same_file(a: &std::path::Path, b: &std::path::Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => false,
    }
}
