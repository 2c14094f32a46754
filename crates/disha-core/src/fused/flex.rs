//! [`FusedTrainingOps`] on Flex: every op one pass over contiguous `f32` rows, written into a
//! fresh buffer that becomes the output tensor without a copy, and split across rayon's threads
//! with the `fast-cpu` feature (one thread without it).
//!
//! Flex runs its own element-wise ops on one thread and the chains they form (RoPE's halves, the
//! RMS-norm reductions, SwiGLU's gate, the cross-entropy's softmax) each materialize several
//! intermediates; here each is one read of the inputs and one write of the output. Anything
//! that is not `f32` takes the reference bodies ([`reference`]), except the frozen and
//! quantized products, which widen half-precision inputs, sum in `f32` and round once.
//!
//! Reductions are deterministic for any thread count: rows are reduced one by one in order,
//! and the one cross-row sum (the RMS-norm scale's gradient) adds fixed blocks of rows in
//! order.

use burn::backend::Flex;
use burn::backend::ops::FloatTensorOps;
use burn::backend::tensor::{FloatTensor, IntTensor};
use burn::tensor::{Bytes, DType, FloatDType, Shape};
use burn_flex::{FlexTensor, Layout};
use half::slice::HalfFloatSliceExt;

use super::ops::{
    AdamWFactors, AdamWStep, FusedTrainingOps, IGNORE_INDEX, reference, rows_and_width,
};
use crate::quantized::{QUANT_BLOCK, QuantLayout, dequantize_span};

/// Elements per task of the element-wise ops (large enough to amortize a task, small enough to
/// balance two to a few dozen threads over one `[512, 1376]` activation).
const CHUNK: usize = 16 * 1024;

/// Rows per block of the cross-row reduction; fixed, so that the sum does not depend on the
/// thread count.
const REDUCE_BLOCK_ROWS: usize = 64;

impl FusedTrainingOps for Flex {
    /// A frozen weight in another float dtype than `x` (a half-precision base under `f32`
    /// compute, an `f32` base under half compute), or `x` and the weight both half precision:
    /// the weight converted block by block in parallel (at most 64 MiB of `f32` at a time) and
    /// rounded to `x`'s dtype where `x` is half, the products summed in `f32` and the output
    /// rounded once. Flex's own route casts the whole weight on one thread, converts whole bf16
    /// operands again inside its matmul, and sums a one-row f16 product in f16 (its `gemm`
    /// crate's vector kernel) — the error of f16 decoding.
    fn frozen_matmul(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        transpose_weight: bool,
    ) -> FloatTensor<Self> {
        let (x_dtype, w_dtype) = (x.dtype(), weight.dtype());
        let shape = x.layout().shape();
        let rows = shape.num_elements() / shape[shape.num_dims() - 1].max(1);
        // Both f16 over several rows: Flex's own matmul sums in f32 there, without converting.
        let f16_matmul = x_dtype == DType::F16 && w_dtype == x_dtype && rows > HALF_DIRECT_ROWS;
        if !is_float(x_dtype)
            || !is_float(w_dtype)
            || x_dtype == DType::F32 && w_dtype == x_dtype
            || f16_matmul
        {
            return reference::frozen_matmul::<Self>(x, weight, transpose_weight);
        }
        frozen_matmul_blocked(x, weight, transpose_weight, FROZEN_BLOCK_ELEMENTS)
    }

    /// A block-quantized matrix: dequantized a block of rows at a time in parallel (at most
    /// 64 MiB of `f32` at a time) instead of the reference's whole-matrix tensor ops; under half
    /// compute the values rounded to `x`'s dtype, the products summed in `f32` and the output
    /// rounded once (as [`frozen_matmul`](FusedTrainingOps::frozen_matmul)).
    fn quantized_matmul(
        x: FloatTensor<Self>,
        codes: IntTensor<Self>,
        scales: FloatTensor<Self>,
        layout: QuantLayout,
        transpose_weight: bool,
    ) -> FloatTensor<Self> {
        if !is_float(x.dtype()) || scales.dtype() != DType::F16 {
            return reference::quantized_matmul::<Self>(x, codes, scales, layout, transpose_weight);
        }
        let (codes, scales) = (codes.to_contiguous(), scales.to_contiguous());
        let code_bytes: &[u8] = match codes.dtype() {
            DType::I8 => pulp::bytemuck::cast_slice(codes.as_slice::<i8>().expect("i8 codes")),
            DType::U8 => codes.as_slice::<u8>().expect("u8 codes"),
            _ => {
                return reference::quantized_matmul::<Self>(
                    x,
                    codes,
                    scales,
                    layout,
                    transpose_weight,
                );
            }
        };
        let scales = scales.as_slice::<half::f16>().expect("f16 scales");
        quantized_matmul_blocked(
            x,
            code_bytes,
            scales,
            layout,
            transpose_weight,
            FROZEN_BLOCK_ELEMENTS,
        )
    }

    /// Flex's own softmax is row-parallel too, but calls libm's `expf` per element (4 % of a
    /// SmolLM2 forward's samples); this one runs the vectorized [`exp`].
    fn softmax_last(x: FloatTensor<Self>) -> FloatTensor<Self> {
        let Some(a) = contiguous_f32(&x) else {
            return reference::softmax_last::<Self>(x);
        };
        let shape = x.layout().shape().clone();
        let a = slice(&a);
        let (_, width) = rows_and_width(&shape);
        let mut out = vec![0.0f32; a.len()];
        for_each_row(&mut out, width, width, |row, y| {
            let x = &a[row * width..(row + 1) * width];
            let max = x.iter().copied().fold(f32::NEG_INFINITY, f32::max);
            for (y, x) in y.iter_mut().zip(x) {
                *y = exp(x - max);
            }
            let scale = 1.0 / y.iter().sum::<f32>();
            for y in y.iter_mut() {
                *y *= scale;
            }
        });
        tensor(out, shape)
    }

    fn softmax_last_backward(
        output: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (Some(y), Some(g)) = (contiguous_f32(&output), contiguous_f32(&grad)) else {
            return reference::softmax_last_backward::<Self>(output, grad);
        };
        let shape = output.layout().shape().clone();
        let (y, g) = (slice(&y), slice(&g));
        let (_, width) = rows_and_width(&shape);
        let mut out = vec![0.0f32; y.len()];
        for_each_row(&mut out, width, width, |row, dx| {
            let range = row * width..(row + 1) * width;
            let (y, g) = (&y[range.clone()], &g[range]);
            let dot: f32 = y.iter().zip(g).map(|(y, g)| y * g).sum();
            for ((dx, y), g) in dx.iter_mut().zip(y).zip(g) {
                *dx = y * (g - dot);
            }
        });
        tensor(out, shape)
    }

