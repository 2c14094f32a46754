//! The fused block-affine GEMM: `out = lhs · R`, where `R` is the adapted weight `W'` (or its
//! transpose) formed **element by element as its tiles are loaded**, so that no `in × out` buffer
//! other than the frozen weight itself ever exists.
//!
//! Tiling: a cube of 16 × 16 units computes a 64 × 64 output tile, each unit a 4 × 4 micro-tile
//! (strided by 16 so neighbouring units touch neighbouring shared-memory words); the contraction
//! runs over K-tiles of 16, staged in shared memory. Products accumulate in the lhs dtype (the
//! callers pass f32); the weight may be stored in any float dtype and is converted as it is read.
//!
//! The transform applied while loading `W'[i, o]` (Burn `[in, out]` indexing):
//! - [`Transform::Bone`]: `W[i, o] + B[i mod r, o]` — the periodic rows of the Bone block;
//! - [`Transform::Bat`]: `W[i, o] + Σ_s D[a][s, p]·W[b·r + s, o] + D[a][q, p]` with
//!   `a = o / r, q = o mod r, b = i / r, p = i mod r` (PEFT orientation, method.md §4.1): `2r`
//!   extra FLOPs and `r` extra (cached) weight reads per loaded element.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::tensor::Shape;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Output rows per cube.
const TILE_M: usize = 64;
/// Output columns per cube.
const TILE_N: usize = 64;
/// Contraction depth staged per step.
const TILE_K: usize = 16;
/// Units per cube along each axis (16 × 16 = 256 units, 4 × 4 outputs each).
const UNITS: usize = 16;
/// Outputs per unit along each axis.
const MICRO: usize = 4;

/// Which adapted weight the GEMM reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Transform {
    /// `W' = W + tile_rows(B)` (Bone; `adapter` is `B`, `[r, out]`).
    Bone,
    /// `W' = T_D(W)` (BAT, PEFT orientation; `adapter` is `D`, `[out/r, r, r]`).
    Bat,
}

impl Transform {
    fn code(self) -> u32 {
        match self {
            Transform::Bone => 1,
            Transform::Bat => 2,
        }
    }
}

/// `W'[i, o]`, read from the frozen weight and the adapter.
#[cube]
fn adapted_weight<F: Float, W: Float>(
    weight: &Tensor<W>,
    adapter: &Tensor<F>,
    i: usize,
    o: usize,
    r: usize,
    #[comptime] transform: u32,
) -> F {
    let d_output = weight.shape(1);
    let mut value = F::cast_from(weight[i * d_output + o]);
    if comptime!(transform == 1) {
        value += adapter[(i % r) * d_output + o];
    } else {
        let a = o / r;
        let q = o % r;
        let b = i / r;
        let p = i % r;
        let d_base = a * r * r;
        // D[a][q, p]
        value += adapter[d_base + q * r + p];
        for s in 0..r {
            // D[a][s, p] · W[b·r + s, o]
            value += adapter[d_base + s * r + p] * F::cast_from(weight[(b * r + s) * d_output + o]);
        }
    }
    value
}

