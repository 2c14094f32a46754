//! Fused vs unfused Bone and BAT (forward + backward) against the plain frozen linear layer, on
//! the default device: Flex on a CPU build (reference bodies), the CubeCL kernels on a
//! `--features wgpu` / `cuda` build.
//!
//! Every case runs `y = f(x)` then `(y ⊙ c).sum().backward()` with `x` and the adapter tracked,
//! as inside a network: the plain layer costs its forward GEMM plus the `dX` GEMM
//! (`4·M·in·out` FLOPs); Bone the same plus `O(M·r·out)`; BAT adds the `G = xᵀ·δY` contraction
//! (`6·M·in·out`). GFLOP/s counts those nominal FLOPs. The median of 5 timed runs (after 2
//! warm-up runs, each ended by a device sync) is reported.
//!
//! ```sh
//! cargo xtask bench kernels                      # Flex, small shapes
//! cargo bench -p disha-core --features wgpu --bench kernels
//! DISHA_BENCH_SHAPES=llama2-7b DISHA_BENCH_DTYPE=bf16 ./kernels-bench   # on a GPU
//! ```
//!
//! - `DISHA_BENCH_SHAPES`: `small` (default: 512 tokens, 1024 × 1024 and 1024 × 2816) or
//!   `llama2-7b` (4096 tokens; 4096 × 4096, 4096 × 11008, 11008 × 4096).
//! - `DISHA_BENCH_DTYPE`: `f32` (default), `bf16` or `f16` (all tensors, adapters included).
//! - `DISHA_BENCH_R`: the adapter rank `r` (default 64).

use std::time::{Duration, Instant};

use burn::tensor::{DType, Device, Distribution, Tensor};
use disha_core::kernels::{bat_linear_with, bone_linear_with, single_pass_fallbacks};
use disha_core::{BatAdapter, BatOrientation, BoneAdapter, reference_block_affine_linear};

struct Shape {
    tokens: usize,
    d_input: usize,
    d_output: usize,
}

fn shapes() -> Vec<Shape> {
    let set = std::env::var("DISHA_BENCH_SHAPES").unwrap_or_else(|_| "small".into());
    let make = |tokens, pairs: &[(usize, usize)]| {
        pairs
            .iter()
            .map(|&(d_input, d_output)| Shape {
                tokens,
                d_input,
                d_output,
            })
            .collect()
    };
    match set.as_str() {
        "llama2-7b" => make(4096, &[(4096, 4096), (4096, 11008), (11008, 4096)]),
        "small" => make(512, &[(1024, 1024), (1024, 2816)]),
        other => panic!("DISHA_BENCH_SHAPES={other}: use `small` or `llama2-7b`"),
    }
}

fn dtype() -> DType {
    match std::env::var("DISHA_BENCH_DTYPE").as_deref() {
        Err(_) | Ok("f32") => DType::F32,
        Ok("bf16") => DType::BF16,
        Ok("f16") => DType::F16,
        Ok(other) => panic!("DISHA_BENCH_DTYPE={other}: use f32, bf16 or f16"),
    }
}

/// The benchmarked cases: name, nominal FLOPs as a multiple of `M·in·out`.
const CASES: [(&str, f64); 7] = [
    ("plain x·W (frozen)", 4.0),
    ("Bone op (backend matmul)", 4.0),
    ("Bone op (single pass: CubeK, W' view)", 4.0),
    ("Bone, plain tensor ops (x·W + S·B)", 4.0),
    ("BAT op (backend matmul, chunked W')", 6.0),
    ("BAT op (single pass: CubeK, W' view)", 6.0),
    ("BAT, plain tensor ops (materialized W')", 6.0),
];

fn step(
    case: usize,
    x: &Tensor<2>,
    w: &Tensor<2>,
    block: &Tensor<2>,
    d: &Tensor<3>,
    c: &Tensor<2>,
) {
    let y = match case {
        0 => x.clone().matmul(w.clone()),
        1 => bone_linear_with(x.clone(), w.clone(), block.clone(), false),
        2 => bone_linear_with(x.clone(), w.clone(), block.clone(), true),
        3 => {
            let adapter = BoneAdapter::new(block.clone(), burn::nn::DropoutConfig::new(0.0).init());
            adapter.add_to_output(x.clone(), x.clone().matmul(w.clone()))
        }
        4 => bat_linear_with(x.clone(), w.clone(), d.clone(), false),
        5 => bat_linear_with(x.clone(), w.clone(), d.clone(), true),
        _ => {
            let adapter = BatAdapter::new(d.clone(), BatOrientation::Peft);
            reference_block_affine_linear(x.clone(), w.clone(), None, &adapter)
        }
    };
    let grads = (y * c.clone()).sum().backward();
    std::hint::black_box(grads);
}

fn main() {
    // `cargo bench` passes `--bench`; nothing else is accepted.
    let device = Device::default().autodiff();
    let dtype = dtype();
    let r: usize = std::env::var("DISHA_BENCH_R")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(64);
    println!("device {device:?}, dtype {dtype:?}, r = {r}");
    println!("| M × in × out | case | ms / step | × plain | GFLOP/s |");
    println!("|---|---|---:|---:|---:|");
    for shape in shapes() {
        let random = |dims: [usize; 2], std: f64| {
            Tensor::<2>::random(dims, Distribution::Normal(0.0, std), &device).cast(dtype)
        };
        let x = random([shape.tokens, shape.d_input], 1.0).require_grad();
        let w = random([shape.d_input, shape.d_output], 0.02);
        let c = random([shape.tokens, shape.d_output], 1.0);
        let block = random([r, shape.d_output], 0.01).require_grad();
        let d = Tensor::<3>::random(
            [shape.d_output / r, r, r],
            Distribution::Normal(0.0, 0.01),
            &device,
        )
        .cast(dtype)
        .require_grad();
        let mut plain = None;
        for (case, (name, flops)) in CASES.iter().enumerate() {
            let run = || {
                let start = Instant::now();
                step(case, &x, &w, &block, &d, &c);
                device.sync().expect("device sync");
                start.elapsed()
            };
            let fallbacks_before = single_pass_fallbacks();
            for _ in 0..2 {
                run();
            }
            let mut times: Vec<Duration> = (0..5).map(|_| run()).collect();
            times.sort();
            let median = times[2].as_secs_f64();
            let base = *plain.get_or_insert(median);
            let nominal = flops * (shape.tokens * shape.d_input * shape.d_output) as f64;
            // A single-pass case that CubeK declined ran the op body: say so in its row.
            let fell_back = match single_pass_fallbacks() - fallbacks_before {
                0 => "",
                _ => " (fell back to the body)",
            };
            println!(
                "| {} × {} × {} | {name}{fell_back} | {:.2} | {:.3} | {:.1} |",
                shape.tokens,
                shape.d_input,
                shape.d_output,
                median * 1e3,
                median / base,
                nominal / median / 1e9
            );
        }
    }
}