    fn silu_mul(gate: FloatTensor<Self>, up: FloatTensor<Self>) -> FloatTensor<Self> {
        let (Some(a), Some(b)) = (contiguous_f32(&gate), contiguous_f32(&up)) else {
            return reference::silu_mul::<Self>(gate, up);
        };
        let shape = gate.layout().shape().clone();
        let (a, b) = (slice(&a), slice(&b));
        let mut out = vec![0.0f32; a.len()];
        for_each_chunk(&mut out, |start, y| {
            let (a, b) = (&a[start..start + y.len()], &b[start..start + y.len()]);
            for ((y, g), u) in y.iter_mut().zip(a).zip(b) {
                *y = g * sigmoid(*g) * u;
            }
        });
        tensor(out, shape)
    }

    fn silu_mul_backward(
        gate: FloatTensor<Self>,
        up: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (Some(a), Some(b), Some(d)) = (
            contiguous_f32(&gate),
            contiguous_f32(&up),
            contiguous_f32(&grad),
        ) else {
            return reference::silu_mul_backward::<Self>(gate, up, grad);
        };
        let shape = gate.layout().shape().clone();
        let (a, b, d) = (slice(&a), slice(&b), slice(&d));
        let mut grad_gate = vec![0.0f32; a.len()];
        let mut grad_up = vec![0.0f32; a.len()];
        for_each_chunk_pair(&mut grad_gate, &mut grad_up, |start, dg, du| {
            let end = start + dg.len();
            let (a, b, d) = (&a[start..end], &b[start..end], &d[start..end]);
            for i in 0..dg.len() {
                let sig = sigmoid(a[i]);
                let silu = a[i] * sig;
                dg[i] = d[i] * b[i] * (sig + silu - silu * sig);
                du[i] = d[i] * silu;
            }
        });
        (tensor(grad_gate, shape.clone()), tensor(grad_up, shape))
    }

    fn cross_entropy_forward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>) {
        let (Some(z), Some(ids)) = (contiguous_f32(&logits), target_ids(&targets)) else {
            return reference::cross_entropy_forward::<Self>(logits, targets);
        };
        let z = slice(&z);
        let (n, v) = rows_and_width(logits.layout().shape());
        check_targets(&ids, v);
        let mut lse = vec![0.0f32; n];
        for_each_row(&mut lse, 1, v, |row, out| {
            out[0] = log_sum_exp(&z[row * v..(row + 1) * v]);
        });
        // In row order, in f64: the same total for any thread count.
        let loss: f64 = ids
            .iter()
            .zip(&lse)
            .enumerate()
            .filter(|(_, (t, _))| **t != IGNORE_INDEX)
            .map(|(row, (t, lse))| f64::from(lse - z[row * v + *t as usize]))
            .sum();
        (
            tensor(vec![loss as f32], Shape::new([1])),
            tensor(lse, Shape::new([n, 1])),
        )
    }

    fn cross_entropy_backward(
        logits: FloatTensor<Self>,
        targets: IntTensor<Self>,
        lse: FloatTensor<Self>,
        grad: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let (Some(z), Some(ids), Some(l), Some(g)) = (
            contiguous_f32(&logits),
            target_ids(&targets),
            contiguous_f32(&lse),
            contiguous_f32(&grad),
        ) else {
            return reference::cross_entropy_backward::<Self>(logits, targets, lse, grad);
        };
        let shape = logits.layout().shape().clone();
        let (z, l, g) = (slice(&z), slice(&l), slice(&g)[0]);
        let (_, v) = rows_and_width(&shape);
        check_targets(&ids, v);
        let mut out = vec![0.0f32; z.len()];
        for_each_row(&mut out, v, v, |row, dz| {
            let t = ids[row];
            if t == IGNORE_INDEX {
                return;
            }
            let lse = l[row];
            for (dz, z) in dz.iter_mut().zip(&z[row * v..(row + 1) * v]) {
                *dz = g * exp(z - lse);
            }
            dz[t as usize] -= g;
        });
        tensor(out, shape)
    }

    fn rms_norm(x: FloatTensor<Self>, gamma: FloatTensor<Self>, epsilon: f64) -> FloatTensor<Self> {
        let (Some(xs), Some(gs)) = (contiguous_f32(&x), contiguous_f32(&gamma)) else {
            return reference::rms_norm::<Self>(x, gamma, epsilon);
        };
        let shape = x.layout().shape().clone();
        let (xs, gs) = (slice(&xs), slice(&gs));
        let (_, d) = rows_and_width(&shape);
        let mut out = vec![0.0f32; xs.len()];
        for_each_row(&mut out, d, d, |row, y| {
            let x = &xs[row * d..(row + 1) * d];
            let r = reciprocal_rms(x, epsilon);
            for ((y, x), g) in y.iter_mut().zip(x).zip(gs) {
                *y = x * r * g;
            }
        });
        tensor(out, shape)
    }

    fn rms_norm_backward(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let (Some(xs), Some(gs), Some(ds)) = (
            contiguous_f32(&x),
            contiguous_f32(&gamma),
            contiguous_f32(&grad),
        ) else {
            return reference::rms_norm_backward::<Self>(x, gamma, grad, epsilon);
        };
        let shape = x.layout().shape().clone();
        let (xs, gs, ds) = (slice(&xs), slice(&gs), slice(&ds));
        let (_, d) = rows_and_width(&shape);
        let mut out = vec![0.0f32; xs.len()];
        for_each_row(&mut out, d, d, |row, dx| {
            let range = row * d..(row + 1) * d;
            let (x, delta) = (&xs[range.clone()], &ds[range]);
            let r = reciprocal_rms(x, epsilon);
            let dot: f32 = x
                .iter()
                .zip(delta)
                .zip(gs)
                .map(|((x, e), g)| x * e * g)
                .sum();
            let coef = dot / d as f32 * r * r * r;
            for (((dx, x), e), g) in dx.iter_mut().zip(x).zip(delta).zip(gs) {
                *dx = r * e * g - x * coef;
            }
        });
        tensor(out, shape)
    }

    fn rms_norm_gamma_backward(
        x: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        epsilon: f64,
    ) -> FloatTensor<Self> {
        let (Some(xs), Some(ds)) = (contiguous_f32(&x), contiguous_f32(&grad)) else {
            return reference::rms_norm_gamma_backward::<Self>(x, grad, epsilon);
        };
        let (xs, ds) = (slice(&xs), slice(&ds));
        let (rows, d) = rows_and_width(x.layout().shape());
        let blocks = rows.div_ceil(REDUCE_BLOCK_ROWS);
        // One partial sum per fixed block of rows, then the blocks in order.
        let mut partial = vec![0.0f32; blocks * d];
        for_each_row(&mut partial, d, REDUCE_BLOCK_ROWS * d, |block, acc| {
            let end = ((block + 1) * REDUCE_BLOCK_ROWS).min(rows);
            for row in block * REDUCE_BLOCK_ROWS..end {
                let range = row * d..(row + 1) * d;
                let (x, delta) = (&xs[range.clone()], &ds[range]);
                let r = reciprocal_rms(x, epsilon);
                for ((a, x), e) in acc.iter_mut().zip(x).zip(delta) {
                    *a += e * x * r;
                }
            }
        });
        let mut total = vec![0.0f32; d];
        for block in partial.chunks_exact(d.max(1)) {
            for (t, p) in total.iter_mut().zip(block) {
                *t += p;
            }
        }
        tensor(total, Shape::new([d]))
    }

    fn adamw_step(
        param: FloatTensor<Self>,
        grad: FloatTensor<Self>,
        moment_1: FloatTensor<Self>,
        moment_2: FloatTensor<Self>,
        step: AdamWStep,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        let shape = param.layout().shape().clone();
        let all_f32 = [&param, &grad, &moment_1, &moment_2]
            .iter()
            .all(|t| t.dtype() == DType::F32);
        if !all_f32 {
            return reference::adamw_step::<Self>(param, grad, moment_1, moment_2, step);
        }
        for (name, t) in [
            ("grad", &grad),
            ("moment_1", &moment_1),
            ("moment_2", &moment_2),
        ] {
            assert_eq!(
                t.layout().shape(),
                &shape,
                "adamw_step: {name} and the parameter differ in shape"
            );
        }
        let n = shape.num_elements();
        let grad = grad.to_contiguous();
        let g = slice(&grad);
        let (mut param, mut m, mut v) = (
            writable_f32(param),
            writable_f32(moment_1),
            writable_f32(moment_2),
        );
        let f = step.factors();
        let (ps, ms, vs) = (
            slice_mut(&mut param, n),
            slice_mut(&mut m, n),
            slice_mut(&mut v, n),
        );
        for_each_chunk_triple(ps, ms, vs, |start, p, m, v| {
            let g = &g[start..start + p.len()];
            match (f.first, f.decay.is_some()) {
                (true, true) => adamw_chunk::<true, true>(&f, g, p, m, v),
                (true, false) => adamw_chunk::<true, false>(&f, g, p, m, v),
                (false, true) => adamw_chunk::<false, true>(&f, g, p, m, v),
                (false, false) => adamw_chunk::<false, false>(&f, g, p, m, v),
            }
        });
        (param, m, v)
    }

    fn rotary(
        x: FloatTensor<Self>,
        cos: FloatTensor<Self>,
        sin: FloatTensor<Self>,
    ) -> FloatTensor<Self> {
        let shape = x.layout().shape().clone();
        let rotatable =
            x.dtype() == DType::F32 && shape.num_dims() == 4 && shape[3].is_multiple_of(2);
        let (true, Some(c), Some(s)) = (rotatable, contiguous_f32(&cos), contiguous_f32(&sin))
        else {
            return reference::rotary::<Self>(x, cos, sin);
        };
        // Rows are read through the strides (no copy for heads swapped out of the projection);
        // only rows that are not themselves contiguous need one.
        let x = match x.layout().strides()[3] == 1 && x.layout().has_positive_strides() {
            true => x,
            false => x.to_contiguous(),
        };
        let table_rows = c.layout().shape()[0];
        let [b, h, seq, d] = [shape[0], shape[1], shape[2], shape[3]];
        assert!(
            (table_rows == 1 || table_rows == b)
                && c.layout().shape().num_elements() == table_rows * seq * d,
            "rotary: cos/sin of shape {:?} for x of shape {shape:?}",
            c.layout().shape()
        );
        let strides = x.layout().strides().to_vec();
        let offset = x.layout().start_offset();
        let xs: &[f32] = x.storage();
        let (cs, ss) = (slice(&c), slice(&s));
        let half = d / 2;
        let mut out = vec![0.0f32; shape.num_elements()];
        for_each_row(&mut out, d, d, |row, y| {
            let (bi, hi, si) = (row / (h * seq), (row / seq) % h, row % seq);
            let start = offset as isize
                + bi as isize * strides[0]
                + hi as isize * strides[1]
                + si as isize * strides[2];
            let x = &xs[start as usize..start as usize + d];
            let table = (if table_rows == 1 { 0 } else { bi } * seq + si) * d;
            let (c, s) = (&cs[table..table + d], &ss[table..table + d]);
            let (y1, y2) = y.split_at_mut(half);
            let (x1, x2) = x.split_at(half);
            for j in 0..half {
                y1[j] = x1[j] * c[j] + (-x2[j]) * s[j];
                y2[j] = x2[j] * c[half + j] + x1[j] * s[half + j];
            }
        });
        tensor(out, shape)
    }
}

