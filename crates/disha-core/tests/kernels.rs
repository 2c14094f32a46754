//! The fused block-affine ops ([`disha_core::kernels`]) against the plain tensor-op formulation.
//!
//! The ops run on `Device::default()` (CubeCL kernels on WGPU / CUDA when the crate is built with
//! `--features wgpu` / `cuda`, the reference bodies with the hand-written backward on Flex); the
//! reference always runs on Flex with Burn's own autodiff: Bone as `x·W + S(x̃)·B`
//! ([`BoneAdapter::add_to_output`]), BAT as `x·T_D(W)` with `W'` materialized
//! ([`reference_block_affine_linear`]). Forward outputs and the gradients of `x` and of the
//! adapter must agree.
//!
//! Every case runs both ways the ops can compute on a Cube backend: through the backend's own
//! matmul (BAT's `W'` and `G` in chunks of input blocks) and single-pass, in CubeK's matmul with
//! `W'` formed as it is read (on Flex both are the same bodies). On Cube backends the single-pass
//! cases must not have fallen back to the bodies ([`single_pass_fallbacks`]), which compute the
//! same values. Shapes are ragged on purpose: `in % r ≠ 0` for Bone, sizes that are not multiples
//! of any tile, and `out` / `r` chosen so that CubeK reads the weight in vectors of 1, 2 and 4
//! elements; one BAT shape has enough input blocks (and weight elements) to take several chunks.
//!
//! Tolerance: every value is a sum of at most ~1000 products of O(1) f32 numbers, in a different
//! order on each side; the f32 rounding of such sums is ~1e-6 relative, so agreement within
//! `2e-5 · (1 + max |reference|)` is tight enough to catch any wrong element (a wrong block, a
//! missing transpose or a dropped term changes results by O(0.1)) and loose enough for
//! summation order.

use burn::nn::DropoutConfig;
use burn::tensor::{DType, Device, Tensor, TensorData};
use disha_core::kernels::{bat_linear_with, bone_linear_with, single_pass_fallbacks};
use disha_core::{BatAdapter, BatOrientation, BoneAdapter, reference_block_affine_linear};

/// The tests of this file run one at a time: the memory test reads the device's pool, which is
/// shared by the whole process, so another test's allocations in flight would be counted as
/// this one's (seen: a materializing forward measured at 12.5 MB instead of 16.8 MB).
static DEVICE: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Takes the device for one test (a panicking test does not poison it for the others).
fn exclusive_device() -> std::sync::MutexGuard<'static, ()> {
    DEVICE
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// SplitMix64 values in `[-0.5, 0.5)`.
fn values(seed: u64, n: usize) -> Vec<f32> {
    let mut state = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|_| {
            state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            let mut z = state;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            z ^= z >> 31;
            (z >> 40) as f32 / (1u64 << 24) as f32 - 0.5
        })
        .collect()
}

fn tensor<const D: usize>(seed: u64, shape: [usize; D], device: &Device) -> Tensor<D> {
    let n = shape.iter().product();
    Tensor::from_data(TensorData::new(values(seed, n), shape), device)
}

fn host<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().try_to_vec_as::<f32>().expect("f32 data")
}

/// Fails with the largest difference when `actual` and `expected` disagree beyond the tolerance
/// in the module docs.
fn assert_agree(what: &str, actual: Vec<f32>, expected: Vec<f32>) {
    assert_eq!(actual.len(), expected.len(), "{what}: lengths differ");
    let scale = expected.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    let (worst, at) = actual
        .iter()
        .zip(&expected)
        .enumerate()
        .map(|(i, (a, e))| ((a - e).abs(), i))
        .fold((0.0f32, 0), |acc, x| if x.0 > acc.0 { x } else { acc });
    let tol = 2e-5 * (1.0 + scale);
    assert!(
        worst <= tol,
        "{what}: max |diff| {worst:e} at {at} (actual {}, expected {}) exceeds {tol:e}",
        actual[at],
        expected[at]
    );
}

/// What one side computes: `y`, `∂L/∂x` (if `x` is tracked) and `∂L/∂adapter`, for
/// `L = Σ y ⊙ c` with a fixed random cotangent `c`.
struct Outcome {
    y: Vec<f32>,
    grad_x: Option<Vec<f32>>,
    grad_adapter: Vec<f32>,
}

struct Case {
    m: usize,
    d_input: usize,
    d_output: usize,
    r: usize,
    track_x: bool,
}

impl Case {
    fn label(&self, method: &str) -> String {
        format!(
            "{method} M={} in={} out={} r={} (x tracked: {})",
            self.m, self.d_input, self.d_output, self.r, self.track_x
        )
    }
}

