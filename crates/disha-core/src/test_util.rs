//! Helpers shared by the unit tests.

use burn::tensor::{Device, Tensor, TensorData};

pub(crate) fn device() -> Device {
    Device::default()
}

/// A 2-D f32 tensor from rows.
pub(crate) fn t2(rows: &[&[f64]]) -> Tensor<2> {
    let cols = rows[0].len();
    let values: Vec<f32> = rows
        .iter()
        .flat_map(|r| r.iter().map(|&v| v as f32))
        .collect();
    Tensor::from_data(TensorData::new(values, [rows.len(), cols]), &device())
}

/// Asserts `actual` equals the rows within `tol` (absolute).
pub(crate) fn assert_close(actual: Tensor<2>, expected: &[&[f64]], tol: f64) {
    let dims = actual.dims();
    assert_eq!(dims, [expected.len(), expected[0].len()], "shape");
    let values = actual.into_data().try_to_vec_as::<f32>().unwrap();
    for (i, row) in expected.iter().enumerate() {
        for (j, &e) in row.iter().enumerate() {
            let a = f64::from(values[i * dims[1] + j]);
            assert!(
                (a - e).abs() <= tol,
                "[{i}, {j}]: got {a}, expected {e} (tol {tol})"
            );
        }
    }
}

/// A tensor of SplitMix64 values in `[-0.5, 0.5)`, on `device`.
pub(crate) fn random<const D: usize>(seed: u64, shape: [usize; D], device: &Device) -> Tensor<D> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    let n = shape.iter().product();
    let values: Vec<f32> = (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
}

/// Max `|a − b|` over all elements.
pub(crate) fn max_abs_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
    (a - b).abs().max().into_scalar::<f32>()
}
