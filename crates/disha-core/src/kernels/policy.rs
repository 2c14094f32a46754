//! [`KernelPolicy`]: whether adapted layers use the fused block-affine ops or the plain
//! tensor-op formulation.

use std::sync::OnceLock;
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};

/// Environment variable that selects the [`KernelPolicy`]: `fused` (the default), `single-pass`
/// or `reference`.
pub const KERNELS_ENV: &str = "DISHA_KERNELS";

/// How [`AdaptedLinear`](crate::AdaptedLinear) computes Bone and BAT (PEFT orientation) layers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KernelPolicy {
    /// BAT through [`BlockAffineOps`](super::BlockAffineOps) with the hand-written backward, its
    /// products in the backend's own matmul (CubeK on GPUs), `W'` one bounded chunk at a time and
    /// never kept. Bone in plain tensor ops (the op would keep the same `S(x̃)` and do the same
    /// products; plain ops fuse better with their neighbours). RWKV-7's WKV recurrence
    /// through [`Wkv7Ops`](crate::wkv::Wkv7Ops). The default.
    Fused,
    /// Bone and BAT through the ops, and on Cube backends every product that contracts with `W'`
    /// in CubeK's matmul with `W'` formed as the routine reads the weight (no weight-sized buffer
    /// at all). BAT's transform then costs `2r` FLOPs per weight element read, once per output
    /// tile row, which the chunked route pays once (see the kernels chapter); elsewhere the ops
    /// run their bodies.
    SinglePass,
    /// Through ordinary differentiable tensor ops, with Burn's own autodiff (the formulation
    /// every other method uses; RWKV-7's WKV in its chunked tensor-op form). For debugging
    /// and for comparing against the kernels.
    Reference,
}

const UNSET: u8 = 0;
static OVERRIDE: AtomicU8 = AtomicU8::new(UNSET);

impl KernelPolicy {
    /// Whether layers route through [`BlockAffineOps`](super::BlockAffineOps) at all.
    pub fn uses_ops(self) -> bool {
        self != KernelPolicy::Reference
    }

    fn code(self) -> u8 {
        match self {
            KernelPolicy::Fused => 1,
            KernelPolicy::SinglePass => 2,
            KernelPolicy::Reference => 3,
        }
    }

    /// Parses `fused` / `single-pass` / `reference` (case-insensitive).
    pub fn parse(value: &str) -> Option<Self> {
        match value.trim().to_ascii_lowercase().as_str() {
            "fused" => Some(KernelPolicy::Fused),
            "single-pass" => Some(KernelPolicy::SinglePass),
            "reference" => Some(KernelPolicy::Reference),
            _ => None,
        }
    }
}

fn from_env() -> KernelPolicy {
    static ENV: OnceLock<KernelPolicy> = OnceLock::new();
    *ENV.get_or_init(|| match std::env::var(KERNELS_ENV) {
        Err(_) => KernelPolicy::Fused,
        Ok(value) => KernelPolicy::parse(&value).unwrap_or_else(|| {
            tracing::warn!(
                "{KERNELS_ENV}={value:?} is not `fused`, `single-pass` or `reference`; using `fused`"
            );
            KernelPolicy::Fused
        }),
    })
}

/// The policy in force: the last [`set_kernel_policy`], else `DISHA_KERNELS`, else
/// [`KernelPolicy::Fused`].
pub fn kernel_policy() -> KernelPolicy {
    match OVERRIDE.load(Ordering::Relaxed) {
        1 => KernelPolicy::Fused,
        2 => KernelPolicy::SinglePass,
        3 => KernelPolicy::Reference,
        _ => from_env(),
    }
}

/// Overrides `DISHA_KERNELS` for the whole process (for example from a CLI flag).
pub fn set_kernel_policy(policy: KernelPolicy) {
    OVERRIDE.store(policy.code(), Ordering::Relaxed);
}

static SINGLE_PASS_FALLBACKS: AtomicUsize = AtomicUsize::new(0);

/// How many products asked for the single-pass route ran the op body instead, in this process:
/// on Cube backends, CubeK declines the adapted-weight view for a weight stored in another dtype
/// than the activations, or for a shape or device it has no routine for (a `debug` log line
/// names the reason). Always 0 on backends without CubeCL kernels (Flex), which ignore the
/// request and run the body.
pub fn single_pass_fallbacks() -> usize {
    SINGLE_PASS_FALLBACKS.load(Ordering::Relaxed)
}

/// Counts one product that fell back to the op body ([`single_pass_fallbacks`]).
#[cfg_attr(not(any(feature = "wgpu", feature = "cuda")), allow(dead_code))]
pub(crate) fn record_single_pass_fallback() {
    SINGLE_PASS_FALLBACKS.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::KernelPolicy;

    #[test]
    fn policy_names_parse_case_insensitively() {
        assert_eq!(KernelPolicy::parse("fused"), Some(KernelPolicy::Fused));
        assert_eq!(
            KernelPolicy::parse(" Reference "),
            Some(KernelPolicy::Reference)
        );
        assert_eq!(
            KernelPolicy::parse("SINGLE-PASS"),
            Some(KernelPolicy::SinglePass)
        );
        assert_eq!(KernelPolicy::parse("cuda"), None);
    }
}