/// Runs `forward(x, W, adapter)` on `device` (autodiff) and collects the [`Outcome`].
fn run<const A: usize>(
    case: &Case,
    device: &Device,
    adapter_shape: [usize; A],
    forward: impl Fn(Tensor<2>, Tensor<2>, Tensor<A>) -> Tensor<2>,
) -> Outcome {
    let device = device.clone().autodiff();
    let x = tensor(1, [case.m, case.d_input], &device);
    let x = if case.track_x { x.require_grad() } else { x };
    let weight = tensor(2, [case.d_input, case.d_output], &device);
    let adapter = tensor(3, adapter_shape, &device)
        .mul_scalar(0.5)
        .require_grad();
    let cotangent = tensor(4, [case.m, case.d_output], &device);
    let y = forward(x.clone(), weight, adapter.clone());
    let grads = (y.clone() * cotangent).sum().backward();
    Outcome {
        y: host(y),
        grad_x: case
            .track_x
            .then(|| host(x.grad(&grads).expect("x is tracked"))),
        grad_adapter: host(adapter.grad(&grads).expect("the adapter is tracked")),
    }
}

/// Whether this build runs the ops on a Cube backend (where `single_pass` is honoured).
const CUBE: bool = cfg!(any(feature = "wgpu", feature = "cuda"));

/// Fails if a single-pass product since `before` ran the op body instead of CubeK's matmul.
fn assert_no_fallback(label: &str, before: usize) {
    let fallbacks = single_pass_fallbacks() - before;
    assert!(
        !CUBE || fallbacks == 0,
        "{label}: {fallbacks} single-pass products fell back to the op bodies"
    );
}

fn compare(label: &str, actual: Outcome, expected: Outcome) {
    assert_agree(&format!("{label}: y"), actual.y, expected.y);
    match (actual.grad_x, expected.grad_x) {
        (Some(a), Some(e)) => assert_agree(&format!("{label}: dL/dx"), a, e),
        (None, None) => {}
        _ => panic!("{label}: only one side has dL/dx"),
    }
    assert_agree(
        &format!("{label}: dL/dadapter"),
        actual.grad_adapter,
        expected.grad_adapter,
    );
}

#[test]
fn bone_forward_and_gradients_match_the_reference() {
    let _device = exclusive_device();
    let cases = [
        // in % r = 1 (padded last shard), everything smaller than one tile.
        Case {
            m: 37,
            d_input: 45,
            d_output: 70,
            r: 4,
            track_x: true,
        },
        // Several tiles in every direction, in % r = 4, ragged edges.
        Case {
            m: 130,
            d_input: 100,
            d_output: 150,
            r: 16,
            track_x: true,
        },
        // The first layer of a model: x is not tracked, only B gets a gradient.
        Case {
            m: 65,
            d_input: 48,
            d_output: 33,
            r: 8,
            track_x: false,
        },
        // out % 4 = 0: the weight view is read in vectors of 4.
        Case {
            m: 50,
            d_input: 72,
            d_output: 96,
            r: 12,
            track_x: true,
        },
    ];
    for (case, single_pass) in cases.iter().flat_map(|c| [(c, false), (c, true)]) {
        let label = case.label(&format!("Bone (single pass: {single_pass})"));
        let shape = [case.r, case.d_output];
        let before = single_pass_fallbacks();
        let actual = run(case, &Device::default(), shape, |x, w, b| {
            bone_linear_with(x, w, b, single_pass)
        });
        assert_no_fallback(&label, before);
        let expected = run(case, &Device::flex(), shape, |x, w, b| {
            let adapter = BoneAdapter::new(b, DropoutConfig::new(0.0).init());
            adapter.add_to_output(x.clone(), x.matmul(w))
        });
        compare(&label, actual, expected);
    }
}

#[test]
fn bat_forward_and_gradients_match_the_reference() {
    let _device = exclusive_device();
    let cases = [
        Case {
            m: 37,
            d_input: 48,
            d_output: 80,
            r: 8,
            track_x: true,
        },
        Case {
            m: 70,
            d_input: 192,
            d_output: 144,
            r: 16,
            track_x: true,
        },
        // Above 1 Mi weight elements: W' and the block gradient are formed in 4 chunks.
        Case {
            m: 33,
            d_input: 1024,
            d_output: 1040,
            r: 16,
            track_x: true,
        },
        Case {
            m: 21,
            d_input: 30,
            d_output: 12,
            r: 3,
            track_x: false,
        },
        // r = 6: a vector may not straddle two blocks, so vectors of 2 although out % 4 = 0.
        Case {
            m: 45,
            d_input: 24,
            d_output: 36,
            r: 6,
            track_x: true,
        },
    ];
    for (case, single_pass) in cases.iter().flat_map(|c| [(c, false), (c, true)]) {
        let label = case.label(&format!("BAT (single pass: {single_pass})"));
        let shape = [case.d_output / case.r, case.r, case.r];
        let before = single_pass_fallbacks();
        let actual = run(case, &Device::default(), shape, |x, w, d| {
            bat_linear_with(x, w, d, single_pass)
        });
        assert_no_fallback(&label, before);
        let expected = run(case, &Device::flex(), shape, |x, w, d| {
            let adapter = BatAdapter::new(d, BatOrientation::Peft);
            reference_block_affine_linear(x, w, None, &adapter)
        });
        compare(&label, actual, expected);
    }
}

