//! Dimension-sharding tensor helpers shared by Bone and MiSS-mini.
//!
//! All of them work in Burn's `[in, out]` layout and on plain, differentiable tensor ops, so every
//! backend runs them and autodiff derives their gradients.

use burn::tensor::ops::PadMode;
use burn::tensor::{DType, Tensor};

/// The block sum `S(x̃) = Σ_c x̃_c` of the zero-padded input (method.md §1–2).
///
/// # Shapes
/// - `x`: `[M, in]`
/// - output: `[M, r]`
pub(crate) fn shard_sum(x: Tensor<2>, r: usize) -> Tensor<2> {
    let [m, d_input] = x.dims();
    let n = d_input.div_ceil(r);
    let pad = n * r - d_input;
    let x = if pad > 0 {
        x.pad([(0, pad)], PadMode::Constant(0.0))
    } else {
        x
    };
    x.reshape([m, n, r]).sum_dim(1).reshape([m, r])
}

/// `W + sign · ΔW` where `ΔW_B[i, o] = block[i mod r, o mod c]` (Bone: `c = out`; mini: `c = mini_r`).
///
/// The tiled delta is never materialized: the weight is viewed as `[in/r, r, out/c, c]` and the
/// block is broadcast over it; the partial last shard (`in % r` rows) is handled separately,
/// exactly like PEFT's remainder path.
///
/// # Shapes
/// - `weight`: `[in, out]`
/// - `block`: `[r, c]` with `out % c = 0` and `r ≤ in`
/// - output: `[in, out]`
pub(crate) fn add_tiled_block(weight: Tensor<2>, block: Tensor<2>, sign: f64) -> Tensor<2> {
    let [d_input, d_output] = weight.dims();
    let [r, c] = block.dims();
    assert!(
        r <= d_input && c > 0 && d_output % c == 0,
        "add_tiled_block: block [{r}, {c}] does not tile weight [{d_input}, {d_output}]"
    );
    let tiles = d_output / c;
    let block = block.mul_scalar(sign);
    let n_full = d_input / r;
    let rem = d_input % r;
    let main = weight
        .clone()
        .narrow(0, 0, n_full * r)
        .reshape([n_full, r, tiles, c])
        .add(block.clone().reshape([1, r, 1, c]))
        .reshape([n_full * r, d_output]);
    if rem == 0 {
        return main;
    }
    let tail = weight
        .narrow(0, n_full * r, rem)
        .reshape([rem, tiles, c])
        .add(block.narrow(0, 0, rem).reshape([rem, 1, c]))
        .reshape([rem, d_output]);
    Tensor::cat(vec![main, tail], 0)
}

/// `y + tile_cols(t)`: adds a `[M, c]` term to every one of the `out / c` column tiles of `y`
/// without building the `[M, out]` tiled copy.
///
/// # Shapes
/// - `y`: `[M, out]`, `term`: `[M, c]` with `out % c = 0`
/// - output: `[M, out]`
pub(crate) fn add_tiled_cols(y: Tensor<2>, term: Tensor<2>) -> Tensor<2> {
    let [m, d_output] = y.dims();
    let [_, c] = term.dims();
    if c == d_output {
        return y + term;
    }
    y.reshape([m, d_output / c, c])
        .add(term.reshape([m, 1, c]))
        .reshape([m, d_output])
}

/// `y + bias` (broadcast over rows, f32).
pub(crate) fn add_bias(y: Tensor<2>, bias: Option<Tensor<1>>) -> Tensor<2> {
    match bias {
        Some(bias) => y + bias.cast(DType::F32).unsqueeze_dim(0),
        None => y,
    }
}

/// Flattens `[..., d]` to `[M, d]`.
pub(crate) fn flatten_rows<const D: usize>(x: Tensor<D>) -> Tensor<2> {
    let dims = x.dims();
    let d = dims[D - 1];
    let m = dims[..D - 1].iter().product::<usize>();
    x.reshape([m, d])
}

/// Restores `[M, d]` to `[..., d]` with the leading dims of `like`.
pub(crate) fn unflatten_rows<const D: usize>(y: Tensor<2>, like: [usize; D]) -> Tensor<D> {
    let mut dims = like;
    dims[D - 1] = y.dims()[1];
    y.reshape(dims)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::{assert_close, device, t2};

    #[test]
    fn shard_sum_pads_the_last_chunk_with_zeros() {
        // G1: x = [1, 2, 3, 4, 5], r = 2 → chunks [1,2] [3,4] [5,0] → S = [9, 6].
        let x = t2(&[&[1., 2., 3., 4., 5.]]);
        assert_close(shard_sum(x, 2), &[&[9., 6.]], 0.0);
    }

    #[test]
    fn add_tiled_block_handles_partial_shard_and_column_tiles() {
        let w = Tensor::<2>::zeros([5, 4], &device());
        // Bone-style (c = out) with in % r = 1.
        let b = t2(&[&[1., 2., 3., 4.], &[10., 20., 30., 40.]]);
        let expected: &[&[f64]] = &[
            &[1., 2., 3., 4.],
            &[10., 20., 30., 40.],
            &[1., 2., 3., 4.],
            &[10., 20., 30., 40.],
            &[1., 2., 3., 4.],
        ];
        assert_close(add_tiled_block(w.clone(), b, 1.0), expected, 0.0);
        // Mini-style (c = 2 < out).
        let bm = t2(&[&[1., 2.], &[3., 4.]]);
        let expected: &[&[f64]] = &[
            &[-1., -2., -1., -2.],
            &[-3., -4., -3., -4.],
            &[-1., -2., -1., -2.],
            &[-3., -4., -3., -4.],
            &[-1., -2., -1., -2.],
        ];
        assert_close(add_tiled_block(w, bm, -1.0), expected, 0.0);
    }

    #[test]
    fn add_tiled_cols_broadcasts_each_tile() {
        let y = t2(&[&[0., 0., 0., 0.], &[1., 1., 1., 1.]]);
        let t = t2(&[&[1., 2.], &[3., 4.]]);
        assert_close(
            add_tiled_cols(y, t),
            &[&[1., 2., 1., 2.], &[4., 5., 4., 5.]],
            0.0,
        );
    }
}