/// [`FusedTrainingOps::adamw_step`]'s element loop over one chunk. `FIRST` and `DECAY` are
/// constants so that each of the four variants is a branch-free loop the compiler vectorizes;
/// the operations are Burn's `AdamW`'s, in its order (see the op's documentation).
#[inline(always)]
fn adamw_chunk<const FIRST: bool, const DECAY: bool>(
    f: &AdamWFactors,
    grad: &[f32],
    param: &mut [f32],
    moment_1: &mut [f32],
    moment_2: &mut [f32],
) {
    let decay = f.decay.unwrap_or(1.0);
    for i in 0..param.len() {
        let g = grad[i];
        let (m, v) = if FIRST {
            (g * f.one_minus_beta_1, (g * g) * f.one_minus_beta_2)
        } else {
            (
                moment_1[i] * f.beta_1 + g * f.one_minus_beta_1,
                moment_2[i] * f.beta_2 + (g * g) * f.one_minus_beta_2,
            )
        };
        moment_1[i] = m;
        moment_2[i] = v;
        let delta = (m / f.correction_1) / ((v / f.correction_2).sqrt() + f.epsilon);
        let p = if DECAY { param[i] * decay } else { param[i] };
        param[i] = p - delta * f.lr;
    }
}

/// Weight elements converted to `f32` per block of [`FusedTrainingOps::frozen_matmul`]: 64 MiB
/// of `f32` at a time, however large the weight (a 128K-vocabulary tied head's embedding is
/// 1 GiB in f32).
const FROZEN_BLOCK_ELEMENTS: usize = 16 << 20;

