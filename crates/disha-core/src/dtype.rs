//! Dtype helpers: adapters compute in f32 whatever the base precision (PEFT's autocast rule).

use burn::tensor::{DType, Tensor};

/// `t` in f32 (a no-op when it already is).
pub(crate) fn to_f32<const D: usize>(t: Tensor<D>) -> Tensor<D> {
    to_dtype(t, DType::F32)
}

/// `t` in `dtype` (a no-op when it already is).
pub(crate) fn to_dtype<const D: usize>(t: Tensor<D>, dtype: DType) -> Tensor<D> {
    if t.dtype() == dtype { t } else { t.cast(dtype) }
}
