//! [`Wkv7Ops`] on Flex: one task per batch row and head (shared out across rayon's threads with
//! the `fast-cpu` feature), each a sequential pass over its tokens with the `N × N` state in a
//! local buffer, every loop over a contiguous state row (vectorized for the CPU at hand).
//! Anything that is not `f32` takes the reference bodies.

use burn::backend::Flex;
use burn::backend::tensor::FloatTensor;
use burn::tensor::{Bytes, DType, Shape};
use burn_flex::{FlexTensor, Layout};

use super::Wkv7Ops;
use super::reference;

impl Wkv7Ops for Flex {
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
        let (y, last, _, _) = forward(r, w, k, v, alpha, beta, state, chunk_len, false);
        reference::pack::<Self>(y, last)
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
        forward(r, w, k, v, alpha, beta, state, chunk_len, true)
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
        if all.iter().any(|t| t.dtype() != DType::F32) {
            return reference::backward::<Self>(
                [r, w, k, v, alpha, beta],
                checkpoints,
                sa,
                grad_y,
                grad_state,
                chunk_len,
            );
        }
        let dims = Dims::of(&r);
        let owned = all.map(FlexTensor::to_contiguous);
        let [r, w, k, v, alpha, beta, checkpoints, sa, grad_y, grad_state] =
            owned.each_ref().map(slice);
        let heads = for_each_head(dims.b * dims.h, |head| {
            simd(BackwardHead {
                dims,
                head,
                chunk_len,
                vectors: [r, w, k, v, alpha, beta, sa, grad_y],
                checkpoints,
                grad_state,
            })
        });
        let mut per_token: [Vec<f32>; 6] = Default::default();
        let mut grad_states = Vec::with_capacity(grad_state.len());
        for (head, (grads, ds)) in heads.into_iter().enumerate() {
            for (out, g) in per_token.iter_mut().zip(grads) {
                dims.scatter(out, head, &g);
            }
            grad_states.extend_from_slice(&ds);
        }
        let [dr, dw, dk, dv, dalpha, dbeta] =
            per_token.map(|values| tensor(values, dims.sequence()));
        let dstate = tensor(grad_states, dims.state());
        (dr, dw, dk, dv, dalpha, dbeta, dstate)
    }
}

/// The sizes of one call: batch rows, tokens, heads, head size.
#[derive(Clone, Copy, Debug)]
struct Dims {
    b: usize,
    t: usize,
    h: usize,
    n: usize,
}

impl Dims {
    fn of(r: &FlexTensor) -> Self {
        let [b, t, h, n] = r.layout().shape().dims::<4>();
        Dims { b, t, h, n }
    }

    fn sequence(&self) -> Shape {
        Shape::new([self.b, self.t, self.h, self.n])
    }

    fn state(&self) -> Shape {
        Shape::new([self.b, self.h, self.n, self.n])
    }

    /// Offset of the vector of `head` (`batch·H + h`) at token `t` in a `[batch, seq, H, N]`
    /// tensor.
    fn offset(&self, head: usize, t: usize) -> usize {
        let (bi, hi) = (head / self.h, head % self.h);
        ((bi * self.t + t) * self.h + hi) * self.n
    }

    /// Writes one head's `[seq, N]` values into a `[batch, seq, H, N]` buffer (allocated on
    /// the first call).
    fn scatter(&self, out: &mut Vec<f32>, head: usize, values: &[f32]) {
        if out.is_empty() {
            out.resize(self.b * self.t * self.h * self.n, 0.0);
        }
        for (t, row) in values.chunks_exact(self.n).enumerate() {
            let at = self.offset(head, t);
            out[at..at + self.n].copy_from_slice(row);
        }
    }
}

/// The forward pass; with `save`, also the checkpoints and `sa` (else two empty tensors).
#[allow(clippy::too_many_arguments)]
fn forward(
    r: FlexTensor,
    w: FlexTensor,
    k: FlexTensor,
    v: FlexTensor,
    alpha: FlexTensor,
    beta: FlexTensor,
    state: FlexTensor,
    chunk_len: usize,
    save: bool,
) -> (FlexTensor, FlexTensor, FlexTensor, FlexTensor) {
    let all = [&r, &w, &k, &v, &alpha, &beta, &state];
    if all.iter().any(|t| t.dtype() != DType::F32) {
        return reference::forward::<Flex>(r, w, k, v, alpha, beta, state, chunk_len);
    }
    let dims = Dims::of(&r);
    let owned = all.map(FlexTensor::to_contiguous);
    let [r, w, k, v, alpha, beta, state] = owned.each_ref().map(slice);
    let heads = for_each_head(dims.b * dims.h, |head| {
        simd(ForwardHead {
            dims,
            head,
            chunk_len,
            save,
            vectors: [r, w, k, v, alpha, beta],
            state,
        })
    });
    let (mut y, mut sa) = (Vec::new(), Vec::new());
    let mut last = Vec::with_capacity(state.len());
    let mut checkpoints = Vec::new();
    for (head, out) in heads.into_iter().enumerate() {
        dims.scatter(&mut y, head, &out.y);
        if save {
            dims.scatter(&mut sa, head, &out.sa);
        }
        last.extend_from_slice(&out.state);
        checkpoints.extend_from_slice(&out.checkpoints);
    }
    let chunks = if save { dims.t.div_ceil(chunk_len) } else { 0 };
    let checkpoints = tensor(
        checkpoints,
        Shape::new([dims.b, dims.h, chunks, dims.n, dims.n]),
    );
    let sa = match save {
        true => tensor(sa, dims.sequence()),
        false => tensor(Vec::new(), Shape::new([0])),
    };
    (
        tensor(y, dims.sequence()),
        tensor(last, dims.state()),
        checkpoints,
        sa,
    )
}