/// `x · W` (`x · Wᵀ` when `transpose`) for a frozen `W` stored `[r, c]` in `f32`, bf16 or f16
/// and an `x` in `f32`, bf16 or f16, through [`blocked_product`] in `f32`: `x` widened (exact),
/// the stored rows converted with `half`'s slice conversion and, when `x` is half precision in
/// another dtype than `W`, rounded to `x`'s dtype (the reference's cast of the weight); the
/// output rounded to `x`'s dtype once.
fn frozen_matmul_blocked(
    x: FlexTensor,
    weight: FlexTensor,
    transpose: bool,
    block_elements: usize,
) -> FlexTensor {
    let (x, x_dtype) = widened(x);
    let w = weight.to_contiguous();
    let dims = w.layout().shape().clone();
    let (r, c) = (dims[0], dims[1]);
    let plan = BlockPlan {
        block_elements,
        align: 1,
        direct_rows: HALF_DIRECT_ROWS,
    };
    let stored = StoredRows::of(&w);
    // Values stored in `x`'s dtype need no rounding.
    let round = if w.dtype() == x_dtype {
        DType::F32
    } else {
        x_dtype
    };
    let span = |i: usize, col0: usize, out: &mut [f32]| {
        stored.read(i * c + col0, out);
        round_to(round, out);
    };
    narrowed(blocked_product(x, [r, c], transpose, plan, span), x_dtype)
}

/// Whether the fast routes take a tensor of this dtype (`f32`, bf16, f16).
fn is_float(dtype: DType) -> bool {
    matches!(dtype, DType::F32 | DType::BF16 | DType::F16)
}

/// `x` in `f32` (exact for bf16 and f16), and the dtype it came in.
fn widened(x: FlexTensor) -> (FlexTensor, DType) {
    match x.dtype() {
        DType::F32 => (x, DType::F32),
        dtype => (Flex::float_cast(x, FloatDType::F32), dtype),
    }
}

/// The `f32` result `y` rounded to `dtype` (a no-op for `f32`).
fn narrowed(y: FlexTensor, dtype: DType) -> FlexTensor {
    match dtype {
        DType::F32 => y,
        _ => Flex::float_cast(y, FloatDType::from(dtype)),
    }
}

/// Values per stack buffer of [`round_to`]'s f16 conversions.
const ROUND_CHUNK: usize = 256;

/// Rounds each value to `dtype` where it is half precision (the reference's cast of a weight
/// to `x`'s dtype; round to nearest, ties to even, as `half`'s conversions); a no-op for `f32`.
/// f16 through `half`'s slice conversions (the CPU's conversion instructions where it has
/// them), bf16 with integer operations that vectorize.
fn round_to(dtype: DType, values: &mut [f32]) {
    match dtype {
        DType::BF16 => pulp::Arch::new().dispatch(RoundToBf16(values)),
        DType::F16 => {
            let mut buffer = [half::f16::ZERO; ROUND_CHUNK];
            for chunk in values.chunks_mut(ROUND_CHUNK) {
                let halves = &mut buffer[..chunk.len()];
                halves.convert_from_f32_slice(chunk);
                halves.convert_to_f32_slice(chunk);
            }
        }
        _ => {}
    }
}

/// [`round_to`] for bf16 as a [`pulp::WithSimd`] operation: adding `0x7FFF` plus the kept
/// part's lowest bit and clearing the low 16 bits rounds to nearest, ties to even (a finite
/// value past bf16's largest becomes infinity); a NaN is kept as it is.
struct RoundToBf16<'a>(&'a mut [f32]);

impl pulp::WithSimd for RoundToBf16<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for v in self.0.iter_mut() {
            let bits = v.to_bits();
            let rounded = bits.wrapping_add(0x7FFF + ((bits >> 16) & 1)) & 0xFFFF_0000;
            *v = if v.is_nan() {
                *v
            } else {
                f32::from_bits(rounded)
            };
        }
    }
}

/// The values of a contiguous `f32`, bf16 or f16 weight, read as `f32`.
enum StoredRows<'a> {
    F32(&'a [f32]),
    Bf16(&'a [half::bf16]),
    F16(&'a [half::f16]),
}

impl<'a> StoredRows<'a> {
    fn of(w: &'a FlexTensor) -> Self {
        let expect = "a contiguous float weight";
        match w.dtype() {
            DType::F32 => Self::F32(w.as_slice::<f32>().expect(expect)),
            DType::BF16 => Self::Bf16(w.as_slice::<half::bf16>().expect(expect)),
            _ => Self::F16(w.as_slice::<half::f16>().expect(expect)),
        }
    }

    /// Writes the values `start..start + out.len()` (row-major) into `out`.
    fn read(&self, start: usize, out: &mut [f32]) {
        let end = start + out.len();
        match self {
            Self::F32(src) => out.copy_from_slice(&src[start..end]),
            Self::Bf16(src) => src[start..end].convert_to_f32_slice(out),
            Self::F16(src) => src[start..end].convert_to_f32_slice(out),
        }
    }
}

/// [`dequantize_span`] as a [`pulp::WithSimd`] operation: its loops compiled for the CPU's
/// vector extensions (a closure body would be compiled for the baseline target, scalar).
struct DequantizeSpan<'a> {
    format: crate::quantized::QuantFormat,
    codes: &'a [u8],
    params: &'a [half::f16],
    col0: usize,
    out: &'a mut [f32],
}

impl pulp::WithSimd for DequantizeSpan<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        dequantize_span(self.format, self.codes, self.params, self.col0, self.out);
    }
}

/// `x · Mᵀ` (`x · M` without `transpose`) for a block-quantized `M` `[rows, layout.cols]` and
/// an `x` in `f32`, bf16 or f16, through [`blocked_product`] in `f32`: stored rows dequantized
/// under run-time SIMD dispatch (column blocks start at multiples of 32, whole quantization
/// blocks) and, for a half-precision `x`, rounded to its dtype; the output in `x`'s dtype.
fn quantized_matmul_blocked(
    x: FlexTensor,
    codes: &[u8],
    scales: &[half::f16],
    layout: QuantLayout,
    transpose: bool,
    block_elements: usize,
) -> FlexTensor {
    let row_bytes = layout.row_bytes();
    let row_params = layout.blocks() * layout.format.block_params();
    let rows = codes.len() / row_bytes.max(1);
    let plan = BlockPlan {
        block_elements,
        align: QUANT_BLOCK,
        direct_rows: QUANT_DIRECT_ROWS,
    };
    let (x, x_dtype) = widened(x);
    let span = |i: usize, col0: usize, out: &mut [f32]| {
        pulp::Arch::new().dispatch(DequantizeSpan {
            format: layout.format,
            codes: &codes[i * row_bytes..(i + 1) * row_bytes],
            params: &scales[i * row_params..(i + 1) * row_params],
            col0,
            out: &mut *out,
        });
        round_to(x_dtype, out);
    };
    narrowed(
        blocked_product(x, [rows, layout.cols], transpose, plan, span),
        x_dtype,
    )
}

