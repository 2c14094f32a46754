//! The fused WKV-7 recurrence (RWKV-7's time mix): one op for the whole sequence, with a
//! hand-written backward that keeps one state per chunk instead of one per token (the kernels
//! chapter of the docs has the design and the measurements).
//!
//! - [`Wkv7Ops`] is a Burn backend extension: a reference body in ordinary backend ops (every
//!   backend), a Flex kernel (one multi-threaded pass per batch row and head) and CubeCL
//!   kernels for CUDA, ROCm and WGPU (one cube per batch row and head, one unit per state row).
//! - [`wkv7`] is the tensor-level entry point; `disha-models`' RWKV-7 time mix calls it unless
//!   the [kernel policy](crate::kernels::kernel_policy) is
//!   [`Reference`](crate::kernels::KernelPolicy::Reference), which keeps the chunked
//!   tensor-op formulation under Burn's autodiff.

mod autodiff;
#[cfg(any(feature = "wgpu", feature = "cuda"))]
mod cube;
#[cfg(feature = "flex")]
mod flex;
mod ops;
mod reference;

use burn::backend::Dispatch;
use burn::tensor::Tensor;

pub use ops::Wkv7Ops;

/// The WKV-7 recurrence over a sequence from `state`, per batch row and head:
///
/// ```text
/// sa_t = S_{t-1} · α_t
/// S_t  = S_{t-1} ⊙ w_tᵀ + sa_t · β_tᵀ + v_t · k_tᵀ
/// y_t  = S_t · r_t
/// ```
///
/// Returns every `y_t` and the final state; differentiable in all seven inputs. Training keeps
/// the inputs, every `sa_t` and the state before every chunk of `chunk_len` tokens; the
/// backward recomputes a chunk's states from its checkpoint (exact for any decay `w`: nothing
/// is divided by it). Computes in `f32` (other dtypes take the reference bodies).
///
/// # Shapes
/// - `r`, `w`, `k`, `v`, `alpha`, `beta`: `[batch, seq, H, N]` with `seq ≥ 1`
/// - `state`: `[batch, H, N, N]`
/// - → (`[batch, seq, H, N]`, `[batch, H, N, N]`)
///
/// # Panics
/// If the shapes do not fit together, `seq` is 0 or `chunk_len` is 0 (programmer errors: the
/// model forms these tensors).
#[allow(clippy::too_many_arguments)]
pub fn wkv7(
    r: Tensor<4>,
    w: Tensor<4>,
    k: Tensor<4>,
    v: Tensor<4>,
    alpha: Tensor<4>,
    beta: Tensor<4>,
    state: Tensor<4>,
    chunk_len: usize,
) -> (Tensor<4>, Tensor<4>) {
    let dims = r.dims();
    let [b, t, h, n] = dims;
    assert!(
        [&w, &k, &v, &alpha, &beta].iter().all(|x| x.dims() == dims)
            && state.dims() == [b, h, n, n]
            && t > 0
            && chunk_len > 0,
        "wkv7: sequences {dims:?}, state {:?} and chunk length {chunk_len} do not fit together",
        state.dims()
    );
    let packed = Tensor::<2>::from_dispatch(<Dispatch as Wkv7Ops>::wkv7(
        r.into_dispatch(),
        w.into_dispatch(),
        k.into_dispatch(),
        v.into_dispatch(),
        alpha.into_dispatch(),
        beta.into_dispatch(),
        state.into_dispatch(),
        chunk_len,
    ));
    let split = t * h * n;
    let y = packed.clone().narrow(1, 0, split).reshape([b, t, h, n]);
    let last = packed.narrow(1, split, h * n * n).reshape([b, h, n, n]);
    (y, last)
}

#[cfg(test)]
mod tests {
    use burn::backend::Dispatch;
    use burn::backend::tensor::FloatTensor;
    use burn::tensor::{Device, Tensor};

    use super::{Wkv7Ops, reference};
    use crate::test_util::{max_abs_diff, random};

    /// `r, w, k, v, α, β` `[b, t, h, n]` and a state, in `[-0.5, 0.5)` except the decay, which
    /// lies in `[w_low, w_low + 0.45)`.
    fn inputs(dims: [usize; 4], w_low: f32, seed: u64, device: &Device) -> [Tensor<4>; 7] {
        let [b, _, h, n] = dims;
        let mut next = seed;
        let mut draw = |shape: [usize; 4]| {
            next += 1;
            random(next, shape, device)
        };
        let w = draw(dims).mul_scalar(0.45).add_scalar(w_low + 0.225);
        [
            draw(dims),
            w,
            draw(dims),
            draw(dims),
            draw(dims),
            draw(dims),
            draw([b, h, n, n]),
        ]
    }

