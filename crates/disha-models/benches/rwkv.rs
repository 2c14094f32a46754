//! RWKV-7 on the default device (Flex on a CPU build): prefill (chunked sequence mode) and RNN
//! decode throughput, one training step (forward, causal-LM loss, backward, AdamW) with Bone
//! r16, LoRA r8 and BAT r16 (RWKV-PEFT orientation) on RWKV-PEFT's six projections of every
//! block, and the peak live heap of a prefill and of a training step against sequence length.
//!
//! First the WKV recurrence alone (the fused op against the chunked tensor-op form), then two
//! models: the trained 834K one from `../shared/assets` (skipped without it) and a random
//! RWKV-7 of the 0.1B shape (C 768, 12 layers, 12 heads of 64, vocab 65,536; 191 M parameters).
//! Each timing is the median of `RUNS` runs after one warm-up run; heap numbers come from a
//! counting global allocator (bytes live at the sampled peak, above those live before the call).
//!
//! ```sh
//! cargo xtask bench rwkv          # or: cargo bench -p disha-models --bench rwkv
//! cargo xtask bench rwkv -- wkv   # the WKV section alone
//! ```

use std::hint::black_box;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use burn::optim::{AdamWConfig, GradientsParams};
use burn::tensor::{Device, Int, Tensor, TensorData};
use cap::Cap;
use disha_core::{
    BatOrientation, MissInit, PeftConfig, PeftModelExt, TargetModules,
    freeze_all_but_active_adapters,
};
use disha_models::rwkv::{PROJECTION_NAMES, Rwkv7, RwkvConfig};
use disha_models::{CausalLm, RandomWeights, causal_lm_loss, load_model};

/// Counts live heap bytes (no limit).
#[global_allocator]
static ALLOCATOR: Cap<std::alloc::System> = Cap::new(std::alloc::System, usize::MAX);

/// Peak live heap (MiB) while `f` runs, above what was live before it; sampled every 50 µs by
/// a second thread (a peak shorter than that can be missed).
fn peak_mib(f: impl FnOnce()) -> f64 {
    let before = ALLOCATOR.allocated();
    let running = Arc::new(AtomicBool::new(true));
    let sampler = {
        let running = Arc::clone(&running);
        std::thread::spawn(move || {
            let mut peak = 0;
            while running.load(Ordering::Relaxed) {
                peak = peak.max(ALLOCATOR.allocated());
                std::thread::sleep(Duration::from_micros(50));
            }
            peak
        })
    };
    f();
    let after = ALLOCATOR.allocated();
    running.store(false, Ordering::Relaxed);
    let peak = sampler
        .join()
        .expect("the sampler does not panic")
        .max(after);
    peak.saturating_sub(before) as f64 / (1024.0 * 1024.0)
}

const RUNS: usize = 5;

/// Median seconds of `RUNS` runs of `f`, after one warm-up run.
fn median_secs(mut f: impl FnMut()) -> f64 {
    f();
    let mut times: Vec<f64> = (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            f();
            start.elapsed().as_secs_f64()
        })
        .collect();
    times.sort_by(f64::total_cmp);
    times[RUNS / 2]
}

fn ids(n: usize, vocab: usize, device: &Device) -> Tensor<2, Int> {
    let ids: Vec<i64> = (0..n as i64)
        .map(|i| (i * 7919 + 13) % vocab as i64)
        .collect();
    Tensor::from_data(TensorData::new(ids, [1, n]), device)
}

/// One AdamW training step of `config` on `tokens` tokens: seconds (median) and peak MiB.
fn train_step(base: &CausalLm, config: &PeftConfig, tokens: usize) -> (f64, f64) {
    let mut model = base.clone();
    model
        .add_adapter("default", config)
        .expect("the six projections take every adapter");
    let model = freeze_all_but_active_adapters(model);
    let input = ids(tokens, model.vocab_size(), &model.device());
    let mut state = Some((model, AdamWConfig::new().init()));
    let mut step = || {
        let (model, mut optim) = state.take().expect("state is put back");
        let loss = causal_lm_loss(model.forward(input.clone()), input.clone());
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        state = Some((optim.step(1e-4, model, grads), optim));
    };
    let secs = median_secs(&mut step);
    let mib = peak_mib(step);
    (secs, mib)
}