/// One head's forward results: `y` and `sa` as `[seq, N]`, the final state, the checkpoints.
struct ForwardOutput {
    y: Vec<f32>,
    sa: Vec<f32>,
    state: Vec<f32>,
    checkpoints: Vec<f32>,
}

/// The forward recurrence of one head (a [`pulp::WithSimd`] operation, so that its loops
/// vectorize for the CPU at hand).
struct ForwardHead<'a> {
    dims: Dims,
    head: usize,
    chunk_len: usize,
    save: bool,
    /// `r, w, k, v, α, β`, `[batch, seq, H, N]` each.
    vectors: [&'a [f32]; 6],
    state: &'a [f32],
}

impl pulp::WithSimd for ForwardHead<'_> {
    type Output = ForwardOutput;

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> ForwardOutput {
        let Dims { t, n, .. } = self.dims;
        let nn = n * n;
        let mut s = self.state[self.head * nn..(self.head + 1) * nn].to_vec();
        let mut y = vec![0.0; t * n];
        let mut sa_out = if self.save {
            vec![0.0; t * n]
        } else {
            Vec::new()
        };
        let mut checkpoints = Vec::new();
        for ti in 0..t {
            let at = self.dims.offset(self.head, ti);
            let [r, w, k, v, alpha, beta] = self.vectors.map(|x| &x[at..at + n]);
            if self.save && ti % self.chunk_len == 0 {
                checkpoints.extend_from_slice(&s);
            }
            for (i, row) in s.chunks_exact_mut(n).enumerate() {
                let sa = dot(row, alpha);
                y[ti * n + i] = update_row(row, [w, beta, k, r], sa, v[i]);
                if self.save {
                    sa_out[ti * n + i] = sa;
                }
            }
        }
        ForwardOutput {
            y,
            sa: sa_out,
            state: s,
            checkpoints,
        }
    }
}

/// The backward pass of one head (a [`pulp::WithSimd`] operation): per chunk from the last,
/// the chunk's states recomputed from its checkpoint, then the reverse recurrence of
/// [`reference::backward`] one state row at a time. Returns the six per-token gradients as
/// `[seq, N]` and the initial state's gradient.
struct BackwardHead<'a> {
    dims: Dims,
    head: usize,
    chunk_len: usize,
    /// `r, w, k, v, α, β, sa, δy`, `[batch, seq, H, N]` each.
    vectors: [&'a [f32]; 8],
    checkpoints: &'a [f32],
    grad_state: &'a [f32],
}