/// How [`blocked_product`] cuts a product.
#[derive(Clone, Copy, Debug)]
struct BlockPlan {
    /// Weight values converted per block of the matmul route.
    block_elements: usize,
    /// Blocks of output columns are a multiple of this many columns (quantization blocks).
    align: usize,
    /// Up to this many rows of `x`, the direct route ([`direct_product`]).
    direct_rows: usize,
}

/// Rows of `x` up to which a half-precision product takes the direct route: one, a decoding
/// step. Larger products go through Flex's matmul, which gives the same bits as an f32 weight
/// holding the same values (the direct route sums in another order).
const HALF_DIRECT_ROWS: usize = 1;

/// Rows of `x` up to which a quantized product takes the direct route (a few sequences
/// decoding together).
const QUANT_DIRECT_ROWS: usize = 8;

/// `x · W` (`x · Wᵀ` when `transpose`) for a frozen `W` stored `[r, c]` in a form only `span`
/// reads: `span(i, col0, out)` writes the `f32` values `col0..col0 + out.len()` of stored row
/// `i` (`col0` a multiple of `plan.align`). The product runs in blocks of output columns (of
/// `plan.block_elements` weight values at most, a multiple of `plan.align` columns), each block
/// of `W` converted by all threads (transposed: stored rows `n0..n0 + nb`, `[nb, k]`; else
/// stored columns `n0..n0 + nb` of each row, `[k, nb]`) and the rows of `x` multiplied by it in
/// one 2-D matmul; every output element is still one dot product over the whole inner
/// dimension. Up to `plan.direct_rows` rows of `x` take [`direct_product`].
fn blocked_product(
    x: FlexTensor,
    [r, c]: [usize; 2],
    transpose: bool,
    plan: BlockPlan,
    span: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> FlexTensor {
    let BlockPlan {
        block_elements,
        align,
        direct_rows,
    } = plan;
    // Output columns `n`, inner dimension `k`.
    let (k, n) = if transpose { (c, r) } else { (r, c) };
    let x_shape = x.layout().shape().clone();
    let rank = x_shape.num_dims();
    let rows = x_shape.num_elements() / k.max(1);
    let mut out = x_shape.clone();
    out[rank - 1] = n;
    if rows <= direct_rows {
        let x = x.to_contiguous();
        let y = direct_product(slice(&x), rows, [r, c], transpose, span);
        return tensor(y, out);
    }
    let x2 = Flex::float_reshape(x, Shape::new([rows, k]));
    let mut block = (block_elements / k.max(1)).clamp(1, n.max(1));
    if !transpose && block < n {
        block = (block / align * align).max(align);
    }
    let mut outputs = Vec::with_capacity(n.div_ceil(block));
    for n0 in (0..n).step_by(block) {
        let nb = block.min(n - n0);
        let mut converted = vec![0.0f32; nb * k];
        let block_w = match transpose {
            true => {
                for_each_row(&mut converted, k, k, |i, out| span(n0 + i, 0, out));
                Flex::float_transpose(tensor(converted, Shape::new([nb, k])))
            }
            false => {
                for_each_row(&mut converted, nb, nb, |i, out| span(i, n0, out));
                tensor(converted, Shape::new([k, nb]))
            }
        };
        outputs.push(Flex::float_matmul(x2.clone(), block_w));
    }
    let y = match outputs.len() {
        1 => outputs.pop().expect("one block"),
        _ => Flex::float_cat(outputs, 1),
    };
    Flex::float_reshape(y, out)
}

/// Stored rows per task of [`direct_product`] (transposed: output columns per task).
const DIRECT_GROUP: usize = 32;

/// Stored rows per task of [`direct_product`]'s row updates.
const ROW_UPDATE_CHUNK: usize = 64;

/// [`blocked_product`] for a few rows of `x` (`[rows, k]`, row-major): the weight read one
/// stored row at a time into a task's buffer (it stays in L1) and used straight away, instead
/// of converting blocks for a matmul. Transposed, each stored row gives one output column (a
/// dot product per row of `x`), [`DIRECT_GROUP`] rows per task; else each stored row `j` adds
/// `x[.., j] · W[j, ..]` to a task's partial output, [`ROW_UPDATE_CHUNK`] rows per task, and
/// the partials are added in task order (the result does not depend on the thread count).
/// Returns `[rows, n]`.
fn direct_product(
    x: &[f32],
    rows: usize,
    [r, c]: [usize; 2],
    transpose: bool,
    span: impl Fn(usize, usize, &mut [f32]) + Sync,
) -> Vec<f32> {
    let (k, n) = if transpose { (c, r) } else { (r, c) };
    let xs = x.chunks_exact(k.max(1)).take(rows);
    if transpose {
        let group = DIRECT_GROUP;
        // Per group of output columns, `[rows, group]` results.
        let mut grouped = vec![0.0f32; n.div_ceil(group) * rows * group];
        for_each_row(&mut grouped, rows * group, k * group, |g, out| {
            let mut w = vec![0.0f32; k];
            for j in 0..group.min(n - g * group) {
                span(g * group + j, 0, &mut w);
                for (i, x) in xs.clone().enumerate() {
                    out[i * group + j] = pulp::Arch::new().dispatch(Dot { a: x, b: &w });
                }
            }
        });
        let mut y = vec![0.0f32; rows * n];
        for (g, block) in grouped.chunks_exact(rows * group).enumerate() {
            let (n0, width) = (g * group, group.min(n - g * group));
            for i in 0..rows {
                y[i * n + n0..i * n + n0 + width]
                    .copy_from_slice(&block[i * group..i * group + width]);
            }
        }
        return y;
    }
    let chunks = k.div_ceil(ROW_UPDATE_CHUNK);
    let mut partial = vec![0.0f32; chunks * rows * n];
    for_each_row(
        &mut partial,
        rows * n,
        ROW_UPDATE_CHUNK * n,
        |chunk, out| {
            let mut w = vec![0.0f32; n];
            for j in chunk * ROW_UPDATE_CHUNK..((chunk + 1) * ROW_UPDATE_CHUNK).min(k) {
                span(j, 0, &mut w);
                for (x, out) in xs.clone().zip(out.chunks_exact_mut(n.max(1))) {
                    pulp::Arch::new().dispatch(Axpy {
                        a: x[j],
                        w: &w,
                        out,
                    });
                }
            }
        },
    );
    let mut y = vec![0.0f32; rows * n];
    for part in partial.chunks_exact(rows * n) {
        for (y, p) in y.iter_mut().zip(part) {
            *y += p;
        }
    }
    y
}

/// `Σ a[i] · b[i]` over sixteen running sums, then the tail; a [`pulp::WithSimd`] operation
/// so that it vectorizes for the CPU at hand.
struct Dot<'a> {
    a: &'a [f32],
    b: &'a [f32],
}

