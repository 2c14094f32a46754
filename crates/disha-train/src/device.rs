//! `--device flex|wgpu|cuda`: the backends compiled into this binary.

use burn::tensor::Device;
use clap::ValueEnum;

use crate::error::{CliError, CliResult};

/// A compute backend.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceChoice {
    /// The best backend compiled in (CUDA, then WGPU, then Flex).
    Auto,
    /// Burn's pure-Rust CPU backend.
    Flex,
    /// Any GPU through WGPU (Vulkan, Metal, DX12; lavapipe on CPU).
    Wgpu,
    /// NVIDIA GPUs (device 0).
    Cuda,
}

impl DeviceChoice {
    /// The Burn device, or an error saying which feature to build with.
    pub fn device(self) -> CliResult<Device> {
        // Unused when every backend is compiled in.
        #[allow(unused_variables)]
        let missing = |name: &str| {
            CliError::Usage(format!(
                "--device {name}: this binary was built without the `{name}` backend \
                 (rebuild with `cargo build --release -p disha-train --features {name}`)"
            ))
        };
        match self {
            Self::Auto => {
                #[cfg(feature = "cuda")]
                return Ok(Device::cuda(0));
                #[cfg(all(feature = "wgpu", not(feature = "cuda")))]
                return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
                #[cfg(all(feature = "flex", not(any(feature = "wgpu", feature = "cuda"))))]
                return Ok(Device::flex());
                #[cfg(not(any(feature = "flex", feature = "wgpu", feature = "cuda")))]
                return Err(missing("flex"));
            }
            Self::Flex => {
                #[cfg(feature = "flex")]
                return Ok(Device::flex());
                #[cfg(not(feature = "flex"))]
                return Err(missing("flex"));
            }
            Self::Wgpu => {
                #[cfg(feature = "wgpu")]
                return Ok(Device::wgpu(burn::tensor::DeviceKind::DefaultDevice));
                #[cfg(not(feature = "wgpu"))]
                return Err(missing("wgpu"));
            }
            Self::Cuda => {
                #[cfg(feature = "cuda")]
                return Ok(Device::cuda(0));
                #[cfg(not(feature = "cuda"))]
                return Err(missing("cuda"));
            }
        }
    }
}