/// A weight stored in another dtype than the activations (an f16 base under f32 adapters): the
/// adapted-weight view reads both with one element type, so CubeK's route declines it and the
/// product runs in the op body — still correct, and counted by [`single_pass_fallbacks`]
/// (exactly one fallback per product on a Cube backend, none on Flex, which has no CubeK route).
#[test]
fn a_weight_in_another_dtype_falls_back_to_the_body_and_is_counted() {
    let _device = exclusive_device();
    let device = Device::default();
    if !device.supports_dtype(DType::F16) {
        println!("skipped: {device:?} has no f16 tensors");
        return;
    }
    let (m, d_input, d_output, r) = (33, 40, 24, 4);
    let x = tensor(1, [m, d_input], &device);
    let weight = tensor(2, [d_input, d_output], &device).cast(DType::F16);
    let block = tensor(3, [r, d_output], &device).mul_scalar(0.5);
    let before = single_pass_fallbacks();
    let y = bone_linear_with(x.clone(), weight.clone(), block.clone(), true);
    let fallbacks = single_pass_fallbacks() - before;
    assert_eq!(
        fallbacks,
        usize::from(CUBE),
        "fallbacks counted for one product"
    );

    let flex = Device::flex();
    let upcast = |t: Tensor<2>| Tensor::<2>::from_data(t.cast(DType::F32).into_data(), &flex);
    let adapter = BoneAdapter::new(upcast(block), DropoutConfig::new(0.0).init());
    let x = upcast(x);
    let expected = adapter.add_to_output(x.clone(), x.matmul(upcast(weight)));
    assert_agree(
        "Bone with an f16 weight",
        host(y.cast(DType::F32)),
        host(expected),
    );
}

/// A BAT training step on a 2048 × 2048 layer with 2048 tokens must not keep any `in × out`
/// tensor from forward to backward: right after the forward, the device holds no more than the
/// plain frozen base layer's forward holds (the fused op keeps a handle to `x`, which the caller
/// holds anyway, and `D`), both ways. The materializing reference keeps `W'` (16 MiB) and fails
/// the same bound, which the test checks too, so it cannot pass vacuously. Backends that do not
/// report their memory pools (Flex) skip with a message.
#[test]
fn bat_training_step_keeps_no_weight_sized_tensor() {
    let _device = exclusive_device();
    let device = Device::default().autodiff();
    if device.memory_pool_usage().is_none() {
        eprintln!(
            "skipped: {device:?} does not report memory-pool usage (run with --features wgpu)"
        );
        return;
    }
    let (n, r) = (2048, 16);
    let weight_bytes = (n * n * 4) as i64;
    let x = tensor(1, [n, n], &device).require_grad();
    let weight = tensor(2, [n, n], &device);
    let blocks = tensor(3, [n / r, r, r], &device)
        .mul_scalar(0.1)
        .require_grad();
    let cotangent = tensor(4, [n, n], &device);

    let in_use = |device: &Device| {
        device.sync().expect("device sync");
        device
            .memory_pool_usage()
            .expect("reported above")
            .bytes_in_use as i64
    };
    // Holds what each forward keeps alive until backward (its output and graph).
    let kept_by = |forward: &dyn Fn() -> Tensor<2>| {
        let start = in_use(&device);
        let y = forward();
        let kept = in_use(&device) - start;
        let grads = (y * cotangent.clone()).sum().backward();
        assert!(blocks.grad(&grads).is_some() || x.grad(&grads).is_some());
        kept
    };
    let plain = kept_by(&|| x.clone().matmul(weight.clone()));
    let chunked = kept_by(&|| bat_linear_with(x.clone(), weight.clone(), blocks.clone(), false));
    let single_pass = kept_by(&|| bat_linear_with(x.clone(), weight.clone(), blocks.clone(), true));
    let reference = kept_by(&|| {
        let adapter = BatAdapter::new(blocks.clone(), BatOrientation::Peft);
        reference_block_affine_linear(x.clone(), weight.clone(), None, &adapter)
    });
    let slack = (n / r * r * r * 4) as i64 + (1 << 20);
    eprintln!(
        "kept from forward to backward: plain {plain} B, fused BAT {chunked} B (chunked), \
         {single_pass} B (single pass), materializing BAT {reference} B (one weight = \
         {weight_bytes} B)"
    );
    for (way, kept) in [("chunked", chunked), ("single-pass", single_pass)] {
        assert!(
            kept <= plain + slack,
            "the {way} BAT forward keeps {kept} B, the plain layer {plain} B"
        );
    }
    // Pool accounting rounds to pages; "about one more weight" is 90 % of one.
    assert!(
        reference - plain >= weight_bytes * 9 / 10,
        "the materializing reference should keep W' ({weight_bytes} B) but keeps {reference} B"
    );
}