impl pulp::WithSimd for Dot<'_> {
    type Output = f32;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> f32 {
        let mut lanes = [0.0f32; 16];
        let (a16, b16) = (self.a.chunks_exact(16), self.b.chunks_exact(16));
        let tail: f32 = a16
            .remainder()
            .iter()
            .zip(b16.remainder())
            .map(|(a, b)| a * b)
            .sum();
        for (a, b) in a16.zip(b16) {
            for i in 0..16 {
                lanes[i] += a[i] * b[i];
            }
        }
        lanes.iter().sum::<f32>() + tail
    }
}

/// `out += a · w`, a [`pulp::WithSimd`] operation like [`Dot`].
struct Axpy<'a> {
    a: f32,
    w: &'a [f32],
    out: &'a mut [f32],
}

impl pulp::WithSimd for Axpy<'_> {
    type Output = ();

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) {
        for (o, w) in self.out.iter_mut().zip(self.w) {
            *o += self.a * w;
        }
    }
}

/// `t` as a contiguous `f32` tensor this op may write into: `t` itself when it owns its
/// buffer alone and starts at its beginning (the optimizer's state and parameters, each step),
/// else a copy.
fn writable_f32(t: FlexTensor) -> FlexTensor {
    let n = t.layout().shape().num_elements();
    if t.is_unique() && t.layout().contiguous_offsets() == Some((0, n)) {
        return t;
    }
    let shape = t.layout().shape().clone();
    tensor(slice(&t.to_contiguous()).to_vec(), shape)
}

/// The first `n` elements of a tensor made by [`writable_f32`].
fn slice_mut(t: &mut FlexTensor, n: usize) -> &mut [f32] {
    let storage = t
        .try_storage_mut::<f32>()
        .expect("writable_f32 returns tensors that own their buffer");
    &mut storage[..n]
}

/// `t` as a contiguous `f32` tensor (a copy when it is strided), or `None` for other dtypes.
fn contiguous_f32(t: &FlexTensor) -> Option<FlexTensor> {
    (t.dtype() == DType::F32).then(|| t.to_contiguous())
}

/// The elements of a contiguous tensor made by [`contiguous_f32`].
fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("contiguous_f32 returns contiguous f32 tensors")
}

/// The target ids as `i64`, or `None` for an int dtype the kernel does not read.
fn target_ids(targets: &FlexTensor) -> Option<Vec<i64>> {
    let t = targets.to_contiguous();
    match t.dtype() {
        DType::I64 => t.as_slice::<i64>().map(<[i64]>::to_vec),
        DType::I32 => t
            .as_slice::<i32>()
            .map(|ids| ids.iter().map(|&i| i64::from(i)).collect()),
        _ => None,
    }
}

/// Every target is an id below `vocab` or [`IGNORE_INDEX`] (the caller's contract, as for the
/// reference's gather).
fn check_targets(ids: &[i64], vocab: usize) {
    if let Some(bad) = ids
        .iter()
        .find(|&&t| t != IGNORE_INDEX && !(0..vocab as i64).contains(&t))
    {
        panic!("cross-entropy target {bad} is outside the vocabulary of {vocab}");
    }
}

/// A contiguous `f32` tensor over `values`, which it takes without a copy.
fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}

/// `1 / sqrt(mean(x²) + ε)` of one row.
fn reciprocal_rms(x: &[f32], epsilon: f64) -> f32 {
    let sum: f32 = x.iter().map(|v| v * v).sum();
    1.0 / (sum / x.len() as f32 + epsilon as f32).sqrt()
}

/// `log Σ exp(z)` of one row, stable (the maximum is subtracted first).
fn log_sum_exp(z: &[f32]) -> f32 {
    let max = z.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let sum: f32 = z.iter().map(|v| exp(v - max)).sum();
    max + sum.ln()
}

/// `1 / (1 + e^{−x})`.
#[inline(always)]
fn sigmoid(x: f32) -> f32 {
    1.0 / (1.0 + exp(-x))
}

/// `e^x` in straight-line `f32` arithmetic that the compiler vectorizes (libm's `expf` is one
/// call per element): Cody–Waite reduction `x = n·ln 2 + r`, `|r| ≤ ln 2 / 2`, Cephes' degree-6
/// polynomial for `e^r` (relative error ≤ 2 ulp), and `2^n` built in the exponent bits. Inputs
/// below −87.3 give 0 (they would be subnormal); above 88 saturate at `e^88` (no model value
/// gets there: every caller exponentiates a non-positive shift or a sigmoid argument, where
/// `1 / (1 + e^88)` is already 0 to f32).
#[inline(always)]
fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const LN2_HI: f32 = 0.693_359_4;
    const LN2_LO: f32 = -2.121_944_4e-4;
    // Adding and subtracting 1.5·2²³ rounds to the nearest integer and leaves it in the low bits.
    const ROUND: f32 = 12_582_912.0;
    let underflow = x < -87.33;
    let x = x.clamp(-87.33, 88.0);
    let shifted = x * LOG2E + ROUND;
    let n = shifted - ROUND;
    let r = x - n * LN2_HI - n * LN2_LO;
    let mut p = 1.987_569_1e-4;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 0.5;
    let er = p * r * r + r + 1.0;
    let k = (shifted.to_bits() as i32).wrapping_sub(ROUND.to_bits() as i32);
    let scale = f32::from_bits(((k + 127) << 23) as u32);
    if underflow { 0.0 } else { er * scale }
}

/// `f(row, out_row)` for every row of `out` (`width` elements each), rows shared out across
/// threads in runs of at least [`CHUNK`] elements of work (`row_cost` per row). Work that fits in
/// one run stays on the calling thread: handing it to the pool (a wake-up and a wait) would cost
/// more than the work itself, as in a decode step's one-token rows.
fn for_each_row(
    out: &mut [f32],
    width: usize,
    row_cost: usize,
    f: impl Fn(usize, &mut [f32]) + Send + Sync,
) {
    if width == 0 {
        return;
    }
    let rows = out.len() / width;
    let rows_per_task = (CHUNK / row_cost.max(1)).max(1);
    #[cfg(feature = "fast-cpu")]
    if rows > rows_per_task {
        use rayon::prelude::*;
        out.par_chunks_mut(width)
            .with_min_len(rows_per_task)
            .enumerate()
            .for_each(|(row, r)| simd(|| f(row, r)));
        return;
    }
    let _ = (rows, rows_per_task);
    out.chunks_mut(width)
        .enumerate()
        .for_each(|(row, r)| simd(|| f(row, r)));
}

/// `f(start, chunk)` for consecutive chunks of `out`, `start` the chunk's first index.
fn for_each_chunk(out: &mut [f32], f: impl Fn(usize, &mut [f32]) + Send + Sync) {
    for_each_row(out, CHUNK, CHUNK, |i, chunk| f(i * CHUNK, chunk));
}

