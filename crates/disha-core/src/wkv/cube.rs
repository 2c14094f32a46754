//! [`Wkv7Ops`] on Cube backends (CUDA, ROCm, WGPU / Vulkan / Metal): one cube per batch row and
//! head, one unit per state row, the token loop inside the kernel.
//!
//! - Forward: unit `i` keeps row `i` of the state (`S[i, ·]`, `N` values) in registers; each
//!   token's key-indexed vectors (`r, w, k, α, β`) are staged in shared memory, so that `sa_i`,
//!   the row update and `y_i` are one pass over the row. Training also writes `sa_t` and the
//!   state before every chunk (the checkpoints).
//! - Backward: the reverse recurrence needs both row and column reductions of `δS`, so unit
//!   `u` keeps row `u` and column `u` of `δS` (updated by the same formulas, so their shared
//!   element stays equal). Per chunk from the last, unit `u` recomputes column `u` of the
//!   chunk's states from its checkpoint and the kept `sa_t` (no reduction needed) into a scratch
//!   buffer of `chunk_len + 1` states per head, then walks the chunk backwards.
//!
//! Computes in `f32`; other dtypes, and head sizes above [`MAX_HEAD_SIZE`], take the reference
//! bodies.

use burn::backend::TensorMetadata;
use burn::backend::cubecl::dtype_to_storage_type;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{DType, Shape};
use burn_cubecl::CubeBackend;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::{Wkv7Ops, reference};

/// The largest head size the kernels take (one unit per state row; two rows of `δS` per unit
/// in the backward). RWKV-7 uses 64.
pub(crate) const MAX_HEAD_SIZE: usize = 256;

// CubeCL expands operators, not `div_ceil`, and a comptime `if` cannot merge with a runtime one.
#[cube(launch)]
#[allow(
    clippy::too_many_arguments,
    clippy::manual_div_ceil,
    clippy::collapsible_if
)]
fn wkv7_forward_kernel<F: Float>(
    r: &Tensor<F>,
    w: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    alpha: &Tensor<F>,
    beta: &Tensor<F>,
    state: &Tensor<F>,
    y: &mut Tensor<F>,
    last: &mut Tensor<F>,
    checkpoints: &mut Tensor<F>,
    sa_out: &mut Tensor<F>,
    seq: usize,
    heads: usize,
    chunk_len: usize,
    #[comptime] n: usize,
    #[comptime] save: bool,
    #[define(F)] _dtype: ElemType,
) {
    let head = CUBE_POS_X as usize;
    let bi = head / heads;
    let hi = head % heads;
    let i = UNIT_POS_X as usize;
    let chunks = (seq + chunk_len - 1) / chunk_len;
    let row = (head * n + i) * n;

    let mut s = Array::<F>::new(n);
    #[unroll]
    for j in 0..n {
        s[j] = state[row + j];
    }
    let mut rs = Shared::<[F]>::new_slice(n);
    let mut ws = Shared::<[F]>::new_slice(n);
    let mut ks = Shared::<[F]>::new_slice(n);
    let mut alphas = Shared::<[F]>::new_slice(n);
    let mut betas = Shared::<[F]>::new_slice(n);

    for t in 0..seq {
        let at = ((bi * seq + t) * heads + hi) * n;
        rs[i] = r[at + i];
        ws[i] = w[at + i];
        ks[i] = k[at + i];
        alphas[i] = alpha[at + i];
        betas[i] = beta[at + i];
        let vi = v[at + i];
        sync_cube();
        if save {
            if t % chunk_len == 0 {
                let base = ((head * chunks + t / chunk_len) * n + i) * n;
                #[unroll]
                for j in 0..n {
                    checkpoints[base + j] = s[j];
                }
            }
        }
        let mut sa = F::new(0.0);
        #[unroll]
        for j in 0..n {
            sa += s[j] * alphas[j];
        }
        let mut yi = F::new(0.0);
        #[unroll]
        for j in 0..n {
            s[j] = s[j] * ws[j] + sa * betas[j] + vi * ks[j];
            yi += s[j] * rs[j];
        }
        y[at + i] = yi;
        if save {
            sa_out[at + i] = sa;
        }
        sync_cube();
    }
    #[unroll]
    for j in 0..n {
        last[row + j] = s[j];
    }
}