/// `out[M, N] = lhs[M, K] · R[K, N]` with `R = W'` (`transposed = false`: `K = in`, `N = out`) or
/// `R = W'ᵀ` (`transposed = true`: `K = out`, `N = in`). All tensors contiguous, row-major.
#[cube(launch)]
fn transformed_matmul_kernel<F: Float, W: Float>(
    lhs: &Tensor<F>,
    weight: &Tensor<W>,
    adapter: &Tensor<F>,
    out: &mut Tensor<F>,
    r: usize,
    #[comptime] transform: u32,
    #[comptime] transposed: bool,
    #[define(F, W)] _dtypes: [ElemType; 2],
) {
    let size_m = lhs.shape(0);
    let size_k = lhs.shape(1);
    let size_n = out.shape(1);
    let row0 = CUBE_POS_Y as usize * TILE_M;
    let col0 = CUBE_POS_X as usize * TILE_N;
    let tx = UNIT_POS_X as usize;
    let ty = UNIT_POS_Y as usize;
    let unit = ty * UNITS + tx;

    let mut lhs_tile = Shared::<[F]>::new_slice(TILE_M * TILE_K);
    let mut rhs_tile = Shared::<[F]>::new_slice(TILE_K * TILE_N);
    let mut acc = Array::<F>::new(MICRO * MICRO);
    #[unroll]
    for e in 0..MICRO * MICRO {
        acc[e] = F::new(0.0);
    }

    let mut k0 = 0;
    while k0 < size_k {
        // Stage lhs[row0.., k0..] (64 × 16) and R[k0.., col0..] (16 × 64): 4 elements per unit.
        #[unroll]
        for step in 0..(TILE_M * TILE_K) / (UNITS * UNITS) {
            let flat = step * UNITS * UNITS + unit;
            let lm = flat / TILE_K;
            let lk = flat % TILE_K;
            let gm = row0 + lm;
            let gk = k0 + lk;
            let mut value = F::new(0.0);
            if gm < size_m && gk < size_k {
                value = lhs[gm * size_k + gk];
            }
            lhs_tile[flat] = value;

            let rk = flat / TILE_N;
            let rn = flat % TILE_N;
            let gk = k0 + rk;
            let gn = col0 + rn;
            let mut value = F::new(0.0);
            if gk < size_k && gn < size_n {
                if transposed {
                    value = adapted_weight::<F, W>(weight, adapter, gn, gk, r, transform);
                } else {
                    value = adapted_weight::<F, W>(weight, adapter, gk, gn, r, transform);
                }
            }
            rhs_tile[flat] = value;
        }
        sync_cube();

        #[unroll]
        for kk in 0..TILE_K {
            #[unroll]
            for i in 0..MICRO {
                let a = lhs_tile[(ty + i * UNITS) * TILE_K + kk];
                #[unroll]
                for j in 0..MICRO {
                    acc[i * MICRO + j] += a * rhs_tile[kk * TILE_N + tx + j * UNITS];
                }
            }
        }
        sync_cube();
        k0 += TILE_K;
    }

    #[unroll]
    for i in 0..MICRO {
        let gm = row0 + ty + i * UNITS;
        #[unroll]
        for j in 0..MICRO {
            let gn = col0 + tx + j * UNITS;
            if gm < size_m && gn < size_n {
                let index = gm * size_n + gn;
                out[index] = acc[i * MICRO + j];
            }
        }
    }
}

/// Launches the fused GEMM: `lhs · W'` (`transposed = false`, output `[M, out]`) or `lhs · W'ᵀ`
/// (`transposed = true`, output `[M, in]`).
///
/// # Shapes
/// - `lhs`: `[M, in]` or `[M, out]`; `weight`: `[in, out]`; `adapter`: `[r, out]` (Bone) or
///   `[out/r, r, r]` (BAT); `adapter` in `lhs`'s dtype.
pub(crate) fn transformed_matmul(
    lhs: CubeTensor,
    weight: CubeTensor,
    adapter: CubeTensor,
    r: usize,
    transform: Transform,
    transposed: bool,
) -> CubeTensor {
    let lhs = into_contiguous(lhs);
    let weight = into_contiguous(weight);
    let adapter = into_contiguous(adapter);
    let [m, _] = lhs.shape().dims::<2>();
    let [d_input, d_output] = weight.shape().dims::<2>();
    let n = if transposed { d_input } else { d_output };
    let dtype = lhs.dtype;
    let weight_dtype = weight.dtype;
    let output = empty_device_dtype(
        lhs.client.clone(),
        lhs.device.clone(),
        Shape::new([m, n]),
        dtype,
    );
    let cube_count = CubeCount::Static(n.div_ceil(TILE_N) as u32, m.div_ceil(TILE_M) as u32, 1);
    let cube_dim = CubeDim::new_2d(UNITS as u32, UNITS as u32);
    transformed_matmul_kernel::launch(
        &output.client,
        cube_count,
        cube_dim,
        lhs.into_tensor_arg(),
        weight.into_tensor_arg(),
        adapter.into_tensor_arg(),
        output.clone().into_tensor_arg(),
        r,
        transform.code(),
        transposed,
        [
            dtype_to_storage_type(dtype),
            dtype_to_storage_type(weight_dtype),
        ],
    );
    output
}
