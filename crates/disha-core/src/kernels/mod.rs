//! Fused block-affine kernels for Bone and BAT (the kernels chapter of the docs has the design and
//! the measurements).
//!
//! Bone and BAT both compute `y = x·W'` for an adapted weight `W'` that is a cheap function of the
//! frozen weight `W` and the adapter: `W'[i, o] = W[i, o] + B[i mod r, o]` (Bone) or
//! `W'_B⟨b,a⟩ = (I + D[a]ᵀ)·W_B⟨b,a⟩ + D[a]ᵀ` (BAT, PEFT orientation). HF PEFT's BAT forms the
//! dense `W'` in every forward and keeps it for backward, together with a dense `G = xᵀ·δY`.
//! Here:
//! - [`BlockAffineOps`] is a Burn backend extension with one op per product (`x·W'`, `δY·W'ᵀ`,
//!   the BAT block gradient). Their bodies run the products in the backend's own matmul, BAT's
//!   `W'` and `G = xᵀ·δY` one bounded chunk of input blocks at a time; on Cube backends (CUDA,
//!   ROCm, WGPU) the single-pass alternative ([`KernelPolicy::SinglePass`]) runs `x·W'` and
//!   `δY·W'ᵀ` in CubeK's matmul (tensor-core tiles where the device has them) with `W'` formed
//!   as the routine's loader reads the weight, so it never exists in memory.
//! - The `Autodiff` implementation is hand-written (method.md §8): Bone keeps only `S(x̃)`, BAT
//!   keeps `x` and never `W'`.
//! - [`bone_linear`] and [`bat_linear`] are the tensor-level entry points.
//!   [`AdaptedLinear`](crate::AdaptedLinear) routes BAT through them by default and Bone too
//!   under [`KernelPolicy::SinglePass`]; [`KernelPolicy::Reference`] (`DISHA_KERNELS=reference`
//!   or [`set_kernel_policy`]) switches both to plain tensor ops with Burn's autodiff.

mod autodiff;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;
mod ops;
mod policy;
mod reference;

use burn::backend::Dispatch;
use burn::tensor::Tensor;

pub use ops::BlockAffineOps;
pub use policy::{
    KERNELS_ENV, KernelPolicy, kernel_policy, set_kernel_policy, single_pass_fallbacks,
};

/// Fused Bone linear: `y = x·W + S(x̃)·B`, differentiable in `x` and `B`.
///
/// `weight` is a constant: it receives no gradient, so pass only a frozen base weight (use the
/// plain ops for a trainable one). The product is computed in `x`'s dtype; `weight` may be stored
/// in another float dtype.
///
/// # Shapes
/// - `x`: `[M, in]`; `weight`: `[in, out]`; `block`: `[r, out]` with `r ≤ in` (any `in`)
/// - output: `[M, out]`
///
/// Cube backends run it single-pass (CubeK's matmul reading `W'` through a view) when the
/// [policy](kernel_policy) is [`KernelPolicy::SinglePass`]; [`bone_linear_with`] chooses
/// explicitly.
pub fn bone_linear(x: Tensor<2>, weight: Tensor<2>, block: Tensor<2>) -> Tensor<2> {
    let single_pass = kernel_policy() == KernelPolicy::SinglePass;
    bone_linear_with(x, weight, block, single_pass)
}

/// [`bone_linear`] with an explicit choice of the single-pass route on Cube backends.
pub fn bone_linear_with(
    x: Tensor<2>,
    weight: Tensor<2>,
    block: Tensor<2>,
    single_pass: bool,
) -> Tensor<2> {
    let [d_input, d_output] = weight.dims();
    let [r, width] = block.dims();
    assert!(
        x.dims()[1] == d_input && width == d_output && (1..=d_input).contains(&r),
        "bone_linear: x {:?}, weight {:?} and block {:?} do not fit together",
        x.dims(),
        weight.dims(),
        block.dims()
    );
    Tensor::from_dispatch(<Dispatch as BlockAffineOps>::bone_linear(
        x.into_dispatch(),
        weight.into_dispatch(),
        block.into_dispatch(),
        single_pass,
    ))
}

/// Fused BAT linear (PEFT orientation): `y = x·T_D(W)`, differentiable in `x` and `D`, without
/// keeping `W'` (it exists one bounded chunk at a time, or not at all single-pass).
///
/// `weight` is a constant, as in [`bone_linear`].
///
/// # Shapes
/// - `x`: `[M, in]`; `weight`: `[in, out]`; `blocks` (`D`): `[out/r, r, r]`, `in % r = out % r = 0`
/// - output: `[M, out]`
///
/// Cube backends run it single-pass when the [policy](kernel_policy) is
/// [`KernelPolicy::SinglePass`]; [`bat_linear_with`] chooses explicitly.
pub fn bat_linear(x: Tensor<2>, weight: Tensor<2>, blocks: Tensor<3>) -> Tensor<2> {
    let single_pass = kernel_policy() == KernelPolicy::SinglePass;
    bat_linear_with(x, weight, blocks, single_pass)
}

/// [`bat_linear`] with an explicit choice of the single-pass route on Cube backends.
pub fn bat_linear_with(
    x: Tensor<2>,
    weight: Tensor<2>,
    blocks: Tensor<3>,
    single_pass: bool,
) -> Tensor<2> {
    let [d_input, d_output] = weight.dims();
    let [na, r, r2] = blocks.dims();
    assert!(
        x.dims()[1] == d_input
            && r == r2
            && r > 0
            && d_input % r == 0
            && d_output % r == 0
            && na * r == d_output,
        "bat_linear: x {:?}, weight {:?} and D {:?} do not fit together",
        x.dims(),
        weight.dims(),
        blocks.dims()
    );
    Tensor::from_dispatch(<Dispatch as BlockAffineOps>::bat_linear(
        x.into_dispatch(),
        weight.into_dispatch(),
        blocks.into_dispatch(),
        single_pass,
    ))
}
