//! `disha export-adapter`: legacy Bone → MiSS, MiSS → LoRA.

use disha_core::{PeftModelExt, read_adapter_dir, write_adapter_dir};

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
            let (loaded, config) = load_with_adapter(model, Some(&args.adapter), &device)?;
            let config = config.expect("adapter given");
            loaded
                .model
                .save_adapter_as_lora(ADAPTER_NAME, &config, &args.out)?;
            println!("wrote equivalent LoRA adapter to {}", args.out.display());
        }
    }
    Ok(())
}