/// [`for_each_chunk`] over two outputs of one length at once.
fn for_each_chunk_pair(
    a: &mut [f32],
    b: &mut [f32],
    f: impl Fn(usize, &mut [f32], &mut [f32]) + Send + Sync,
) {
    assert_eq!(a.len(), b.len());
    #[cfg(feature = "fast-cpu")]
    if a.len() > CHUNK {
        use rayon::prelude::*;
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, (a, b))| simd(|| f(i * CHUNK, a, b)));
        return;
    }
    a.chunks_mut(CHUNK)
        .zip(b.chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(i, (a, b))| simd(|| f(i * CHUNK, a, b)));
}

/// [`for_each_chunk`] over three outputs of one length at once.
fn for_each_chunk_triple(
    a: &mut [f32],
    b: &mut [f32],
    c: &mut [f32],
    f: impl Fn(usize, &mut [f32], &mut [f32], &mut [f32]) + Send + Sync,
) {
    assert!(a.len() == b.len() && a.len() == c.len());
    #[cfg(feature = "fast-cpu")]
    if a.len() > CHUNK {
        use rayon::prelude::*;
        a.par_chunks_mut(CHUNK)
            .zip(b.par_chunks_mut(CHUNK))
            .zip(c.par_chunks_mut(CHUNK))
            .enumerate()
            .for_each(|(i, ((a, b), c))| simd(|| f(i * CHUNK, a, b, c)));
        return;
    }
    a.chunks_mut(CHUNK)
        .zip(b.chunks_mut(CHUNK))
        .zip(c.chunks_mut(CHUNK))
        .enumerate()
        .for_each(|(i, ((a, b), c))| simd(|| f(i * CHUNK, a, b, c)));
}