impl pulp::WithSimd for BackwardHead<'_> {
    type Output = ([Vec<f32>; 6], Vec<f32>);

    #[inline(always)]
    fn with_simd<S: pulp::Simd>(self, _: S) -> Self::Output {
        let Dims { t, n, .. } = self.dims;
        let nn = n * n;
        let chunks = t.div_ceil(self.chunk_len);
        let mut ds = self.grad_state[self.head * nn..(self.head + 1) * nn].to_vec();
        let mut states = vec![0.0; (self.chunk_len.min(t) + 1) * nn];
        // δr, δw, δk, δv, δα, δβ as [seq, N].
        let mut grads: [Vec<f32>; 6] = std::array::from_fn(|_| vec![0.0; t * n]);
        for chunk in (0..chunks).rev() {
            let start = chunk * self.chunk_len;
            let end = (start + self.chunk_len).min(t);
            let checkpoint = (self.head * chunks + chunk) * nn;
            states[..nn].copy_from_slice(&self.checkpoints[checkpoint..checkpoint + nn]);
            for ti in start..end {
                let at = self.dims.offset(self.head, ti);
                let [_, w, k, v, _, beta, sa, _] = self.vectors.map(|x| &x[at..at + n]);
                let (done, rest) = states.split_at_mut((ti - start + 1) * nn);
                let before = &done[(ti - start) * nn..];
                for (i, (row, old)) in rest[..nn]
                    .chunks_exact_mut(n)
                    .zip(before.chunks_exact(n))
                    .enumerate()
                {
                    let (sai, vi) = (sa[i], v[i]);
                    for ((((row, old), w), beta), k) in
                        row.iter_mut().zip(old).zip(w).zip(beta).zip(k)
                    {
                        *row = old * w + sai * beta + vi * k;
                    }
                }
            }
            for ti in (start..end).rev() {
                let at = self.dims.offset(self.head, ti);
                let [r, w, k, v, alpha, beta, sa, dy] = self.vectors.map(|x| &x[at..at + n]);
                let before = &states[(ti - start) * nn..(ti - start + 1) * nn];
                let after = &states[(ti - start + 1) * nn..(ti - start + 2) * nn];
                let [dr, dw, dk, dv, dalpha, dbeta] = &mut grads;
                let token = ti * n..(ti + 1) * n;
                let (dr, dw, dk) = (
                    &mut dr[token.clone()],
                    &mut dw[token.clone()],
                    &mut dk[token.clone()],
                );
                let (dv, dalpha, dbeta) = (
                    &mut dv[token.clone()],
                    &mut dalpha[token.clone()],
                    &mut dbeta[token],
                );
                for (i, row) in ds.chunks_exact_mut(n).enumerate() {
                    let old = &before[i * n..(i + 1) * n];
                    let new = &after[i * n..(i + 1) * n];
                    let (dyi, vi, sai) = (dy[i], v[i], sa[i]);
                    for (((((row, r), dr), new), dw), old) in row
                        .iter_mut()
                        .zip(r)
                        .zip(dr.iter_mut())
                        .zip(new)
                        .zip(dw.iter_mut())
                        .zip(old)
                    {
                        *row += dyi * r;
                        *dr += dyi * new;
                        *dw += *row * old;
                    }
                    for ((row, dk), dbeta) in row.iter().zip(dk.iter_mut()).zip(dbeta.iter_mut()) {
                        *dk += vi * row;
                        *dbeta += sai * row;
                    }
                    dv[i] = dot(row, k);
                    let dsa = dot(row, beta);
                    for ((((row, dalpha), old), w), alpha) in row
                        .iter_mut()
                        .zip(dalpha.iter_mut())
                        .zip(old)
                        .zip(w)
                        .zip(alpha)
                    {
                        *dalpha += dsa * old;
                        *row = *row * w + dsa * alpha;
                    }
                }
            }
        }
        (grads, ds)
    }
}

/// One state row's step, `row ← row ⊙ w + sa·β + v_i·k`, returning `⟨row, r⟩` of the new row
/// (eight running sums, as [`dot`]).
#[inline(always)]
fn update_row(row: &mut [f32], [w, beta, k, r]: [&[f32]; 4], sa: f32, vi: f32) -> f32 {
    let mut lanes = [0.0f32; 8];
    let mut tail = 0.0;
    let mut row8 = row.chunks_exact_mut(8);
    let (w8, beta8, k8, r8) = (
        w.chunks_exact(8),
        beta.chunks_exact(8),
        k.chunks_exact(8),
        r.chunks_exact(8),
    );
    let rest = [
        w8.remainder(),
        beta8.remainder(),
        k8.remainder(),
        r8.remainder(),
    ];
    for ((((row, w), beta), k), r) in (&mut row8).zip(w8).zip(beta8).zip(k8).zip(r8) {
        for i in 0..8 {
            row[i] = row[i] * w[i] + sa * beta[i] + vi * k[i];
            lanes[i] += row[i] * r[i];
        }
    }
    let [w, beta, k, r] = rest;
    for (i, x) in row8.into_remainder().iter_mut().enumerate() {
        *x = *x * w[i] + sa * beta[i] + vi * k[i];
        tail += *x * r[i];
    }
    lanes.iter().sum::<f32>() + tail
}

/// `Σ a[j] · b[j]` over eight running sums (vectorizes; the order is fixed, so the result does
/// not depend on the machine).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let (a8, b8) = (a.chunks_exact(8), b.chunks_exact(8));
    let tail: f32 = a8
        .remainder()
        .iter()
        .zip(b8.remainder())
        .map(|(a, b)| a * b)
        .sum();
    for (a, b) in a8.zip(b8) {
        for i in 0..8 {
            lanes[i] += a[i] * b[i];
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// `f(head)` for every head, in parallel with the `fast-cpu` feature; results in head order.
fn for_each_head<R: Send>(heads: usize, f: impl Fn(usize) -> R + Send + Sync) -> Vec<R> {
    #[cfg(feature = "fast-cpu")]
    if heads > 1 {
        use rayon::prelude::*;
        return (0..heads).into_par_iter().map(f).collect();
    }
    (0..heads).map(f).collect()
}

/// Runs a [`pulp::WithSimd`] operation compiled for the widest vector instructions the CPU has.
fn simd<O: pulp::WithSimd>(op: O) -> O::Output {
    pulp::Arch::new().dispatch(op)
}

/// The elements of a contiguous `f32` tensor.
fn slice(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>().expect("a contiguous f32 tensor")
}

/// A contiguous `f32` tensor over `values`, which it takes without a copy.
fn tensor(values: Vec<f32>, shape: Shape) -> FlexTensor {
    FlexTensor::new(
        Bytes::from_elems(values),
        Layout::contiguous(shape),
        DType::F32,
    )
}
