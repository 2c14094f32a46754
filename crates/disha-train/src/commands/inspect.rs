//! `disha inspect`: architecture, parameter counts, adapter targets.

use std::collections::BTreeMap;

use std::fmt::Write;

use disha_core::PeftModelExt;
use disha_models::ModelFormat;

use super::{load_model_args, print_stdout};
use crate::cli::InspectArgs;
use crate::error::CliResult;

pub fn run(args: InspectArgs) -> CliResult {
    let mut out = String::new();
    let (loaded, adapter, _) = load_model_args(&args.model)?;
    let format = match loaded.format {
        ModelFormat::HfSafetensors => "HF safetensors",
        ModelFormat::Gguf => "GGUF (dequantized to f32)",
        ModelFormat::Llama2c => "llama2.c checkpoint",
        ModelFormat::RwkvSafetensors => "BlinkDL RWKV safetensors",
        ModelFormat::RwkvPth => "BlinkDL RWKV .pth",
        ModelFormat::RwkvCpp => "rwkv.cpp .bin",
    };
    let _ = writeln!(out, "model        {} [{format}]", loaded.path.display());
    for (i, line) in loaded.model.architecture().lines().enumerate() {
        let label = if i == 0 { "architecture" } else { "" };
        let _ = writeln!(out, "{label:<12} {line}");
    }
    let _ = match loaded.tokenizer() {
        Ok(t) => writeln!(
            out,
            "tokenizer    {} tokens, chat template: {}",
            t.vocab_size(),
            if t.chat_template().is_some() {
                "yes"
            } else {
                "no"
            }
        ),
        Err(e) => writeln!(out, "tokenizer    none ({e})"),
    };
    let (mut quantized, mut bytes, mut format) = (0, 0, None);
    disha_core::AdaptableModel::visit_linears(&loaded.model, &mut |_, linear| {
        if let Some(q) = &linear.quantized {
            quantized += 1;
            bytes += q.size_bytes();
            format = Some(q.layout().format);
        }
    });
    let _ = match format {
        Some(format) => writeln!(
            out,
            "base         {}; {quantized} linears in {format} (ggml {}, {:.1} MB)",
            loaded.model.base_dtype_name(),
            format.ggml_name(),
            bytes as f64 / 1e6
        ),
        None => writeln!(out, "base         {}", loaded.model.base_dtype_name()),
    };
    // The seven projections of layer 0 (every layer has the same shapes).
    let sites = loaded.model.linear_sites();
    let _ = writeln!(out, "linear layers {} adaptable:", sites.len());
    for (site, d_in, d_out) in sites.iter().filter(|(s, _, _)| {
        // Layer 0 and what is outside the layers (every layer has the same shapes).
        let in_layer = |name: &str| {
            ["model.layers.", "blocks."]
                .iter()
                .find_map(|p| name.strip_prefix(p))
                .map(|rest| rest.split('.').next() == Some("0"))
        };
        in_layer(&s.name).unwrap_or(true)
    }) {
        let _ = writeln!(out, "  {:<36} [in {d_in:>6} -> out {d_out:>6}]", site.name);
    }
    if let Some(config) = adapter {
        let spec = config.spec();
        let _ = writeln!(
            out,
            "adapter      {} (PEFT {:?}, r = {}) from {}",
            spec.method_name(),
            config.peft_type,
            config.r,
            args.model
                .adapter
                .as_ref()
                .expect("adapter loaded")
                .display()
        );
        let mut by_module: BTreeMap<String, usize> = BTreeMap::new();
        disha_core::AdaptableModel::visit_linears(&loaded.model, &mut |site, linear| {
            if linear.adapter(super::ADAPTER_NAME).is_some() {
                let short = site.name.rsplit('.').next().unwrap_or(&site.name);
                *by_module.entry(short.to_string()).or_default() += 1;
            }
        });
        let targets: Vec<String> = by_module.iter().map(|(m, n)| format!("{m} x{n}")).collect();
        let _ = writeln!(out, "targets      {}", targets.join(", "));
    }
    let _ = writeln!(out, "{}", loaded.model.parameter_count());
    print_stdout(&out);
    Ok(())
}