fn report(name: &str, model: &CausalLm, train_base: &CausalLm, tokens: usize) {
    let device = model.device();
    println!("\n{name}: batch 1, {tokens} tokens, default device");
    println!(
        "{:<52} {:>12} {:>12} {:>10}",
        "case", "median", "tokens/s", "peak MiB"
    );
    let row = |case: &str, secs: f64, n: usize, mib: Option<f64>| {
        println!(
            "{case:<52} {:>10.1}ms {:>12.1} {:>10}",
            secs * 1e3,
            n as f64 / secs,
            mib.map_or_else(|| "-".into(), |m| format!("{m:.1}"))
        )
    };
    let input = ids(tokens, model.vocab_size(), &device);
    let prefill = || {
        let mut state = model.new_decode_state();
        black_box(model.forward_last(input.clone(), &mut state).into_data());
    };
    row(
        &format!("prefill {tokens} tok (last logits)"),
        median_secs(prefill),
        tokens,
        Some(peak_mib(prefill)),
    );
    let mut prefilled = model.new_decode_state();
    model.forward_last(input.clone(), &mut prefilled);
    let next = ids(1, model.vocab_size(), &device);
    let decode = || {
        let mut state = prefilled.clone();
        black_box(model.forward_last(next.clone(), &mut state).into_data());
    };
    row(
        "RNN decode 1 tok",
        median_secs(decode),
        1,
        Some(peak_mib(decode)),
    );
    let six = TargetModules::Names(PROJECTION_NAMES.map(String::from).to_vec());
    for (case, config) in [
        ("Bone r16", PeftConfig::miss(16, six.clone())),
        ("LoRA r8", PeftConfig::lora(8, 16.0, six.clone())),
        (
            "BAT r16 (RWKV-PEFT)",
            PeftConfig::miss_with(16, MissInit::BatRwkv, six.clone()),
        ),
    ] {
        let (secs, mib) = train_step(train_base, &config, tokens);
        row(
            &format!("train step {case} x6 proj (fwd+bwd+AdamW)"),
            secs,
            tokens,
            Some(mib),
        );
    }
    debug_assert!(matches!(
        PeftConfig::miss_with(16, MissInit::BatRwkv, six)
            .spec()
            .method,
        disha_core::AdapterMethod::Bat(BatOrientation::RwkvPeft)
    ));

    println!("\n{name}: peak live heap (MiB) against sequence length");
    println!(
        "{:>8} {:>18} {:>22}",
        "tokens", "prefill", "train step Bone r16"
    );
    let bone = PeftConfig::miss(
        16,
        TargetModules::Names(PROJECTION_NAMES.map(String::from).to_vec()),
    );
    for t in [64, 256, 1024] {
        let input = ids(t, model.vocab_size(), &device);
        let prefill = peak_mib(|| {
            let mut state = model.new_decode_state();
            black_box(model.forward_last(input.clone(), &mut state).into_data());
        });
        let train = if t <= 256 {
            format!("{:.1}", train_step(train_base, &bone, t).1)
        } else {
            "-".into()
        };
        println!("{t:>8} {prefill:>18.1} {train:>22}");
    }
}

fn assets() -> Option<PathBuf> {
    let root = std::env::var_os("DISHA_ASSETS")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(env!("CARGO_MANIFEST_DIR")).join("../../../shared/assets"));
    let path = root.join("rwkv7-834K/model.pth");
    if path.is_file() {
        Some(path)
    } else {
        eprintln!(
            "SKIPPED (834K model): {} not found (set DISHA_ASSETS to the shared assets directory)",
            path.display()
        );
        None
    }
}

/// The RWKV-7 0.1B shape (C 768, 12 layers, heads of 64, vocab 65,536; low-rank widths 64 / 64
/// / 32 / 128), random weights.
fn random_0_1b(device: &Device) -> CausalLm {
    let config = RwkvConfig::rwkv7_0_1b_shape();
    let mut weights = RandomWeights::from_shapes(config.tensor_shapes(), 0.02, 7);
    Rwkv7::from_source(&config, &mut weights, device)
        .expect("random weights fit their own config")
        .into()
}