#[cube(launch)]
#[allow(clippy::too_many_arguments, clippy::manual_div_ceil)]
fn wkv7_backward_kernel<F: Float>(
    r: &Tensor<F>,
    w: &Tensor<F>,
    k: &Tensor<F>,
    v: &Tensor<F>,
    alpha: &Tensor<F>,
    beta: &Tensor<F>,
    checkpoints: &Tensor<F>,
    sa: &Tensor<F>,
    grad_y: &Tensor<F>,
    grad_state: &Tensor<F>,
    dr_out: &mut Tensor<F>,
    dw_out: &mut Tensor<F>,
    dk_out: &mut Tensor<F>,
    dv_out: &mut Tensor<F>,
    dalpha_out: &mut Tensor<F>,
    dbeta_out: &mut Tensor<F>,
    dstate: &mut Tensor<F>,
    scratch: &mut Tensor<F>,
    seq: usize,
    heads: usize,
    chunk_len: usize,
    slot_count: usize,
    #[comptime] n: usize,
    #[define(F)] _dtype: ElemType,
) {
    let head = CUBE_POS_X as usize;
    let bi = head / heads;
    let hi = head % heads;
    let u = UNIT_POS_X as usize;
    let chunks = (seq + chunk_len - 1) / chunk_len;
    let nn = n * n;
    let base = head * nn;
    let slots = head * slot_count * nn;

    // Row u and column u of δS.
    let mut ds_row = Array::<F>::new(n);
    let mut ds_col = Array::<F>::new(n);
    #[unroll]
    for j in 0..n {
        ds_row[j] = grad_state[base + u * n + j];
        ds_col[j] = grad_state[base + j * n + u];
    }
    let mut col = Array::<F>::new(n);
    let mut rs = Shared::<[F]>::new_slice(n);
    let mut ws = Shared::<[F]>::new_slice(n);
    let mut ks = Shared::<[F]>::new_slice(n);
    let mut alphas = Shared::<[F]>::new_slice(n);
    let mut betas = Shared::<[F]>::new_slice(n);
    let mut vs = Shared::<[F]>::new_slice(n);
    let mut sas = Shared::<[F]>::new_slice(n);
    let mut dys = Shared::<[F]>::new_slice(n);
    let mut dsas = Shared::<[F]>::new_slice(n);

    let mut chunk = chunks;
    while chunk > 0 {
        chunk -= 1;
        let start = chunk * chunk_len;
        let mut end = start + chunk_len;
        if end > seq {
            end = seq;
        }
        // Column u of the chunk's states: slot 0 the checkpoint, slot s the state after the
        // chunk's s-th token.
        let checkpoint = (head * chunks + chunk) * nn;
        #[unroll]
        for i in 0..n {
            col[i] = checkpoints[checkpoint + i * n + u];
            scratch[slots + i * n + u] = col[i];
        }
        for t in start..end {
            let at = ((bi * seq + t) * heads + hi) * n;
            sas[u] = sa[at + u];
            vs[u] = v[at + u];
            sync_cube();
            let wu = w[at + u];
            let ku = k[at + u];
            let bu = beta[at + u];
            let slot = slots + (t - start + 1) * nn;
            #[unroll]
            for i in 0..n {
                col[i] = col[i] * wu + sas[i] * bu + vs[i] * ku;
                scratch[slot + i * n + u] = col[i];
            }
            sync_cube();
        }

        let mut t = end;
        while t > start {
            t -= 1;
            let at = ((bi * seq + t) * heads + hi) * n;
            rs[u] = r[at + u];
            ws[u] = w[at + u];
            ks[u] = k[at + u];
            alphas[u] = alpha[at + u];
            betas[u] = beta[at + u];
            vs[u] = v[at + u];
            sas[u] = sa[at + u];
            dys[u] = grad_y[at + u];
            sync_cube();
            let after = slots + (t - start + 1) * nn;
            let before = after - nn;
            let ru = rs[u];
            let wu = ws[u];
            let au = alphas[u];
            let dyu = dys[u];
            // δS += δy · rᵀ (row u and column u).
            #[unroll]
            for j in 0..n {
                ds_row[j] += dyu * rs[j];
                ds_col[j] += dys[j] * ru;
            }
            let mut dr = F::new(0.0);
            let mut dw = F::new(0.0);
            let mut dk = F::new(0.0);
            let mut db = F::new(0.0);
            #[unroll]
            for i in 0..n {
                let old = scratch[before + i * n + u];
                dr += scratch[after + i * n + u] * dys[i];
                dw += ds_col[i] * old;
                dk += ds_col[i] * vs[i];
                db += ds_col[i] * sas[i];
            }
            let mut dv = F::new(0.0);
            let mut dsa = F::new(0.0);
            #[unroll]
            for j in 0..n {
                dv += ds_row[j] * ks[j];
                dsa += ds_row[j] * betas[j];
            }
            dsas[u] = dsa;
            sync_cube();
            let mut da = F::new(0.0);
            #[unroll]
            for i in 0..n {
                da += scratch[before + i * n + u] * dsas[i];
            }
            #[unroll]
            for j in 0..n {
                ds_row[j] = ds_row[j] * ws[j] + dsa * alphas[j];
                ds_col[j] = ds_col[j] * wu + dsas[j] * au;
            }
            let at = at + u;
            dr_out[at] = dr;
            dw_out[at] = dw;
            dk_out[at] = dk;
            dv_out[at] = dv;
            dalpha_out[at] = da;
            dbeta_out[at] = db;
            sync_cube();
        }
    }
    #[unroll]
    for j in 0..n {
        dstate[base + u * n + j] = ds_row[j];
    }
}

