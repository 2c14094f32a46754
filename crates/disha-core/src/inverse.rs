//! Batched inversion of small square matrices, for BAT unmerge (`(I + D)⁻¹`, method.md §4.5).
//!
//! The blocks are `r x r` with `r` in the tens, and unmerge runs once, not per step, so they are
//! inverted on the host: Gauss–Jordan with partial pivoting, accumulated in f64 and returned in
//! f32. That is at least as accurate as PEFT's f32 `torch.inverse`, and unlike PEFT it detects
//! singular blocks instead of returning infinities.

/// A block whose pivot fell below the singularity threshold.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) struct SingularMatrix {
    /// Index of the block in the batch.
    pub index: usize,
    /// Magnitude of the offending pivot.
    pub pivot: f64,
}

/// Inverts every `r x r` matrix of a row-major `[k, r, r]` batch.
///
/// A matrix is treated as singular when a pivot is at most `r · ε_f32 · max|M|`: its inverse would
/// carry no correct digit in f32.
pub(crate) fn invert_batch(data: &[f32], r: usize) -> Result<Vec<f32>, SingularMatrix> {
    assert!(
        r > 0 && data.len().is_multiple_of(r * r),
        "invert_batch: {} values is not a batch of {r}x{r} matrices",
        data.len()
    );
    let mut out = Vec::with_capacity(data.len());
    for (index, block) in data.chunks_exact(r * r).enumerate() {
        let inv = invert(block, r).map_err(|pivot| SingularMatrix { index, pivot })?;
        out.extend(inv.into_iter().map(|v| v as f32));
    }
    Ok(out)
}

/// Gauss–Jordan on `[A | I]`; returns the smallest bad pivot on failure.
fn invert(block: &[f32], r: usize) -> Result<Vec<f64>, f64> {
    let w = 2 * r;
    let mut m = vec![0.0f64; r * w];
    let mut scale = 0.0f64;
    for i in 0..r {
        for j in 0..r {
            let v = f64::from(block[i * r + j]);
            scale = scale.max(v.abs());
            m[i * w + j] = v;
        }
        m[i * w + r + i] = 1.0;
    }
    let threshold = r as f64 * f64::from(f32::EPSILON) * scale;
    for col in 0..r {
        let pivot_row = (col..r)
            .max_by(|&a, &b| m[a * w + col].abs().total_cmp(&m[b * w + col].abs()))
            .expect("non-empty pivot range");
        let pivot = m[pivot_row * w + col];
        if !pivot.is_finite() || pivot.abs() <= threshold {
            return Err(pivot.abs());
        }
        if pivot_row != col {
            for j in 0..w {
                m.swap(col * w + j, pivot_row * w + j);
            }
        }
        for j in 0..w {
            m[col * w + j] /= pivot;
        }
        for row in 0..r {
            let factor = m[row * w + col];
            if row == col || factor == 0.0 {
                continue;
            }
            for j in 0..w {
                m[row * w + j] -= factor * m[col * w + j];
            }
        }
    }
    Ok((0..r)
        .flat_map(|i| m[i * w + r..i * w + w].to_vec())
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn inverts_a_batch_that_needs_pivoting() {
        // [[0, 1], [1, 0]] needs a row swap; [[2, 0], [0, 4]] is diagonal.
        let inv = invert_batch(&[0., 1., 1., 0., 2., 0., 0., 4.], 2).unwrap();
        assert_eq!(inv, vec![0., 1., 1., 0., 0.5, 0., 0., 0.25]);
    }

    #[test]
    fn product_with_inverse_is_identity() {
        let a = [4.0f32, 7.0, 2.0, 3.0, 6.0, 1.0, 2.0, 5.0, 3.0];
        let inv = invert_batch(&a, 3).unwrap();
        for i in 0..3 {
            for j in 0..3 {
                let v: f32 = (0..3).map(|k| a[i * 3 + k] * inv[k * 3 + j]).sum();
                let expected = if i == j { 1.0 } else { 0.0 };
                assert!((v - expected).abs() < 1e-5, "({i},{j}) = {v}");
            }
        }
    }

    #[test]
    fn reports_the_singular_block() {
        // Second block has two equal rows.
        let err = invert_batch(&[1., 0., 0., 1., 1., 2., 1., 2.], 2).unwrap_err();
        assert_eq!(err.index, 1);
        assert!(err.pivot < 1e-6);
    }
}