/// The WKV recurrence alone on the 0.1B shape's heads (12 of 64, batch 1): the fused op
/// (`disha_core::wkv::wkv7`, this backend's kernels) next to the chunked tensor-op form
/// (`wkv7_chunked`, Burn's autodiff), chunks of 16. Forward alone (inference) and forward +
/// backward (a loss over `y` and the final state), median seconds and peak MiB.
fn wkv_report(device: &Device) {
    println!("\nWKV-7 alone: batch 1, 12 heads of 64, chunks of 16, default device");
    println!(
        "{:<40} {:>12} {:>12} {:>10}",
        "case", "median", "tokens/s", "peak MiB"
    );
    for tokens in [128, 1024] {
        let ad = device.clone().autodiff();
        let make = |seed: f32, shape: [usize; 4], lo: f32, hi: f32, device: &Device| {
            let n: usize = shape.iter().product();
            let values: Vec<f32> = (0..n)
                .map(|i| lo + (hi - lo) * (((i as f32 + seed) * 0.618_034).fract()))
                .collect();
            Tensor::<4>::from_data(TensorData::new(values, shape), device)
        };
        let inputs = |device: &Device| {
            let shape = [1, tokens, 12, 64];
            [
                make(0.1, shape, -1.0, 1.0, device),
                make(0.2, shape, 0.55, 0.99, device),
                make(0.3, shape, -1.0, 1.0, device),
                make(0.4, shape, -1.0, 1.0, device),
                make(0.5, shape, -0.125, 0.0, device),
                make(0.6, shape, 0.0, 0.125, device),
                make(0.7, [1, 12, 64, 64], -0.1, 0.1, device),
            ]
        };
        for fused in [false, true] {
            let run = |x: [Tensor<4>; 7]| {
                let [r, w, k, v, a, b, s] = x;
                match fused {
                    true => disha_core::wkv::wkv7(r, w, k, v, a, b, s, 16),
                    false => disha_models::rwkv::wkv7_chunked(r, w, k, v, a, b, s, 16),
                }
            };
            let form = if fused {
                "fused op"
            } else {
                "chunked tensor ops"
            };
            let plain = inputs(device);
            let forward = || {
                let (y, s) = run(plain.clone());
                black_box((y.into_data(), s.into_data()));
            };
            let secs = median_secs(forward);
            let row = |case: String, secs: f64, mib: f64| {
                println!(
                    "{case:<40} {:>10.2}ms {:>12.0} {mib:>10.1}",
                    secs * 1e3,
                    tokens as f64 / secs
                )
            };
            row(
                format!("{form}, {tokens} tok, forward"),
                secs,
                peak_mib(forward),
            );
            let leaves = inputs(&ad).map(|t| t.require_grad());
            let train = || {
                let (y, s) = run(leaves.clone());
                let grads = (y.sum() + s.sum()).backward();
                black_box(leaves[0].grad(&grads).map(|g| g.into_data()));
            };
            let secs = median_secs(train);
            row(
                format!("{form}, {tokens} tok, fwd+bwd"),
                secs,
                peak_mib(train),
            );
        }
    }
}

fn main() {
    let device = Device::default();
    wkv_report(&device);
    // `-- wkv`: the WKV section alone.
    if std::env::args().any(|a| a == "wkv") {
        return;
    }
    if let Some(path) = assets() {
        let model = load_model(&path, &device).expect("834K loads").model;
        let train = load_model(&path, &device.clone().autodiff())
            .expect("834K loads")
            .model;
        report(
            "RWKV-7 834K (trained, C 64, 12 layers)",
            &model,
            &train,
            128,
        );
    }
    let model = random_0_1b(&device);
    let train = random_0_1b(&device.clone().autodiff());
    report(
        "RWKV-7 0.1B shape (random, C 768, 12 layers)",
        &model,
        &train,
        128,
    );
}