/// The inputs as contiguous tensors when the kernels take them (all `f32`, a head size up to
/// [`MAX_HEAD_SIZE`]), else `None`.
fn kernel_inputs<const K: usize>(tensors: [&CubeTensor; K]) -> Option<[CubeTensor; K]> {
    let n = tensors[0].shape().dims::<4>()[3];
    let f32 = tensors.iter().all(|t| t.dtype == DType::F32);
    (f32 && (1..=MAX_HEAD_SIZE).contains(&n)).then(|| tensors.map(|t| into_contiguous(t.clone())))
}

fn empty(like: &CubeTensor, shape: Shape) -> CubeTensor {
    empty_device_dtype(like.client.clone(), like.device.clone(), shape, DType::F32)
}

/// The forward kernel; with `save`, also the checkpoints and `sa` (else 1-element placeholders).
fn forward(
    inputs: [CubeTensor; 7],
    chunk_len: usize,
    save: bool,
) -> (CubeTensor, CubeTensor, CubeTensor, CubeTensor) {
    let [r, w, k, v, alpha, beta, state] = inputs;
    let [b, t, h, n] = r.shape().dims::<4>();
    let y = empty(&r, Shape::new([b, t, h, n]));
    let last = empty(&r, Shape::new([b, h, n, n]));
    let (checkpoints, sa) = match save {
        true => (
            empty(&r, Shape::new([b, h, t.div_ceil(chunk_len), n, n])),
            empty(&r, Shape::new([b, t, h, n])),
        ),
        false => (empty(&r, Shape::new([1])), empty(&r, Shape::new([1]))),
    };
    wkv7_forward_kernel::launch(
        &r.client.clone(),
        CubeCount::Static((b * h) as u32, 1, 1),
        CubeDim::new_1d(n as u32),
        r.into_tensor_arg(),
        w.into_tensor_arg(),
        k.into_tensor_arg(),
        v.into_tensor_arg(),
        alpha.into_tensor_arg(),
        beta.into_tensor_arg(),
        state.into_tensor_arg(),
        y.clone().into_tensor_arg(),
        last.clone().into_tensor_arg(),
        checkpoints.clone().into_tensor_arg(),
        sa.clone().into_tensor_arg(),
        t,
        h,
        chunk_len,
        n,
        save,
        dtype_to_storage_type(DType::F32),
    );
    (y, last, checkpoints, sa)
}

