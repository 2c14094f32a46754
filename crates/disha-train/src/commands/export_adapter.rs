//! `disha export-adapter`: legacy Bone → MiSS, MiSS → LoRA, RWKV-PEFT `.pth` ↔ PEFT directory.

use std::collections::BTreeMap;

use disha_core::{PeftModelExt, peft_key, read_adapter_dir, write_adapter_dir};
use disha_models::LoadOptions;
use disha_models::rwkv::RwkvPeftCheckpoint;

use super::{ADAPTER_NAME, load_with_adapter};
use crate::cli::{AdapterFormat, ExportAdapterArgs};
use crate::error::{CliError, CliResult};

pub fn run(args: ExportAdapterArgs) -> CliResult {
    if args.out == args.adapter {
        return Err(CliError::Usage(
            "--out equals --adapter; the input is never modified, choose a new directory".into(),
        ));
    }
    match args.to {
        AdapterFormat::Miss if args.adapter.is_file() => {
            // An RWKV-PEFT checkpoint: the same values under PEFT keys (BAT as `bat_rwkv`).
            let checkpoint = RwkvPeftCheckpoint::read(&args.adapter)?;
            if !checkpoint.overlay.is_empty() {
                return Err(CliError::File {
                    path: args.adapter.clone(),
                    message: format!(
                        "also replaces base tensors ({}), which a PEFT adapter directory cannot \
                         hold; merge it instead (`disha merge`)",
                        checkpoint
                            .overlay
                            .keys()
                            .cloned()
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                });
            }
            let tensors: BTreeMap<_, _> = checkpoint
                .adapters
                .iter()
                .map(|(module, t)| (peft_key(module, "miss_block"), t.clone()))
                .collect();
            write_adapter_dir(&args.out, &checkpoint.peft_config(), &tensors)?;
            println!(
                "wrote MiSS adapter ({} tensors, {} r = {}) to {}",
                tensors.len(),
                checkpoint.spec.method_name(),
                checkpoint.spec.r,
                args.out.display()
            );
        }
        AdapterFormat::Miss => {
            // Reading renames legacy `bone_block` keys; writing emits peft_type MISS.
            let files = read_adapter_dir(&args.adapter)?;
            write_adapter_dir(&args.out, &files.config, &files.tensors)?;
            println!(
                "wrote MiSS adapter ({} tensors) to {}",
                files.tensors.len(),
                args.out.display()
            );
        }
        AdapterFormat::Lora => {
            let model = args.model.as_ref().ok_or_else(|| {
                CliError::Usage("--to lora needs --model (the layer input sizes)".into())
            })?;
            let device = args.device.device()?;
            let (loaded, config) =
                load_with_adapter(model, Some(&args.adapter), &LoadOptions::default(), &device)?;
            let config = config.expect("adapter given");
            loaded
                .model
                .save_adapter_as_lora(ADAPTER_NAME, &config, &args.out)?;
            println!("wrote equivalent LoRA adapter to {}", args.out.display());
        }
        AdapterFormat::RwkvPeft => {
            let model = args.model.as_ref().ok_or_else(|| {
                CliError::Usage("--to rwkv-peft needs --model (an RWKV-7)".into())
            })?;
            let device = args.device.device()?;
            let (loaded, _) =
                load_with_adapter(model, Some(&args.adapter), &LoadOptions::default(), &device)?;
            let rwkv = loaded.model.as_rwkv7().ok_or_else(|| {
                CliError::Usage(format!(
                    "--to rwkv-peft: {} is a {} model; RWKV-PEFT checkpoints are for RWKV-7",
                    model.display(),
                    loaded.model.family()
                ))
            })?;
            let written = rwkv.save_rwkv_peft(ADAPTER_NAME, &args.out)?;
            println!(
                "wrote RWKV-PEFT checkpoint ({written} tensors) to {}",
                args.out.display()
            );
        }
    }
    Ok(())
}
