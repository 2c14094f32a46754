//! [`BlockAffineOps`] on Cube backends (CUDA, ROCm, WGPU / Vulkan / Metal). With `single_pass`,
//! every product that contracts with `W'` runs in the single-pass GEMM of [`transformed_matmul`];
//! otherwise in the trait's bodies, whose GEMMs are the backend's own (CubeK) matmul. The BAT
//! block gradient always keeps the trait's chunked body.

mod transformed_matmul;

use burn::backend::TensorMetadata;
use burn::backend::tensor::FloatTensor;
use burn_cubecl::CubeBackend;
use burn_cubecl::tensor::CubeTensor;

use super::{BlockAffineOps, reference};
use transformed_matmul::{Transform, transformed_matmul};

/// The single-pass GEMM for one product, with the adapter in `lhs`'s dtype (the kernel reads
/// both with one element type).
fn single_pass_product(
    lhs: CubeTensor,
    weight: CubeTensor,
    adapter: CubeTensor,
    transform: Transform,
    transposed: bool,
) -> CubeTensor {
    let r = match transform {
        Transform::Bone => adapter.shape().dims::<2>()[0],
        Transform::Bat => adapter.shape().dims::<3>()[1],
    };
    let adapter = if adapter.dtype == lhs.dtype {
        adapter
    } else {
        burn_cubecl::kernel::cast(adapter, lhs.dtype)
    };
    transformed_matmul(lhs, weight, adapter, r, transform, transposed)
}

impl BlockAffineOps for CubeBackend {
    fn bone_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        block: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        match single_pass {
            true => single_pass_product(x, weight, block, Transform::Bone, false),
            false => reference::bone_linear::<Self>(x, weight, block),
        }
    }

    fn bone_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        block: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        match single_pass {
            true => single_pass_product(grad, weight, block, Transform::Bone, true),
            false => reference::bone_linear_grad_input::<Self>(grad, weight, block),
        }
    }

    fn bat_linear(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        blocks: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        match single_pass {
            true => single_pass_product(x, weight, blocks, Transform::Bat, false),
            false => reference::bat_linear::<Self>(x, weight, blocks),
        }
    }

    fn bat_linear_grad_input(
        grad: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        blocks: FloatTensor<Self>,
        single_pass: bool,
    ) -> FloatTensor<Self> {
        match single_pass {
            true => single_pass_product(grad, weight, blocks, Transform::Bat, true),
            false => reference::bat_linear_grad_input::<Self>(grad, weight, blocks),
        }
    }
}