/// Runs `f` compiled for the widest vector instructions the CPU has (AVX-512 or AVX2 + FMA,
/// detected at run time; baseline x86-64 otherwise), so that the kernels' element loops —
/// [`exp`] included — vectorize beyond SSE2. Only instruction selection changes: without
/// fast-math no operation is reordered or fused, so the results are the same bits.
#[inline(always)]
fn simd<R>(f: impl FnOnce() -> R) -> R {
    pulp::Arch::new().dispatch(f)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The blocked product (blocks of 3 columns, a ragged last one) against the reference's
    /// whole-tensor cast and one matmul, for both dtypes and both orientations. Each output is the
    /// same dot product over 40 terms either way: equal up to the matmul's blocking, a few ulps.
    #[test]
    fn blocked_frozen_matmul_matches_the_reference() {
        use burn::tensor::TensorData;
        // 10 rows of `x`: blocks of 3 output columns through the matmul; 1 row: the direct
        // routes (transposed: groups of 32 output columns, a ragged third of 6; else stored
        // rows updating the output).
        for batch in [[2, 5], [1, 1]] {
            let rows = batch[0] * batch[1];
            let x = FlexTensor::from_data(TensorData::new(
                values(rows * 40, 1),
                [batch[0], batch[1], 40],
            ));
            for dtype in [DType::BF16, DType::F16] {
                for transpose in [false, true] {
                    let shape = if transpose { [70, 40] } else { [40, 70] };
                    let w = TensorData::new(values(40 * 70, 2), shape).convert_dtype(dtype);
                    let w = FlexTensor::from_data(w);
                    let ours = frozen_matmul_blocked(x.clone(), w.clone(), transpose, 3 * 40);
                    let theirs = reference::frozen_matmul::<Flex>(x.clone(), w, transpose);
                    assert_eq!(ours.layout().shape().to_vec(), vec![batch[0], batch[1], 70]);
                    let d = max_abs_diff(&ours, &theirs);
                    assert!(
                        d <= 1e-5,
                        "{rows} rows, {dtype:?}, transpose {transpose}: {d}"
                    );
                }
            }
        }
    }

    /// Half-precision `x` against a frozen weight in each float dtype, through the op: every
    /// output is the dot product of `x` and the weight rounded to `x`'s dtype (the reference's
    /// cast), summed exactly and rounded to `x`'s dtype once — within one unit in the last place
    /// (the f32 sum of 512 terms is off by about 1e-7 relative; 1e-5 absolute covers the sums
    /// that cancel to near zero). One row is the decoding step, where Flex's own f16 matmul is
    /// about 15 units off (it sums in f16).
    #[test]
    fn half_inputs_are_summed_in_f32_and_rounded_once() {
        use burn::tensor::TensorData;
        let (k, n) = (512, 24);
        let round = |v: f32, dtype: DType| match dtype {
            DType::BF16 => half::bf16::from_f32(v).to_f32(),
            DType::F16 => half::f16::from_f32(v).to_f32(),
            _ => v,
        };
        for rows in [1, 10] {
            let xs = values(rows * k, 3)
                .iter()
                .map(|v| v * 2.0)
                .collect::<Vec<_>>();
            for x_dtype in [DType::BF16, DType::F16] {
                let x = FlexTensor::from_data(
                    TensorData::new(xs.clone(), [rows, k]).convert_dtype(x_dtype),
                );
                for w_dtype in [DType::F32, DType::BF16, DType::F16] {
                    for transpose in [false, true] {
                        let ws = values(k * n, 4);
                        let shape = if transpose { [n, k] } else { [k, n] };
                        let w = TensorData::new(ws.clone(), shape).convert_dtype(w_dtype);
                        let y = Flex::frozen_matmul(x.clone(), FlexTensor::from_data(w), transpose);
                        assert_eq!(y.dtype(), x_dtype, "the output is in x's dtype");
                        let y = Flex::float_cast(y, FloatDType::F32).to_contiguous();
                        for (i, j) in (0..rows).flat_map(|i| (0..n).map(move |j| (i, j))) {
                            let exact: f64 = (0..k)
                                .map(|l| {
                                    let w = ws[if transpose { j * k + l } else { l * n + j }];
                                    let w = round(round(w, w_dtype), x_dtype);
                                    round(xs[i * k + l], x_dtype) as f64 * w as f64
                                })
                                .sum();
                            let expected = round(exact as f32, x_dtype);
                            let got = slice(&y)[i * n + j];
                            assert!(
                                (got - expected).abs() <= ulp(expected, x_dtype) + 1e-5,
                                "{rows} rows, x {x_dtype:?}, weight {w_dtype:?}, transpose \
                                 {transpose}, [{i}, {j}]: {got} against {expected}"
                            );
                        }
                    }
                }
            }
        }
    }

    /// [`round_to`] against `half`'s scalar conversions, bit for bit: ties both ways, values
    /// near each format's largest, subnormals, infinities, zeros, and seeded random bits (NaN
    /// stays NaN).
    #[test]
    fn rounding_to_half_matches_the_half_crate() {
        let mut bits = vec![
            0x3F80_8000, // a tie between two bf16 values, the lower one even
            0x3F81_8000, // a tie, the upper one even
            0x3F80_8001,
            0x7F7F_FFFF, // f32's largest: infinity in bf16 and f16
            0x477F_E000, // 65504 = f16's largest
            0x477F_F000, // a tie past f16's largest: infinity
            0x3380_0000, // 2⁻²⁴, f16's smallest subnormal
            0x3300_0001,
            0x0000_0001,
            0x8000_0000,
            0x7F80_0000,
            0xFF80_0000,
            0x7FC0_0001,
        ];
        let mut state = 7u64;
        bits.extend((0..4096).map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 32) as u32
        }));
        let values: Vec<f32> = bits.iter().map(|b| f32::from_bits(*b)).collect();
        for (dtype, scalar) in [
            (
                DType::BF16,
                (|v| half::bf16::from_f32(v).to_f32()) as fn(f32) -> f32,
            ),
            (DType::F16, |v| half::f16::from_f32(v).to_f32()),
        ] {
            let mut rounded = values.clone();
            round_to(dtype, &mut rounded);
            for (v, r) in values.iter().zip(&rounded) {
                let expected = scalar(*v);
                assert!(
                    r.to_bits() == expected.to_bits() || r.is_nan() && expected.is_nan(),
                    "{dtype:?}: {v:e} ({:#010x}) rounded to {r:e}, not {expected:e}",
                    v.to_bits()
                );
            }
        }
    }

    /// One unit in the last place of `v` in `dtype` (bf16, f16; `f32` for anything else).
    fn ulp(v: f32, dtype: DType) -> f32 {
        let mantissa = match dtype {
            DType::BF16 => 7,
            DType::F16 => 10,
            _ => 23,
        };
        2f32.powi(v.abs().max(f32::MIN_POSITIVE).log2().floor() as i32 - mantissa)
    }

    /// Two results of one dtype, each element within one unit in the last place of the other's
    /// (two sums in another order, each rounded once) plus 1e-5 (f32 sums that cancel).
    fn assert_within_one_ulp(ours: &FlexTensor, theirs: &FlexTensor, what: &str) {
        assert_eq!(ours.dtype(), theirs.dtype(), "{what}: dtypes");
        let dtype = ours.dtype();
        let f32s = |t: &FlexTensor| Flex::float_cast(t.clone(), FloatDType::F32).to_contiguous();
        let (a, b) = (f32s(ours), f32s(theirs));
        for (i, (a, b)) in slice(&a).iter().zip(slice(&b)).enumerate() {
            assert!(
                (a - b).abs() <= ulp(*b, dtype) + 1e-5,
                "{what}: [{i}] {a} against {b}"
            );
        }
    }

    /// The largest elementwise difference of two f32 tensors of one shape.
    fn max_abs_diff(a: &FlexTensor, b: &FlexTensor) -> f32 {
        let (a, b) = (a.to_contiguous(), b.to_contiguous());
        slice(&a)
            .iter()
            .zip(slice(&b))
            .map(|(a, b)| (a - b).abs())
            .fold(0.0f32, f32::max)
    }

    /// Seeded values in `[-1, 1)`.
    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut state = seed;
        (0..n)
            .map(|_| {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                ((state >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The blocked quantized product against the reference (whole-matrix dequantization with
    /// tensor ops, then Burn's `linear`), every format, both orientations, a ragged last
    /// quantization block (72 columns = 2¼ blocks), 12 rows of `x` (several blocks of the
    /// matmul route: 64 columns of the non-transposed product per block, two aligned blocks and
    /// a ragged one; 3 rows per block transposed) and 6 (the direct route: transposed, groups of
    /// 32 output columns, a ragged last one; else stored rows updating the output). Same
    /// dequantized values, same dot products up to the summation order.
    #[test]
    fn blocked_quantized_matmul_matches_the_reference() {
        use crate::quantized::{QuantFormat, QuantizedMatrix};
        use burn::tensor::TensorData;
        let device = burn::tensor::Device::default();
        let (rows, cols) = (40, 72);
        for format in [QuantFormat::Q8, QuantFormat::Q4, QuantFormat::Q4_1] {
            let m = QuantizedMatrix::quantize(
                &values(rows * cols, 3),
                [rows, cols],
                format,
                "m",
                &device,
            )
            .unwrap();
            let codes = FlexTensor::from_data(m.codes.val().into_data());
            let scales = FlexTensor::from_data(m.scales.val().into_data());
            let bytes: Vec<u8> = match format {
                QuantFormat::Q8 => {
                    pulp::bytemuck::cast_slice(codes.as_slice::<i8>().unwrap()).to_vec()
                }
                QuantFormat::Q4 | QuantFormat::Q4_1 => codes.as_slice::<u8>().unwrap().to_vec(),
            };
            let sc = scales.as_slice::<half::f16>().unwrap().to_vec();
            for (transpose, batch) in [true, false]
                .into_iter()
                .flat_map(|t| [(t, [2, 3]), (t, [3, 4])])
            {
                let width = if transpose { cols } else { rows };
                for x_dtype in [DType::F32, DType::BF16, DType::F16] {
                    let x = FlexTensor::from_data(
                        TensorData::new(
                            values(batch[0] * batch[1] * width, 4),
                            [batch[0], batch[1], width],
                        )
                        .convert_dtype(x_dtype),
                    );
                    let block = if transpose { 3 * cols } else { 64 * rows };
                    let ours = quantized_matmul_blocked(
                        x.clone(),
                        &bytes,
                        &sc,
                        m.layout(),
                        transpose,
                        block,
                    );
                    let theirs = reference::quantized_matmul::<Flex>(
                        x,
                        codes.clone(),
                        scales.clone(),
                        m.layout(),
                        transpose,
                    );
                    let out = if transpose { rows } else { cols };
                    assert_eq!(
                        ours.layout().shape().to_vec(),
                        vec![batch[0], batch[1], out]
                    );
                    assert_eq!(ours.dtype(), x_dtype, "the output is in x's dtype");
                    let what = format!("{format:?}, x {x_dtype:?}, transpose {transpose}");
                    assert_within_one_ulp(&ours, &theirs, &what);
                }
            }
        }
    }

    #[test]
    fn exp_is_within_two_ulp_of_libm_and_exact_at_the_edges() {
        let mut worst = 0.0f32;
        let mut x = -87.0f32;
        while x < 88.0 {
            let (ours, libm) = (exp(x), x.exp());
            worst = worst.max(((ours - libm) / libm).abs());
            x += 0.013;
        }
        // Two ulps of f32 relative (2 · 2⁻²³ ≈ 2.4e-7).
        assert!(worst <= 2.4e-7, "worst relative error {worst}");
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1.0e9), 0.0);
        assert_eq!(exp(f32::NEG_INFINITY), 0.0);
    }
}
