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