    fn max_abs(t: Tensor<4>) -> f32 {
        t.abs().max().into_scalar::<f32>()
    }

    /// `a` and `b` agree within `tol` relative to `b`'s largest entry.
    fn assert_near(what: &str, a: Tensor<4>, b: Tensor<4>, tol: f32) {
        assert_eq!(a.dims(), b.dims(), "{what}: shapes differ");
        let (diff, scale) = (max_abs_diff(a, b.clone()), max_abs(b).max(1e-6));
        assert!(
            diff <= tol * scale,
            "{what}: differs by {diff:e} (largest entry {scale:e}, tolerance {tol:e} relative)"
        );
    }

    fn dispatch<const D: usize>(t: &Tensor<D>) -> FloatTensor<Dispatch> {
        t.clone().into_dispatch()
    }

    fn tensor<const D: usize>(t: FloatTensor<Dispatch>) -> Tensor<D> {
        Tensor::from_dispatch(t)
    }

    /// The backend's kernels (Flex here) against the reference bodies (the op under autodiff
    /// against the per-token loop is in `tests/kernels.rs`, on Flex and on WGPU), forward (outputs, final state, checkpoints, `sa`) and
    /// backward (all seven gradients), for ragged chunks (10 tokens in chunks of 3), one chunk
    /// longer than the sequence, chunks of one token, a head size that is not a multiple of the
    /// kernel's 8 lanes, and decays down to 0.01 (the backward recomputes states, it never
    /// divides by `w`). Both sum the same O(1) terms in different orders over at most 33 steps:
    /// f32 rounding, 1e-5 of the largest entry.
    #[test]
    fn kernels_match_the_reference_bodies_forward_and_backward() {
        let device = Device::default();
        let cases = [
            ([2, 10, 3, 5], 3, 0.5),
            ([1, 10, 2, 8], 16, 0.5),
            ([2, 7, 1, 4], 1, 0.01),
            ([1, 33, 2, 16], 16, 0.01),
        ];
        for (case, (dims, chunk_len, w_low)) in cases.into_iter().enumerate() {
            let [r, w, k, v, a, b, s] = inputs(dims, w_low, 10 * case as u64, &device);
            let ins = [&r, &w, &k, &v, &a, &b, &s].map(dispatch);
            let [r0, w0, k0, v0, a0, b0, s0] = ins.clone();
            let expected = reference::forward::<Dispatch>(r0, w0, k0, v0, a0, b0, s0, chunk_len);
            let [r1, w1, k1, v1, a1, b1, s1] = ins;
            let actual =
                <Dispatch as Wkv7Ops>::wkv7_forward_saving(r1, w1, k1, v1, a1, b1, s1, chunk_len);
            let label = |what: &str| format!("case {case} {dims:?}/{chunk_len}: {what}");
            assert_near(
                &label("y"),
                tensor(actual.0),
                tensor(expected.0.clone()),
                1e-5,
            );
            assert_near(&label("state"), tensor(actual.1), tensor(expected.1), 1e-5);
            let checkpoints: Tensor<5> = tensor(actual.2);
            let expected_checkpoints: Tensor<5> = tensor(expected.2.clone());
            assert_eq!(checkpoints.dims(), expected_checkpoints.dims());
            assert_near(
                &label("checkpoints"),
                checkpoints.flatten(0, 1),
                expected_checkpoints.flatten(0, 1),
                1e-5,
            );
            assert_near(
                &label("sa"),
                tensor(actual.3),
                tensor(expected.3.clone()),
                1e-5,
            );

            let grad_y = random(1000 + case as u64, dims, &device);
            let grad_s = random(2000 + case as u64, s.dims(), &device);
            let backward = |kernel: bool| {
                let [r, w, k, v, a, b] = [&r, &w, &k, &v, &a, &b].map(dispatch);
                let (cp, sa) = (expected.2.clone(), expected.3.clone());
                let (gy, gs) = (dispatch(&grad_y), dispatch(&grad_s));
                let g = match kernel {
                    true => <Dispatch as Wkv7Ops>::wkv7_backward(
                        r, w, k, v, a, b, cp, sa, gy, gs, chunk_len,
                    ),
                    false => reference::backward::<Dispatch>(
                        [r, w, k, v, a, b],
                        cp,
                        sa,
                        gy,
                        gs,
                        chunk_len,
                    ),
                };
                [g.0, g.1, g.2, g.3, g.4, g.5, g.6].map(tensor::<4>)
            };
            let names = ["δr", "δw", "δk", "δv", "δα", "δβ", "δstate"];
            for ((name, got), want) in names.iter().zip(backward(true)).zip(backward(false)) {
                assert_near(&label(name), got, want, 1e-5);
            }
        }
    }
}
