//! Reference bodies of [`BlockAffineOps`](super::BlockAffineOps), written with ordinary backend
//! ops so that every backend runs them. They are the formulas of method.md §2, §4 and §8, in
//! Burn's `[in, out]` layout, and the contract the CubeCL kernels are tested against.

use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, TensorMetadata};
use burn::tensor::{FloatDType, Shape, Slice};

/// `t` in `like`'s float dtype (a no-op when it already is).
fn cast_like<B: Backend>(t: FloatTensor<B>, like: &FloatTensor<B>) -> FloatTensor<B> {
    let dtype = like.dtype();
    if t.dtype() == dtype {
        t
    } else {
        B::float_cast(t, FloatDType::from(dtype))
    }
}

fn dims2<B: Backend>(t: &FloatTensor<B>) -> [usize; 2] {
    t.shape().dims::<2>()
}

/// `S(x̃)`: the sum of the `r`-wide shards of the zero-padded input.
///
/// # Shapes
/// - `x`: `[M, in]`; output: `[M, r]`
pub(crate) fn shard_sum<B: Backend>(x: FloatTensor<B>, r: usize) -> FloatTensor<B> {
    let [m, d_input] = dims2::<B>(&x);
    let n = d_input.div_ceil(r);
    let pad = n * r - d_input;
    let x = if pad > 0 {
        let zeros = B::float_zeros(
            Shape::new([m, pad]),
            &x.device(),
            FloatDType::from(x.dtype()),
        );
        B::float_cat(vec![x, zeros], 1)
    } else {
        x
    };
    let chunks = B::float_reshape(x, Shape::new([m, n, r]));
    B::float_reshape(B::float_sum_dim(chunks, 1), Shape::new([m, r]))
}

/// `tile_rows(t)` truncated to `d_input` columns: column `i` of the result is column `i mod r`
/// of `t`.
///
/// # Shapes
/// - `t`: `[M, r]`; output: `[M, d_input]`
fn tile_columns<B: Backend>(t: FloatTensor<B>, d_input: usize) -> FloatTensor<B> {
    let [m, r] = dims2::<B>(&t);
    let n = d_input.div_ceil(r);
    let tiled = B::float_expand(
        B::float_reshape(t, Shape::new([m, 1, r])),
        Shape::new([m, n, r]),
    );
    let tiled = B::float_reshape(tiled, Shape::new([m, n * r]));
    if n * r == d_input {
        tiled
    } else {
        B::float_slice(
            tiled,
            &[Slice::full(), Slice::new(0, Some(d_input as isize), 1)],
        )
    }
}

/// Bone forward: `x·W + S(x̃)·B`.
pub(crate) fn bone_linear<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    block: FloatTensor<B>,
) -> FloatTensor<B> {
    let r = dims2::<B>(&block)[0];
    let shard_sums = shard_sum::<B>(x.clone(), r);
    bone_linear_from_sums::<B>(x, weight, block, shard_sums)
}

/// Bone forward with `S(x̃)` already computed (training keeps it for `∂L/∂B` anyway).
pub(crate) fn bone_linear_from_sums<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    block: FloatTensor<B>,
    shard_sums: FloatTensor<B>,
) -> FloatTensor<B> {
    let weight = cast_like::<B>(weight, &x);
    let block = cast_like::<B>(block, &x);
    let base = B::float_matmul(x, weight);
    B::float_add(base, B::float_matmul(shard_sums, block))
}

/// Bone input gradient: `δY·Wᵀ + tile_rows(δY·Bᵀ)`.
pub(crate) fn bone_linear_grad_input<B: Backend>(
    grad: FloatTensor<B>,
    weight: FloatTensor<B>,
    block: FloatTensor<B>,
) -> FloatTensor<B> {
    let d_input = dims2::<B>(&weight)[0];
    let weight = cast_like::<B>(weight, &grad);
    let block = cast_like::<B>(block, &grad);
    let base = B::float_matmul(grad.clone(), B::float_transpose(weight));
    let term = B::float_matmul(grad, B::float_transpose(block));
    B::float_add(base, tile_columns::<B>(term, d_input))
}

/// `[in, out]` → `[in/r, out/r, r, r]`, element `(b, a, p, q) = W_B⟨b,a⟩[p, q]`.
fn block_view<B: Backend>(weight: FloatTensor<B>, r: usize) -> FloatTensor<B> {
    let [d_input, d_output] = dims2::<B>(&weight);
    let view = B::float_reshape(weight, Shape::new([d_input / r, r, d_output / r, r]));
    B::float_swap_dims(view, 1, 2)
}

