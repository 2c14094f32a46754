//! [`BlockAffineOps`] on Cube backends (CUDA, ROCm, WGPU / Vulkan / Metal). With `single_pass`,
//! every product that contracts with `W'` runs in CubeK's matmul with `W'` formed as the routine
//! reads it ([`adapted_weight_matmul`]); otherwise, and wherever CubeK declines that launch, in
//! the trait's bodies, whose GEMMs are the backend's own (CubeK) matmul on materialized chunks.
//! The BAT block gradient always keeps the trait's chunked body.

mod adapted_weight_matmul;

use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;

use super::{BlockAffineOps, reference};
use adapted_weight_matmul::adapted_weight_matmul;

/// Which adapted weight a product reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transform {
    /// `W' = W + tile_rows(B)` (Bone; the adapter is `B`, `[r, out]`).
    Bone,
    /// `W' = T_D(W)` (BAT, PEFT orientation; the adapter is `D`, `[out/r, r, r]`).
    Bat,
}

/// One product: its body (`body`, the trait's default), or with `single_pass` through
/// [`adapted_weight_matmul`] with the adapter in `lhs`'s dtype, falling back to `body` where CubeK
/// declines the launch (for example a weight stored in another dtype than the activations: the
/// view reads both with one element type).
fn product(
    single_pass: bool,
    lhs: CubeTensor,
    weight: CubeTensor,
    adapter: CubeTensor,
    transform: Transform,
    transposed: bool,
    body: impl FnOnce(CubeTensor, CubeTensor, CubeTensor) -> CubeTensor,
) -> CubeTensor {
    if !single_pass {
        return body(lhs, weight, adapter);
    }
    let r = match transform {
        Transform::Bone => adapter.shape().dims::<2>()[0],
        Transform::Bat => adapter.shape().dims::<3>()[1],
    };
    let adapter = if adapter.dtype == lhs.dtype {
        adapter
    } else {
        burn_cubecl::kernel::cast(adapter, lhs.dtype)
    };
    match adapted_weight_matmul(
        lhs.clone(),
        weight.clone(),
        adapter.clone(),
        r,
        transform,
        transposed,
    ) {
        Ok(out) => out,
        Err(declined) => {
            super::policy::record_single_pass_fallback();
            tracing::debug!(
                "{transform:?} product (transposed: {transposed}) runs the op body: CubeK declined the adapted-weight view ({declined:?})"
            );
            body(lhs, weight, adapter)
        }
    }
}

impl BlockAffineOps for CubeBackend {
    fn bone_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        block: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let body = reference::bone_linear::<Self>;
        product(single_pass, x, weight, block, Transform::Bone, false, body)
    }

    fn bone_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        block: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let body = reference::bone_linear_grad_input::<Self>;
        product(
            single_pass,
            grad,
            weight,
            block,
            Transform::Bone,
            true,
            body,
        )
    }

    fn bat_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        blocks: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let body = reference::bat_linear::<Self>;
        product(single_pass, x, weight, blocks, Transform::Bat, false, body)
    }

    fn bat_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        blocks: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        let body = reference::bat_linear_grad_input::<Self>;
        product(
            single_pass,
            grad,
            weight,
            blocks,
            Transform::Bat,
            true,
            body,
        )
    }
}
