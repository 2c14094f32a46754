//! [`BlockAffineOps`]: the backend extension behind the fused Bone and BAT linear layers.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, backend_extension};
use burn::tensor::Shape;

use super::reference;

/// Fused block-affine linear operations, one per forward and backward product.
///
/// Every method has a **body** made of ordinary backend ops (the formulas of method.md §2, §4 and
/// §8; BAT's `W'` and `G` one bounded chunk at a time), which every backend can run: Flex uses it
/// as is. With `single_pass`, Cube backends (CUDA, ROCm, WGPU / Vulkan / Metal) run the products
/// that contract with `W'` in CubeK's matmul instead, with `W'` as a view of its right-hand
/// operand formed as the routine reads it (no weight-sized buffer at all, not even a chunk);
/// where CubeK declines (see [`single_pass_fallbacks`](super::single_pass_fallbacks)) they run
/// the body. Other backends ignore the flag. The `Autodiff` implementation wires the ops into
/// training with a hand-written backward pass. Use the tensor-level functions
/// [`bone_linear`](super::bone_linear) and [`bat_linear`](super::bat_linear) rather than calling
/// these primitives.
///
/// The base weight is a **constant** for every method: it never receives a gradient (the callers
/// only route frozen weights here). All methods compute in `x`'s float dtype (the tensor-level
/// functions pass f32, PEFT's adapter precision); the weight may be stored in another float dtype
/// (for example bf16) and is converted as it is read.
///
/// # Shapes
/// `M` token rows, Burn `[in, out]` weight layout:
/// - `x`: `[M, in]`; `grad` (`∂L/∂y`): `[M, out]`; `weight`: `[in, out]`
/// - Bone `block`: `[r, out]` (no divisibility requirement on `in`)
/// - BAT `blocks` (`D`, PEFT orientation): `[out/r, r, r]` with `in % r = out % r = 0`
#[backend_extension(
    Cube: cfg(any(feature = "wgpu", feature = "cuda")),
    Flex: cfg(feature = "flex"),
    Fusion: cfg(feature = "fusion"),
    Autodiff
)]
pub trait BlockAffineOps: Backend {
    /// Bone forward: `y = x·W + S(x̃)·B`, i.e. `x·W'` with `W'[i, o] = W[i, o] + B[i mod r, o]`.
    #[fusion(dtype = x, shape = matmul_shape(x, weight, false))]
    fn bone_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        block: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let _ = single_pass;
        reference::bone_linear::<Self>(x, weight, block)
    }

    /// Bone input gradient: `∂L/∂x = δY·W'ᵀ = δY·Wᵀ + tile_rows(δY·Bᵀ)` truncated to `in`.
    #[fusion(dtype = grad, shape = matmul_shape(grad, weight, true))]
    fn bone_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        block: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let _ = single_pass;
        reference::bone_linear_grad_input::<Self>(grad, weight, block)
    }

    /// BAT forward (PEFT orientation): `y = x·W'` with
    /// `W'_B⟨b,a⟩ = (I + D[a]ᵀ)·W_B⟨b,a⟩ + D[a]ᵀ`. The body forms `W'` one chunk of input blocks
    /// at a time (at most a quarter of the weight, 16 MiB) and multiplies it with the backend's
    /// matmul; nothing weight-sized outlives the call.
    #[fusion(dtype = x, shape = matmul_shape(x, weight, false))]
    fn bat_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        blocks: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let _ = single_pass;
        reference::bat_linear::<Self>(x, weight, blocks)
    }

    /// BAT input gradient: `∂L/∂x = δY·W'ᵀ`, chunked like [`bat_linear`](Self::bat_linear).
    #[fusion(dtype = grad, shape = matmul_shape(grad, weight, true))]
    fn bat_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        blocks: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let _ = single_pass;
        reference::bat_linear_grad_input::<Self>(grad, weight, blocks)
    }

    /// BAT block gradient: `∂L/∂D[a] = Σ_b (W_B⟨b,a⟩ + I)·G_B⟨b,a⟩ᵀ` with `G_B = xᵀ·δY`
    /// (method.md §8). It does not depend on `D`. `G_B` is never formed whole: it is reduced over
    /// chunks of input blocks bounded by a quarter of the weight and 16 MiB.
    #[fusion(dtype = x, shape = blocks_grad_shape(weight, *r))]
    fn bat_blocks_grad(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        r: usize,
    ) -> FloatTensor<Self> {
        reference::bat_blocks_grad::<Self>(x, grad, weight, r)
    }
}

// Used by the `Fusion` implementation the macro generates (output metadata before execution).
#[cfg_attr(not(feature = "fusion"), allow(dead_code))]
/// `[M, out]` for `x·W` (`transposed = false`) or `[M, in]` for `δY·Wᵀ` (`transposed = true`).
pub(crate) fn matmul_shape(lhs: &Shape, weight: &Shape, transposed: bool) -> Shape {
    let m = lhs.dims::<2>()[0];
    let [d_input, d_output] = weight.dims::<2>();
    Shape::new([m, if transposed { d_input } else { d_output }])
}

/// `[out/r, r, r]`.
#[cfg_attr(not(feature = "fusion"), allow(dead_code))]
pub(crate) fn blocks_grad_shape(weight: &Shape, r: usize) -> Shape {
    let d_output = weight.dims::<2>()[1];
    Shape::new([d_output / r, r, r])
}

#[cfg(feature = "flex")]
impl BlockAffineOps for burn::backend::Flex {}