/// Inverse of [`block_view`].
fn from_block_view<B: Backend>(blocks: FloatTensor<B>) -> FloatTensor<B> {
    let [nb, na, r, _] = blocks.shape().dims::<4>();
    B::float_reshape(
        B::float_swap_dims(blocks, 1, 2),
        Shape::new([nb * r, na * r]),
    )
}

/// `W' = T_D(W)` (PEFT orientation), materialized in `like`'s dtype.
pub(crate) fn bat_transform<B: Backend>(
    weight: FloatTensor<B>,
    blocks: FloatTensor<B>,
    like: &FloatTensor<B>,
) -> FloatTensor<B> {
    let [na, r, _] = blocks.shape().dims::<3>();
    let weight = cast_like::<B>(weight, like);
    let dt = B::float_reshape(
        B::float_swap_dims(cast_like::<B>(blocks, like), 1, 2),
        Shape::new([1, na, r, r]),
    );
    let view = block_view::<B>(weight, r);
    let [nb, ..] = view.shape().dims::<4>();
    let dt = B::float_expand(dt, Shape::new([nb, na, r, r]));
    let transformed = B::float_add(
        B::float_add(view.clone(), B::float_matmul(dt.clone(), view)),
        dt,
    );
    from_block_view::<B>(transformed)
}

/// The input-block chunks `[start, end)` (in rows of `W`) of a BAT weight, each at most
/// [`blocks_chunk`] blocks.
fn row_chunks(d_input: usize, d_output: usize, r: usize) -> Vec<(usize, usize)> {
    let n_blocks = d_input / r;
    let step = blocks_chunk(d_input, d_output, r);
    (0..n_blocks)
        .step_by(step)
        .map(|start| (start * r, (start + step).min(n_blocks) * r))
        .collect()
}

fn rows(start: usize, end: usize) -> Slice {
    Slice::new(start as isize, Some(end as isize), 1)
}

/// Rows `start..end` of `weight` (one chunk of input blocks), in `like`'s dtype: a weight stored
/// in another dtype is converted one chunk at a time, never whole.
fn weight_rows<B: Backend>(
    weight: &FloatTensor<B>,
    (start, end): (usize, usize),
    like: &FloatTensor<B>,
) -> FloatTensor<B> {
    let chunk = B::float_slice(weight.clone(), &[rows(start, end), Slice::full()]);
    cast_like::<B>(chunk, like)
}

/// The sum of per-chunk partial results.
fn sum_chunks<B: Backend>(parts: impl Iterator<Item = FloatTensor<B>>) -> FloatTensor<B> {
    parts
        .reduce(B::float_add)
        .expect("a BAT weight has at least one input block")
}

/// BAT forward: `x·T_D(W) = Σ_c x[:, c]·T_D(W)[c, :]` over chunks `c` of input blocks, so that
/// only one chunk of `W'` (at most a quarter of the weight) exists at a time and none is kept.
pub(crate) fn bat_linear<B: Backend>(
    x: FloatTensor<B>,
    weight: FloatTensor<B>,
    blocks: FloatTensor<B>,
) -> FloatTensor<B> {
    let [d_input, d_output] = dims2::<B>(&weight);
    let r = blocks.shape().dims::<3>()[1];
    sum_chunks::<B>(row_chunks(d_input, d_output, r).into_iter().map(|chunk| {
        let w = weight_rows::<B>(&weight, chunk, &x);
        let x_chunk = B::float_slice(x.clone(), &[Slice::full(), rows(chunk.0, chunk.1)]);
        B::float_matmul(x_chunk, bat_transform::<B>(w, blocks.clone(), &x))
    }))
}

/// BAT input gradient: `δY·T_D(W)ᵀ`, one chunk of input columns at a time (as [`bat_linear`]).
pub(crate) fn bat_linear_grad_input<B: Backend>(
    grad: FloatTensor<B>,
    weight: FloatTensor<B>,
    blocks: FloatTensor<B>,
) -> FloatTensor<B> {
    let [d_input, d_output] = dims2::<B>(&weight);
    let r = blocks.shape().dims::<3>()[1];
    let parts: Vec<FloatTensor<B>> = row_chunks(d_input, d_output, r)
        .into_iter()
        .map(|chunk| {
            let w = weight_rows::<B>(&weight, chunk, &grad);
            let transformed = bat_transform::<B>(w, blocks.clone(), &grad);
            B::float_matmul(grad.clone(), B::float_transpose(transformed))
        })
        .collect();
    if parts.len() == 1 {
        parts.into_iter().next().expect("one part")
    } else {
        B::float_cat(parts, 1)
    }
}