impl Wkv7Ops for CubeBackend {
    fn wkv7(
        r: FloatTensor<Self>,
        w: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        state: FloatTensor<Self>,
        chunk_len: usize,
    ) -> FloatTensor<Self> {
        match kernel_inputs([&r, &w, &k, &v, &alpha, &beta, &state]) {
            Some(inputs) => {
                let (y, last, _, _) = forward(inputs, chunk_len, false);
                reference::pack::<Self>(y, last)
            }
            None => {
                let (y, last, _, _) =
                    reference::forward::<Self>(r, w, k, v, alpha, beta, state, chunk_len);
                reference::pack::<Self>(y, last)
            }
        }
    }

    fn wkv7_forward_saving(
        r: FloatTensor<Self>,
        w: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        state: FloatTensor<Self>,
        chunk_len: usize,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        match kernel_inputs([&r, &w, &k, &v, &alpha, &beta, &state]) {
            Some(inputs) => forward(inputs, chunk_len, true),
            None => reference::forward::<Self>(r, w, k, v, alpha, beta, state, chunk_len),
        }
    }

    fn wkv7_backward(
        r: FloatTensor<Self>,
        w: FloatTensor<Self>,
        k: FloatTensor<Self>,
        v: FloatTensor<Self>,
        alpha: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        checkpoints: FloatTensor<Self>,
        sa: FloatTensor<Self>,
        grad_y: FloatTensor<Self>,
        grad_state: FloatTensor<Self>,
        chunk_len: usize,
    ) -> (
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
        FloatTensor<Self>,
    ) {
        let all = [
            &r,
            &w,
            &k,
            &v,
            &alpha,
            &beta,
            &checkpoints,
            &sa,
            &grad_y,
            &grad_state,
        ];
        let Some(inputs) = kernel_inputs(all) else {
            return reference::backward::<Self>(
                [r, w, k, v, alpha, beta],
                checkpoints,
                sa,
                grad_y,
                grad_state,
                chunk_len,
            );
        };
        let [r, w, k, v, alpha, beta, checkpoints, sa, grad_y, grad_state] = inputs;
        let [b, t, h, n] = r.shape().dims::<4>();
        let grads: [CubeTensor; 6] = std::array::from_fn(|_| empty(&r, Shape::new([b, t, h, n])));
        let dstate = empty(&r, Shape::new([b, h, n, n]));
        // The states of one chunk per head: its checkpoint and one per token.
        let slot_count = chunk_len.min(t) + 1;
        let scratch = empty(&r, Shape::new([b * h, slot_count, n, n]));
        let [dr, dw, dk, dv, dalpha, dbeta] = grads.each_ref().map(|g| g.clone().into_tensor_arg());
        wkv7_backward_kernel::launch(
            &r.client.clone(),
            CubeCount::Static((b * h) as u32, 1, 1),
            CubeDim::new_1d(n as u32),
            r.into_tensor_arg(),
            w.into_tensor_arg(),
            k.into_tensor_arg(),
            v.into_tensor_arg(),
            alpha.into_tensor_arg(),
            beta.into_tensor_arg(),
            checkpoints.into_tensor_arg(),
            sa.into_tensor_arg(),
            grad_y.into_tensor_arg(),
            grad_state.into_tensor_arg(),
            dr,
            dw,
            dk,
            dv,
            dalpha,
            dbeta,
            dstate.clone().into_tensor_arg(),
            scratch.into_tensor_arg(),
            t,
            h,
            chunk_len,
            slot_count,
            n,
            dtype_to_storage_type(DType::F32),
        );
        let [dr, dw, dk, dv, dalpha, dbeta] = grads;
        (dr, dw, dk, dv, dalpha, dbeta, dstate)
    }
}