/// The WKV-7 recurrence one token at a time in plain tensor ops (differentiated by Burn's
/// autodiff): `sa = S·α_t; S ← S ⊙ w_tᵀ + sa·β_tᵀ + v_t·k_tᵀ; y_t = S·r_t`.
fn wkv7_per_token(inputs: [Tensor<4>; 7]) -> (Tensor<4>, Tensor<4>) {
    let [r, w, k, v, alpha, beta, mut s] = inputs;
    let [b, t, h, n] = r.dims();
    let at = |x: &Tensor<4>, i: usize, column: bool| {
        let x = x.clone().narrow(1, i, 1);
        x.reshape(if column { [b, h, n, 1] } else { [b, h, 1, n] })
    };
    let mut ys = Vec::new();
    for i in 0..t {
        let sa = s.clone().matmul(at(&alpha, i, true));
        s = s * at(&w, i, false) + sa * at(&beta, i, false) + at(&v, i, true) * at(&k, i, false);
        ys.push(s.clone().matmul(at(&r, i, true)).reshape([b, 1, h, n]));
    }
    (Tensor::cat(ys, 1), s)
}

/// The fused WKV-7 op ([`disha_core::wkv::wkv7`]: the CubeCL kernels on WGPU / CUDA, the Flex
/// kernel on Flex) against the per-token recurrence on Flex: outputs, final state and the
/// gradients of all seven inputs. Shapes: RWKV-7's head size 64 with a ragged last chunk (37
/// tokens in chunks of 16), several heads and batch rows, one chunk longer than the sequence,
/// chunks of one token, small head sizes. The decay lies in `[0.5, 0.95)` as the model's does;
/// state entries stay O(1)–O(10), so the tolerance of the module docs holds.
#[test]
fn wkv7_forward_and_gradients_match_the_per_token_recurrence() {
    let _device = exclusive_device();
    let cases = [
        ([2, 37, 3, 64], 16),
        ([1, 10, 2, 8], 3),
        ([1, 6, 1, 4], 1),
        ([1, 20, 2, 64], 64),
    ];
    for (case, (dims, chunk_len)) in cases.into_iter().enumerate() {
        let [b, _, h, n] = dims;
        let seed = 100 * case as u64;
        let run = |device: &Device, fused: bool| {
            let device = device.clone().autodiff();
            let leaf = |i: u64, shape: [usize; 4]| tensor(seed + i, shape, &device).require_grad();
            let mut inputs = [0, 1, 2, 3, 4, 5].map(|i| leaf(i, dims)).to_vec();
            inputs[1] = tensor(seed + 1, dims, &device)
                .mul_scalar(0.9)
                .add_scalar(0.725)
                .require_grad();
            inputs.push(leaf(6, [b, h, n, n]));
            let inputs: [Tensor<4>; 7] = inputs.try_into().expect("seven inputs");
            let (y, s) = match fused {
                true => {
                    let [r, w, k, v, a, bb, s] = inputs.clone();
                    disha_core::wkv::wkv7(r, w, k, v, a, bb, s, chunk_len)
                }
                false => wkv7_per_token(inputs.clone()),
            };
            let cy = tensor(seed + 7, dims, &device);
            let cs = tensor(seed + 8, [b, h, n, n], &device);
            let grads = ((y.clone() * cy).sum() + (s.clone() * cs).sum()).backward();
            let mut out = vec![host(y), host(s)];
            out.extend(
                inputs
                    .iter()
                    .map(|x| host(x.grad(&grads).expect("every input is tracked"))),
            );
            out
        };
        let actual = run(&Device::default(), true);
        let expected = run(&Device::flex(), false);
        let names = ["y", "state", "δr", "δw", "δk", "δv", "δα", "δβ", "δstate"];
        for ((name, a), e) in names.iter().zip(actual).zip(expected) {
            assert_agree(&format!("WKV {dims:?} chunk {chunk_len}: {name}"), a, e);
        }
    }
}