/// BAT block gradient `Σ_b (W_B⟨b,a⟩ + I)·G_B⟨b,a⟩ᵀ`, reducing `G_B = xᵀ·δY` over the
/// input-block chunks of [`blocks_chunk`], so that no more than one chunk of `G_B` (and of the
/// shifted weight) exists at a time.
///
/// # Shapes
/// - `x`: `[M, in]`, `grad`: `[M, out]`, `weight`: `[in, out]`; output: `[out/r, r, r]`
pub(crate) fn bat_blocks_grad<B: Backend>(
    x: FloatTensor<B>,
    grad: FloatTensor<B>,
    weight: FloatTensor<B>,
    r: usize,
) -> FloatTensor<B> {
    let [d_input, d_output] = dims2::<B>(&weight);
    let device = x.device();
    let dtype = FloatDType::from(x.dtype());
    let identity = B::float_from_data(
        burn::tensor::TensorData::new(
            (0..r * r)
                .map(|i| if i / r == i % r { 1.0f32 } else { 0.0 })
                .collect::<Vec<_>>(),
            [1, 1, r, r],
        )
        .convert_dtype(dtype.into()),
        &device,
    );
    let x_t = B::float_transpose(x);
    let total = sum_chunks::<B>(row_chunks(d_input, d_output, r).into_iter().map(|chunk| {
        let x_chunk = B::float_slice(x_t.clone(), &[rows(chunk.0, chunk.1), Slice::full()]);
        let g = block_view::<B>(B::float_matmul(x_chunk, grad.clone()), r);
        let w = block_view::<B>(weight_rows::<B>(&weight, chunk, &x_t), r);
        let shifted = B::float_add(w, identity.clone());
        let per_block = B::float_matmul(shifted, B::float_swap_dims(g, 2, 3));
        B::float_sum_dim(per_block, 0)
    }));
    B::float_reshape(total, Shape::new([d_output / r, r, r]))
}

/// Largest weight-shaped slice (of `W'` or `G_B = xᵀ·δY`, in elements) the BAT ops form at once:
/// 4 Mi elements (16 MiB in f32).
const CHUNK_ELEMENTS: usize = 1 << 22;

/// Weights up to this many elements (4 MiB in f32) are transformed in one piece: their `W'` is
/// small, and one piece keeps the products bit-identical to a plain `x·W` when `D = 0`.
const WHOLE_ELEMENTS: usize = 1 << 20;

/// Input blocks per chunk of the BAT ops: all of them for weights up to [`WHOLE_ELEMENTS`];
/// otherwise at most [`CHUNK_ELEMENTS`] and at most a quarter of the weight, so the transient
/// buffers (a `W'` or `G_B` slice, the matching shifted-weight slice, per-block products) stay
/// well below one `in × out` buffer. At least one block.
pub(crate) fn blocks_chunk(d_input: usize, d_output: usize, r: usize) -> usize {
    if d_input * d_output <= WHOLE_ELEMENTS {
        return (d_input / r).max(1);
    }
    let by_budget = CHUNK_ELEMENTS / (r * d_output).max(1);
    let by_quarter = d_input / r / 4;
    by_budget.min(by_quarter).max(1)
}

#[cfg(test)]
mod tests {
    use super::blocks_chunk;

    #[test]
    fn chunks_stay_below_a_quarter_of_the_weight() {
        // Llama-2-7B shapes, r = 16 and 64: a quarter of the weight, or the 4 Mi budget.
        for (d_input, d_output, r) in [(4096, 4096, 16), (4096, 11008, 64), (11008, 4096, 16)] {
            let rows = blocks_chunk(d_input, d_output, r) * r;
            assert!(rows * d_output <= (d_input * d_output / 4).max(r * d_output));
            assert!(rows * d_output <= 1 << 22 || rows == r);
            assert!(rows >= r);
        }
        // 2048 x 2048, r = 16: 512 rows (a quarter) = 1 Mi elements.
        assert_eq!(blocks_chunk(2048, 2048, 16), 32);
        // Small weights are transformed whole; just above the limit, in quarters.
        assert_eq!(blocks_chunk(48, 32, 8), 6);
        assert_eq!(blocks_chunk(1024, 1040, 16), 16);
    }
}
