//! # disha-core
//!
//! DiSHA dimension-sharding adapters for [Burn](https://burn.dev): **Bone** (MiSS standard),
//! **BAT** (block-affine, in both the HF PEFT and the RWKV-PEFT orientation), **MiSS-mini**, and
//! **LoRA** as the baseline — as the *same functions* HF PEFT computes, read from and written to
//! PEFT adapter directories.
//!
//! Three ways in:
//! - [`AdaptedLinear`]: a drop-in for `burn::nn::Linear` with named adapters, checked
//!   merge / unmerge and an activation-space forward (Bone costs `O(M·(in + r·out))` extra).
//! - [`AdaptableModel`] + [`PeftModelExt`]: apply a [`PeftConfig`] to a whole model by HF module
//!   name, count trainable parameters, load / save PEFT directories.
//! - [`DishaReparameterizer`]: adapt any existing Burn model with no code change (weight space,
//!   slower to train; see its docs for the cost).
//!
//! Layout: Burn's `Linear` stores `W_B = Wᵀ` (`[in, out]`); adapter tensors are stored in PEFT's
//! orientation in both layouts, so files move between Python and Rust untouched. The formulas are
//! in `docs/` ("Adapters") and the project's `method.md` reference.
#![warn(missing_docs)]

mod adapted_linear;
mod adapter;
mod bat;
mod bone;
mod convert;
mod error;
pub mod fused;
mod inverse;
pub mod kernels;
pub mod limits;
mod lora;
mod peft_config;
mod peft_files;
mod peft_model;
mod quantized;
mod reparam;
mod safetensors_file;
mod safetensors_writer;
mod shard;
mod spec;
mod targets;
#[cfg(test)]
mod test_util;
pub mod wkv;

pub use adapted_linear::{AdaptedLinear, AdaptedLinearConfig, replace_param_value};
pub use adapter::{Adapter, AdapterSet};
pub use bat::{BatAdapter, block_affine_linear, reference_block_affine_linear};
pub use bone::BoneAdapter;
pub use convert::miss_to_lora;
pub use error::{DishaError, Result};
pub use lora::LoraAdapter;
pub use peft_config::{LoraInit, MissInit, PeftConfig, PeftMethod, PeftType, TargetModules};
pub use peft_files::{
    CONFIG_FILE, HostTensor, KEY_PREFIX, PeftAdapterFiles, WEIGHTS_FILE, read_adapter_dir,
    read_safetensors, write_adapter_dir, write_atomic,
};
pub use peft_model::{
    AdaptableModel, LinearRole, LinearSite, ParameterCount, PeftModelExt,
    freeze_all_but_active_adapters, peft_key,
};
pub use quantized::{QUANT_BLOCK, QuantFormat, QuantLayout, QuantizedMatrix};
pub use reparam::{DishaReparam, DishaReparameterizer};
pub use safetensors_file::{SafetensorsFile, TensorSlot};
pub use safetensors_writer::{SafetensorsWriter, safetensors_header};
pub use spec::{AdapterInit, AdapterKind, AdapterMethod, AdapterSpec, BatOrientation};
pub use targets::TargetMatcher;
